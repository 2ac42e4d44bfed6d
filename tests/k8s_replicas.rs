//! End-to-end tests of proxy replicas in k8s mode: `fngate serve` bound to kubesim, and
//! `fngate proxy` processes that take their routes from it and report their load to it. Each
//! replica routes only the pods labelled with its name.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::k8s::*;
use common::*;
use hyper::Method;
use k8s_openapi::api::core::v1::Pod;
use tokio::net::TcpListener;

/// A running `fngate proxy` process.
struct ReplicaProcess {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    stderr_path: PathBuf,
}

impl Drop for ReplicaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ReplicaProcess {
    /// Starts replica `name` of namespace `default` against `env`'s control plane and cluster,
    /// and waits until its `/readyz` returns 200.
    async fn start(env: &Env, name: &str) -> ReplicaProcess {
        ReplicaProcess::start_with(env, name, env.fngate.api, &[]).await
    }

    /// Like [`ReplicaProcess::start`], with the control-plane API at `control_plane` and
    /// `extra` arguments.
    async fn start_with(
        env: &Env,
        name: &str,
        control_plane: SocketAddr,
        extra: &[&str],
    ) -> ReplicaProcess {
        let stderr_path = env.fngate.dir.path().join(format!("{name}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_fngate"))
            .arg("proxy")
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--proxy-threads", "1"])
            .args(["--control-plane", &format!("http://{control_plane}")])
            .args(["--namespace", "default"])
            .args(extra)
            .args(["--replica", name])
            .arg("--kubeconfig")
            .arg(&env.kubeconfig)
            .args(["--context", "kubesim"])
            .args(["--shutdown-grace-ms", "2000"])
            .env("FNGATE_LOG", "info,fngate_proxy=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("failed to start fngate proxy");
        let rx = stdout_lines(&mut child);
        let address = |line: &str| -> Option<SocketAddr> {
            let rest = line.split("listening on http://").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        };
        let (mut proxy, mut admin) = (None, None);
        let deadline = Instant::now() + WAIT_LIMIT;
        while proxy.is_none() || admin.is_none() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(remaining).unwrap_or_else(|_| {
                panic!(
                    "fngate proxy printed no addresses; stderr:\n{}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                )
            });
            if line.starts_with("fngate: admin listening") {
                admin = address(&line);
            } else if line.starts_with("fngate: proxy replica") {
                proxy = address(&line);
            }
        }
        let replica = ReplicaProcess {
            child,
            proxy: proxy.unwrap(),
            admin: admin.unwrap(),
            stderr_path,
        };
        loop {
            let reply = get(replica.admin, "/readyz").await;
            if reply.status == 200 {
                return replica;
            }
            assert!(
                Instant::now() < deadline,
                "replica {name} never became ready: {}\n{}",
                reply.text(),
                replica.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn replica_of(pod: &Pod) -> String {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get("fngate.io/replica"))
        .cloned()
        .unwrap_or_default()
}

fn replicas_of(pods: &[Pod]) -> Vec<String> {
    let mut replicas: Vec<String> = pods.iter().map(replica_of).collect();
    replicas.sort();
    replicas
}

/// Each replica starts pods labelled with its name and reuses its own warm pod, and the
/// function's status lists the instances of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_route_only_their_own_pods() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim(dir, "", &web_toml("site", &code, "")).await;
    let a = ReplicaProcess::start(&env, "proxy-a").await;
    let b = ReplicaProcess::start(&env, "proxy-b").await;

    let first = get(a.proxy, "/web/default/site/one").await;
    assert_eq!(first.status, 200, "{}\n{}", first.text(), a.stderr());
    assert_eq!(first.json()["path"], "/one");
    let pods = env.runtime_pods().await;
    assert_eq!(replicas_of(&pods), ["proxy-a"]);

    let other = get(b.proxy, "/web/default/site/two").await;
    assert_eq!(other.status, 200, "{}\n{}", other.text(), b.stderr());
    assert_ne!(pid_of(&other), pid_of(&first), "replica b used a's pod");
    assert_eq!(
        replicas_of(&env.runtime_pods().await),
        ["proxy-a", "proxy-b"]
    );

    let again = get(a.proxy, "/web/default/site/three").await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(
        pid_of(&again),
        pid_of(&first),
        "a's warm pod was not reused"
    );
    assert_eq!(env.runtime_pods().await.len(), 2);

    // The status follows the scalers, which may see a pod ready a moment after its replica.
    wait_instances(&env, &b, "ready on both replicas", |instances| {
        let mut ready: Vec<&str> = instances
            .iter()
            .filter(|instance| instance["state"] == "ready")
            .filter_map(|instance| instance["replica"].as_str())
            .collect();
        ready.sort();
        ready == ["proxy-a", "proxy-b"]
    })
    .await;

    let namespace = get(env.fngate.api, "/v1/namespaces/default").await.json();
    let replicas: Vec<&str> = namespace["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|replica| replica["name"].as_str().unwrap())
        .collect();
    assert_eq!(replicas, ["proxy-a", "proxy-b"], "{namespace}");
}

/// A replica that stops reporting loses its pods once it expires; the other replica goes on
/// serving from its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replica_pods_are_deleted() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim(dir, "", &web_toml("site", &code, "")).await;
    let mut a = ReplicaProcess::start(&env, "proxy-a").await;
    let b = ReplicaProcess::start(&env, "proxy-b").await;
    for replica in [&a, &b] {
        let reply = get(replica.proxy, "/web/default/site/").await;
        assert_eq!(reply.status, 200, "{}\n{}", reply.text(), replica.stderr());
    }
    let kept = get(b.proxy, "/web/default/site/").await;
    assert_eq!(
        replicas_of(&env.runtime_pods().await),
        ["proxy-a", "proxy-b"]
    );

    a.kill();
    env.wait_pods("only replica b's", |pods| replicas_of(pods) == ["proxy-b"])
        .await;
    assert!(
        env.fngate
            .stderr()
            .contains("proxy replica stopped reporting"),
        "{}",
        env.fngate.stderr()
    );
    let reply = get(b.proxy, "/web/default/site/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(pid_of(&reply), pid_of(&kept), "b's pod was replaced");
}

/// Keep-warm on a replica's pod counts from the replica's last request: a pod busy for twice
/// keep-warm is still routed when its request ends, and is deleted once idle for keep-warm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_pod_kept_while_busy_then_expires() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let functions = web_toml("site", &code, "keep_warm_ms = 2000\ntimeout_ms = 10000");
    let env = Env::start_sim(dir, "", &functions).await;
    let a = ReplicaProcess::start(&env, "proxy-a").await;

    let slow = get(a.proxy, "/web/default/site/?ms=4000").await;
    assert_eq!(slow.status, 200, "{}\n{}", slow.text(), a.stderr());
    // Sent at once: the pod's keep-warm has only just started.
    let next = get(a.proxy, "/web/default/site/").await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(
        pid_of(&next),
        pid_of(&slow),
        "the pod was retired while its request ran:\n{}",
        env.fngate.stderr()
    );

    env.wait_pods("empty after keep-warm", |pods| pods.is_empty())
        .await;
    let last = get(a.proxy, "/web/default/site/").await;
    assert_eq!(last.status, 200, "{}", last.text());
    assert_ne!(pid_of(&last), pid_of(&slow));
}

/// The replica endpoints reject what they cannot serve with a JSON error naming the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_endpoints_reject_bad_requests() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let fngate = tokio::task::block_in_place(|| {
        Fngate::start(dir, &platform_file(&web_toml("site", &code, "")))
    });
    let cases = [
        (
            "/v1/namespaces/default/replicas/proxy-a/routes",
            409,
            "k8s-mode",
        ),
        ("/v1/namespaces/nope/replicas/proxy-a/routes", 404, "nope"),
        (
            "/v1/namespaces/default/replicas/Proxy_A/routes",
            400,
            "replica",
        ),
        (
            "/v1/namespaces/default/replicas/local/routes",
            400,
            "replica",
        ),
        (
            "/v1/namespaces/default/replicas/proxy-a/routes?after=x",
            400,
            "after",
        ),
        (
            "/v1/namespaces/default/replicas/proxy-a/routes?since=1",
            400,
            "since",
        ),
    ];
    for (path, status, needle) in cases {
        let reply = get(fngate.api, path).await;
        assert_eq!(reply.status, status, "{path}: {}", reply.text());
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains(needle), "{path}: {message}");
    }
    let reply = request(
        fngate.api,
        hyper::Method::POST,
        "/v1/namespaces/default/replicas/proxy-a/report",
        "[1]",
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.text());
}

/// Polls the function's status until `condition` holds for its instances.
async fn wait_instances(
    env: &Env,
    replica: &ReplicaProcess,
    what: &str,
    condition: impl Fn(&[serde_json::Value]) -> bool,
) {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let status = get(env.fngate.api, "/v1/namespaces/default/functions/site").await;
        let instances = status.json()["instances"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if condition(&instances) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "instances never became {what}: {}\n{}\n{}",
            status.text(),
            env.fngate.stderr(),
            replica.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Changing a function replaces a replica's pod without failing the request in flight on it:
/// the update returns once the replica's old pod is out of routing, the next request reaches a
/// new pod, and the old pod is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_drains_replica_pod() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim(dir, "", &web_toml("site", &code, "timeout_ms = 10000")).await;
    let a = ReplicaProcess::start(&env, "proxy-a").await;
    let warm = get(a.proxy, "/web/default/site/").await;
    assert_eq!(warm.status, 200, "{}\n{}", warm.text(), a.stderr());
    let old_pod = name_of(&env.runtime_pods().await[0]);

    let proxy = a.proxy;
    let slow = tokio::spawn(async move { get(proxy, "/web/default/site/?ms=2000").await });
    // Changed as soon as the replica forwards the request, before its next report can tell
    // the control plane.
    let labels = [("namespace", "default"), ("function", "site")];
    let deadline = Instant::now() + WAIT_LIMIT;
    while metric_at(a.admin, "fngate_in_flight_requests", &labels).await != 1.0 {
        assert!(Instant::now() < deadline, "the slow request never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let body = serde_json::json!({
        "kind": "web",
        "code": {"directory": code.dir},
        "timeout_ms": 10000,
        "env": {"VERSION": "2"},
    });
    let update = put_json(
        env.fngate.api,
        "/v1/namespaces/default/functions/site",
        &body,
    )
    .await;
    assert_eq!(update.status, 200, "{}", update.text());

    let after = get(a.proxy, "/web/default/site/").await;
    assert_eq!(after.status, 200, "{}\n{}", after.text(), a.stderr());
    assert_ne!(
        pid_of(&after),
        pid_of(&warm),
        "the old pod served after the update"
    );
    let slow = slow.await.unwrap();
    assert_eq!(
        slow.status,
        200,
        "in-flight request failed: {}",
        slow.text()
    );
    assert_eq!(pid_of(&slow), pid_of(&warm));

    env.wait_pods("without the old pod", |pods| {
        !pods.iter().any(|pod| name_of(pod) == old_pod)
    })
    .await;
    let replicas = replicas_of(&env.runtime_pods().await);
    assert!(replicas.iter().all(|r| r == "proxy-a"), "{replicas:?}");
}

/// A TCP relay on loopback to a target the test can change, standing in for the stable
/// address (a Service) of a control plane that restarts on another port.
struct Relay {
    addr: SocketAddr,
    target: std::sync::Arc<std::sync::Mutex<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = std::sync::Arc::new(std::sync::Mutex::new(target));
        let current = std::sync::Arc::clone(&target);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let to = *current.lock().unwrap();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Relay { addr, target, task }
    }

    fn retarget(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }
}

/// A replica outlives a control plane restart. While the control plane is down it serves from
/// its warm pod, and a request on that pod finishes after the new control plane started.
/// Afterwards it routes only the new control plane's pods, and the earlier pod is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_survives_control_plane_restart() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim(dir, "", &web_toml("site", &code, "")).await;
    let relay = Relay::start(env.fngate.api).await;
    let a = ReplicaProcess::start_with(&env, "proxy-a", relay.addr, &[]).await;
    let first = get(a.proxy, "/web/default/site/").await;
    assert_eq!(first.status, 200, "{}\n{}", first.text(), a.stderr());
    let earlier_pod = name_of(&env.runtime_pods().await[0]);

    kill_control_plane(&env).await;
    let deadline = Instant::now() + WAIT_LIMIT;
    let during = get(a.proxy, "/web/default/site/").await;
    assert_eq!(during.status, 200, "{}\n{}", during.text(), a.stderr());
    assert_eq!(pid_of(&during), pid_of(&first), "the warm pod was not used");

    // A request still running on the earlier pod when the new control plane starts.
    let proxy = a.proxy;
    let slow = tokio::spawn(async move { get(proxy, "/web/default/site/?ms=2000").await });
    let labels = [("namespace", "default"), ("function", "site")];
    while metric_at(a.admin, "fngate_in_flight_requests", &labels).await != 1.0 {
        assert!(Instant::now() < deadline, "the slow request never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let platform = std::fs::read_to_string(env.fngate.dir.path().join("fngate.toml")).unwrap();
    let second = tokio::task::block_in_place(|| Fngate::start(tempdir(), &platform));
    relay.retarget(second.api);
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 200, "{}\n{}", slow.text(), second.stderr());
    assert_eq!(pid_of(&slow), pid_of(&first));
    env.wait_pods("without the earlier pod", |pods| {
        !pods.iter().any(|pod| name_of(pod) == earlier_pod)
    })
    .await;
    let after = get(a.proxy, "/web/default/site/").await;
    assert_eq!(
        after.status,
        200,
        "{}\n{}\n{}",
        after.text(),
        a.stderr(),
        second.stderr()
    );
    assert_ne!(pid_of(&after), pid_of(&first), "the earlier pod was routed");
    assert_eq!(replicas_of(&env.runtime_pods().await), ["proxy-a"]);
}

/// A replica name in use by a running process is rejected with 409 for another process, which
/// the session header identifies, while the first keeps its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_replica_name_rejected() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim(dir, "", &web_toml("site", &code, "")).await;
    let path = "/v1/namespaces/default/replicas/proxy-a/routes";
    let session = |id: &'static str| [("x-fngate-replica-session", id)];

    let first = request(env.fngate.api, Method::GET, path, "", &session("one")).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.json()["kube_namespace"], env.namespace.as_str());
    let other = request(env.fngate.api, Method::GET, path, "", &session("two")).await;
    assert_eq!(other.status, 409, "{}", other.text());
    let message = other.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("in use by another"), "{message}");
    let again = request(env.fngate.api, Method::GET, path, "", &session("one")).await;
    assert_eq!(again.status, 200, "{}", again.text());
}

/// A replica started with the wrong --kube-namespace watches the binding's k8s namespace,
/// where its pods are, logs a warning, and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_kube_namespace_follows_binding() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim(dir, "", &web_toml("site", &code, "")).await;
    let extra = ["--kube-namespace", "elsewhere"];
    let a = ReplicaProcess::start_with(&env, "proxy-a", env.fngate.api, &extra).await;
    let reply = get(a.proxy, "/web/default/site/").await;
    assert_eq!(reply.status, 200, "{}\n{}", reply.text(), a.stderr());
    assert!(
        a.stderr().contains("differs from the namespace's binding"),
        "{}",
        a.stderr()
    );
}

/// A request that waits on a replica cut off from the control plane fails after its queue
/// budget with a message that names the unreachable control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_control_plane_named_in_error() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim(dir, "", &web_toml("site", &code, "queue_budget_ms = 1000")).await;
    let a = ReplicaProcess::start(&env, "proxy-a").await;

    kill_control_plane(&env).await;
    let reply = get(a.proxy, "/web/default/site/").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(
        reply.text().contains("cannot reach the control plane"),
        "{}",
        reply.text()
    );
}

/// Stopping fngate serve with SIGTERM lets a request running on a replica's pod finish before
/// the pod is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_shutdown_drains_replica_pods() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let mut env = Env::start_sim(dir, "", &web_toml("site", &code, "timeout_ms = 10000")).await;
    let a = ReplicaProcess::start(&env, "proxy-a").await;
    let warm = get(a.proxy, "/web/default/site/").await;
    assert_eq!(warm.status, 200, "{}\n{}", warm.text(), a.stderr());

    let proxy = a.proxy;
    let slow = tokio::spawn(async move { get(proxy, "/web/default/site/?ms=2000").await });
    let labels = [("namespace", "default"), ("function", "site")];
    let deadline = Instant::now() + WAIT_LIMIT;
    while metric_at(a.admin, "fngate_in_flight_requests", &labels).await != 1.0 {
        assert!(Instant::now() < deadline, "the slow request never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let code = tokio::task::block_in_place(|| env.fngate.terminate());
    assert_eq!(code, Some(0), "{}", env.fngate.stderr());
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 200, "{}\n{}", slow.text(), env.fngate.stderr());
    assert_eq!(pid_of(&slow), pid_of(&warm));
    env.wait_pods("deleted after the drain", |pods| pods.is_empty())
        .await;
}

/// Kills `env`'s fngate serve with SIGKILL and waits until it is gone, reaping it.
async fn kill_control_plane(env: &Env) {
    let pid = env.fngate.pid() as i32;
    assert!(signal(pid, libc::SIGKILL));
    let deadline = Instant::now() + WAIT_LIMIT;
    while process_alive(pid) {
        // Reaps the killed child, which otherwise stays a zombie.
        // SAFETY: waitpid only writes the status integer.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        assert!(Instant::now() < deadline, "fngate survived SIGKILL");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
