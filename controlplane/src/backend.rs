//! The seam between the scaler and whatever runs instances: local processes in default mode,
//! pods in k8s mode. The scaler decides how many instances a function needs; a backend only
//! starts one, reports when it exits, and stops it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::model::FunctionSpec;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub use fngate_proxy::pod_watch::LOCAL_REPLICA;

/// Input a backend needs to start one instance.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// Never reused within one control plane process; names the instance in logs and files.
    pub instance_id: u64,
    pub function: Arc<FunctionSpec>,
    /// The function's code, already unpacked.
    pub code_dir: PathBuf,
    /// SHA-256 of the code package (64 hex digits); `None` for a directory source. In k8s
    /// mode the node agent fetches the package by it.
    pub code_digest: Option<String>,
    /// The proxy replica that routes to the instance; [`LOCAL_REPLICA`] for the proxy inside
    /// this process. k8s mode labels the pod with it.
    pub replica: String,
    /// The function's layers, merged into one directory; `None` without layers.
    pub layers: Option<Layers>,
}

/// A function's layers as resolved on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layers {
    /// The directory with the merged layers, which instances find in `FNGATE_LAYER_DIR`.
    pub dir: PathBuf,
    /// SHA-256 of each layer's package, in the function's order.
    pub digests: Vec<String>,
}

impl StartRequest {
    /// Returns the variables every instance gets from the platform, whatever its backend: SCF's
    /// `SCF_*` description of the function and fngate's instance id.
    pub fn platform_env(&self) -> [(&'static str, String); 6] {
        let spec = &self.function;
        [
            ("SCF_FUNCTIONNAME", spec.name.clone()),
            ("SCF_NAMESPACE", spec.namespace.clone()),
            ("SCF_FUNCTIONVERSION", crate::model::LATEST.to_owned()),
            ("SCF_MEMSIZE", spec.memory_mb.to_string()),
            ("SCF_TIMEOUT", spec.timeout_ms.to_string()),
            ("FNGATE_INSTANCE_ID", self.instance_id.to_string()),
        ]
    }
}

/// Reason an instance failed to start or stopped on its own.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InstanceFailure {
    /// The process exited; `status` is its exit status as text ("exit status 1", "signal 9"),
    /// `output_tail` its last output lines.
    #[error("{what} exited with {status}{}", tail_suffix(output_tail))]
    Exited {
        what: String,
        status: String,
        output_tail: String,
    },
    /// The instance did not become ready within the start timeout.
    #[error("instance did not become ready within {}ms", timeout.as_millis())]
    StartTimeout { timeout: Duration },
    /// The instance could not be created at all (missing or non-executable bootstrap, spawn
    /// error, no free port).
    #[error("{0}")]
    Spawn(String),
    /// Something outside fngate removed the instance while it started, such as a pod deleted
    /// or evicted during a node drain. Not a fault of the function: the scaler starts a
    /// replacement without backing off.
    #[error("{0}")]
    Preempted(String),
}

/// Formats the output tail for `Display` on one line, its lines joined with " | " and blank
/// lines left out, so a failure stays one log event.
fn tail_suffix(tail: &str) -> String {
    let lines: Vec<&str> = tail
        .lines()
        .map(str::trim_end)
        .filter(|line| !line.is_empty())
        .collect();
    if lines.is_empty() {
        String::new()
    } else {
        format!("; last output: {}", lines.join(" | "))
    }
}

/// Starts and stops instances for the scaler.
pub trait InstanceBackend: Send + Sync + 'static {
    /// Starts an instance and resolves once its port answers (ready) or once it failed.
    ///
    /// Called by the scaler for each instance it adds. Cancel-safe: dropping the future before it
    /// resolves kills whatever was started.
    fn start(
        &self,
        request: StartRequest,
    ) -> BoxFuture<'_, Result<Box<dyn RunningInstance>, InstanceFailure>>;

    /// Status of the namespace's binding to a cluster; `None` for a backend without one.
    fn binding_status(&self) -> Option<crate::k8s::install::BindingStatus> {
        None
    }

    /// Takes a changed namespace spec in place, if the backend can: a k8s-mode binding whose
    /// placement or images changed but not its cluster. New instances follow the change.
    /// Returns false when the change needs a new backend.
    fn update_binding(&self, _spec: &crate::model::NamespaceSpec) -> bool {
        false
    }

    /// Starts routing the pods of proxy replica `replica` into `router`, the control plane's
    /// mirror of the replica's table, so that the replica's scalers see its instances. Returns
    /// the owner id of this backend's pods, which the replica's own pod watcher filters on, or
    /// why the backend has no proxy replicas.
    fn add_replica(
        &self,
        _replica: &str,
        _router: Arc<fngate_proxy::Router>,
    ) -> Result<String, String> {
        Err(
            "proxy replicas serve k8s-mode namespaces only; this namespace runs its instances \
             as local processes behind the proxy of fngate serve"
                .to_owned(),
        )
    }

    /// Stops routing the pods of a replica that `add_replica` added.
    fn remove_replica(&self, _replica: &str) {}

    /// Waits, for a bounded time, until the deletions of instances whose start was abandoned
    /// have been sent, so a process that exits next leaves none running.
    fn settle(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// Removes what binding the namespace created outside fngate, such as its system
    /// components in the cluster. Called when the namespace is deleted, and when a change of
    /// its binding replaces this backend with another.
    fn unbind(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// A started, ready instance owned by the scaler.
pub trait RunningInstance: Send + Sync {
    /// Address the proxy forwards to.
    fn addr(&self) -> SocketAddr;

    /// Time from the start request until the instance's port answered.
    fn boot_time(&self) -> Duration;

    /// Resolves when the instance exits without having been asked to stop. Cancel-safe, so the
    /// scaler can call it in a `select!` loop.
    fn exited(&self) -> BoxFuture<'_, InstanceFailure>;

    /// Returns the instance object when the backend's route source already routes it (in k8s
    /// mode the proxy's pod watcher does). The scaler then uses it instead of making one, and does not
    /// add it to the pool itself.
    fn routed(&self) -> Option<Arc<fngate_proxy::Instance>> {
        None
    }

    /// Tells every route source to stop sending new requests here, ahead of `stop`. The
    /// scaler has already taken the instance out of its own pool.
    fn drain(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// Stops the instance: SIGTERM (or pod deletion), then a forced kill once `grace` passed.
    /// Resolves when it is gone. Calling it after the instance exited returns at once.
    fn stop(&self, grace: Duration) -> BoxFuture<'_, ()>;
}
