//! The platform in default mode: the function store, wired to the proxy's routing table and to
//! one scaler per function. Every change made through the config file or the API goes through
//! here, one at a time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use fngate_proxy::{FunctionKey, FunctionKind, FunctionSettings, Router};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backend::InstanceBackend;
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

struct FunctionEntry {
    spec: Arc<FunctionSpec>,
    code_dir: PathBuf,
    resolved: watch::Sender<Resolved>,
    stop: watch::Sender<Stop>,
    /// The newest generation whose outdated instances the scaler took out of routing.
    applied: watch::Receiver<u64>,
    task: JoinHandle<()>,
    status: Arc<Mutex<Vec<InstanceStatus>>>,
}

struct NamespaceEntry {
    spec: NamespaceSpec,
    quota: Arc<Quota>,
    /// Local processes, or pods of the bound cluster in k8s mode.
    backend: Arc<dyn InstanceBackend>,
    functions: BTreeMap<String, FunctionEntry>,
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
        }
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
            }
            let functions: Vec<&FunctionSpec> =
                entry.functions.values().map(|f| f.spec.as_ref()).collect();
            crate::validate::quota_fits_functions(&spec, &functions)?;
            entry.quota.set_limit(spec.memory_quota_mb);
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
                spec,
                functions: BTreeMap::new(),
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
        let (code_dir, code_digest) = self.resolve_code(&spec).await?;
        let (applied, replaced) = self.apply_function(Arc::new(spec), code_dir, code_digest)?;
        if let Some((mut scaler_generation, generation)) = replaced {
            // Wait until the scaler took the old instances out of routing, so requests sent
            // after this call returns reach the new version.
            let replaced = scaler_generation.wait_for(|applied| *applied >= generation);
            if tokio::time::timeout(REPLACE_WAIT, replaced).await.is_err() {
                tracing::warn!(
                    generation,
                    "scaler did not confirm the function update in time"
                );
            }
        }
        Ok(applied)
    }

    /// Stores a checked function and starts or updates its scaler. When running instances must
    /// be replaced, also returns the scaler's generation channel and the generation to wait for.
    #[allow(clippy::type_complexity)]
    fn apply_function(
        &self,
        spec: Arc<FunctionSpec>,
        code_dir: PathBuf,
        code_digest: Option<String>,
    ) -> Result<(Applied, Option<(watch::Receiver<u64>, u64)>), PlatformError> {
        let key = function_key(&spec);
        let mut namespaces = self.namespaces.lock();
        let namespace = namespaces
            .get_mut(&spec.namespace)
            .ok_or_else(|| namespace_not_found(&spec.namespace))?;

        if let Some(entry) = namespace.functions.get_mut(&spec.name) {
            if *entry.spec == *spec && entry.code_dir == code_dir {
                return Ok((Applied::Unchanged, None));
            }
            let replace = needs_new_instances(&entry.spec, &spec) || entry.code_dir != code_dir;
            self.router.upsert(key, settings(&spec));
            let generation = if replace {
                self.generations
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            } else {
                entry.resolved.borrow().generation
            };
            entry.spec = Arc::clone(&spec);
            entry.code_dir = code_dir.clone();
            let _ = entry.resolved.send(Resolved {
                spec,
                code_dir,
                code_digest,
                generation,
            });
            tracing::info!(function = %entry.spec.name, namespace = %entry.spec.namespace, replace, "function updated");
            let wait = replace.then(|| (entry.applied.clone(), generation));
            return Ok((Applied::Updated, wait));
        }

        let function = self.router.upsert(key, settings(&spec));
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (resolved_tx, resolved_rx) = watch::channel(Resolved {
            spec: Arc::clone(&spec),
            code_dir: code_dir.clone(),
            code_digest,
            generation,
        });
        let (stop_tx, stop_rx) = watch::channel(Stop::No);
        let (applied_tx, applied_rx) = watch::channel(generation);
        let status = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(scaler::run(ScalerParts {
            function,
            backend: Arc::clone(&namespace.backend),
            quota: Arc::clone(&namespace.quota),
            resolved: resolved_rx,
            stop: stop_rx,
            applied: applied_tx,
            status: Arc::clone(&status),
            instance_ids: Arc::clone(&self.instance_ids),
        }));
        tracing::info!(function = %spec.name, namespace = %spec.namespace, kind = ?spec.kind, "function created");
        namespace.functions.insert(
            spec.name.clone(),
            FunctionEntry {
                spec,
                code_dir,
                resolved: resolved_tx,
                stop: stop_tx,
                applied: applied_rx,
                task,
                status,
            },
        );
        Ok((Applied::Created, None))
    }

    /// Resolves the function's code and checks that it has the executable the function's kind
    /// starts. Code that fails the check is discarded if this call unpacked it.
    /// Returns the code directory and, for a zip package, its SHA-256.
    async fn resolve_code(
        &self,
        spec: &FunctionSpec,
    ) -> Result<(PathBuf, Option<String>), PlatformError> {
        let source = spec.code.clone();
        let function_dir = self.config.function_dir.clone();
        let (namespace, name) = (spec.namespace.clone(), spec.name.clone());
        let (kind, runtime) = (spec.kind, spec.event_runtime());
        tokio::task::spawn_blocking(move || {
            let code = crate::code::resolve(&source, &function_dir, &namespace, &name)?;
            match crate::code::check_entrypoint(&code.path, &source, kind, runtime) {
                Ok(()) => Ok((code.path, code.digest)),
                Err(error) => {
                    code.discard();
                    Err(error)
                }
            }
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
        self.router.remove(&function_key(&entry.spec));
        let _ = entry.stop.send(Stop::Drain);
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

    /// Stops every scaler and waits until their instances are gone. Instances are stopped without
    /// draining, so call this after the proxy drained its connections.
    pub async fn shutdown(&self) {
        let _change = self.changes.lock().await;
        let tasks: Vec<JoinHandle<()>> = {
            let mut namespaces = self.namespaces.lock();
            let mut tasks = Vec::new();
            for namespace in namespaces.values_mut() {
                for (_, entry) in std::mem::take(&mut namespace.functions) {
                    let _ = entry.stop.send(Stop::Now);
                    tasks.push(entry.task);
                }
            }
            tasks
        };
        for task in tasks {
            let _ = task.await;
        }
    }
}

fn status_of(entry: &FunctionEntry) -> FunctionStatus {
    FunctionStatus {
        spec: FunctionSpec::clone(&entry.spec),
        code_dir: entry.code_dir.clone(),
        instances: entry.status.lock().clone(),
    }
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
