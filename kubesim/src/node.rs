//! A simulated node: a kubelet that runs the containers of pods bound to it as local process
//! groups, gives each pod a loopback IP, and reports status through the store.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::container::{self, ContainerContext};
use crate::pod_status::{refresh, set_condition};
use crate::store::{meta_str, now_rfc3339, EventType, Start, Store, Target};
use crate::{NodeConfig, Resource, Status};

/// Log files of pod containers, by namespace and pod name.
#[derive(Default)]
pub struct LogIndex {
    /// Container name and log path, by namespace and pod name.
    paths: Mutex<HashMap<PodKey, Vec<(String, PathBuf)>>>,
}

type PodKey = (String, String);

impl LogIndex {
    pub fn insert(&self, namespace: &str, pod: &str, container: &str, path: PathBuf) {
        let mut paths = self.paths.lock();
        let entry = paths
            .entry((namespace.to_string(), pod.to_string()))
            .or_default();
        entry.retain(|(name, _)| name != container);
        entry.push((container.to_string(), path));
    }

    /// Reads the current log of a pod's first container.
    pub fn read(&self, namespace: &str, pod: &str) -> Option<String> {
        self.read_container(namespace, pod, None)
    }

    pub fn read_container(
        &self,
        namespace: &str,
        pod: &str,
        container: Option<&str>,
    ) -> Option<String> {
        let path = {
            let paths = self.paths.lock();
            let entries = paths.get(&(namespace.to_string(), pod.to_string()))?;
            match container {
                Some(name) => entries.iter().find(|(n, _)| n == name)?.1.clone(),
                None => entries.first()?.1.clone(),
            }
        };
        std::fs::read(&path)
            .ok()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Process groups of running containers, so that dropping the cluster can kill them all.
#[derive(Default)]
pub struct ProcessTable {
    groups: Mutex<HashSet<i32>>,
    closed: std::sync::atomic::AtomicBool,
}

impl ProcessTable {
    /// Records a process group. After `kill_all`, the group is killed at once instead.
    pub fn add(&self, pgid: i32) {
        let mut groups = self.groups.lock();
        if self.is_closed() {
            // SAFETY: killpg only sends a signal; a stale group id fails with ESRCH.
            unsafe {
                libc::killpg(pgid, libc::SIGKILL);
            }
            return;
        }
        groups.insert(pgid);
    }

    /// Reports whether `kill_all` has run, after which no container may start.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn remove(&self, pgid: i32) {
        self.groups.lock().remove(&pgid);
    }

    /// Sends SIGKILL to every recorded process group.
    pub fn kill_all(&self) {
        let mut groups = self.groups.lock();
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        for pgid in groups.drain() {
            // SAFETY: killpg only sends a signal; a stale group id fails with ESRCH.
            unsafe {
                libc::killpg(pgid, libc::SIGKILL);
            }
        }
    }
}

/// Loopback addresses in use by pods of any cluster in this process.
fn addresses_in_use() -> &'static Mutex<HashSet<Ipv4Addr>> {
    static IN_USE: OnceLock<Mutex<HashSet<Ipv4Addr>>> = OnceLock::new();
    IN_USE.get_or_init(Default::default)
}

/// The pod IPs of one node: a random `127.R.S.0/24` block, so that concurrently running test
/// processes rarely share a block, and a bind check on port 9000 before each address is used.
pub struct IpPool {
    block: [u8; 3],
    next: Mutex<u8>,
}

impl IpPool {
    fn new() -> IpPool {
        IpPool {
            block: [127, fastrand::u8(1..=254), fastrand::u8(0..=255)],
            next: Mutex::new(2),
        }
    }

    /// Returns the node's own address, reported as `status.hostIP`.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.block[0], self.block[1], self.block[2], 1)
    }

    /// Takes a free address: not used by a pod of this process, and bindable on port 9000,
    /// so no other process listens there. Returns `None` when the block is exhausted.
    fn allocate(&self) -> Option<Ipv4Addr> {
        let mut next = self.next.lock();
        for _ in 0..253 {
            let host = *next;
            *next = if *next >= 254 { 2 } else { *next + 1 };
            let ip = Ipv4Addr::new(self.block[0], self.block[1], self.block[2], host);
            let mut in_use = addresses_in_use().lock();
            if in_use.contains(&ip) {
                continue;
            }
            if std::net::TcpListener::bind((ip, 9000)).is_err() {
                continue;
            }
            in_use.insert(ip);
            return Some(ip);
        }
        None
    }

    fn release(ip: Ipv4Addr) {
        addresses_in_use().lock().remove(&ip);
    }
}

/// Settings the nodes of one cluster share.
pub struct NodeShared {
    pub store: Arc<Store>,
    pub logs: Arc<LogIndex>,
    pub processes: Arc<ProcessTable>,
    pub log_dir: PathBuf,
    pub crash_backoff: Duration,
    pub crash_backoff_max: Duration,
}

/// Deletion state of a pod, as the kubelet tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    None,
    /// The pod has a deletionTimestamp: stop its containers within this grace period.
    Graceful(Duration),
    /// The object is gone already: kill the containers at once.
    Removed,
}

/// One running simulated node.
pub struct Node {
    pub config: NodeConfig,
    pub shared: Arc<NodeShared>,
    pub ips: IpPool,
}

impl Node {
    pub fn new(config: NodeConfig, shared: Arc<NodeShared>) -> Node {
        Node {
            config,
            shared,
            ips: IpPool::new(),
        }
    }
}

fn deletion_of(pod: &Value) -> Deletion {
    if pod.pointer("/metadata/deletionTimestamp").is_none() {
        return Deletion::None;
    }
    let grace = pod
        .pointer("/metadata/deletionGracePeriodSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(30);
    Deletion::Graceful(Duration::from_secs(grace))
}

/// Runs the node until `shutdown` turns true: starts a pod task for each pod bound to it and
/// forwards deletions to those tasks.
pub async fn run(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let store = node.shared.store.clone();
    let Ok(mut subscription) = store.subscribe(&Resource::PODS, None, Start::Now, false) else {
        return;
    };
    let mut pods: HashMap<String, watch::Sender<Deletion>> = HashMap::new();
    let initial = std::mem::take(&mut subscription.initial);
    for pod in initial {
        observe(&node, &mut pods, &pod, false);
    }
    loop {
        tokio::select! {
            event = subscription.events.recv() => {
                let Some(event) = event else { return };
                observe(&node, &mut pods, &event.object, event.kind == EventType::Deleted);
            }
            _ = shutdown.changed() => return,
        }
    }
}

fn observe(
    node: &Arc<Node>,
    pods: &mut HashMap<String, watch::Sender<Deletion>>,
    pod: &Value,
    removed: bool,
) {
    if pod.pointer("/spec/nodeName").and_then(Value::as_str) != Some(node.config.name.as_str()) {
        return;
    }
    let Some(uid) = meta_str(pod, "uid").map(str::to_string) else {
        return;
    };
    pods.retain(|_, sender| !sender.is_closed());
    if removed {
        if let Some(sender) = pods.remove(&uid) {
            let _ = sender.send(Deletion::Removed);
        }
        return;
    }
    match pods.get(&uid) {
        Some(sender) => {
            let deletion = deletion_of(pod);
            if deletion != Deletion::None && *sender.borrow() == Deletion::None {
                let _ = sender.send(deletion);
            }
        }
        None => {
            let (sender, receiver) = watch::channel(deletion_of(pod));
            pods.insert(uid, sender);
            tokio::spawn(run_pod(node.clone(), pod.clone(), receiver));
        }
    }
}

/// Identifies one pod object; status writes for another object with the same name fail.
#[derive(Clone)]
pub struct PodId {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl PodId {
    /// Changes the pod's status through the store, then recomputes phase and readiness.
    /// Fails when the pod is gone or replaced.
    pub fn write_status(
        &self,
        store: &Store,
        change: impl FnOnce(&mut Value),
    ) -> Result<Value, Status> {
        store.update(
            &Resource::PODS,
            &self.namespace,
            &self.name,
            Target::Status,
            |current| {
                if meta_str(current, "uid") != Some(self.uid.as_str()) {
                    return Err(Status::not_found(&Resource::PODS, &self.name));
                }
                let mut pod = current.clone();
                if !pod.get("status").is_some_and(Value::is_object) {
                    pod["status"] = json!({});
                }
                change(&mut pod);
                refresh(&mut pod);
                Ok(pod)
            },
        )
    }
}

/// Waits until the pod is marked for deletion or removed.
pub async fn wait_for_deletion(deletion: &mut watch::Receiver<Deletion>) -> Deletion {
    loop {
        let current = *deletion.borrow_and_update();
        if current != Deletion::None {
            return current;
        }
        if deletion.changed().await.is_err() {
            return Deletion::Removed;
        }
    }
}

async fn run_pod(node: Arc<Node>, pod: Value, mut deletion: watch::Receiver<Deletion>) {
    let id = PodId {
        namespace: meta_str(&pod, "namespace").unwrap_or("").to_string(),
        name: meta_str(&pod, "name").unwrap_or("").to_string(),
        uid: meta_str(&pod, "uid").unwrap_or("").to_string(),
    };
    let store = node.shared.store.clone();
    let containers = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();

    let ip = if *deletion.borrow() == Deletion::None {
        node.ips.allocate()
    } else {
        None
    };
    if let Some(ip) = ip {
        let host_ip = node.ips.host_ip().to_string();
        let written = id.write_status(&store, |pod| {
            let status = &mut pod["status"];
            status["hostIP"] = json!(host_ip);
            status["hostIPs"] = json!([{"ip": host_ip}]);
            status["podIP"] = json!(ip.to_string());
            status["podIPs"] = json!([{"ip": ip.to_string()}]);
            status["startTime"] = json!(now_rfc3339());
            status["containerStatuses"] = Value::Array(
                containers
                    .iter()
                    .map(|c| container::waiting_status(c, "ContainerCreating", None, 0, None))
                    .collect(),
            );
            set_condition(pod, "PodReadyToStartContainers", true, None, None);
            set_condition(pod, "Initialized", true, None, None);
        });
        if written.is_ok() {
            let mut tasks = tokio::task::JoinSet::new();
            for (index, spec) in containers.iter().enumerate() {
                let context = ContainerContext {
                    node: node.clone(),
                    pod: pod.clone(),
                    id: id.clone(),
                    index,
                    spec: spec.clone(),
                    pod_ip: ip,
                };
                tasks.spawn(container::run(context, deletion.clone()));
            }
            while tasks.join_next().await.is_some() {}
        }
    } else if *deletion.borrow() == Deletion::None {
        let message = format!("no free pod IP in {}/24", node.ips.host_ip());
        tracing::warn!(pod = %id.name, namespace = %id.namespace, "kubesim node: {message}");
        let _ = id.write_status(&store, |pod| {
            pod["status"]["containerStatuses"] = Value::Array(
                containers
                    .iter()
                    .map(|c| {
                        container::waiting_status(c, "ContainerCreating", Some(&message), 0, None)
                    })
                    .collect(),
            );
        });
    }

    let outcome = wait_for_deletion(&mut deletion).await;
    if outcome != Deletion::Removed {
        store.remove_if_uid(&Resource::PODS, &id.namespace, &id.name, &id.uid);
    }
    if let Some(ip) = ip {
        IpPool::release(ip);
    }
}
