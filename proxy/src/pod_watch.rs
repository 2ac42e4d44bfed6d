//! k8s mode's route source: a watcher on runtime pods that keeps each function's instances
//! current from the kube API.
//!
//! One watcher runs per bound k8s namespace and reads fngate's runtime pods by label. It routes
//! to a pod only while the pod has an IP, is neither being deleted nor marked draining, and has
//! a Ready condition of True. A pod also counts as ready once fngate's own probe reached its
//! runtime port, until the kubelet reports Ready.
//! Pods are tracked by UID, so an event about a deleted pod never touches a replacement that
//! reuses its name.
//!
//! Events that arrive together are applied as one batch: each function's instance list is
//! swapped once per batch, not once per event. After a watch error or an expired resource
//! version the kube-rs watcher lists again; a periodic relist guards against silent gaps.
//! Pods missing from a relist count as deleted.
//!
//! The scaler follows its pods through [`PodWatcher::pod`], which reports whether a pod is
//! starting, routable, failed or gone.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use metrics::counter;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::instance::{Instance, InstanceState};
use crate::table::{Function, FunctionKey, RouteSource, Router};

/// Label every runtime pod carries, with value [`MANAGED_BY`].
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "fngate";
/// Labels with the function namespace, name and version, made label-safe; for selectors only.
pub const LABEL_NAMESPACE: &str = "fngate.io/namespace";
pub const LABEL_FUNCTION: &str = "fngate.io/function";
pub const LABEL_QUALIFIER: &str = "fngate.io/qualifier";
/// Label with the control plane's instance id.
pub const LABEL_INSTANCE: &str = "fngate.io/instance";
/// Label naming the proxy replica that routes to the pod. Each pod has one, so each slot is
/// counted by one proxy.
pub const LABEL_REPLICA: &str = "fngate.io/replica";
/// Replica name of the proxy inside the `fngate serve` process.
pub const LOCAL_REPLICA: &str = "local";
/// Annotations with the exact function namespace, name and qualifier, which route the pod.
pub const ANNOTATION_NAMESPACE: &str = "fngate.io/namespace";
pub const ANNOTATION_FUNCTION: &str = "fngate.io/function";
pub const ANNOTATION_QUALIFIER: &str = "fngate.io/qualifier";
/// Annotation naming the control plane that created the pod. A watcher with an owner routes
/// only that owner's pods, so pods left by an earlier control plane (and perhaps running older
/// code) never get requests.
pub const ANNOTATION_OWNER: &str = "fngate.io/owner";
/// Annotation set to "true" on a pod being drained: no new requests go to it.
pub const ANNOTATION_DRAINING: &str = "fngate.io/draining";
/// Port of the runtime in every pod, SCF's convention for web functions.
pub const RUNTIME_PORT: u16 = 9000;

/// Container waiting reasons after which a pod will not start without a change.
const FATAL_WAITING: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "CrashLoopBackOff",
];

/// Maximum time the proxy probes a running pod's port before it leaves readiness to the
/// kubelet alone.
const PROBE_LIMIT: Duration = Duration::from_secs(300);
/// Maximum number of events applied in one batch.
const BATCH_MAX: usize = 1024;

/// Settings of one pod watcher.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// The k8s namespace with the runtime pods.
    pub namespace: String,
    /// How often the watcher lists all pods again even when the watch stream looks healthy.
    pub resync_interval: Duration,
    /// Port of the runtime in every pod; [`RUNTIME_PORT`] except in tests.
    pub runtime_port: u16,
    /// Routes only pods whose [`ANNOTATION_OWNER`] has this value; `None` routes every pod.
    pub owner: Option<String>,
    /// Lists and routes only pods whose [`LABEL_REPLICA`] has this value; `None` takes the pods
    /// of every replica.
    pub replica: Option<String>,
    /// Routes only pods of this function namespace; `None` routes pods of every namespace.
    /// Several function namespaces may share one k8s namespace, each with its own watcher.
    pub function_namespace: Option<String>,
}

/// Reason a pod will not become or stay routable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFailure {
    /// The Kubernetes reason: `Unschedulable`, `ImagePullBackOff`, `Error`, `Evicted`, ...
    pub reason: String,
    /// The status message, if any.
    pub message: String,
    /// Exit code of the runtime container when it ended.
    pub exit_code: Option<i32>,
}

impl std::fmt::Display for PodFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.exit_code {
            Some(code) => write!(f, "{} (exit code {code})", self.reason)?,
            None => f.write_str(&self.reason)?,
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message.trim_end())?;
        }
        Ok(())
    }
}

/// A pod as its watcher reports it to the scaler.
#[derive(Debug, Clone)]
pub enum PodState {
    /// Not seen in the API yet.
    Unknown,
    /// Seen, not routable yet; `waiting` is the status reason, when there is one.
    Starting { waiting: Option<String> },
    /// Taking requests through `instance`.
    Routable { instance: Arc<Instance> },
    /// Was routable and is not now (readiness lost, draining or being deleted). Requests in
    /// flight on `instance` finish.
    Unroutable {
        instance: Arc<Instance>,
        deleting: bool,
    },
    /// Will not run or has ended: unschedulable, image not pullable, runtime exited.
    Failed(PodFailure),
    /// Being deleted (by someone else, or evicted) before it ever took requests.
    Deleting,
    /// Deleted from the API, or missing from a relist.
    Gone,
}

/// A pod's fields that decide its routing, read from one API object.
#[derive(Debug, Clone, PartialEq)]
struct PodView {
    uid: String,
    name: String,
    key: Option<FunctionKey>,
    ip: Option<IpAddr>,
    running: bool,
    /// The Ready condition: `None` before the kubelet reported one.
    ready: Option<bool>,
    deleting: bool,
    draining: bool,
    owner: Option<String>,
    replica: Option<String>,
    /// The control plane's id of the instance, from the `fngate.io/instance` label.
    instance_id: Option<u64>,
    failure: Option<PodFailure>,
    waiting: Option<String>,
}

impl PodView {
    fn from_pod(pod: &Pod) -> Option<PodView> {
        let meta = &pod.metadata;
        let uid = meta.uid.clone()?;
        let annotations = meta.annotations.as_ref();
        let annotation = |name: &str| annotations.and_then(|a| a.get(name)).cloned();
        let key = match (
            annotation(ANNOTATION_NAMESPACE),
            annotation(ANNOTATION_FUNCTION),
        ) {
            (Some(namespace), Some(name)) => Some(FunctionKey {
                namespace,
                name,
                qualifier: annotation(ANNOTATION_QUALIFIER).unwrap_or_else(|| "$LATEST".to_owned()),
            }),
            _ => None,
        };
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        let containers = status
            .and_then(|s| s.container_statuses.as_deref())
            .unwrap_or_default();
        let condition = |kind: &str| {
            status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|conditions| conditions.iter().find(|c| c.type_ == kind))
        };
        let ready = condition("Ready").map(|c| c.status == "True");
        let ip = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        let running = phase == "Running"
            && !containers.is_empty()
            && containers
                .iter()
                .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
        // The reason, with the kubelet's message when it gave one.
        let waiting = containers
            .iter()
            .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
            .find_map(|w| {
                let reason = w.reason.clone()?;
                Some(match w.message.as_deref().filter(|m| !m.is_empty()) {
                    Some(message) => format!("{reason}: {message}"),
                    None => reason,
                })
            });

        let failure = failure_of(pod, phase, containers, condition("PodScheduled"));
        Some(PodView {
            uid,
            name: meta.name.clone().unwrap_or_default(),
            key,
            ip,
            running,
            ready,
            deleting: meta.deletion_timestamp.is_some(),
            draining: annotation(ANNOTATION_DRAINING).as_deref() == Some("true"),
            owner: annotation(ANNOTATION_OWNER),
            replica: meta
                .labels
                .as_ref()
                .and_then(|labels| labels.get(LABEL_REPLICA))
                .cloned(),
            instance_id: meta
                .labels
                .as_ref()
                .and_then(|labels| labels.get(LABEL_INSTANCE))
                .and_then(|id| id.parse().ok()),
            failure,
            waiting,
        })
    }

    /// Returns whether the pod can take requests, readiness aside.
    fn runnable(&self) -> bool {
        self.ip.is_some()
            && self.running
            && !self.deleting
            && !self.draining
            && self.failure.is_none()
    }
}

/// Reads a terminal failure from a pod's status: a failed or finished phase, an ended or
/// unstartable container, or an Unschedulable condition.
fn failure_of(
    pod: &Pod,
    phase: &str,
    containers: &[ContainerStatus],
    scheduled: Option<&k8s_openapi::api::core::v1::PodCondition>,
) -> Option<PodFailure> {
    for container in containers {
        let Some(state) = &container.state else {
            continue;
        };
        if let Some(terminated) = &state.terminated {
            return Some(PodFailure {
                reason: terminated
                    .reason
                    .clone()
                    .unwrap_or_else(|| "Terminated".to_owned()),
                message: terminated.message.clone().unwrap_or_default(),
                exit_code: Some(terminated.exit_code),
            });
        }
        if let Some(waiting) = &state.waiting {
            let reason = waiting.reason.as_deref().unwrap_or_default();
            if FATAL_WAITING.contains(&reason) {
                return Some(PodFailure {
                    reason: reason.to_owned(),
                    message: waiting.message.clone().unwrap_or_default(),
                    exit_code: None,
                });
            }
        }
    }
    if phase == "Failed" || phase == "Succeeded" {
        let status = pod.status.as_ref();
        return Some(PodFailure {
            reason: status
                .and_then(|s| s.reason.clone())
                .unwrap_or_else(|| phase.to_owned()),
            message: status.and_then(|s| s.message.clone()).unwrap_or_default(),
            exit_code: None,
        });
    }
    if let Some(scheduled) = scheduled {
        if scheduled.status == "False" && scheduled.reason.as_deref() == Some("Unschedulable") {
            return Some(PodFailure {
                reason: "Unschedulable".to_owned(),
                message: scheduled.message.clone().unwrap_or_default(),
                exit_code: None,
            });
        }
    }
    None
}

/// The watcher's record of one pod.
struct Tracked {
    view: PodView,
    instance: Option<Arc<Instance>>,
    /// The pool the instance is in while routable.
    routed_in: Option<Arc<Function>>,
    /// The proxy's own probe reached the runtime port.
    probed: bool,
    /// The kubelet reported Ready once; from then on its condition alone decides.
    kubelet_ready_seen: bool,
    probe: Option<JoinHandle<()>>,
    /// When the watcher first saw the pod, a few milliseconds after its creation. Creation
    /// timestamps have whole seconds only, too coarse for a boot time.
    first_seen: tokio::time::Instant,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(probe) = self.probe.take() {
            probe.abort();
        }
    }
}

/// State shared between the watcher task and the scaler.
struct Shared {
    states: Mutex<HashMap<String, watch::Sender<PodState>>>,
    source: Arc<RouteSource>,
}

impl Shared {
    fn publish(&self, uid: &str, state: PodState) {
        let mut states = self.states.lock();
        let gone = matches!(state, PodState::Gone);
        states
            .entry(uid.to_owned())
            .or_insert_with(|| watch::channel(PodState::Unknown).0)
            .send_replace(state);
        if gone {
            // Receivers keep the channel and read `Gone`; the entry is not needed any more.
            states.remove(uid);
        }
    }
}

/// Handle to a running pod watcher. Dropping it stops the watcher.
pub struct PodWatcher {
    shared: Arc<Shared>,
    router: Arc<Router>,
    task: JoinHandle<()>,
}

impl Drop for PodWatcher {
    fn drop(&mut self) {
        self.task.abort();
        self.router.remove_source(&self.shared.source);
    }
}

impl PodWatcher {
    /// Starts watching the runtime pods of `config.namespace` and routing to them through
    /// `router`. The router does not count as synced until the first list finished.
    pub fn spawn(client: kube::Client, config: WatchConfig, router: Arc<Router>) -> PodWatcher {
        let source = router.add_source(format!("kube:{}", config.namespace));
        let shared = Arc::new(Shared {
            states: Mutex::new(HashMap::new()),
            source,
        });
        let api: Api<Pod> = Api::namespaced(client, &config.namespace);
        let task = tokio::spawn(run(api, config, Arc::clone(&router), Arc::clone(&shared)));
        PodWatcher {
            shared,
            router,
            task,
        }
    }

    /// Follows the pod with `uid`. The receiver starts at [`PodState::Unknown`] when the watcher
    /// has not seen the pod yet.
    pub fn pod(&self, uid: &str) -> watch::Receiver<PodState> {
        let mut states = self.shared.states.lock();
        states
            .entry(uid.to_owned())
            .or_insert_with(|| watch::channel(PodState::Unknown).0)
            .subscribe()
    }

    /// Returns whether the first list has finished.
    pub fn is_synced(&self) -> bool {
        self.shared.source.is_synced()
    }
}

async fn run(api: Api<Pod>, config: WatchConfig, router: Arc<Router>, shared: Arc<Shared>) {
    let mut selector = format!("{LABEL_MANAGED_BY}={MANAGED_BY}");
    if let Some(replica) = &config.replica {
        selector.push_str(&format!(",{LABEL_REPLICA}={replica}"));
    }
    let (probe_tx, mut probe_rx) = mpsc::unbounded_channel::<String>();
    let mut tracker = Tracker {
        pods: HashMap::new(),
        relist: None,
        router,
        shared,
        probe_tx,
        port: config.runtime_port,
        owner: config.owner.clone(),
        replica: config.replica.clone(),
        function_namespace: config.function_namespace.clone(),
    };
    loop {
        let stream = watcher::watcher(api.clone(), watcher::Config::default().labels(&selector))
            .default_backoff()
            .ready_chunks(BATCH_MAX);
        tokio::pin!(stream);
        let resync = tokio::time::sleep(config.resync_interval);
        tokio::pin!(resync);
        loop {
            tokio::select! {
                batch = stream.next() => {
                    let Some(batch) = batch else { break };
                    tracker.apply(batch, &config.namespace);
                }
                Some(uid) = probe_rx.recv() => {
                    let mut probed = vec![uid];
                    while let Ok(uid) = probe_rx.try_recv() {
                        probed.push(uid);
                    }
                    tracker.apply_probes(probed);
                }
                () = &mut resync => {
                    tracing::debug!(namespace = %config.namespace, "relisting runtime pods");
                    break;
                }
            }
        }
    }
}

/// The watcher's state; only the watcher task touches it.
struct Tracker {
    pods: HashMap<String, Tracked>,
    /// UIDs listed since the last `Init`, while a relist is under way.
    relist: Option<HashSet<String>>,
    router: Arc<Router>,
    shared: Arc<Shared>,
    probe_tx: mpsc::UnboundedSender<String>,
    port: u16,
    owner: Option<String>,
    replica: Option<String>,
    function_namespace: Option<String>,
}

/// Instance changes of one function within a batch.
#[derive(Default)]
struct PoolChanges {
    function: Option<Arc<Function>>,
    added: Vec<Arc<Instance>>,
    removed: Vec<u64>,
}

impl Tracker {
    /// Applies a batch of watch events. Returns the number of instance-list swaps.
    fn apply(&mut self, batch: Vec<Result<Event<Pod>, watcher::Error>>, namespace: &str) -> usize {
        let mut touched: HashSet<String> = HashSet::new();
        let mut changes: HashMap<FunctionKey, PoolChanges> = HashMap::new();
        for item in batch {
            match item {
                Ok(Event::Apply(pod)) | Ok(Event::InitApply(pod)) => {
                    if let Some(view) = PodView::from_pod(&pod) {
                        if let Some(relist) = &mut self.relist {
                            relist.insert(view.uid.clone());
                        }
                        touched.insert(view.uid.clone());
                        self.upsert(view);
                    }
                    self.shared.source.mark_synced_if_listed();
                }
                Ok(Event::Delete(pod)) => {
                    if let Some(uid) = pod.metadata.uid {
                        self.forget(&uid, &mut changes);
                        touched.remove(&uid);
                    }
                    self.shared.source.mark_synced_if_listed();
                }
                Ok(Event::Init) => self.relist = Some(HashSet::new()),
                Ok(Event::InitDone) => {
                    if let Some(listed) = self.relist.take() {
                        let missing: Vec<String> = self
                            .pods
                            .keys()
                            .filter(|uid| !listed.contains(*uid))
                            .cloned()
                            .collect();
                        for uid in missing {
                            tracing::info!(namespace, pod_uid = %uid,
                                "runtime pod missing from the relist; treating it as deleted");
                            self.forget(&uid, &mut changes);
                            touched.remove(&uid);
                        }
                    }
                    self.shared.source.mark_synced();
                }
                Err(error) => {
                    counter!(crate::metrics::KUBE_WATCH_ERRORS, "k8s_namespace" => namespace.to_owned())
                        .increment(1);
                    tracing::warn!(namespace, error = %error, "runtime pod watch failed; retrying with back-off");
                }
            }
        }
        // Pods that wait for their function to appear in the table are retried on every batch.
        let unrouted: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, t)| t.routed_in.is_none() && t.view.runnable())
            .map(|(uid, _)| uid.clone())
            .collect();
        touched.extend(unrouted);
        for uid in touched {
            self.route(&uid, &mut changes);
        }
        self.commit(changes)
    }

    fn apply_probes(&mut self, uids: Vec<String>) -> usize {
        let mut changes = HashMap::new();
        for uid in uids {
            if let Some(tracked) = self.pods.get_mut(&uid) {
                tracked.probed = true;
                tracked.probe = None;
                self.route(&uid, &mut changes);
            }
        }
        self.commit(changes)
    }

    fn upsert(&mut self, view: PodView) {
        match self.pods.get_mut(&view.uid) {
            Some(tracked) => {
                if tracked.view.ip != view.ip {
                    // A new address invalidates a probe of the old one.
                    tracked.probed = false;
                }
                tracked.view = view;
            }
            None => {
                self.pods.insert(
                    view.uid.clone(),
                    Tracked {
                        view,
                        instance: None,
                        routed_in: None,
                        probed: false,
                        kubelet_ready_seen: false,
                        probe: None,
                        first_seen: tokio::time::Instant::now(),
                    },
                );
            }
        }
    }

    /// Drops a deleted pod: out of routing, its instance marked failed unless already retired.
    fn forget(&mut self, uid: &str, changes: &mut HashMap<FunctionKey, PoolChanges>) {
        if let Some(tracked) = self.pods.remove(uid) {
            if let Some(instance) = &tracked.instance {
                if let Some(function) = &tracked.routed_in {
                    let entry = changes.entry(function.key.clone()).or_default();
                    entry.function = Some(Arc::clone(function));
                    entry.removed.push(instance.id());
                }
                if instance.state() == InstanceState::Ready {
                    instance.set_state(InstanceState::Failed);
                }
            }
        }
        self.shared.publish(uid, PodState::Gone);
    }

    /// Decides whether one pod is routable and records the pool change and its new state.
    fn route(&mut self, uid: &str, changes: &mut HashMap<FunctionKey, PoolChanges>) {
        let Some(tracked) = self.pods.get_mut(uid) else {
            return;
        };
        let view = &tracked.view;
        if view.ready == Some(true) {
            tracked.kubelet_ready_seen = true;
        }
        let ready = match view.ready {
            Some(true) => true,
            _ => tracked.probed && !tracked.kubelet_ready_seen,
        };
        let retired = tracked
            .instance
            .as_ref()
            .is_some_and(|i| i.state() != InstanceState::Ready);
        let function = view.key.as_ref().and_then(|key| {
            self.router
                .lookup(&key.namespace, &key.name, &key.qualifier)
                .ok()
        });
        let owned = (self.owner.is_none() || view.owner == self.owner)
            && (self.replica.is_none() || view.replica == self.replica)
            && self.function_namespace.as_ref().is_none_or(|namespace| {
                view.key.as_ref().map(|key| &key.namespace) == Some(namespace)
            });
        let routable = owned && view.runnable() && ready && !retired && function.is_some();

        // Probe the runtime port of a running pod the kubelet has not reported ready yet.
        let wants_probe = owned && view.runnable() && !ready && !tracked.kubelet_ready_seen;
        if wants_probe && tracked.probe.is_none() {
            if let Some(ip) = view.ip {
                tracked.probe = Some(spawn_probe(
                    uid.to_owned(),
                    SocketAddr::new(ip, self.port),
                    self.probe_tx.clone(),
                ));
            }
        } else if !wants_probe {
            if let Some(probe) = tracked.probe.take() {
                probe.abort();
            }
        }

        if routable && tracked.routed_in.is_none() {
            let function = function.expect("routable implies a function");
            let addr = SocketAddr::new(view.ip.expect("runnable implies an ip"), self.port);
            let instance = match &tracked.instance {
                Some(instance) if instance.addr() == addr => Arc::clone(instance),
                _ => {
                    let boot_time = tracked.first_seen.elapsed();
                    // The control plane's id, so that a replica's reports and the control
                    // plane's mirror name an instance alike. Unique among the pods of one
                    // owner, which is all a watcher with an owner routes.
                    let id = match (&self.owner, view.instance_id) {
                        (Some(_), Some(id)) => id,
                        _ => next_instance_id(),
                    };
                    let instance = Arc::new(Instance::new(
                        id,
                        addr,
                        function.settings().concurrency,
                        boot_time,
                    ));
                    tracked.instance = Some(Arc::clone(&instance));
                    instance
                }
            };
            tracing::debug!(pod = %view.name, addr = %addr, function = %function.key, "routing to pod");
            let entry = changes.entry(function.key.clone()).or_default();
            entry.function = Some(Arc::clone(&function));
            entry.added.push(Arc::clone(&instance));
            tracked.routed_in = Some(function);
        } else if !routable {
            if let Some(function) = tracked.routed_in.take() {
                let instance = tracked
                    .instance
                    .as_ref()
                    .expect("routed implies an instance");
                tracing::debug!(pod = %view.name, function = %function.key, "pod no longer routable");
                let entry = changes.entry(function.key.clone()).or_default();
                entry.function = Some(Arc::clone(&function));
                entry.removed.push(instance.id());
            }
        }

        let state = if view.deleting && tracked.instance.is_none() {
            PodState::Deleting
        } else if let Some(failure) = &view.failure {
            if let Some(instance) = &tracked.instance {
                if instance.state() == InstanceState::Ready {
                    instance.set_state(InstanceState::Failed);
                }
            }
            PodState::Failed(failure.clone())
        } else if let (true, Some(instance)) = (routable, &tracked.instance) {
            PodState::Routable {
                instance: Arc::clone(instance),
            }
        } else if let Some(instance) = &tracked.instance {
            PodState::Unroutable {
                instance: Arc::clone(instance),
                deleting: view.deleting,
            }
        } else {
            PodState::Starting {
                waiting: view.waiting.clone(),
            }
        };
        self.shared.publish(uid, state);
    }

    /// Applies the batch's pool changes, one instance-list swap per function. Returns the
    /// number of functions whose instance list changed.
    fn commit(&self, changes: HashMap<FunctionKey, PoolChanges>) -> usize {
        if changes.is_empty() {
            return 0;
        }
        let mut swapped = 0;
        for (_, change) in changes {
            if let Some(function) = change.function {
                function
                    .pool
                    .update_instances(&change.added, &change.removed);
                swapped += 1;
            }
        }
        counter!(crate::metrics::KUBE_ROUTE_BATCHES).increment(1);
        swapped
    }
}

/// Ids of pod instances, from a range the control plane's own counter does not reach.
fn next_instance_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static NEXT: AtomicU64 = AtomicU64::new(1 << 48);
    NEXT.fetch_add(1, Relaxed)
}

/// Connects to a running pod's runtime port until it accepts, then reports the pod's UID.
/// Retries start at 5 ms and grow to 100 ms, for at most [`PROBE_LIMIT`].
fn spawn_probe(
    uid: String,
    addr: SocketAddr,
    done: mpsc::UnboundedSender<String>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + PROBE_LIMIT;
        let mut delay = Duration::from_millis(5);
        while tokio::time::Instant::now() < deadline {
            let attempt = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            );
            if let Ok(Ok(_stream)) = attempt.await {
                let _ = done.send(uid);
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    })
}

#[cfg(test)]
mod tests;
