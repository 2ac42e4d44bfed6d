//! Harness for the k8s-mode end-to-end tests: kubesim (or a real cluster), the runtime
//! namespace, fngate bound to it, helpers that read the runtime pods, and a relay that can
//! make the API server stop responding.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fngate_kubesim::{Cluster, ClusterConfig, Image, NodeConfig};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, PostParams};
use kube::Api;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::{get, Code, Fngate, Reply, WAIT_LIMIT};

/// The k8s namespace of the runtime pods on kubesim.
pub const RUNTIME_NAMESPACE: &str = "fngate-runtime";

/// Image name the simulated node maps to the fngate-runtime binary.
pub const IMAGE: &str = "fngate/runtime:test";
pub const SELECTOR: &str = "app.kubernetes.io/managed-by=fngate";

/// A cluster with a runtime namespace, and fngate bound to it.
pub struct Env {
    // Declared first so it stops (and deletes its pods) while the cluster still runs.
    pub fngate: Fngate,
    /// The kubeconfig fngate uses: through the relay when there is one.
    pub kubeconfig: PathBuf,
    pub pods: Api<Pod>,
    pub sim: Option<Cluster>,
    /// Relay between fngate and the API server, when the test asked for one.
    pub relay: Option<Relay>,
    pub namespace: String,
}

/// Where the test's cluster comes from.
pub enum Target {
    Sim { nodes: Vec<NodeConfig> },
    Real(RealCluster),
}

pub struct RealCluster {
    pub kubeconfig: PathBuf,
    pub context: Option<String>,
    pub image: String,
    pub namespace: String,
}

impl RealCluster {
    /// Reads the real cluster's settings from `FNGATE_TEST_*`.
    pub fn from_env() -> RealCluster {
        let kubeconfig = std::env::var_os("FNGATE_TEST_KUBECONFIG")
            .expect("real-cluster tests need FNGATE_TEST_KUBECONFIG; see docs/kubernetes.md");
        RealCluster {
            kubeconfig: PathBuf::from(kubeconfig),
            context: std::env::var("FNGATE_TEST_CONTEXT").ok(),
            image: std::env::var("FNGATE_TEST_RUNTIME_IMAGE").unwrap_or_else(|_| IMAGE.to_owned()),
            namespace: std::env::var("FNGATE_TEST_NAMESPACE")
                .unwrap_or_else(|_| "fngate-test".to_owned()),
        }
    }
}

/// Returns the node of most tests: labelled for functions, with the runtime image.
pub fn function_node(name: &str) -> NodeConfig {
    NodeConfig::new(name)
        .label("fngate.io/pool", "functions")
        .image(IMAGE, runtime_image())
}

pub fn runtime_image() -> Image {
    Image::default()
        .map(
            "/usr/local/bin/fngate-runtime",
            env!("CARGO_BIN_EXE_fngate-runtime"),
        )
        .env("PATH", &std::env::var("PATH").unwrap_or_default())
        .env("HOME", "/tmp")
}

impl Env {
    /// Starts the cluster (kubesim, or connects to a real one), creates the runtime namespace,
    /// and starts fngate with `functions` in a namespace `default` bound to it. `binding` adds
    /// lines to the `[namespace.kubernetes]` table.
    pub async fn start(
        target: Target,
        dir: tempfile::TempDir,
        binding: &str,
        functions: &str,
    ) -> Env {
        Env::start_with(target, dir, binding, functions, false).await
    }

    /// Like [`Env::start`]; with `relay`, fngate reaches kubesim's API server through a
    /// [`Relay`] that the test can freeze.
    pub async fn start_with(
        target: Target,
        dir: tempfile::TempDir,
        binding: &str,
        functions: &str,
        relay: bool,
    ) -> Env {
        let (sim, kubeconfig, context, image, namespace) = match target {
            Target::Sim { nodes } => {
                let mut config = ClusterConfig::new(dir.path().join("kubesim-logs"));
                config.nodes = nodes;
                let cluster = Cluster::start(config)
                    .await
                    .expect("kubesim failed to start");
                let kubeconfig = dir.path().join("kubeconfig");
                cluster.write_kubeconfig(&kubeconfig, "kubesim").unwrap();
                let namespace = RUNTIME_NAMESPACE.to_owned();
                (
                    Some(cluster),
                    kubeconfig,
                    Some("kubesim".to_owned()),
                    IMAGE.to_owned(),
                    namespace,
                )
            }
            Target::Real(real) => (
                None,
                real.kubeconfig,
                real.context,
                real.image,
                real.namespace,
            ),
        };
        let client = client(&kubeconfig, context.as_deref()).await;
        ensure_namespace(&client, &namespace).await;
        let (kubeconfig, relay) = match (&sim, relay) {
            (Some(cluster), true) => {
                let relay = Relay::start(cluster).await;
                let relayed = dir.path().join("kubeconfig-relayed");
                let text = std::fs::read_to_string(&kubeconfig).unwrap();
                let text = text.replace(cluster.url(), &format!("http://{}", relay.addr));
                std::fs::write(&relayed, text).unwrap();
                (relayed, Some(relay))
            }
            (None, true) => panic!("a relay needs kubesim"),
            (_, false) => (kubeconfig, None),
        };

        let context_line = context
            .map(|c| format!("context = \"{c}\"\n"))
            .unwrap_or_default();
        // Installing the system components is tested on its own; elsewhere it is only noise.
        let install_line = if binding.contains("install") {
            ""
        } else {
            "install = false\n"
        };
        // Unless the binding names another, the nodes' function directory is the control
        // plane's, so code is there without a node agent.
        let function_dir_line = if binding.contains("function_dir") {
            String::new()
        } else {
            format!("function_dir = \"{}\"\n", dir.path().join("data").display())
        };
        let platform = format!(
            "[[namespace]]\nname = \"default\"\n[namespace.kubernetes]\nkubeconfig = \"{}\"\n{context_line}namespace = \"{namespace}\"\n{install_line}{function_dir_line}runtime_image = \"{image}\"\n{binding}\n\n{functions}",
            kubeconfig.display(),
        );
        let fngate = tokio::task::block_in_place(|| Fngate::start(dir, &platform));
        let env = Env {
            fngate,
            kubeconfig: kubeconfig.clone(),
            pods: Api::namespaced(client, &namespace),
            sim,
            relay,
            namespace,
        };
        env.wait_synced().await;
        env
    }

    /// Starts kubesim with one node for functions, and fngate bound to it.
    pub async fn start_sim(dir: tempfile::TempDir, binding: &str, functions: &str) -> Env {
        let nodes = vec![function_node("node-1")];
        Env::start(Target::Sim { nodes }, dir, binding, functions).await
    }

    /// Starts kubesim with one node for functions and fngate bound to it; with `relay`, through
    /// a [`Relay`].
    pub async fn start_sim_with(
        dir: tempfile::TempDir,
        binding: &str,
        functions: &str,
        relay: bool,
    ) -> Env {
        let nodes = vec![function_node("node-1")];
        Env::start_with(Target::Sim { nodes }, dir, binding, functions, relay).await
    }

    pub fn relay(&self) -> &Relay {
        self.relay.as_ref().expect("this test needs the relay")
    }

    /// Returns the only runtime pod, failing when there is not exactly one.
    pub async fn only_pod(&self) -> Pod {
        let pods = self.runtime_pods().await;
        assert_eq!(
            pods.len(),
            1,
            "{:?}",
            pods.iter().map(summary).collect::<Vec<_>>()
        );
        pods.into_iter().next().unwrap()
    }

    pub fn sim(&self) -> &Cluster {
        self.sim.as_ref().expect("this test needs kubesim")
    }

    /// Waits until `/readyz` reports the routing table synced, which in k8s mode means the
    /// pod watcher finished its first list.
    pub async fn wait_synced(&self) {
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            let reply = get(self.fngate.admin, "/readyz").await;
            if reply.status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "fngate never became ready: {}\n{}",
                reply.text(),
                self.fngate.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn runtime_pods(&self) -> Vec<Pod> {
        self.pods
            .list(&ListParams::default().labels(SELECTOR))
            .await
            .expect("list runtime pods")
            .items
    }

    /// Waits until `condition` holds for the runtime pods, failing after [`WAIT_LIMIT`].
    pub async fn wait_pods(&self, what: &str, condition: impl Fn(&[Pod]) -> bool) -> Vec<Pod> {
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            let pods = self.runtime_pods().await;
            if condition(&pods) {
                return pods;
            }
            assert!(
                Instant::now() < deadline,
                "runtime pods never became {what}: {:?}\n{}",
                pods.iter().map(summary).collect::<Vec<_>>(),
                self.fngate.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn routable(&self, function: &str) -> f64 {
        self.fngate
            .metric(
                "fngate_routable_instances",
                &[("namespace", "default"), ("function", function)],
            )
            .await
    }
}

pub async fn client(kubeconfig: &Path, context: Option<&str>) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_owned),
        ..Default::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

pub async fn ensure_namespace(client: &kube::Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(name).await.unwrap().is_some() {
        return;
    }
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
}

pub fn summary(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    format!(
        "{} phase={:?} ip={:?} deleting={}",
        pod.metadata.name.as_deref().unwrap_or_default(),
        status.and_then(|s| s.phase.clone()),
        status.and_then(|s| s.pod_ip.clone()),
        pod.metadata.deletion_timestamp.is_some()
    )
}

pub fn name_of(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

pub fn web_toml(name: &str, code: &Code, extra: &str) -> String {
    format!(
        "[[function]]\nnamespace = \"default\"\nname = \"{name}\"\nkind = \"web\"\ncode = {{ directory = \"{}\" }}\n{extra}\n",
        code.dir.display()
    )
}

pub fn pid_of(reply: &Reply) -> i64 {
    reply.json()["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("no pid in {}", reply.text()))
}

pub fn env_image(env: &Env) -> String {
    match &env.sim {
        Some(_) => IMAGE.to_owned(),
        None => std::env::var("FNGATE_TEST_RUNTIME_IMAGE").unwrap_or_else(|_| IMAGE.to_owned()),
    }
}

/// LIST requests (not watches) of the runtime pods the API server received.
pub fn pod_lists(sim: &Cluster, namespace: &str) -> usize {
    let path = format!("/api/v1/namespaces/{namespace}/pods");
    sim.requests()
        .iter()
        .filter(|r| r.method == "GET" && !r.watch && r.path == path)
        .count()
}

/// DELETE requests for the pod `name` the API server received.
pub fn pod_deletes(sim: &Cluster, namespace: &str, name: &str) -> usize {
    let path = format!("/api/v1/namespaces/{namespace}/pods/{name}");
    sim.requests()
        .iter()
        .filter(|r| r.method == "DELETE" && r.path == path)
        .count()
}

/// A TCP relay to the API server that can stop passing bytes in both directions while keeping
/// every connection open, so that requests neither fail nor complete.
pub struct Relay {
    pub addr: SocketAddr,
    frozen: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(cluster: &Cluster) -> Relay {
        let upstream: SocketAddr = cluster
            .url()
            .strip_prefix("http://")
            .expect("kubesim serves plain HTTP")
            .parse()
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, gate) = watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let gate = gate.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pump(client_read, server_write, gate.clone()),
                        pump(server_read, client_write, gate),
                    );
                });
            }
        });
        Relay {
            addr,
            frozen,
            accept,
        }
    }

    /// Stops (`true`) or resumes (`false`) passing bytes.
    pub fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies bytes from `from` to `to`, holding each chunk while the relay is frozen.
pub async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut gate: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if gate.wait_for(|frozen| !frozen).await.is_err() {
            break;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
