//! The `kube` instance backend: each instance is a pod in the namespace's bound cluster.
//!
//! Starting an instance creates its pod and follows it through the proxy's pod watcher, which
//! routes to the pod as soon as it is ready. A pod whose status shows it cannot run
//! (unschedulable, image not pullable, runtime exited) fails the start with that reason at
//! once. Stopping marks the pod draining first, so every proxy stops routing to it, then
//! deletes it with a grace period, naming its UID so a replacement with the same name is never
//! touched.

pub mod agent;
pub mod install;
pub mod pod;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fngate_proxy::pod_watch::{
    PodState, PodWatcher, WatchConfig, ANNOTATION_DRAINING, ANNOTATION_OWNER, LABEL_MANAGED_BY,
    MANAGED_BY,
};
use fngate_proxy::{Instance, Router};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Api;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::backend::{BoxFuture, InstanceBackend, InstanceFailure, RunningInstance, StartRequest};
use crate::error::PlatformError;
use crate::model::KubeBinding;

/// Maximum wait for a deleted pod to disappear after its grace period.
const DELETE_WAIT_MARGIN: Duration = Duration::from_secs(30);

/// Runs instances as pods of one bound k8s namespace.
pub struct KubeBackend {
    pods: Api<Pod>,
    watcher: PodWatcher,
    /// The control plane's function directory, whose layout the nodes' directory mirrors.
    host_function_dir: PathBuf,
    /// Value of the owner annotation on this backend's pods.
    owner: String,
    client: kube::Client,
    function_namespace: String,
    /// The API listener's URL, the agents' default package source.
    api_url: Option<String>,
    /// The binding in effect and what it installed. A change of placement or images replaces
    /// it in place; new pods follow it.
    current: parking_lot::Mutex<Installation>,
    status: Arc<parking_lot::Mutex<install::BindingStatus>>,
    /// Pod watchers of the proxy replicas, by replica name, each routing the replica's pods
    /// into the control plane's mirror of its table. The replica `local` uses `watcher`.
    replicas: parking_lot::Mutex<std::collections::HashMap<String, PodWatcher>>,
    /// Deletions of pods whose start was abandoned, which [`InstanceBackend::settle`] awaits.
    abandoned: Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

/// A binding with the system objects applied for it and the task that keeps them applied.
struct Installation {
    binding: KubeBinding,
    /// The objects `unbind` removes: those applied for this binding or, after `install` was
    /// turned off in place, those applied for the binding before.
    system_objects: Vec<serde_json::Value>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Installation {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Returns whether two bindings differ only in what applies to new pods and to the system
/// components (placement, images, installation), so a backend can take the change in place.
/// The cluster, the k8s namespace, the function directory and the watcher's resync interval
/// need a new backend.
fn same_connection(old: &KubeBinding, new: &KubeBinding) -> bool {
    old.kubeconfig == new.kubeconfig
        && old.context == new.context
        && old.namespace == new.namespace
        && old.function_dir == new.function_dir
        && old.resync_interval_ms == new.resync_interval_ms
}

impl KubeBackend {
    /// Connects to the binding's cluster and starts the pod watcher, which routes through
    /// `router`. Fails when the kubeconfig cannot be read or names no usable context, or when
    /// the cluster reports the k8s namespace missing. An unreachable API is no reason to fail:
    /// it shows up as watch errors and an unready `/readyz`. The system components are applied
    /// only from [`KubeBackend::start_install`] on.
    pub async fn connect(
        function_namespace: &str,
        binding: &KubeBinding,
        router: Arc<Router>,
        host_function_dir: PathBuf,
        api_url: Option<&str>,
    ) -> Result<KubeBackend, PlatformError> {
        if let Some(kubeconfig) = binding.kubeconfig.as_deref().filter(|p| p.is_relative()) {
            return Err(PlatformError::invalid(
                "kubernetes.kubeconfig",
                format!(
                    "must be an absolute path, got {}; relative paths are only resolved in the platform file",
                    kubeconfig.display()
                ),
            ));
        }
        let client = client(binding).await?;
        check_namespace_exists(&client, &binding.namespace).await?;
        let owner = process_owner().to_owned();
        let watcher = PodWatcher::spawn(
            client.clone(),
            WatchConfig {
                namespace: binding.namespace.clone(),
                resync_interval: Duration::from_millis(binding.resync_interval_ms),
                runtime_port: fngate_proxy::pod_watch::RUNTIME_PORT,
                owner: Some(owner.clone()),
                replica: Some(crate::backend::LOCAL_REPLICA.to_owned()),
                function_namespace: Some(function_namespace.to_owned()),
            },
            router,
        );
        let pods: Api<Pod> = Api::namespaced(client.clone(), &binding.namespace);
        tokio::spawn(delete_orphans(pods.clone(), owner.clone()));

        let status = Arc::new(parking_lot::Mutex::new(
            install::BindingStatus::initializing("applying the system components"),
        ));
        let backend = KubeBackend {
            pods,
            watcher,
            host_function_dir,
            owner,
            client,
            function_namespace: function_namespace.to_owned(),
            api_url: api_url.map(str::to_owned),
            current: parking_lot::Mutex::new(Installation {
                binding: binding.clone(),
                system_objects: Vec::new(),
                task: None,
            }),
            status,
            replicas: parking_lot::Mutex::new(std::collections::HashMap::new()),
            abandoned: Arc::new(parking_lot::Mutex::new(Vec::new())),
        };
        Ok(backend)
    }

    /// Starts keeping the binding's system components applied, when `install` is set, and
    /// reporting the binding's status.
    pub fn start_install(&self) {
        let binding = self.current.lock().binding.clone();
        let installation = self.install(&binding);
        *self.current.lock() = installation;
    }

    /// Starts keeping the binding's system components applied, when `install` is set.
    fn install(&self, binding: &KubeBinding) -> Installation {
        let mut installation = Installation {
            binding: binding.clone(),
            system_objects: Vec::new(),
            task: None,
        };
        let control_plane_url = binding
            .control_plane_url
            .as_deref()
            .or(self.api_url.as_deref());
        let status = match (binding.install, control_plane_url) {
            (false, _) => install::BindingStatus::normal(),
            (true, None) => install::BindingStatus::failed(
                "set kubernetes.control_plane_url: the node agents and proxy pods need the control-plane API's address",
            ),
            (true, Some(url)) => {
                let objects = install::system_objects(&self.function_namespace, binding, url);
                let published = Arc::clone(&self.status);
                installation.task = Some(tokio::spawn(install::run(
                    self.client.clone(),
                    binding.clone(),
                    objects.clone(),
                    Duration::from_millis(binding.resync_interval_ms),
                    move |current| *published.lock() = current,
                )));
                installation.system_objects = objects;
                install::BindingStatus::initializing("applying the system components")
            }
        };
        *self.status.lock() = status;
        installation
    }

    async fn start_pod(
        &self,
        request: StartRequest,
    ) -> Result<Box<dyn RunningInstance>, InstanceFailure> {
        let started = Instant::now();
        let start_timeout = request.function.start_timeout();
        let deadline = started + start_timeout;
        let binding = self.current.lock().binding.clone();
        let code_dir = pod::node_code_dir(&request.code_dir, &self.host_function_dir, &binding);
        let mut pod = pod::runtime_pod(&binding, &request, &code_dir);
        pod.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(ANNOTATION_OWNER.to_owned(), self.owner.clone());
        let name = pod.metadata.name.clone().unwrap_or_default();

        let params = PostParams::default();
        let create = self.pods.create(&params, &pod);
        let created = match tokio::time::timeout_at(deadline, create).await {
            Ok(Ok(created)) => created,
            Ok(Err(error)) => {
                return Err(InstanceFailure::Spawn(format!(
                    "cannot create pod {name} in k8s namespace {}: {}",
                    binding.namespace,
                    describe_error(&error)
                )))
            }
            Err(_) => {
                // The API server may still create the pod. Its name is unique, so it is deleted
                // by name once the server responds again.
                tokio::spawn(delete_abandoned(self.pods.clone(), name.clone()));
                tracing::warn!(pod = %name, "kube API did not respond to the pod create within the start timeout");
                return Err(InstanceFailure::StartTimeout {
                    timeout: start_timeout,
                });
            }
        };
        let Some(uid) = created.metadata.uid else {
            return Err(InstanceFailure::Spawn(format!(
                "the kube API returned pod {name} without a uid"
            )));
        };
        tracing::info!(pod = %name, namespace = %binding.namespace, "runtime pod created");

        let mut guard = DeleteOnDrop {
            pods: Some(self.pods.clone()),
            name: name.clone(),
            uid: uid.clone(),
            pending: Arc::clone(&self.abandoned),
        };
        let followed = if request.replica == crate::backend::LOCAL_REPLICA {
            Some(self.watcher.pod(&uid))
        } else {
            let replicas = self.replicas.lock();
            replicas
                .get(&request.replica)
                .map(|watcher| watcher.pod(&uid))
        };
        let Some(mut state) = followed else {
            // Dropping the guard deletes the pod.
            return Err(InstanceFailure::Spawn(format!(
                "proxy replica {} is gone; pod {name} is deleted",
                request.replica
            )));
        };
        let ready = tokio::time::timeout_at(deadline, wait_routable(&mut state, &name)).await;

        match ready {
            Ok(Ok(instance)) => {
                guard.pods = None;
                Ok(Box::new(KubeInstance {
                    pods: self.pods.clone(),
                    name,
                    uid,
                    instance,
                    boot_time: started.elapsed(),
                    state,
                }))
            }
            Ok(Err(failure)) => Err(failure),
            Err(_) => {
                let waiting = match &*state.borrow() {
                    PodState::Starting {
                        waiting: Some(reason),
                    } => format!("; it was waiting: {reason}"),
                    PodState::Unknown => "; it never appeared in the pod watch".to_owned(),
                    _ => String::new(),
                };
                tracing::warn!(pod = %name, "runtime pod not ready within the start timeout{waiting}");
                // The pod's waiting reason is more useful to the operator than the bare timeout.
                Err(InstanceFailure::Spawn(format!(
                    "pod {name} did not become ready within {}ms{waiting}",
                    start_timeout.as_millis()
                )))
            }
        }
    }
}

impl InstanceBackend for KubeBackend {
    fn start(
        &self,
        request: StartRequest,
    ) -> BoxFuture<'_, Result<Box<dyn RunningInstance>, InstanceFailure>> {
        Box::pin(self.start_pod(request))
    }

    fn binding_status(&self) -> Option<install::BindingStatus> {
        Some(self.status.lock().clone())
    }

    fn add_replica(&self, replica: &str, router: Arc<Router>) -> Result<String, String> {
        let binding = self.current.lock().binding.clone();
        let watcher = PodWatcher::spawn(
            self.client.clone(),
            WatchConfig {
                namespace: binding.namespace.clone(),
                resync_interval: Duration::from_millis(binding.resync_interval_ms),
                runtime_port: fngate_proxy::pod_watch::RUNTIME_PORT,
                owner: Some(self.owner.clone()),
                replica: Some(replica.to_owned()),
                function_namespace: Some(self.function_namespace.clone()),
            },
            router,
        );
        self.replicas.lock().insert(replica.to_owned(), watcher);
        Ok(self.owner.clone())
    }

    fn remove_replica(&self, replica: &str) {
        self.replicas.lock().remove(replica);
    }

    fn settle(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let pending = std::mem::take(&mut *self.abandoned.lock());
            let all = futures_util::future::join_all(pending);
            let _ = tokio::time::timeout(API_CALL_LIMIT, all).await;
        })
    }

    fn update_binding(&self, spec: &crate::model::NamespaceSpec) -> bool {
        let Some(new) = &spec.kubernetes else {
            return false;
        };
        if !same_connection(&self.current.lock().binding, new) {
            return false;
        }
        let mut installation = self.install(new);
        let mut current = self.current.lock();
        // Dropping the previous installation stops its task. The new one applies the same
        // object names, so nothing is removed. A binding that no longer installs leaves the
        // applied objects in the cluster, and keeps their list so that `unbind` removes them.
        if installation.system_objects.is_empty() {
            installation.system_objects = std::mem::take(&mut current.system_objects);
        }
        *current = installation;
        drop(current);
        tracing::info!(k8s_namespace = %new.namespace, "binding changed; new pods follow it");
        true
    }

    fn unbind(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (objects, binding) = {
                let mut current = self.current.lock();
                if let Some(task) = current.task.take() {
                    task.abort();
                }
                (
                    std::mem::take(&mut current.system_objects),
                    current.binding.clone(),
                )
            };
            if objects.is_empty() {
                return;
            }
            let function_namespace = &self.function_namespace;
            let namespace = &binding.namespace;
            let cluster = describe_cluster(&binding);
            let removal = install::remove(&self.client, &objects);
            match tokio::time::timeout(REMOVAL_LIMIT, removal).await {
                Ok(Ok(())) => tracing::info!(namespace = %function_namespace,
                    k8s_namespace = %namespace, %cluster,
                    "removed the binding's system components"),
                Ok(Err(error)) => tracing::warn!(namespace = %function_namespace,
                    k8s_namespace = %namespace, %cluster, error = %error,
                    "cannot remove the binding's system components; delete what remains by hand"),
                Err(_) => tracing::warn!(namespace = %function_namespace,
                    k8s_namespace = %namespace, %cluster, timeout_s = REMOVAL_LIMIT.as_secs(),
                    "kube API did not respond while removing the binding's system components; \
                     delete what remains by hand"),
            }
        })
    }
}

/// Describes the cluster a binding connects to, for logs: the kubeconfig and context, or the
/// in-cluster service account.
fn describe_cluster(binding: &KubeBinding) -> String {
    match (&binding.kubeconfig, &binding.context) {
        (Some(path), Some(context)) => format!("{} context {context}", path.display()),
        (Some(path), None) => format!("{} current context", path.display()),
        (None, _) => "in-cluster service account".to_owned(),
    }
}

/// Builds a client from the binding's kubeconfig, or from the in-cluster service account.
async fn client(binding: &KubeBinding) -> Result<kube::Client, PlatformError> {
    connect(binding.kubeconfig.as_deref(), binding.context.as_deref()).await
}

/// Builds a client from a kubeconfig file and context, or from the in-cluster service account
/// when `kubeconfig` is `None`.
pub async fn connect(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> Result<kube::Client, PlatformError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|error| {
                // kube's own message repeats the path, so only its cause follows.
                let mut cause: &dyn std::error::Error = &error;
                while let Some(source) = cause.source() {
                    cause = source;
                }
                PlatformError::invalid(
                    "kubernetes.kubeconfig",
                    format!("cannot read {}: {cause}", path.display()),
                )
            })?;
            if let Some(context) = context {
                if !kubeconfig.contexts.iter().any(|c| c.name == context) {
                    let known: Vec<&str> = kubeconfig
                        .contexts
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect();
                    return Err(PlatformError::invalid(
                        "kubernetes.context",
                        format!(
                            "context {context:?} is not in {} (it has: {})",
                            path.display(),
                            known.join(", ")
                        ),
                    ));
                }
            }
            let options = KubeConfigOptions {
                context: context.map(str::to_owned),
                ..KubeConfigOptions::default()
            };
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|error| {
                    PlatformError::invalid(
                        "kubernetes.context",
                        format!("cannot use {}: {error}", path.display()),
                    )
                })?
        }
        None => kube::Config::incluster().map_err(|error| {
            PlatformError::invalid(
                "kubernetes.kubeconfig",
                format!("is not set and in-cluster credentials are unavailable: {error}"),
            )
        })?,
    };
    kube::Client::try_from(config)
        .map_err(|error| PlatformError::Internal(format!("cannot build the kube client: {error}")))
}

/// Rejects a binding whose k8s namespace the cluster reports missing. An unreachable or
/// slow API server is not a reason to reject: the watcher retries, and `/readyz` reports it.
async fn check_namespace_exists(client: &kube::Client, name: &str) -> Result<(), PlatformError> {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    match tokio::time::timeout(API_CALL_LIMIT, namespaces.get_opt(name)).await {
        Ok(Ok(None)) => Err(PlatformError::invalid(
            "kubernetes.namespace",
            format!("k8s namespace {name:?} does not exist in the cluster; create it first"),
        )),
        Ok(Ok(Some(_))) => Ok(()),
        Ok(Err(error)) => {
            tracing::warn!(k8s_namespace = name, error = %describe_error(&error),
                "cannot check that the k8s namespace exists");
            Ok(())
        }
        Err(_) => {
            tracing::warn!(
                k8s_namespace = name,
                "kube API did not respond; not checking that the k8s namespace exists"
            );
            Ok(())
        }
    }
}

/// Describes a kube client error in one line: the API server's status code, reason and message
/// for API errors, and the error's own text otherwise.
pub fn describe_error(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            format!("{} {}: {}", status.code, status.reason, status.message)
        }
        other => {
            // kube's own message names only the layer that failed ("client error (Connect)"),
            // so the causes below it follow.
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                if !text.contains(&cause_text) {
                    text.push_str(": ");
                    text.push_str(&cause_text);
                }
                source = cause.source();
            }
            text
        }
    }
}

/// Maximum time a drain mark or a delete request may take before fngate gives up on it, so an
/// unresponsive API server cannot hold up scaling down or shutting down.
const API_CALL_LIMIT: Duration = Duration::from_secs(5);

/// Maximum time for removing a binding's system components, which holds up the namespace's
/// deletion or rebind.
const REMOVAL_LIMIT: Duration = Duration::from_secs(20);

/// Returns the owner id of this process's pods, random per process: a restarted control plane
/// does not route the pods of its previous run, and deletes them.
fn process_owner() -> &'static str {
    static OWNER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    OWNER.get_or_init(|| uuid::Uuid::new_v4().to_string())
}

/// Deletes a pod whose create request timed out, retrying while the API server does not
/// respond, for at most about five minutes.
async fn delete_abandoned(pods: Api<Pod>, name: String) {
    let mut delay = Duration::from_secs(1);
    for _ in 0..8 {
        let attempt = tokio::time::timeout(
            API_CALL_LIMIT,
            pods.delete(&name, &DeleteParams::default().grace_period(0)),
        )
        .await;
        match attempt {
            Ok(Ok(_)) => {
                tracing::info!(pod = %name, "deleted a pod whose create had timed out");
                return;
            }
            Ok(Err(kube::Error::Api(status))) if status.code == 404 => return,
            _ => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    }
    tracing::warn!(pod = %name, "cannot delete a pod whose create had timed out; it may be left running");
}

/// First delay between attempts to list the pods left by earlier control planes.
const ORPHAN_RETRY: Duration = Duration::from_secs(1);
/// Attempts before giving up on that cleanup; the delay doubles up to a minute.
const ORPHAN_ATTEMPTS: u32 = 10;

/// Deletes the runtime pods another control plane created: a previous run of this one that
/// crashed or was killed. They are never routed (the watcher routes only `owner`'s pods), so
/// they would only hold memory. Their requests in flight, if any, get the pods' grace period.
async fn delete_orphans(pods: Api<Pod>, owner: String) {
    let selector = format!("{LABEL_MANAGED_BY}={MANAGED_BY}");
    let mut delay = ORPHAN_RETRY;
    for attempt in 1..=ORPHAN_ATTEMPTS {
        match pods.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => {
                let orphans: Vec<Pod> = list
                    .items
                    .into_iter()
                    .filter(|pod| {
                        let annotations = pod.metadata.annotations.as_ref();
                        annotations.and_then(|a| a.get(ANNOTATION_OWNER)) != Some(&owner)
                    })
                    .collect();
                if !orphans.is_empty() {
                    tracing::info!(
                        count = orphans.len(),
                        "deleting runtime pods left by an earlier fngate control plane"
                    );
                }
                let mut deletions = Vec::new();
                for orphan in orphans {
                    let (Some(name), Some(uid)) = (orphan.metadata.name, orphan.metadata.uid)
                    else {
                        continue;
                    };
                    let grace = orphan
                        .spec
                        .and_then(|spec| spec.termination_grace_period_seconds)
                        .and_then(|seconds| u64::try_from(seconds).ok())
                        .unwrap_or(30);
                    let pods = pods.clone();
                    deletions.push(async move {
                        retire_orphan(&pods, &name, &uid, Duration::from_secs(grace)).await;
                    });
                }
                futures_util::future::join_all(deletions).await;
                return;
            }
            Err(error) => {
                tracing::warn!(attempt, error = %error, retry_in_ms = delay.as_millis() as u64,
                    "cannot list runtime pods to delete those of earlier control planes");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Deletes a pod of an earlier control plane. Proxy replicas may still have requests on it,
/// forwarded before they learned of this control plane. So the pod is marked draining, which
/// takes it out of every proxy's routing, and is deleted with its grace period once its
/// function's timeout (the grace period less the stop margin) has passed.
async fn retire_orphan(pods: &Api<Pod>, name: &str, uid: &str, grace: Duration) {
    let patch = serde_json::json!({
        "metadata": {"annotations": {ANNOTATION_DRAINING: "true"}},
    });
    let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
    let mark = pods.patch(name, &params, &patch);
    if let Ok(Ok(_)) = tokio::time::timeout(API_CALL_LIMIT, mark).await {
        let requests = grace.saturating_sub(Duration::from_secs(pod::STOP_MARGIN_SECS));
        tokio::time::sleep(requests).await;
    }
    delete_pod(pods, name, uid, grace).await;
}

/// Waits until the pod is routable, or fails with the reason its status gives.
async fn wait_routable(
    state: &mut watch::Receiver<PodState>,
    name: &str,
) -> Result<Arc<Instance>, InstanceFailure> {
    loop {
        let current = state.borrow_and_update().clone();
        match current {
            PodState::Routable { instance } => return Ok(instance),
            PodState::Failed(failure) => return Err(start_failure(name, &failure)),
            PodState::Gone | PodState::Deleting | PodState::Unroutable { deleting: true, .. } => {
                return Err(InstanceFailure::Preempted(format!(
                    "pod {name} was deleted before it became ready"
                )))
            }
            PodState::Unknown | PodState::Starting { .. } | PodState::Unroutable { .. } => {}
        }
        if state.changed().await.is_err() {
            return Err(InstanceFailure::Spawn(format!(
                "the pod watcher stopped while pod {name} was starting"
            )));
        }
    }
}

/// Turns a pod failure into the reason the scaler reports to waiting requests.
fn start_failure(name: &str, failure: &fngate_proxy::pod_watch::PodFailure) -> InstanceFailure {
    match failure.exit_code {
        Some(code) => InstanceFailure::Exited {
            what: format!("pod {name}"),
            status: format!("exit code {code} ({})", failure.reason),
            output_tail: failure.message.clone(),
        },
        None if failure.message.is_empty() => {
            InstanceFailure::Spawn(format!("pod {name}: {}", failure.reason))
        }
        None => InstanceFailure::Spawn(format!(
            "pod {name}: {}: {}",
            failure.reason,
            failure.message.trim_end()
        )),
    }
}

/// Deletes a pod whose start was abandoned, unless disarmed by taking `pods`.
struct DeleteOnDrop {
    pods: Option<Api<Pod>>,
    name: String,
    uid: String,
    /// The list that keeps the deletion's task, so shutdown can wait for it.
    pending: Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let Some(pods) = self.pods.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (name, uid) = (self.name.clone(), self.uid.clone());
        let deletion = runtime.spawn(async move {
            delete_pod(&pods, &name, &uid, Duration::ZERO).await;
        });
        let mut pending = self.pending.lock();
        pending.retain(|task| !task.is_finished());
        pending.push(deletion);
    }
}

/// Deletes the pod `name` if it still has `uid`. A pod already gone is not an error. Returns
/// false when the API server did not accept the delete.
async fn delete_pod(pods: &Api<Pod>, name: &str, uid: &str, grace: Duration) -> bool {
    let params = DeleteParams {
        grace_period_seconds: Some(u32::try_from(grace.as_secs()).unwrap_or(u32::MAX)),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match tokio::time::timeout(API_CALL_LIMIT, pods.delete(name, &params)).await {
        Ok(Ok(_)) => {
            tracing::info!(pod = %name, grace_s = grace.as_secs(), "runtime pod deleted");
            true
        }
        Ok(Err(kube::Error::Api(status))) if status.code == 404 || status.code == 409 => true,
        Ok(Err(error)) => {
            tracing::warn!(pod = %name, error = %error, "cannot delete runtime pod");
            false
        }
        Err(_) => {
            tracing::warn!(pod = %name, timeout_s = API_CALL_LIMIT.as_secs(),
                "kube API did not respond to the delete of a runtime pod");
            false
        }
    }
}

/// A ready runtime pod owned by the scaler.
struct KubeInstance {
    pods: Api<Pod>,
    name: String,
    uid: String,
    instance: Arc<Instance>,
    boot_time: Duration,
    state: watch::Receiver<PodState>,
}

impl RunningInstance for KubeInstance {
    fn addr(&self) -> std::net::SocketAddr {
        self.instance.addr()
    }

    fn boot_time(&self) -> Duration {
        self.boot_time
    }

    fn routed(&self) -> Option<Arc<Instance>> {
        Some(Arc::clone(&self.instance))
    }

    fn exited(&self) -> BoxFuture<'_, InstanceFailure> {
        let mut state = self.state.clone();
        Box::pin(async move {
            loop {
                let failure = match &*state.borrow_and_update() {
                    PodState::Failed(failure) => Some(start_failure(&self.name, failure)),
                    PodState::Gone => Some(InstanceFailure::Spawn(format!(
                        "pod {} was deleted",
                        self.name
                    ))),
                    PodState::Unroutable { deleting: true, .. } => Some(InstanceFailure::Spawn(
                        format!("pod {} is being deleted by someone else", self.name),
                    )),
                    _ => None,
                };
                if let Some(failure) = failure {
                    return failure;
                }
                if state.changed().await.is_err() {
                    // The watcher stopped: the namespace is going away. Never resolve, so the
                    // scaler's shutdown decides what happens to the pod.
                    std::future::pending::<()>().await;
                }
            }
        })
    }

    fn drain(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let patch = serde_json::json!({
                "metadata": {"annotations": {ANNOTATION_DRAINING: "true"}},
            });
            let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
            let mark = self.pods.patch(&self.name, &params, &patch);
            match tokio::time::timeout(API_CALL_LIMIT, mark).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(pod = %self.name, error = %error, "cannot mark runtime pod draining")
                }
                Err(_) => {
                    tracing::warn!(pod = %self.name, "kube API did not respond to the draining mark")
                }
            }
        })
    }

    fn stop(&self, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if !delete_pod(&self.pods, &self.name, &self.uid, grace).await {
                // Waiting for the pod to go would only wait for the API server.
                return;
            }
            let mut state = self.state.clone();
            let gone = state.wait_for(|s| matches!(s, PodState::Gone));
            if tokio::time::timeout(grace + DELETE_WAIT_MARGIN, gone)
                .await
                .is_err()
            {
                tracing::warn!(pod = %self.name, "runtime pod still present after its grace period");
            }
        })
    }
}
