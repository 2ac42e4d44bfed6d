//! A Kubernetes API test server and simulated nodes, all in one process, so that code using
//! kube-rs can be tested without a cluster.
//!
//! [`Cluster::start`] serves the Kubernetes HTTP API on `127.0.0.1` with a random port and a
//! random bearer token, and runs a scheduler. Each configured node runs as a simulated kubelet
//! that starts pod containers as local processes, each pod on a loopback IP of its own. kube-rs talks
//! to it as to a real API server, through the kubeconfig from [`Cluster::write_kubeconfig`].
//!
//! # What is served
//!
//! - core/v1 `namespaces`, `nodes`, `pods` (with `status` and `log`), `services`, `configmaps`,
//!   `serviceaccounts`, `events`; events.k8s.io/v1 `events`, stored apart from the core ones;
//!   apps/v1 `deployments` and `daemonsets` (with `status`); rbac.authorization.k8s.io/v1
//!   `roles`, `rolebindings`, `clusterroles`, `clusterrolebindings`; coordination.k8s.io/v1
//!   `leases`. Discovery at `/api`, `/api/v1`,
//!   `/apis`, `/apis/{group}` and `/apis/{group}/{version}`, and `/version`.
//! - GET, LIST (label and field selectors, `limit`/`continue`), WATCH (history replay from a
//!   resourceVersion, 410 Expired after compaction, bookmarks, streaming lists with
//!   `sendInitialEvents`), POST, PUT, DELETE (graceful for pods on a node), deletecollection,
//!   and PATCH (merge, JSON, strategic merge and server-side apply).
//! - One global resourceVersion counter. A write that changes nothing keeps the
//!   resourceVersion and emits no event.
//!
//! # Simplifications versus a real cluster
//!
//! - No authorization, admission webhooks, validation beyond names, or OpenAPI schema. RBAC
//!   objects are stored but never enforced. [`Cluster::forbid`] denies chosen requests
//!   instead, with the 403 status RBAC would cause. Any object content is accepted.
//! - Simplified controllers. A deployment owns its pods directly, without ReplicaSets (which
//!   are not served). For a new template it creates all new pods at once and deletes the old
//!   ones when the new ones are ready, whatever the strategy says, and a ready pod counts as
//!   available (no `minReadySeconds`). A daemonset runs one pod on each node that its
//!   template's node selector, required affinity and tolerations admit, pinned by node
//!   affinity as the real controller does, and replaces a pod of an old template by deleting
//!   it first. Pods whose controlling deployment or daemonset is gone are deleted, as the
//!   garbage collector does with background propagation, and no other owner references are
//!   followed. Services get a cluster IP and node ports but route nothing, and a
//!   LoadBalancer service never gets an ingress address. Node objects are served for
//!   reading, but the scheduler and nodes follow [`ClusterConfig::nodes`] only, so changing or
//!   deleting a Node object (cordoning, tainting) has no effect on scheduling.
//! - `metadata.generation` is set and bumped (on changes outside metadata and status) for
//!   every type but pods, including types whose real strategy leaves it unset.
//! - LIST always returns the current state: `resourceVersion` with `resourceVersionMatch=Exact`
//!   fails with 410 when older than the retained history and otherwise also returns the
//!   current state. Pages of a `limit`/`continue` list are not a consistent snapshot: each
//!   page reads the current objects after the last key of the previous page.
//! - Writes to `/status` change only `status`. Update writes record no `Update` entries in
//!   `managedFields`.
//! - Strategic merge patch merges lists of objects by a fixed merge key (`name` for
//!   containers, initContainers, env, volumes, volumeMounts and imagePullSecrets;
//!   `containerPort` or `port` for ports) and honours the `$patch: delete` and
//!   `$patch: replace` directives; every other list is replaced, with no per-type schema.
//! - Server-side apply reads JSON bodies only. It merges the applied configuration into the
//!   object like a strategic merge without deletions and records the manager with
//!   `operation: Apply` in `managedFields`. Fields a manager stops applying are not removed,
//!   `force` is accepted and conflicts are never reported.
//! - `dryRun` is rejected with 400.
//! - `GET .../pods/NAME/log` returns the current log at once and honours `container` (default:
//!   the first container) and `tailLines` only, so `follow=true` does not stream.
//! - Deleting a namespace marks it Terminating, removes its objects at once except pods on a
//!   node, which go through graceful deletion, and removes the namespace when it is empty.
//!   Metadata finalizers delay the removal of other objects until they are cleared.
//! - Unschedulable messages omit the `preemption: ...` sentence that recent schedulers append.
//! - A pod bound to a node name that no simulated node has is removed at once on delete, as
//!   the pod garbage collector would soon do.
//! - Pods: no init containers, no liveness or startup probes, no exec or gRPC readiness probes
//!   (they count as failing), no service account token volume, no service environment
//!   variables, no resource limits enforcement, no OOMKilled. Only hostPath volumes mounted at
//!   their own host path work, and anything else fails with CreateContainerConfigError.
//!   `DirectoryOrCreate` paths are created; a missing `Directory` path keeps the container
//!   ContainerCreating until it exists; other hostPath types are not checked.
//!   Container images are names looked up in the node's [`NodeConfig::images`]. A container's
//!   log file holds its current run only. The crash back-off is never reset.
//! - Pod IPs are loopback addresses, so every pod shares the host's network namespace and
//!   port space on its own address.

mod authorization;
mod container;
mod controllers;
mod defaults;
mod node;
mod patch;
mod pod_status;
mod resource;
mod scheduler;
mod selector;
mod server;
mod status;
mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use authorization::VERBS;
pub use resource::Resource;
pub use scheduler::parse_quantity;
pub use status::{Status, StatusDetails};

use node::{LogIndex, Node, NodeShared, ProcessTable};
use server::ServerState;
use store::{DeleteOptions, Deleted, Store};

/// One HTTP request the API server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw query string, without the `?`.
    pub query: String,
    /// Whether the request was a watch (`watch=true` or `watch=1`).
    pub watch: bool,
}

/// A node taint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

impl Taint {
    pub fn new(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.to_string(),
            value: value.to_string(),
            effect: effect.to_string(),
        }
    }
}

/// A container image a node can run: a mapping of image paths to host paths, plus the
/// image's environment, entrypoint and default arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    /// Image path and the host path it maps to. `command[0]`, arguments and `workingDir`
    /// equal to an image path, or under it as a directory, are mapped to the host.
    pub path_map: Vec<(String, PathBuf)>,
    pub env: BTreeMap<String, String>,
    /// Used when the container has no `command`, like an image's ENTRYPOINT.
    pub entrypoint: Vec<String>,
    /// Used when the container has neither `command` nor `args`, like an image's CMD.
    pub cmd: Vec<String>,
}

impl Image {
    /// Maps one image path to a host path.
    pub fn map(mut self, image_path: &str, host_path: impl Into<PathBuf>) -> Image {
        self.path_map
            .push((image_path.to_string(), host_path.into()));
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Image {
        self.env.insert(name.to_string(), value.to_string());
        self
    }
}

/// One simulated node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    /// Labels, besides `kubernetes.io/hostname`, `kubernetes.io/os` and `kubernetes.io/arch`,
    /// which every node has.
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    /// Allocatable memory in MiB, which the memory requests of its pods must fit into.
    pub memory_mb: u64,
    /// Images the node can run, by the name a container's `image` gives.
    pub images: BTreeMap<String, Image>,
}

impl NodeConfig {
    /// Creates a node with 8 GiB of allocatable memory and no labels, taints or images.
    pub fn new(name: &str) -> NodeConfig {
        NodeConfig {
            name: name.to_string(),
            labels: BTreeMap::new(),
            taints: Vec::new(),
            memory_mb: 8192,
            images: BTreeMap::new(),
        }
    }

    pub fn label(mut self, key: &str, value: &str) -> NodeConfig {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    pub fn taint(mut self, taint: Taint) -> NodeConfig {
        self.taints.push(taint);
        self
    }

    pub fn memory_mb(mut self, memory_mb: u64) -> NodeConfig {
        self.memory_mb = memory_mb;
        self
    }

    pub fn image(mut self, name: &str, image: Image) -> NodeConfig {
        self.images.insert(name.to_string(), image);
        self
    }
}

/// Settings of a simulated cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub nodes: Vec<NodeConfig>,
    /// How often watches that allow bookmarks get a BOOKMARK event.
    pub bookmark_interval: Duration,
    /// How many events the history keeps for watches that resume from a resourceVersion.
    pub history_limit: usize,
    /// Directory for container log files.
    pub log_dir: PathBuf,
    /// The first restart delay of a crashed container; it doubles per restart.
    pub crash_backoff: Duration,
    /// The maximum restart delay.
    pub crash_backoff_max: Duration,
    /// Serves requests that carry no `Authorization` header. kubectl and other client-go
    /// programs send no token over plain HTTP, so they need this; kube-rs does send it.
    pub allow_anonymous: bool,
    /// The user name that requests with the bearer token authenticate as, which denials from
    /// [`Cluster::forbid`] name. Requests without a token are `system:anonymous`.
    pub user: String,
}

impl ClusterConfig {
    /// Creates a configuration with one node named `node-1` without images, bookmarks every
    /// second, 10 000 events of history, a crash back-off from 100 ms to 2 s, and the user
    /// `system:serviceaccount:kube-system:kubesim`.
    pub fn new(log_dir: impl Into<PathBuf>) -> ClusterConfig {
        ClusterConfig {
            nodes: vec![NodeConfig::new("node-1")],
            bookmark_interval: Duration::from_secs(1),
            history_limit: 10_000,
            log_dir: log_dir.into(),
            crash_backoff: Duration::from_millis(100),
            crash_backoff_max: Duration::from_secs(2),
            allow_anonymous: false,
            user: "system:serviceaccount:kube-system:kubesim".to_string(),
        }
    }
}

/// A running simulated cluster: API server, scheduler and nodes. Dropping it kills every pod
/// process and stops the server.
pub struct Cluster {
    url: String,
    token: String,
    store: Arc<Store>,
    server: Arc<ServerState>,
    processes: Arc<ProcessTable>,
    logs: Arc<LogIndex>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn namespace_of(resource: &Resource, namespace: Option<&str>) -> String {
    if resource.namespaced {
        namespace.unwrap_or("default").to_string()
    } else {
        String::new()
    }
}

/// Creates the `Node` object of a simulated node, with its labels, taints, memory and a
/// Ready condition. The scheduler reads the node's configuration, not this object.
fn create_node_object(store: &Store, node: &Node) -> Result<(), Status> {
    let config = &node.config;
    let taints: Vec<Value> = config
        .taints
        .iter()
        .map(|t| json!({"key": t.key, "value": t.value, "effect": t.effect}))
        .collect();
    let mut object = json!({"metadata": {"name": config.name, "labels": scheduler::node_labels(config)}, "spec": {}});
    if !taints.is_empty() {
        object["spec"]["taints"] = Value::Array(taints);
    }
    store.create(&Resource::NODES, "", object)?;
    let now = store::now_rfc3339();
    let resources = json!({"memory": format!("{}Mi", config.memory_mb), "pods": "110"});
    let status = json!({
        "capacity": resources,
        "allocatable": resources,
        "conditions": [{
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "kubelet is posting ready status",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }],
        "addresses": [
            {"type": "InternalIP", "address": node.ips.host_ip().to_string()},
            {"type": "Hostname", "address": config.name},
        ],
        "nodeInfo": {
            "architecture": std::env::consts::ARCH,
            "operatingSystem": "linux",
            "kubeletVersion": "v1.33.0-kubesim",
            "kubeProxyVersion": "",
            "containerRuntimeVersion": "kubesim://0.1.0",
            "kernelVersion": "",
            "osImage": "kubesim",
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
        },
    });
    store.update(
        &Resource::NODES,
        "",
        &config.name,
        store::Target::Status,
        |current| {
            let mut node = current.clone();
            node["status"] = status;
            Ok(node)
        },
    )?;
    Ok(())
}

/// Builds a denial rule, panicking on an unknown verb so that a typo cannot leave a test's
/// denial without effect.
fn forbid_rule(verb: &str, resource: &Resource, namespace: Option<&str>) -> authorization::Rule {
    assert!(
        verb == "*" || VERBS.contains(&verb),
        "unknown verb {verb:?}: expected one of {VERBS:?} or \"*\""
    );
    authorization::Rule {
        verb: verb.to_string(),
        resource: *resource,
        namespace: namespace.map(str::to_string),
    }
}

impl Cluster {
    /// Starts the API server on `127.0.0.1` with a random port, the scheduler and the nodes,
    /// and creates the `default` and `kube-system` namespaces.
    pub async fn start(config: ClusterConfig) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(&config.log_dir)?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let token = uuid::Uuid::new_v4().simple().to_string();

        let store = Arc::new(Store::new(
            config.history_limit,
            config.nodes.iter().map(|n| n.name.clone()),
        ));
        for namespace in ["default", "kube-system"] {
            store
                .create(
                    &Resource::NAMESPACES,
                    "",
                    json!({"metadata": {"name": namespace}}),
                )
                .map_err(|status| {
                    anyhow::anyhow!("failed to create namespace {namespace}: {status}")
                })?;
        }
        let logs = Arc::new(LogIndex::default());
        let processes = Arc::new(ProcessTable::default());
        let shared = Arc::new(NodeShared {
            store: store.clone(),
            logs: logs.clone(),
            processes: processes.clone(),
            log_dir: config.log_dir.clone(),
            // A zero back-off would restart a crashing container in a busy loop.
            crash_backoff: config.crash_backoff.max(Duration::from_millis(10)),
            crash_backoff_max: config
                .crash_backoff_max
                .max(config.crash_backoff.max(Duration::from_millis(10))),
        });
        let mut nodes = Vec::new();
        for node in &config.nodes {
            let node = Arc::new(Node::new(node.clone(), shared.clone()));
            create_node_object(&store, &node).map_err(|status| {
                anyhow::anyhow!(
                    "failed to create node object {}: {status}",
                    node.config.name
                )
            })?;
            nodes.push(node);
        }

        let server = Arc::new(ServerState {
            store: store.clone(),
            token: token.clone(),
            user: config.user.clone(),
            allow_anonymous: config.allow_anonymous,
            bookmark_interval: config.bookmark_interval,
            requests: Default::default(),
            logs: logs.clone(),
            watches_blocked: watch::channel(false).0,
            forbidden: Default::default(),
        });
        let (shutdown, shutdown_receiver) = watch::channel(false);
        let mut tasks = vec![tokio::spawn(server::serve(
            listener,
            server.clone(),
            shutdown_receiver.clone(),
        ))];
        tasks.push(tokio::spawn(scheduler::run(
            store.clone(),
            config.nodes.clone(),
            shutdown_receiver.clone(),
        )));
        tasks.push(tokio::spawn(controllers::run(
            store.clone(),
            config.nodes.clone(),
            shutdown_receiver.clone(),
        )));
        for node in nodes {
            tasks.push(tokio::spawn(node::run(node, shutdown_receiver.clone())));
        }

        tracing::info!(%url, nodes = config.nodes.len(), "kubesim: cluster started");
        Ok(Cluster {
            url,
            token,
            store,
            server,
            processes,
            logs,
            shutdown,
            tasks,
        })
    }

    /// Returns the API server's base URL, such as `http://127.0.0.1:41234`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bearer token every request must carry.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Writes a kubeconfig with one cluster, user and context, all named `context`, using
    /// token authentication, with `current-context` set to it and namespace `default`.
    pub fn write_kubeconfig(&self, path: &Path, context: &str) -> std::io::Result<()> {
        let quote = |text: &str| serde_json::to_string(text).expect("strings serialize");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n    namespace: default\ncurrent-context: {name}\n",
            name = quote(context),
            server = quote(&self.url),
            token = quote(&self.token),
        );
        std::fs::write(path, text)
    }

    /// Ends every open watch stream now, as an API server restart would. Clients resume from
    /// their last resourceVersion.
    pub fn cut_watches(&self) {
        self.store.cut_watches();
    }

    /// Holds new watch requests while `blocked` is true, as an API server that is down would
    /// not serve them. Changes and a [`Cluster::compact`] made meanwhile then happen before a
    /// client resumes. Other requests are served. A held watch starts once watches are
    /// unblocked, or after 60 s.
    pub fn block_watches(&self, blocked: bool) {
        self.server.watches_blocked.send_replace(blocked);
    }

    /// Denies every HTTP request with `verb` on `resource` in `namespace` (`None`: in every
    /// namespace and at the cluster scope) until [`Cluster::permit`] lifts the denial, as RBAC
    /// denies a request that no role grants. The request gets 403 with a `Forbidden` status
    /// and the real server's message, such as `daemonsets.apps "agent" is forbidden: User
    /// "system:serviceaccount:kube-system:kubesim" cannot patch resource "daemonsets" in API
    /// group "apps" in the namespace "fngate-system"`.
    ///
    /// `verb` is one of [`VERBS`] or `*`, and a request's verb is derived as the real server
    /// derives it, so a server-side apply is `patch`. Unlike the real server, kubesim does not
    /// also check `create` for an apply that creates the object. Requests for a namespace
    /// object count as requests in that namespace. Requests for subresources (`status`, `log`)
    /// and calls of [`Cluster::create`] or [`Cluster::delete`] are never denied.
    ///
    /// # Panics
    ///
    /// When `verb` is not one of [`VERBS`] or `*`.
    pub fn forbid(&self, verb: &str, resource: &Resource, namespace: Option<&str>) {
        let rule = forbid_rule(verb, resource, namespace);
        let mut rules = self.server.forbidden.lock();
        if !rules.contains(&rule) {
            rules.push(rule);
        }
    }

    /// Lifts the denial that [`Cluster::forbid`] set with the same arguments. Returns false
    /// when there was none.
    ///
    /// # Panics
    ///
    /// When `verb` is not one of [`VERBS`] or `*`.
    pub fn permit(&self, verb: &str, resource: &Resource, namespace: Option<&str>) -> bool {
        let rule = forbid_rule(verb, resource, namespace);
        let mut rules = self.server.forbidden.lock();
        let before = rules.len();
        rules.retain(|existing| *existing != rule);
        rules.len() < before
    }

    /// Forgets the event history: a watch resuming from a resourceVersion older than the
    /// current one, or a `continue` token from before, gets 410 Expired.
    pub fn compact(&self) {
        self.store.compact();
    }

    /// Returns the current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store.resource_version()
    }

    /// Reads one object. `namespace` defaults to `default` for namespaced types.
    pub fn get(&self, resource: &Resource, namespace: Option<&str>, name: &str) -> Option<Value> {
        self.store
            .get(resource, &namespace_of(resource, namespace), name)
    }

    /// Lists objects of a type, in one namespace or, with `None`, in all.
    pub fn list(&self, resource: &Resource, namespace: Option<&str>) -> Vec<Value> {
        let namespace = if resource.namespaced { namespace } else { None };
        self.store.list(resource, namespace).0
    }

    /// Creates an object with the same checks and side effects as a POST. The namespace comes
    /// from `metadata.namespace`, or is `default`.
    pub fn create(&self, resource: &Resource, object: Value) -> Result<Value, Status> {
        let namespace = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .map(str::to_string);
        self.store.create(
            resource,
            &namespace_of(resource, namespace.as_deref()),
            object,
        )
    }

    /// Deletes an object as a DELETE request with `gracePeriodSeconds = grace` does. A pod on a
    /// node is only marked; it disappears once its processes have stopped.
    pub fn delete(
        &self,
        resource: &Resource,
        namespace: Option<&str>,
        name: &str,
        grace: Option<u64>,
    ) -> Result<(), Status> {
        let options = DeleteOptions {
            grace_period_seconds: grace,
            ..DeleteOptions::default()
        };
        match self
            .store
            .delete(resource, &namespace_of(resource, namespace), name, &options)?
        {
            Deleted::Removed(_) | Deleted::Pending(_) => Ok(()),
        }
    }

    /// Returns every request the API server has received, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.server.requests.lock().clone()
    }

    /// Reads the output (stdout and stderr) of the current run of a pod's first container.
    pub fn pod_log(&self, namespace: &str, name: &str) -> Option<String> {
        self.logs.read(namespace, name)
    }

    /// Kills every pod process and stops the server, scheduler and nodes.
    pub async fn shutdown(mut self) {
        self.stop();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        tracing::info!(url = %self.url, "kubesim: cluster stopped");
    }

    fn stop(&self) {
        self.processes.kill_all();
        let _ = self.shutdown.send(true);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn cluster_is_send_and_sync() {
        assert_send_sync::<Cluster>();
        assert_send_sync::<ClusterConfig>();
    }
}
