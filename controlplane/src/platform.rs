//! The platform: the function store, wired to the proxy's routing table and to the scalers.
//! Every change made through the config file or the API goes through here, one at a time.
//!
//! Each function has one scaler per proxy replica that routes to it, called a lane: the lane
//! `local` scales for the proxy inside this process, and in k8s mode each replica run by
//! `fngate proxy` gets a lane of its own. A replica's lane runs on a mirror of the replica's
//! table, whose pools take the demand and instance load the replica reports.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};
use std::time::Duration;

use fngate_proxy::replica::protocol::{
    FunctionNotice, Report, ReportResponse, RouteEntry, Routes, StartFailureNotice,
};
use fngate_proxy::replica::{EXPIRY, REPORT_INTERVAL, ROUTES_POLL_LIMIT};
use fngate_proxy::{
    Demand, Function, FunctionKey, FunctionKind, FunctionSettings, Instance, Router,
};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::{InstanceBackend, LOCAL_REPLICA};
use crate::error::PlatformError;
use crate::model::{self, FunctionSpec, NamespaceSpec, LATEST};
use crate::quota::Quota;
use crate::scaler::{self, Resolved, ScalerParts, Stop};

/// Longest wait for the scaler to take a replaced version's instances out of routing.
const REPLACE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether a put created a resource or changed an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created,
    Updated,
    Unchanged,
}

/// A function as stored, with its running instances.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionStatus {
    pub spec: FunctionSpec,
    /// Directory the code was used from or unpacked to.
    pub code_dir: PathBuf,
    pub instances: Vec<InstanceStatus>,
}

/// One instance as the scaler sees it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct InstanceStatus {
    pub id: u64,
    /// `starting`, `ready`, `draining` or `failed`.
    pub state: &'static str,
    pub addr: Option<String>,
    pub in_flight: u32,
    /// The proxy replica that routes to the instance; `local` for the proxy of this process.
    pub replica: String,
}

/// A proxy replica as the namespace's status lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub name: String,
    /// Time since the replica's last report or routes poll.
    pub last_seen_ms: u64,
}

/// Settings of the platform itself.
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    /// Directory for unpacked zip packages and instance logs.
    pub function_dir: PathBuf,
    /// URL of the control-plane API (`http://host:port`), the default address node agents
    /// fetch code packages from.
    pub api_url: Option<String>,
}

/// Most proxy replicas one namespace accepts; each costs a pod watch and a scaler per function.
/// Above the largest `proxy_replicas` (100), so a rolling update's new pods and the names still
/// waiting out their expiry fit.
pub const MAX_REPLICAS: usize = 250;

struct FunctionEntry {
    spec: Arc<FunctionSpec>,
    code_dir: PathBuf,
    layers: Option<crate::backend::Layers>,
    resolved: watch::Sender<Resolved>,
    /// One scaler per proxy replica, by replica name.
    lanes: BTreeMap<String, Lane>,
}

/// The scaler of one function for one proxy replica.
struct Lane {
    /// The function in the replica's table: for `local` the proxy's own, else the mirror.
    function: Arc<Function>,
    stop: watch::Sender<Stop>,
    /// The newest generation whose outdated instances the scaler took out of routing.
    applied: watch::Receiver<u64>,
    task: JoinHandle<()>,
    status: Arc<Mutex<Vec<InstanceStatus>>>,
    live: Arc<Mutex<HashMap<u64, Arc<Instance>>>>,
}

/// A proxy replica of a k8s-mode namespace, known from its routes polls and reports.
struct ReplicaEntry {
    /// The control plane's mirror of the replica's table.
    router: Arc<Router>,
    /// Owner id of the pods the replica may route.
    owner: String,
    /// The session id of the process that uses the name, when it sent one.
    session: Option<String>,
    last_seen: Instant,
}

struct NamespaceEntry {
    spec: NamespaceSpec,
    quota: Arc<Quota>,
    /// Local processes, or pods of the bound cluster in k8s mode.
    backend: Arc<dyn InstanceBackend>,
    functions: BTreeMap<String, FunctionEntry>,
    replicas: BTreeMap<String, ReplicaEntry>,
    /// Whether the in-process proxy's lanes keep `min_instances` warm: not when the binding
    /// installs a proxy Deployment, whose replicas then keep them.
    local_keeps_minimum: Arc<std::sync::atomic::AtomicBool>,
}

/// Returns whether the in-process proxy's lanes of a namespace keep the functions' minimum
/// warm.
fn local_keeps_minimum(spec: &NamespaceSpec) -> bool {
    !spec
        .kubernetes
        .as_ref()
        .is_some_and(|binding| binding.install)
}

/// The control plane of one fngate process.
pub struct Platform {
    config: PlatformConfig,
    router: Arc<Router>,
    backend: Arc<dyn InstanceBackend>,
    namespaces: Mutex<BTreeMap<String, NamespaceEntry>>,
    /// Serializes changes, which span awaits (unpacking code, stopping scalers).
    changes: tokio::sync::Mutex<()>,
    instance_ids: Arc<AtomicU64>,
    generations: AtomicU64,
    /// Version of the functions as replicas see them; bumped by every function change. Starts
    /// at the clock's milliseconds, so a replica polling with a version from an earlier run is
    /// given the current routes at once.
    routes_version: watch::Sender<u64>,
}

/// Rejects a binding that would install the system components of a k8s namespace for which
/// another function namespace already installs them: both would apply the same objects, and
/// deleting either would remove the other's node agents.
fn check_install_unshared(
    spec: &NamespaceSpec,
    namespaces: &BTreeMap<String, NamespaceEntry>,
) -> Result<(), PlatformError> {
    let Some(binding) = spec.kubernetes.as_ref().filter(|b| b.install) else {
        return Ok(());
    };
    let other = namespaces.values().find(|entry| {
        entry.spec.name != spec.name
            && entry.spec.kubernetes.as_ref().is_some_and(|other| {
                other.install
                    && other.namespace == binding.namespace
                    && other.kubeconfig == binding.kubeconfig
                    && other.context == binding.context
            })
    });
    match other {
        Some(other) => Err(PlatformError::Conflict(format!(
            "namespace {:?} already installs the system components for k8s namespace {:?} of \
             this cluster; bind {:?} to another k8s namespace, or set install = false on one of \
             them",
            other.spec.name, binding.namespace, spec.name
        ))),
        None => Ok(()),
    }
}

impl Platform {
    pub fn new(
        config: PlatformConfig,
        router: Arc<Router>,
        backend: Arc<dyn InstanceBackend>,
    ) -> Self {
        Platform {
            config,
            router,
            backend,
            namespaces: Mutex::new(BTreeMap::new()),
            changes: tokio::sync::Mutex::new(()),
            instance_ids: Arc::new(AtomicU64::new(1)),
            generations: AtomicU64::new(1),
            routes_version: watch::Sender::new(initial_routes_version()),
        }
    }

    /// Starts removing proxy replicas that stopped reporting; the task ends with the platform.
    pub fn start_replica_expiry(self: &Arc<Self>) {
        let platform: Weak<Platform> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(platform) = platform.upgrade() else {
                    return;
                };
                platform.expire_replicas();
            }
        });
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Creates or changes a namespace. A memory quota below the memory of one of its
    /// functions' instances is rejected, because that function could never start one.
    pub async fn put_namespace(&self, spec: NamespaceSpec) -> Result<Applied, PlatformError> {
        crate::validate::namespace(&spec)?;
        let _change = self.changes.lock().await;
        // `previous` is the backend that a rebind replaces.
        let (rebind, previous) = {
            let namespaces = self.namespaces.lock();
            // Checked before anything changes, so a rejected put leaves the binding as it was.
            if let Some(entry) = namespaces.get(&spec.name) {
                let functions: Vec<&FunctionSpec> =
                    entry.functions.values().map(|f| f.spec.as_ref()).collect();
                crate::validate::quota_fits_functions(&spec, &functions)?;
            }
            check_install_unshared(&spec, &namespaces)?;
            match namespaces.get(&spec.name) {
                Some(entry) if entry.spec.kubernetes != spec.kubernetes => {
                    if entry.backend.update_binding(&spec) {
                        (false, None)
                    } else if !entry.functions.is_empty() {
                        return Err(PlatformError::Conflict(format!(
                            "namespace {:?} has {} functions; changing the cluster, k8s namespace, \
                             function directory or resync interval of its kubernetes binding while \
                             functions run is not supported yet, delete them first",
                            spec.name,
                            entry.functions.len()
                        )));
                    } else {
                        (true, Some(Arc::clone(&entry.backend)))
                    }
                }
                Some(_) => (false, None),
                None => (true, None),
            }
        };
        // Connecting reads the kubeconfig, so it happens before the namespace lock is taken.
        let backend = if rebind {
            Some(self.backend_for(&spec, previous.as_deref()).await?)
        } else {
            None
        };
        let mut namespaces = self.namespaces.lock();
        if let Some(entry) = namespaces.get_mut(&spec.name) {
            if entry.spec == spec {
                return Ok(Applied::Unchanged);
            }
            if let Some(backend) = backend {
                entry.backend = backend;
                // Their watchers belonged to the previous backend; replicas rejoin with their
                // next report.
                entry.replicas.clear();
            }
            let functions: Vec<&FunctionSpec> =
                entry.functions.values().map(|f| f.spec.as_ref()).collect();
            crate::validate::quota_fits_functions(&spec, &functions)?;
            entry.quota.set_limit(spec.memory_quota_mb);
            let keeps = local_keeps_minimum(&spec);
            if entry
                .local_keeps_minimum
                .swap(keeps, std::sync::atomic::Ordering::SeqCst)
                != keeps
            {
                // Wakes the local lanes, which start or retire their minimum.
                for function in entry.functions.values() {
                    if let Some(lane) = function.lanes.get(LOCAL_REPLICA) {
                        lane.function.pool.notify_demand();
                    }
                }
            }
            entry.spec = spec;
            return Ok(Applied::Updated);
        }
        tracing::info!(namespace = %spec.name, memory_quota_mb = spec.memory_quota_mb, "namespace created");
        self.router.add_namespace(&spec.name);
        namespaces.insert(
            spec.name.clone(),
            NamespaceEntry {
                backend: backend.expect("a new namespace gets a backend"),
                quota: Arc::new(Quota::new(spec.memory_quota_mb)),
                local_keeps_minimum: Arc::new(local_keeps_minimum(&spec).into()),
                spec,
                functions: BTreeMap::new(),
                replicas: BTreeMap::new(),
            },
        );
        Ok(Applied::Created)
    }

    /// Returns the backend for a namespace: the local one, or pods of its bound cluster.
    ///
    /// On a rebind, `previous` is the namespace's current backend, and what its binding created
    /// in a cluster is removed. The removal waits until the new binding has connected, so a
    /// rejected binding leaves the previous one intact. It runs before the new binding applies
    /// anything, so objects that both bindings name alike in one cluster end up applied, not
    /// deleted. A failed removal is logged and does not fail the rebind.
    async fn backend_for(
        &self,
        spec: &NamespaceSpec,
        previous: Option<&dyn InstanceBackend>,
    ) -> Result<Arc<dyn InstanceBackend>, PlatformError> {
        match &spec.kubernetes {
            None => {
                if let Some(previous) = previous {
                    previous.unbind().await;
                }
                Ok(Arc::clone(&self.backend))
            }
            Some(binding) => {
                let backend = crate::k8s::KubeBackend::connect(
                    &spec.name,
                    binding,
                    Arc::clone(&self.router),
                    self.config.function_dir.clone(),
                    self.config.api_url.as_deref(),
                )
                .await?;
                if let Some(previous) = previous {
                    previous.unbind().await;
                }
                backend.start_install();
                tracing::info!(namespace = %spec.name, k8s_namespace = %binding.namespace,
                    "namespace bound to a Kubernetes cluster; its instances run as pods");
                Ok(Arc::new(backend))
            }
        }
    }

    /// Deletes an empty namespace.
    pub async fn delete_namespace(&self, name: &str) -> Result<(), PlatformError> {
        let _change = self.changes.lock().await;
        let entry = {
            let mut namespaces = self.namespaces.lock();
            let Some(entry) = namespaces.get(name) else {
                return Err(namespace_not_found(name));
            };
            if !entry.functions.is_empty() {
                return Err(PlatformError::Conflict(format!(
                    "namespace {name:?} still has {} functions; delete them first",
                    entry.functions.len()
                )));
            }
            namespaces.remove(name)
        };
        self.router.remove_namespace(name);
        if let Some(entry) = entry {
            entry.backend.unbind().await;
        }
        tracing::info!(namespace = %name, "namespace deleted");
        Ok(())
    }

    /// Status of a namespace's binding to a cluster; `None` in default mode or when the
    /// namespace does not exist.
    pub fn binding_status(&self, name: &str) -> Option<crate::k8s::install::BindingStatus> {
        let namespaces = self.namespaces.lock();
        namespaces.get(name)?.backend.binding_status()
    }

    /// Returns the proxy replicas of a namespace, by name; empty when it has none or does not
    /// exist.
    pub fn replicas(&self, namespace: &str) -> Vec<ReplicaStatus> {
        let namespaces = self.namespaces.lock();
        let Some(entry) = namespaces.get(namespace) else {
            return Vec::new();
        };
        entry
            .replicas
            .iter()
            .map(|(name, replica)| ReplicaStatus {
                name: name.clone(),
                last_seen_ms: millis(replica.last_seen.elapsed()),
            })
            .collect()
    }

    pub fn namespaces(&self) -> Vec<NamespaceSpec> {
        self.namespaces
            .lock()
            .values()
            .map(|entry| entry.spec.clone())
            .collect()
    }

    /// Creates or changes a function. Its memory is checked against the namespace quota, and
    /// its code resolved (a zip unpacked) and checked for the executable its kind starts, all
    /// before anything changes, so a rejected update leaves the running version untouched.
    pub async fn put_function(&self, mut spec: FunctionSpec) -> Result<Applied, PlatformError> {
        crate::validate::function(&spec)?;
        if spec.kind == model::FunctionKind::Event {
            spec.runtime = Some(spec.event_runtime());
        }
        let _change = self.changes.lock().await;
        {
            let namespaces = self.namespaces.lock();
            let namespace = namespaces
                .get(&spec.namespace)
                .ok_or_else(|| namespace_not_found(&spec.namespace))?;
            crate::validate::memory_within_quota(&spec, &namespace.spec)?;
        }
        let (code_dir, code_digest, layers) = self.resolve_code(&spec).await?;
        let (applied, replaced) =
            self.apply_function(Arc::new(spec), code_dir, code_digest, layers)?;
        if let Some((lanes, generation)) = replaced {
            // Wait until every lane's scaler took the old instances out of routing, so requests
            // sent after this call returns reach the new version.
            let replaced =
                futures_util::future::join_all(lanes.into_iter().map(|mut applied| async move {
                    let _ = applied.wait_for(|applied| *applied >= generation).await;
                }));
            if tokio::time::timeout(REPLACE_WAIT, replaced).await.is_err() {
                tracing::warn!(
                    generation,
                    "scaler did not confirm the function update in time"
                );
            }
        }
        Ok(applied)
    }

    /// Stores a checked function and starts or updates its scalers. When running instances must
    /// be replaced, also returns the lanes' generation channels and the generation to wait for.
    #[allow(clippy::type_complexity)]
    fn apply_function(
        &self,
        spec: Arc<FunctionSpec>,
        code_dir: PathBuf,
        code_digest: Option<String>,
        layers: Option<crate::backend::Layers>,
    ) -> Result<(Applied, Option<(Vec<watch::Receiver<u64>>, u64)>), PlatformError> {
        let key = function_key(&spec);
        let mut namespaces = self.namespaces.lock();
        let namespace = namespaces
            .get_mut(&spec.namespace)
            .ok_or_else(|| namespace_not_found(&spec.namespace))?;

        if let Some(entry) = namespace.functions.get_mut(&spec.name) {
            if *entry.spec == *spec && entry.code_dir == code_dir && entry.layers == layers {
                return Ok((Applied::Unchanged, None));
            }
            let replace = needs_new_instances(&entry.spec, &spec)
                || entry.code_dir != code_dir
                || entry.layers != layers;
            for replica in namespace.replicas.values() {
                replica.router.upsert(key.clone(), settings(&spec));
            }
            self.router.upsert(key, settings(&spec));
            self.routes_version.send_modify(|version| *version += 1);
            let generation = if replace {
                self.generations
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            } else {
                entry.resolved.borrow().generation
            };
            entry.spec = Arc::clone(&spec);
            entry.code_dir = code_dir.clone();
            entry.layers = layers.clone();
            let _ = entry.resolved.send(Resolved {
                spec,
                code_dir,
                code_digest,
                layers,
                generation,
            });
            tracing::info!(function = %entry.spec.name, namespace = %entry.spec.namespace, replace, "function updated");
            let wait = replace.then(|| {
                let lanes = entry.lanes.values().map(|lane| lane.applied.clone());
                (lanes.collect(), generation)
            });
            return Ok((Applied::Updated, wait));
        }

        let function = self.router.upsert(key.clone(), settings(&spec));
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (resolved, _) = watch::channel(Resolved {
            spec: Arc::clone(&spec),
            code_dir: code_dir.clone(),
            code_digest,
            layers: layers.clone(),
            generation,
        });
        let mut lanes = BTreeMap::new();
        let local = self.spawn_lane(namespace, &resolved, function, LOCAL_REPLICA);
        lanes.insert(LOCAL_REPLICA.to_owned(), local);
        for (name, replica) in &namespace.replicas {
            let mirror = replica.router.upsert(key.clone(), settings(&spec));
            lanes.insert(
                name.clone(),
                self.spawn_lane(namespace, &resolved, mirror, name),
            );
        }
        self.routes_version.send_modify(|version| *version += 1);
        tracing::info!(function = %spec.name, namespace = %spec.namespace, kind = ?spec.kind, "function created");
        namespace.functions.insert(
            spec.name.clone(),
            FunctionEntry {
                spec,
                code_dir,
                layers,
                resolved,
                lanes,
            },
        );
        Ok((Applied::Created, None))
    }

    /// Starts the scaler of one function for one proxy replica, on `function`, the function in
    /// the replica's table.
    ///
    /// NOTE: each lane applies the function's `min_instances` and `max_instances` on its own, so
    /// with replicas a function may run up to `max_instances` pods per replica. The namespace's
    /// memory quota is shared by all lanes and bounds the total.
    fn spawn_lane(
        &self,
        namespace: &NamespaceEntry,
        resolved: &watch::Sender<Resolved>,
        function: Arc<Function>,
        replica: &str,
    ) -> Lane {
        let generation = resolved.borrow().generation;
        let (stop, stop_rx) = watch::channel(Stop::No);
        let (applied_tx, applied) = watch::channel(generation);
        let status = Arc::new(Mutex::new(Vec::new()));
        let live = Arc::new(Mutex::new(HashMap::new()));
        let task = tokio::spawn(scaler::run(ScalerParts {
            function: Arc::clone(&function),
            backend: Arc::clone(&namespace.backend),
            quota: Arc::clone(&namespace.quota),
            resolved: resolved.subscribe(),
            stop: stop_rx,
            applied: applied_tx,
            status: Arc::clone(&status),
            live: Arc::clone(&live),
            instance_ids: Arc::clone(&self.instance_ids),
            replica: replica.to_owned(),
            keeps_minimum: if replica == LOCAL_REPLICA {
                Arc::clone(&namespace.local_keeps_minimum)
            } else {
                Arc::new(true.into())
            },
        }));
        Lane {
            function,
            stop,
            applied,
            task,
            status,
            live,
        }
    }

    /// Resolves the function's code and checks that it has the executable the function's kind
    /// starts. Code that fails the check is discarded if this call unpacked it.
    /// Returns the code directory and, for a zip package, its SHA-256.
    #[allow(clippy::type_complexity)]
    async fn resolve_code(
        &self,
        spec: &FunctionSpec,
    ) -> Result<(PathBuf, Option<String>, Option<crate::backend::Layers>), PlatformError> {
        let source = spec.code.clone();
        let layers = spec.layers.clone();
        let function_dir = self.config.function_dir.clone();
        let (namespace, name) = (spec.namespace.clone(), spec.name.clone());
        let (kind, runtime) = (spec.kind, spec.event_runtime());
        tokio::task::spawn_blocking(move || {
            let code = crate::code::resolve(&source, &function_dir, &namespace, &name)?;
            if let Err(error) = crate::code::check_entrypoint(&code.path, &source, kind, runtime) {
                code.discard();
                return Err(error);
            }
            let layers =
                match crate::code::resolve_layers(&layers, &function_dir, &namespace, &name) {
                    Ok(layers) => layers,
                    Err(error) => {
                        code.discard();
                        return Err(error);
                    }
                };
            let layers = layers.map(|layers| crate::backend::Layers {
                dir: layers.path,
                digests: layers.digests,
            });
            Ok((code.path, code.digest, layers))
        })
        .await
        .map_err(|error| PlatformError::Internal(format!("code resolution task failed: {error}")))?
    }

    /// Reads the stored code package with SHA-256 `digest` (64 lowercase hex digits).
    pub async fn package(&self, digest: &str) -> Result<bytes::Bytes, PlatformError> {
        if !crate::code::is_sha256_hex(digest) {
            return Err(PlatformError::invalid(
                "digest",
                format!("expected a SHA-256 as 64 lowercase hex digits, got {digest:?}"),
            ));
        }
        let path = crate::code::package_path(&self.config.function_dir, digest);
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(bytes::Bytes::from(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Err(PlatformError::NotFound {
                    what: format!("package sha256:{digest}"),
                })
            }
            Err(error) => Err(PlatformError::Internal(format!(
                "cannot read package {}: {error}",
                path.display()
            ))),
        }
    }

    /// Deletes a function: waiting requests fail at once; instances drain and stop in the
    /// background.
    pub async fn delete_function(&self, namespace: &str, name: &str) -> Result<(), PlatformError> {
        let _change = self.changes.lock().await;
        let entry = {
            let mut namespaces = self.namespaces.lock();
            let functions = &mut namespaces
                .get_mut(namespace)
                .ok_or_else(|| namespace_not_found(namespace))?
                .functions;
            functions
                .remove(name)
                .ok_or_else(|| function_not_found(namespace, name))?
        };
        let key = function_key(&entry.spec);
        self.router.remove(&key);
        if let Some(namespace) = self.namespaces.lock().get(namespace) {
            for replica in namespace.replicas.values() {
                replica.router.remove(&key);
            }
        }
        self.routes_version.send_modify(|version| *version += 1);
        for lane in entry.lanes.values() {
            let _ = lane.stop.send(Stop::Drain);
        }
        tracing::info!(function = %name, %namespace, "function deleted; draining its instances");
        Ok(())
    }

    pub fn functions(&self, namespace: &str) -> Result<Vec<FunctionStatus>, PlatformError> {
        let namespaces = self.namespaces.lock();
        let entry = namespaces
            .get(namespace)
            .ok_or_else(|| namespace_not_found(namespace))?;
        Ok(entry.functions.values().map(status_of).collect())
    }

    pub fn function(&self, namespace: &str, name: &str) -> Result<FunctionStatus, PlatformError> {
        let namespaces = self.namespaces.lock();
        namespaces
            .get(namespace)
            .ok_or_else(|| namespace_not_found(namespace))?
            .functions
            .get(name)
            .map(status_of)
            .ok_or_else(|| function_not_found(namespace, name))
    }

    /// Records that a proxy replica of `namespace` is alive and returns the owner id of the
    /// pods it may route. A replica seen for the first time joins: it gets a mirror table, a
    /// pod watcher for its pods, and a lane for each function.
    ///
    /// `session` identifies the process. A name in use by another session is rejected until
    /// that session expires, because two proxies routing the same pods would overfill their
    /// slots.
    fn touch_replica(
        &self,
        namespace: &str,
        replica: &str,
        session: Option<&str>,
    ) -> Result<String, PlatformError> {
        check_replica_name(replica)?;
        let mut namespaces = self.namespaces.lock();
        let entry = namespaces
            .get_mut(namespace)
            .ok_or_else(|| namespace_not_found(namespace))?;
        if let Some(known) = entry.replicas.get_mut(replica) {
            match (&known.session, session) {
                (Some(known), Some(session)) if known != session => {
                    return Err(PlatformError::Conflict(format!(
                        "replica name {replica:?} of namespace {namespace:?} is in use by another \
                         fngate proxy process; give each replica its own --replica. If that \
                         process stopped, this one joins once the name expires, {} s after its \
                         last report",
                        EXPIRY.as_secs()
                    )));
                }
                (None, Some(session)) => known.session = Some(session.to_owned()),
                _ => {}
            }
            known.last_seen = Instant::now();
            return Ok(known.owner.clone());
        }
        if entry.replicas.len() >= MAX_REPLICAS {
            return Err(PlatformError::Conflict(format!(
                "namespace {namespace:?} already has {MAX_REPLICAS} proxy replicas; replica \
                 {replica:?} cannot join until one stops reporting"
            )));
        }
        let router = Arc::new(Router::new());
        router.add_namespace(namespace);
        let owner = entry
            .backend
            .add_replica(replica, Arc::clone(&router))
            .map_err(|reason| {
                PlatformError::Conflict(format!("namespace {namespace:?}: {reason}"))
            })?;
        let mut lanes = Vec::new();
        for function in entry.functions.values() {
            let mirror = router.upsert(function_key(&function.spec), settings(&function.spec));
            let lane = self.spawn_lane(entry, &function.resolved, mirror, replica);
            lanes.push((function.spec.name.clone(), lane));
        }
        for (name, lane) in lanes {
            if let Some(function) = entry.functions.get_mut(&name) {
                function.lanes.insert(replica.to_owned(), lane);
            }
        }
        entry.replicas.insert(
            replica.to_owned(),
            ReplicaEntry {
                router,
                owner: owner.clone(),
                session: session.map(str::to_owned),
                last_seen: Instant::now(),
            },
        );
        tracing::info!(%namespace, %replica, "proxy replica joined");
        Ok(owner)
    }

    /// Responds to a replica's routes poll: at once when `after` is not the current version, else
    /// when the functions change or after [`ROUTES_POLL_LIMIT`].
    pub async fn replica_routes(
        &self,
        namespace: &str,
        replica: &str,
        session: Option<&str>,
        after: Option<u64>,
    ) -> Result<Routes, PlatformError> {
        self.touch_replica(namespace, replica, session)?;
        if let Some(after) = after {
            let mut version = self.routes_version.subscribe();
            let changed = version.wait_for(|version| *version != after);
            let _ = tokio::time::timeout(ROUTES_POLL_LIMIT, changed).await;
        }
        // The replica may have expired or the namespace gone while the poll waited.
        let owner = self.touch_replica(namespace, replica, session)?;
        let version = *self.routes_version.borrow();
        let namespaces = self.namespaces.lock();
        let entry = namespaces
            .get(namespace)
            .ok_or_else(|| namespace_not_found(namespace))?;
        let functions = entry
            .functions
            .values()
            .map(|function| RouteEntry::new(&function.spec.name, LATEST, &settings(&function.spec)))
            .collect();
        let binding = entry.spec.kubernetes.as_ref();
        Ok(Routes {
            version,
            owner,
            resync_interval_ms: binding.map_or(0, |binding| binding.resync_interval_ms),
            kube_namespace: binding.map_or_else(String::new, |binding| binding.namespace.clone()),
            functions,
        })
    }

    /// Takes a replica's report: each lane's pool takes the replica's demand for its function
    /// (none when the report leaves the function out), and each instance the reported load.
    /// Responds with the start failures and capacity notes of the replica's lanes.
    pub fn replica_report(
        &self,
        namespace: &str,
        replica: &str,
        session: Option<&str>,
        report: &Report,
    ) -> Result<ReportResponse, PlatformError> {
        self.touch_replica(namespace, replica, session)?;
        let namespaces = self.namespaces.lock();
        let entry = namespaces
            .get(namespace)
            .ok_or_else(|| namespace_not_found(namespace))?;
        let reported: HashMap<(&str, &str), _> = report
            .functions
            .iter()
            .map(|function| {
                (
                    (function.name.as_str(), function.qualifier.as_str()),
                    function,
                )
            })
            .collect();
        let now = Instant::now();
        let mut response = ReportResponse::default();
        for function in entry.functions.values() {
            let Some(lane) = function.lanes.get(replica) else {
                continue;
            };
            let pool = &lane.function.pool;
            let load = reported.get(&(function.spec.name.as_str(), LATEST));
            // Usage first: the demand below wakes the scaler, which then reads both.
            if let Some(load) = load {
                let live = lane.live.lock();
                for instance in &load.instances {
                    if let Some(mirror) = live.get(&instance.id) {
                        let idle_for = Duration::from_millis(instance.idle_ms);
                        mirror.set_reported_usage(instance.in_flight, idle_for);
                        if !instance.routed {
                            mirror.set_reported_unrouted();
                        }
                    }
                }
            }
            pool.set_reported_demand(load.map_or(Demand::default(), |load| Demand {
                in_flight: load.in_flight,
                queued: load.queued,
            }));
            // A failure whose back-off (at first 0.5 s) ended since the replica's last report
            // still has to reach the requests waiting there.
            let start_failure = pool
                .start_failure()
                .filter(|failure| failure.retry_at + 2 * REPORT_INTERVAL > now)
                .map(|failure| StartFailureNotice {
                    reason: failure.reason,
                    retry_in_ms: millis(failure.retry_at.saturating_duration_since(now)),
                    id: failure.id,
                });
            let capacity_note = pool.capacity_note();
            if start_failure.is_some() || capacity_note.is_some() {
                response.functions.push(FunctionNotice {
                    name: function.spec.name.clone(),
                    qualifier: LATEST.to_owned(),
                    start_failure,
                    capacity_note,
                });
            }
        }
        Ok(response)
    }

    /// Removes the replicas that sent nothing for [`EXPIRY`]: their lanes stop at once, which
    /// deletes their pods, and then their pod watchers stop.
    pub fn expire_replicas(&self) {
        let mut namespaces = self.namespaces.lock();
        for (namespace, entry) in namespaces.iter_mut() {
            let gone: Vec<String> = entry
                .replicas
                .iter()
                .filter(|(_, replica)| replica.last_seen.elapsed() > EXPIRY)
                .map(|(name, _)| name.clone())
                .collect();
            for replica in gone {
                entry.replicas.remove(&replica);
                let mut tasks = Vec::new();
                for function in entry.functions.values_mut() {
                    if let Some(lane) = function.lanes.remove(&replica) {
                        let _ = lane.stop.send(Stop::Now);
                        tasks.push(lane.task);
                    }
                }
                tracing::warn!(%namespace, %replica, silent_ms = millis(EXPIRY),
                    "proxy replica stopped reporting; deleting its pods");
                let backend = Arc::clone(&entry.backend);
                tokio::spawn(async move {
                    for task in tasks {
                        let _ = task.await;
                    }
                    backend.remove_replica(&replica);
                });
            }
        }
    }

    /// Stops every scaler and waits until their instances are gone. The in-process proxy's
    /// instances are stopped without draining, so call this after the proxy drained its
    /// connections. Proxy replicas' pods are drained, each for at most its function's timeout
    /// plus 1 s, since the replicas keep forwarding to them.
    pub async fn shutdown(&self) {
        let _change = self.changes.lock().await;
        let tasks: Vec<JoinHandle<()>> = {
            let mut namespaces = self.namespaces.lock();
            let mut tasks = Vec::new();
            for namespace in namespaces.values_mut() {
                namespace.replicas.clear();
                for (_, entry) in std::mem::take(&mut namespace.functions) {
                    for (replica, lane) in entry.lanes {
                        // The replicas still forward requests to their pods, so those drain;
                        // the in-process proxy has drained its connections already.
                        let stop = if replica == LOCAL_REPLICA {
                            Stop::Now
                        } else {
                            Stop::Drain
                        };
                        let _ = lane.stop.send(stop);
                        tasks.push(lane.task);
                    }
                }
            }
            tasks
        };
        for task in tasks {
            let _ = task.await;
        }
        let backends: Vec<Arc<dyn InstanceBackend>> = self
            .namespaces
            .lock()
            .values()
            .map(|namespace| Arc::clone(&namespace.backend))
            .collect();
        for backend in backends {
            backend.settle().await;
        }
    }
}

fn status_of(entry: &FunctionEntry) -> FunctionStatus {
    let mut instances: Vec<InstanceStatus> = entry
        .lanes
        .values()
        .flat_map(|lane| lane.status.lock().clone())
        .collect();
    instances.sort_by_key(|instance| instance.id);
    FunctionStatus {
        spec: FunctionSpec::clone(&entry.spec),
        code_dir: entry.code_dir.clone(),
        instances,
    }
}

fn initial_routes_version() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |since| u64::try_from(since.as_millis()).unwrap_or(1))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Checks a replica name, as [`fngate_proxy::replica::check_name`] does.
fn check_replica_name(replica: &str) -> Result<(), PlatformError> {
    fngate_proxy::replica::check_name(replica)
        .map_err(|message| PlatformError::invalid("replica", message))
}

fn namespace_not_found(name: &str) -> PlatformError {
    PlatformError::NotFound {
        what: format!("namespace {name:?}"),
    }
}

fn function_not_found(namespace: &str, name: &str) -> PlatformError {
    PlatformError::NotFound {
        what: format!("function {name:?} in namespace {namespace:?}"),
    }
}

fn function_key(spec: &FunctionSpec) -> FunctionKey {
    FunctionKey {
        namespace: spec.namespace.clone(),
        name: spec.name.clone(),
        qualifier: LATEST.to_owned(),
    }
}

/// The proxy's view of a function spec.
pub fn settings(spec: &FunctionSpec) -> FunctionSettings {
    FunctionSettings {
        kind: match spec.kind {
            model::FunctionKind::Event => FunctionKind::Event,
            model::FunctionKind::Web => FunctionKind::Web,
        },
        memory_mb: spec.memory_mb,
        timeout: spec.timeout(),
        queue_budget: spec.queue_budget(),
        queue_limit: spec.queue_limit as usize,
        max_body_bytes: spec.max_body_bytes,
        concurrency: spec.concurrency,
    }
}

/// True when running instances cannot serve the new spec and must be replaced.
fn needs_new_instances(old: &FunctionSpec, new: &FunctionSpec) -> bool {
    old.kind != new.kind
        || old.event_runtime() != new.event_runtime()
        || old.code != new.code
        || old.env != new.env
        || old.memory_mb != new.memory_mb
        || old.start_timeout_ms != new.start_timeout_ms
}
