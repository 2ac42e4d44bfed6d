//! End-to-end tests of k8s mode: the real `fngate` binary with a namespace bound to a
//! Kubernetes cluster. By default the cluster is kubesim (the Kubernetes API test server and
//! simulated node in `kubesim/`), whose runtime pods are real processes on loopback addresses.
//!
//! The scenarios that need no simulator controls also have a `real_` twin for a real cluster.
//! Those are ignored unless run with `--ignored` and `FNGATE_TEST_KUBECONFIG` set, and
//! docs/kubernetes.md lists what that cluster needs.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::k8s::*;
use common::*;
use fngate_kubesim::{Cluster, ClusterConfig, Image, NodeConfig, Resource, Taint};
use hyper::Method;
use kube::api::DeleteParams;
use serde_json::{json, Value};

/// Defines a kubesim test and its real-cluster twin for a scenario that needs no simulator
/// controls.
macro_rules! on_both {
    ($scenario:ident, $sim:ident, $real:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sim() {
            $scenario(Target::Sim {
                nodes: vec![function_node("node-1")],
            })
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[ignore = "needs a real cluster: set FNGATE_TEST_KUBECONFIG and pass --ignored"]
        async fn $real() {
            $scenario(Target::Real(RealCluster::from_env())).await;
        }
    };
}

on_both!(
    cold_start_then_warm_reuse,
    sim_cold_start_then_warm_reuse,
    real_cold_start_then_warm_reuse
);

/// Checks that the first request creates a pod and waits for it, and the second reuses it. The
/// pod carries fngate's labels and no service-account token.
async fn cold_start_then_warm_reuse(target: Target) {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start(target, dir, "", &web_toml("site", &code, "")).await;
    assert!(
        env.runtime_pods().await.is_empty(),
        "a pod before any request"
    );

    let first = get(env.fngate.proxy, "/web/default/site/hello?x=1").await;
    assert_eq!(
        first.status,
        200,
        "{}\n{}",
        first.text(),
        env.fngate.stderr()
    );
    assert_eq!(first.json()["path"], "/hello");
    let timing = first
        .header("server-timing")
        .expect("no Server-Timing on a cold start");
    assert!(timing.contains("boot;dur="), "{timing}");

    let pods = env.runtime_pods().await;
    assert_eq!(
        pods.len(),
        1,
        "{:?}",
        pods.iter().map(summary).collect::<Vec<_>>()
    );
    let pod = &pods[0];
    let annotations = pod.metadata.annotations.as_ref().unwrap();
    assert_eq!(annotations["fngate.io/function"], "site");
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some(env_image(&env).as_str())
    );

    let second = get(env.fngate.proxy, "/web/default/site/again").await;
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(
        pid_of(&second),
        pid_of(&first),
        "the warm pod was not reused"
    );
    assert!(second.header("server-timing").is_none());
    assert_eq!(env.runtime_pods().await.len(), 1);
}

on_both!(
    concurrency_is_enforced_per_pod,
    sim_concurrency_is_enforced_per_pod,
    real_concurrency_is_enforced_per_pod
);

/// With one slot per pod and at most two pods, parallel requests never overlap on a pod, and
/// no third pod is created.
async fn concurrency_is_enforced_per_pod(target: Target) {
    let dir = tempdir();
    let code = web_function(dir.path(), "slow");
    let env = Env::start(
        target,
        dir,
        "",
        &web_toml("slow", &code, "concurrency = 1\nmax_instances = 2"),
    )
    .await;
    let proxy = env.fngate.proxy;
    let calls: Vec<_> = (0..6)
        .map(|_| tokio::spawn(async move { get(proxy, "/web/default/slow/?ms=300").await }))
        .collect();
    let mut pids = std::collections::HashSet::new();
    for call in calls {
        let reply = call.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(
            reply.json()["active"],
            1,
            "two requests overlapped on one pod"
        );
        pids.insert(pid_of(&reply));
    }
    assert!(
        pids.len() <= 2,
        "more than max_instances pods served: {pids:?}"
    );
    let pods = env.runtime_pods().await;
    assert!(
        pods.len() <= 2,
        "{:?}",
        pods.iter().map(summary).collect::<Vec<_>>()
    );
}

on_both!(
    update_drains_the_old_pod_without_failures,
    sim_update_drains_the_old_pod_without_failures,
    real_update_drains_the_old_pod_without_failures
);

/// Changing a function replaces its pod: the request in flight on the old pod finishes, new
/// requests reach the new pod, and the old pod is marked draining before it is deleted.
async fn update_drains_the_old_pod_without_failures(target: Target) {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start(target, dir, "", &web_toml("site", &code, "")).await;
    let warm = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(warm.status, 200, "{}", warm.text());
    let old_pod = name_of(&env.runtime_pods().await[0]);

    let proxy = env.fngate.proxy;
    let slow = tokio::spawn(async move { get(proxy, "/web/default/site/?ms=1500").await });
    env.fngate
        .wait_for_metric(
            "fngate_in_flight_requests",
            &[("namespace", "default"), ("function", "site")],
            |v| v == 1.0,
        )
        .await;

    let body = json!({
        "kind": "web",
        "code": {"directory": code.dir},
        "env": {"VERSION": "2"},
    });
    let update = put_json(
        env.fngate.api,
        "/v1/namespaces/default/functions/site",
        &body,
    )
    .await;
    assert_eq!(update.status, 200, "{}", update.text());

    let after = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(after.status, 200, "{}", after.text());
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
        !pods.iter().any(|p| name_of(p) == old_pod)
    })
    .await;
    if let Some(sim) = &env.sim {
        let writes: Vec<String> = sim
            .requests()
            .into_iter()
            .filter(|r| r.path.ends_with(&format!("/pods/{old_pod}")))
            .map(|r| r.method)
            .collect();
        let patch = writes.iter().position(|m| m == "PATCH");
        let delete = writes.iter().position(|m| m == "DELETE");
        assert!(
            matches!((patch, delete), (Some(p), Some(d)) if p < d),
            "the old pod was not marked draining before its deletion: {writes:?}"
        );
    }
}

on_both!(
    unschedulable_pod_fails_requests_with_the_reason,
    sim_unschedulable_pod_fails_requests_with_the_reason,
    real_unschedulable_pod_fails_requests_with_the_reason
);

/// Checks a nodeSelector no node matches: the request fails with the scheduler's reason rather
/// than waiting out its 60 s queue budget, and the scaler backs off instead of creating pods in
/// a loop.
async fn unschedulable_pod_fails_requests_with_the_reason(target: Target) {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start(
        target,
        dir,
        "node_selector = { \"fngate.io/pool\" = \"no-such-pool\" }",
        &web_toml("site", &code, "queue_budget_ms = 60000"),
    )
    .await;
    for _ in 0..3 {
        let reply = get(env.fngate.proxy, "/web/default/site/").await;
        assert_eq!(reply.status, 503, "{}", reply.text());
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.contains("Unschedulable"), "{message}");
    }
    let pods = env.runtime_pods().await;
    assert!(
        pods.len() <= 2,
        "the scaler kept creating pods: {:?}",
        pods.iter().map(summary).collect::<Vec<_>>()
    );
}

/// The node cannot pull the binding's runtime image: the request fails with the kubelet's
/// reason, naming the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpullable_image_fails_requests_with_the_reason() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start(
        Target::Sim {
            nodes: vec![NodeConfig::new("node-1").image("other/image:1", runtime_image())],
        },
        dir,
        "",
        &web_toml("site", &code, ""),
    )
    .await;
    let reply = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("ErrImagePull") || message.contains("ImagePullBackOff"),
        "{message}"
    );
    assert!(message.contains(IMAGE), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_rules_reach_pod_spec() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let tainted =
        function_node("node-functions").taint(Taint::new("dedicated", "functions", "NoSchedule"));
    let other = NodeConfig::new("node-other").image(IMAGE, runtime_image());
    let binding = r#"node_selector = { "fngate.io/pool" = "functions" }
tolerations = [{ key = "dedicated", operator = "Equal", value = "functions", effect = "NoSchedule" }]
[namespace.kubernetes.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution]
nodeSelectorTerms = [{ matchExpressions = [{ key = "kubernetes.io/hostname", operator = "In", values = ["node-functions"] }] }]"#;
    let env = Env::start(
        Target::Sim {
            nodes: vec![other, tainted],
        },
        dir,
        binding,
        &web_toml("site", &code, ""),
    )
    .await;
    let reply = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(
        reply.status,
        200,
        "{}\n{}",
        reply.text(),
        env.fngate.stderr()
    );

    let pod = &env.runtime_pods().await[0];
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some("node-functions"));
    assert_eq!(
        spec.node_selector.as_ref().unwrap()["fngate.io/pool"],
        "functions"
    );
    let toleration = &spec.tolerations.as_ref().unwrap()[0];
    assert_eq!(toleration.key.as_deref(), Some("dedicated"));
    let affinity = serde_json::to_value(spec.affinity.as_ref().unwrap()).unwrap();
    assert_eq!(
        affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"][0]["values"][0],
        "node-functions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_gap_leaves_no_stale_route() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim(dir, "", &web_toml("site", &code, "")).await;
    let warm = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(warm.status, 200, "{}", warm.text());
    assert_eq!(env.routable("site").await, 1.0);
    let old_pod = name_of(&env.runtime_pods().await[0]);
    let lists_before = pod_lists(env.sim(), &env.namespace);

    // The pod goes away while the watcher cannot see it, and the history it would resume
    // from is gone: only a relist can tell.
    let sim = env.sim();
    sim.block_watches(true);
    sim.cut_watches();
    sim.delete(&Resource::PODS, Some(&env.namespace), &old_pod, Some(0))
        .unwrap();
    sim.compact();
    sim.block_watches(false);

    env.fngate
        .wait_for_metric(
            "fngate_routable_instances",
            &[("namespace", "default"), ("function", "site")],
            |v| v == 0.0,
        )
        .await;
    assert!(
        pod_lists(env.sim(), &env.namespace) > lists_before,
        "the watcher did not list the pods again"
    );
    let next = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_ne!(pid_of(&next), pid_of(&warm));
    assert_eq!(env.routable("site").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_name_replacement_routed_by_uid() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim(dir, "", &web_toml("site", &code, "")).await;
    let warm = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(warm.status, 200, "{}", warm.text());
    let old = env.runtime_pods().await.remove(0);
    let name = name_of(&old);
    let old_uid = old.metadata.uid.clone().unwrap();

    // Replace the pod with one of the same name and labels while the watcher is cut off, so
    // the relist shows the same name with a new UID and the old one missing.
    let mut replacement = serde_json::to_value(&old).unwrap();
    replacement["metadata"] = json!({
        "name": name,
        "namespace": env.namespace,
        "labels": old.metadata.labels,
        "annotations": old.metadata.annotations,
    });
    replacement["spec"]["nodeName"] = Value::Null;
    replacement.as_object_mut().unwrap().remove("status");
    let sim = env.sim();
    sim.block_watches(true);
    sim.cut_watches();
    sim.delete(&Resource::PODS, Some(&env.namespace), &name, Some(0))
        .unwrap();
    sim.create(&Resource::PODS, replacement).unwrap();
    sim.compact();
    sim.block_watches(false);

    let pods = env
        .wait_pods("the ready replacement", |pods| {
            pods.iter().any(|p| {
                p.metadata.uid.as_deref() != Some(old_uid.as_str())
                    && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
            })
        })
        .await;
    assert_eq!(pods.len(), 1);
    // The scaler drops the old pod once the watcher's relist shows it gone.
    let old_addr = format!(
        "{}:9000",
        old.status.as_ref().unwrap().pod_ip.as_ref().unwrap()
    );
    let deadline = Instant::now() + WAIT_LIMIT;
    while env
        .fngate
        .instances("default", "site")
        .await
        .iter()
        .any(|i| i["addr"] == old_addr.as_str())
    {
        assert!(
            Instant::now() < deadline,
            "fngate never noticed the old pod was gone"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let next = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_ne!(pid_of(&next), pid_of(&warm), "the old pod's route survived");
    // fngate deletes pods by UID, so handling the old pod's end left the replacement alone.
    let still = env.pods.get(&name).await.unwrap();
    assert_ne!(still.metadata.uid.as_deref(), Some(old_uid.as_str()));
    let _ = env
        .pods
        .delete(&name, &DeleteParams::default().grace_period(0))
        .await;
}

/// Event functions run in pods too: a custom-runtime `bootstrap` behind the runtime wrapper
/// serving on the pod IP, and an image-style server the wrapper replaces itself with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_functions_run_in_pods() {
    let dir = tempdir();
    let custom = script_function(dir.path(), "custom", "bootstrap", EVENT_BOOTSTRAP);
    let image = dir.path().join("image");
    std::fs::create_dir_all(&image).unwrap();
    std::fs::write(image.join("app.py"), IMAGE_EVENT_APP).unwrap();
    write_executable(
        &image.join("scf_bootstrap"),
        "#!/bin/bash\nexec python3 app.py\n",
    );
    let functions = format!(
        "[[function]]\nnamespace = \"default\"\nname = \"custom\"\nkind = \"event\"\ncode = {{ directory = \"{}\" }}\n\n[[function]]\nnamespace = \"default\"\nname = \"image\"\nkind = \"event\"\nruntime = \"image\"\ncode = {{ directory = \"{}\" }}\n",
        custom.dir.display(),
        image.display()
    );
    let env = Env::start_sim(dir, "", &functions).await;

    let reply = invoke(&env.fngate, "default", "custom", r#"{"n": 1}"#).await;
    assert_eq!(
        reply.status,
        200,
        "{}\n{}",
        reply.text(),
        env.fngate.stderr()
    );
    assert_eq!(reply.json()["echo"]["n"], 1);
    let reply = invoke(&env.fngate, "default", "image", r#"{"n": 2}"#).await;
    assert_eq!(
        reply.status,
        200,
        "{}\n{}",
        reply.text(),
        env.fngate.stderr()
    );
    assert_eq!(reply.json()["event"]["n"], 2);

    let pods = env.runtime_pods().await;
    assert_eq!(
        pods.len(),
        2,
        "{:?}",
        pods.iter().map(summary).collect::<Vec<_>>()
    );
}

/// Image-style event server that serves `POST /event-invoke` on the pod IP and `PORT`.
const IMAGE_EVENT_APP: &str = r#"
import json, os
from http.server import HTTPServer, BaseHTTPRequestHandler

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        event = json.loads(self.rfile.read(length) or b"null")
        body = json.dumps({"event": event, "pid": os.getpid()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

HTTPServer((os.environ["FNGATE_INSTANCE_IP"], int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// An idle pod past keep-warm is drained and deleted; the next request starts a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_warm_expiry_deletes_the_pod() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim(dir, "", &web_toml("site", &code, "keep_warm_ms = 1000")).await;
    let first = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(env.runtime_pods().await.len(), 1);

    env.wait_pods("empty after keep-warm", |pods| pods.is_empty())
        .await;
    assert_eq!(env.routable("site").await, 0.0);
    let next = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_ne!(pid_of(&next), pid_of(&first));
}

/// A control plane killed without cleanup leaves its pods behind. The next one never routes to
/// them (they may run older code) and deletes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_control_plane_deletes_earlier_pods() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim(dir, "", &web_toml("site", &code, "")).await;
    let first = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(first.status, 200, "{}", first.text());
    let earlier_pod = name_of(&env.runtime_pods().await[0]);

    let pid = env.fngate.pid() as i32;
    assert!(signal(pid, libc::SIGKILL));
    let deadline = Instant::now() + WAIT_LIMIT;
    while process_alive(pid) && reap_failed(pid) {
        assert!(Instant::now() < deadline, "fngate survived SIGKILL");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        env.runtime_pods().await.len(),
        1,
        "the pod went with fngate"
    );

    let platform = std::fs::read_to_string(env.fngate.dir.path().join("fngate.toml")).unwrap();
    let second = tokio::task::block_in_place(|| Fngate::start(tempdir(), &platform));
    let reply = get(second.proxy, "/web/default/site/").await;
    assert_eq!(reply.status, 200, "{}\n{}", reply.text(), second.stderr());
    assert_ne!(
        pid_of(&reply),
        pid_of(&first),
        "the earlier control plane's pod was routed"
    );
    env.wait_pods("without the earlier pod", |pods| {
        !pods.iter().any(|p| name_of(p) == earlier_pod)
    })
    .await;
    drop(second);
}

/// Returns true while `pid` is a zombie not yet reaped, after trying to reap it.
fn reap_failed(pid: i32) -> bool {
    let mut status = 0;
    // SAFETY: waitpid only writes the status integer; a pid that is not our child fails.
    let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    reaped == 0
}

/// A `fngate agent` process for node `node-1`, killed on drop.
struct Agent {
    child: std::process::Child,
    stderr: PathBuf,
}

impl Agent {
    fn start(env: &Env, node_dir: &Path, log: &Path) -> Agent {
        Agent::start_with_retain(env, node_dir, log, 3_600_000)
    }

    fn start_with_retain(env: &Env, node_dir: &Path, log: &Path, retain_ms: u64) -> Agent {
        let stderr = std::fs::File::create(log).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_fngate"))
            .arg("agent")
            .args(["--node", "node-1", "--namespace", &env.namespace])
            .arg("--control-plane")
            .arg(format!("http://{}", env.fngate.api))
            .arg("--function-dir")
            .arg(node_dir)
            .arg("--kubeconfig")
            .arg(&env.kubeconfig)
            .args(["--context", "kubesim"])
            .args(["--retain-unused-ms", &retain_ms.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("failed to start fngate agent");
        Agent {
            child,
            stderr: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a zip of the web function in `code`.
fn zip_function(code: &Code, path: &Path) {
    use std::io::Write;
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    for (name, mode) in [("scf_bootstrap", 0o755), ("app.py", 0o644)] {
        let options = zip::write::SimpleFileOptions::default().unix_permissions(mode);
        zip.start_file(name, options).unwrap();
        zip.write_all(&std::fs::read(code.dir.join(name)).unwrap())
            .unwrap();
    }
    zip.finish().unwrap();
}

/// Starts fngate bound to kubesim with a zip-packaged web function whose nodes' function
/// directory is `<dir>/node`, apart from the control plane's, so only the agent can put code
/// there.
async fn zip_env(extra: &str) -> (Env, PathBuf, PathBuf) {
    let dir = tempdir();
    let code = web_function(dir.path(), "src");
    let package = dir.path().join("site.zip");
    zip_function(&code, &package);
    let node_dir = dir.path().join("node");
    let logs = dir.path().join("agent.log");
    let functions = format!(
        "[[function]]\nnamespace = \"default\"\nname = \"site\"\nkind = \"web\"\ncode = {{ zip_file = \"{}\" }}\n{extra}\n",
        package.display()
    );
    let binding = format!("function_dir = \"{}\"", node_dir.display());
    let env = Env::start_sim(dir, &binding, &functions).await;
    (env, node_dir, logs)
}

/// The agent fetches a zip package from the control plane into the node's function directory,
/// and the pod, which waited for it, serves the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_delivers_code_to_the_node() {
    let (env, node_dir, log) = zip_env("").await;
    let agent = Agent::start(&env, &node_dir, &log);

    let reply = get(env.fngate.proxy, "/web/default/site/x").await;
    assert_eq!(
        reply.status,
        200,
        "{}\n{}\n{}",
        reply.text(),
        env.fngate.stderr(),
        agent.log()
    );
    assert_eq!(reply.json()["path"], "/x");

    let pod = &env.runtime_pods().await[0];
    let annotations = pod.metadata.annotations.as_ref().unwrap();
    let digest = &annotations["fngate.io/code-sha256"];
    let version = &annotations["fngate.io/code-version"];
    assert_eq!(version, &format!("default/site/code/{}", &digest[..16]));
    let delivered = node_dir.join(version);
    assert!(delivered.join("scf_bootstrap").is_file(), "{}", agent.log());
    let leftovers: Vec<_> = std::fs::read_dir(node_dir.join(".incoming"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "downloads left behind: {leftovers:?}");
}

/// A package whose bytes no longer match its digest is never unpacked or run: the pod gives up
/// waiting for its code and the request fails with that reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_package_is_rejected_by_digest() {
    let (env, node_dir, log) = zip_env("start_timeout_ms = 3000\nqueue_budget_ms = 20000").await;
    let packages = env.fngate.dir.path().join("data").join("packages");
    let stored: Vec<PathBuf> = std::fs::read_dir(&packages)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
    let mut bytes = std::fs::read(&stored[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&stored[0], bytes).unwrap();
    let agent = Agent::start(&env, &node_dir, &log);

    let reply = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("did not arrive"), "{message}");
    assert!(agent.log().contains("digest mismatch"), "{}", agent.log());
    let unpacked = node_dir.join("default/site/code");
    let versions: Vec<_> = std::fs::read_dir(&unpacked)
        .map(|entries| entries.collect())
        .unwrap_or_default();
    assert!(
        versions.is_empty(),
        "a corrupt version was unpacked: {versions:?}"
    );
}

/// Once no pod on the node uses a version for the retention time, the agent removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_removes_unused_versions() {
    let (env, node_dir, log) = zip_env("").await;
    let agent = Agent::start_with_retain(&env, &node_dir, &log, 1000);
    let reply = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(reply.status, 200, "{}\n{}", reply.text(), agent.log());
    let pod = &env.runtime_pods().await[0];
    let version =
        node_dir.join(&pod.metadata.annotations.as_ref().unwrap()["fngate.io/code-version"]);
    assert!(version.is_dir());

    let deleted = request(
        env.fngate.api,
        Method::DELETE,
        "/v1/namespaces/default/functions/site",
        Bytes::new(),
        &[],
    )
    .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text());
    env.wait_pods("gone after the delete", |pods| pods.is_empty())
        .await;
    // The agent logs the removal after the directory is gone.
    let deadline = Instant::now() + WAIT_LIMIT;
    while version.exists() || !agent.log().contains("removed unused code version") {
        assert!(
            Instant::now() < deadline,
            "unused version {} never removed and logged: {}",
            version.display(),
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Image name the simulated node maps to the fngate binary, for the node agent DaemonSet and
/// the proxy Deployment.
const FNGATE_IMAGE: &str = "fngate/fngate:test";

/// Returns the fngate image: the fngate binary as its entrypoint.
fn fngate_image() -> Image {
    let mut image = Image::default()
        .map("/usr/local/bin/fngate", env!("CARGO_BIN_EXE_fngate"))
        .env("PATH", &std::env::var("PATH").unwrap_or_default());
    image.entrypoint = vec!["/usr/local/bin/fngate".to_owned()];
    image
}

/// Returns an fngate image whose `proxy` subcommand is a stand-in
/// (tests/fixtures/fngate-entrypoint.py): it checks the Deployment's arguments, reports them
/// on `/healthz`, and returns 200 on `/readyz` only once the test created a file. Every
/// other subcommand runs the fngate binary.
fn stand_in_proxy_image() -> Image {
    let entrypoint = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fngate-entrypoint.py"
    );
    let mut image = Image::default()
        .map("/usr/local/bin/fngate", entrypoint)
        .env("FNGATE_BIN", env!("CARGO_BIN_EXE_fngate"))
        .env("PATH", &std::env::var("PATH").unwrap_or_default());
    image.entrypoint = vec!["/usr/local/bin/fngate".to_owned()];
    image
}

/// Name of the proxy Deployment, Service, ServiceAccount and RBAC objects of a binding to the
/// runtime namespace of [`Env`].
const PROXY: &str = "fngate-proxy-fngate-runtime";

async fn namespace_status(env: &Env, namespace: &str) -> Value {
    let reply = get(env.fngate.api, &format!("/v1/namespaces/{namespace}")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["status"].clone()
}

/// Waits until the binding of the namespace `default` has `phase`, failing after
/// [`WAIT_LIMIT`].
async fn wait_phase(env: &Env, phase: &str) -> Value {
    wait_namespace_phase(env, "default", phase).await
}

/// Waits until the binding of `namespace` has `phase`, failing after [`WAIT_LIMIT`].
async fn wait_namespace_phase(env: &Env, namespace: &str, phase: &str) -> Value {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let status = namespace_status(env, namespace).await;
        if status["phase"] == phase {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "binding of {namespace} stuck at {status}, expected {phase}\n{}",
            env.fngate.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the binding of the namespace `default` is Initializing with a reason that
/// contains `needle`, failing after [`WAIT_LIMIT`].
async fn wait_initializing_reason(env: &Env, needle: &str) -> String {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let status = namespace_status(env, "default").await;
        let reason = status["reason"].as_str().unwrap_or_default();
        if status["phase"] == "Initializing" && reason.contains(needle) {
            return reason.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "binding never became Initializing with {needle:?}: {status}\n{}",
            env.fngate.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the object `name` of `resource` in `fngate-system` exists again, failing after
/// [`WAIT_LIMIT`].
async fn wait_reapplied(sim: &Cluster, resource: &Resource, name: &str) {
    let deadline = Instant::now() + WAIT_LIMIT;
    while sim.get(resource, Some("fngate-system"), name).is_none() {
        assert!(
            Instant::now() < deadline,
            "the deleted {} {name} never came back",
            resource.kind
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Binding with `install = true` applies the node agent DaemonSet and the proxy Deployment,
/// reaches Normal once an agent is ready and the Deployment is available, and the agent
/// delivers a zip package. A deleted DaemonSet, proxy Deployment or proxy Service comes back
/// on the next re-apply, and deleting the namespace removes what the binding created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_installs_agent_repairs_drift_and_unbinds() {
    let dir = tempdir();
    let code = web_function(dir.path(), "src");
    let package = dir.path().join("site.zip");
    zip_function(&code, &package);
    let node_dir = dir.path().join("node");
    let kubeconfig = dir.path().join("kubeconfig");
    let binding = format!(
        "install = true\nagent_image = \"{FNGATE_IMAGE}\"\nagent_kubeconfig = \"{}\"\nfunction_dir = \"{}\"\nresync_interval_ms = 1000",
        kubeconfig.display(),
        node_dir.display()
    );
    let functions = format!(
        "[[function]]\nnamespace = \"default\"\nname = \"site\"\nkind = \"web\"\ncode = {{ zip_file = \"{}\" }}\n",
        package.display()
    );
    let nodes = vec![function_node("node-1").image(FNGATE_IMAGE, fngate_image())];
    let env = Env::start(Target::Sim { nodes }, dir, &binding, &functions).await;

    wait_phase(&env, "Normal").await;
    let cold = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(cold.status, 200, "{}\n{}", cold.text(), env.fngate.stderr());
    let warm = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(pid_of(&warm), pid_of(&cold), "the warm pod was not reused");

    // The agent reports the version it delivered.
    let agents: Vec<Value> = env
        .sim()
        .list(&Resource::PODS, Some("fngate-system"))
        .into_iter()
        .filter(|pod| pod["metadata"]["labels"]["app.kubernetes.io/name"] == "fngate-agent")
        .collect();
    assert_eq!(agents.len(), 1, "{agents:?}");
    let agent_ip = agents[0]["status"]["podIP"].as_str().unwrap().to_owned();
    let agent: std::net::SocketAddr = format!("{agent_ip}:9310").parse().unwrap();
    let versions = get(agent, "/versions").await.json();
    let pod = &env.runtime_pods().await[0];
    let version = &pod.metadata.annotations.as_ref().unwrap()["fngate.io/code-version"];
    assert_eq!(versions["versions"], json!([version]), "{versions}");
    assert_eq!(get(agent, "/healthz").await.status, 200);

    let sim = env.sim();
    let daemonset = "fngate-agent-fngate-runtime";
    let installed = sim
        .get(&Resource::DAEMONSETS, Some("fngate-system"), daemonset)
        .expect("the agent DaemonSet was not applied");
    let args = &installed["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(args[0], "agent");
    assert!(
        sim.get(&Resource::ROLES, Some(&env.namespace), daemonset)
            .is_some(),
        "the agent's Role is missing"
    );

    for (resource, name) in [
        (&Resource::DAEMONSETS, daemonset),
        (&Resource::DEPLOYMENTS, PROXY),
        (&Resource::SERVICES, PROXY),
    ] {
        sim.delete(resource, Some("fngate-system"), name, None)
            .unwrap();
        wait_reapplied(sim, resource, name).await;
    }

    for path in [
        "/v1/namespaces/default/functions/site",
        "/v1/namespaces/default",
    ] {
        let deleted = request(env.fngate.api, Method::DELETE, path, Bytes::new(), &[]).await;
        assert_eq!(deleted.status, 204, "{path}: {}", deleted.text());
    }
    assert!(sim
        .get(&Resource::DAEMONSETS, Some("fngate-system"), daemonset)
        .is_none());
    assert!(sim
        .get(&Resource::ROLES, Some(&env.namespace), daemonset)
        .is_none());
    assert!(sim
        .get(&Resource::CONFIGMAPS, Some("fngate-system"), daemonset)
        .is_none());
    assert_binding_objects(
        sim,
        &env.namespace,
        false,
        "is still there after the namespace was deleted",
    );
}

/// Returns the proxy pods of the binding once `count` of them run and their admin listener
/// is up (the stand-in logs its address after it bound it), failing after [`WAIT_LIMIT`].
async fn wait_proxy_pods_listening(env: &Env, count: usize) -> Vec<Value> {
    let sim = env.sim();
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let pods: Vec<Value> = sim
            .list(&Resource::PODS, Some("fngate-system"))
            .into_iter()
            .filter(|pod| pod["metadata"]["labels"]["app.kubernetes.io/instance"] == PROXY)
            .collect();
        let listening = |pod: &Value| {
            let name = pod["metadata"]["name"].as_str().unwrap_or_default();
            sim.pod_log("fngate-system", name)
                .is_some_and(|log| log.contains("admin listener on"))
        };
        if pods.len() == count && pods.iter().all(listening) {
            return pods;
        }
        assert!(
            Instant::now() < deadline,
            "{count} proxy pods never listened: {pods:?}\n{}",
            env.fngate.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With the agent ready, a binding stays Initializing with a reason that names the proxy
/// Deployment and its replica counts while the proxy pods are not ready, and reaches Normal
/// once they are. The Deployment runs the binding's number of proxy pods, each with its pod
/// name as the replica name and its pod IP in the listen addresses, and the Service takes the
/// binding's port, type and annotations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_waits_for_the_proxy_deployment() {
    let dir = tempdir();
    let ready_file = dir.path().join("proxy-ready");
    let binding = format!(
        "{}\nproxy_replicas = 3\nsupport_service_port = 8443\nservice_type = \"NodePort\"\n\
         service_annotations = {{ \"example.com/team\" = \"functions\" }}",
        agent_binding(&dir.path().join("kubeconfig"), &dir.path().join("node"))
    );
    // The stand-in proxy returns 503 on /readyz until the file exists.
    let image =
        stand_in_proxy_image().env("FNGATE_TEST_PROXY_READY_FILE", ready_file.to_str().unwrap());
    let nodes = vec![function_node("node-1").image(FNGATE_IMAGE, image)];
    let env = Env::start(Target::Sim { nodes }, dir, &binding, "").await;
    let sim = env.sim();

    let reason = wait_initializing_reason(&env, &format!("Deployment {PROXY}")).await;
    assert!(reason.contains("of 3 desired"), "{reason}");

    let pods = wait_proxy_pods_listening(&env, 3).await;
    for pod in &pods {
        let name = pod["metadata"]["name"].as_str().unwrap();
        let ip = pod["status"]["podIP"].as_str().unwrap();
        let admin: std::net::SocketAddr = format!("{ip}:9090").parse().unwrap();
        let health = get(admin, "/healthz").await;
        assert_eq!(health.status, 200, "{name}: {}", health.text());
        let health = health.json();
        assert_eq!(health["replica"], name, "{health}");
        let args = health["args"].as_array().unwrap();
        for expected in [
            format!("--listen={ip}:8080"),
            format!("--admin-listen={ip}:9090"),
            "--namespace=default".to_owned(),
            format!("--kube-namespace={}", env.namespace),
        ] {
            assert!(
                args.contains(&json!(expected)),
                "{expected} not in {args:?}"
            );
        }
        assert_eq!(get(admin, "/readyz").await.status, 503, "{name}");
    }
    // Every proxy pod runs but none is ready, so the Deployment is not available.
    let status = namespace_status(&env, "default").await;
    assert_eq!(status["phase"], "Initializing", "{status}");
    let reason = status["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "waiting for Deployment {PROXY} to become available (0 ready of 3 desired"
        )),
        "{reason}"
    );

    let service = sim
        .get(&Resource::SERVICES, Some("fngate-system"), PROXY)
        .expect("the proxy Service was not applied");
    assert_eq!(service["spec"]["type"], "NodePort", "{service}");
    assert_eq!(service["spec"]["ports"][0]["port"], 8443, "{service}");
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"], "proxy",
        "{service}"
    );
    assert_eq!(
        service["metadata"]["annotations"]["example.com/team"], "functions",
        "{service}"
    );

    std::fs::write(&ready_file, "").unwrap();
    wait_phase(&env, "Normal").await;
    let deployment = sim
        .get(&Resource::DEPLOYMENTS, Some("fngate-system"), PROXY)
        .unwrap();
    assert_eq!(deployment["status"]["readyReplicas"], 3, "{deployment}");
}

/// A binding whose placement rules match no node fails with that reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_without_eligible_nodes_fails() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let binding = format!(
        "install = true\nagent_image = \"{FNGATE_IMAGE}\"\nnode_selector = {{ \"fngate.io/pool\" = \"gpu\" }}"
    );
    let nodes = vec![function_node("node-1").image(FNGATE_IMAGE, fngate_image())];
    let env = Env::start(
        Target::Sim { nodes },
        dir,
        &binding,
        &web_toml("site", &code, ""),
    )
    .await;
    let status = wait_phase(&env, "Failed").await;
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.contains("no eligible nodes"), "{reason}");
}

/// A binding whose agent image no node has fails with that reason and the image's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_with_unpullable_agent_image_fails() {
    let dir = tempdir();
    let image = "fngate/missing-agent:0.0.1";
    let binding = format!("install = true\nagent_image = \"{image}\"");
    // The node has the runtime image only.
    let env = Env::start_sim(dir, &binding, "").await;

    let status = wait_phase(&env, "Failed").await;
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.starts_with("image not pullable"), "{reason}");
    assert!(reason.contains(image), "{reason}");
}

/// A binding whose server-side apply RBAC denies fails with a reason that reports the denial
/// and names the object. Once the denial is lifted, a later re-apply installs the agent and the binding
/// reaches Normal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_forbidden_by_rbac_recovers_when_permitted() {
    let dir = tempdir();
    let node_dir = dir.path().join("node");
    let nodes = vec![function_node("node-1").image(FNGATE_IMAGE, fngate_image())];
    // The namespace `default` installs nothing. The namespace under test is bound through the
    // API once the denial is in place.
    let env = Env::start(Target::Sim { nodes }, dir, "", "").await;
    let sim = env.sim();
    sim.forbid("patch", &Resource::DAEMONSETS, Some("fngate-system"));

    let binding = json!({
        "kubeconfig": env.kubeconfig,
        "context": "kubesim",
        "namespace": env.namespace,
        "install": true,
        "agent_image": FNGATE_IMAGE,
        "agent_kubeconfig": env.kubeconfig,
        "function_dir": node_dir,
        "resync_interval_ms": 1000,
    });
    let body = json!({ "kubernetes": binding });
    let created = put_json(env.fngate.api, "/v1/namespaces/agents", &body).await;
    assert_eq!(created.status, 201, "{}", created.text());

    let daemonset = "fngate-agent-fngate-runtime";
    let status = wait_namespace_phase(&env, "agents", "Failed").await;
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.starts_with("forbidden by RBAC"), "{reason}");
    assert!(
        reason.contains(&format!("DaemonSet {daemonset}")),
        "{reason}"
    );
    assert!(
        reason.contains(
            "cannot patch resource \"daemonsets\" in API group \"apps\" in the namespace \"fngate-system\""
        ),
        "{reason}"
    );
    assert!(
        sim.get(&Resource::DAEMONSETS, Some("fngate-system"), daemonset)
            .is_none(),
        "the denied DaemonSet exists"
    );

    assert!(sim.permit("patch", &Resource::DAEMONSETS, Some("fngate-system")));
    wait_namespace_phase(&env, "agents", "Normal").await;
    assert!(
        sim.get(&Resource::DAEMONSETS, Some("fngate-system"), daemonset)
            .is_some(),
        "the DaemonSet is missing after the binding reached Normal"
    );
}

/// A status check that RBAC denies reading the agent DaemonSet fails the binding with that
/// reason, instead of leaving it Initializing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_status_read_fails_binding() {
    forbidden_read_fails_binding(
        &Resource::DAEMONSETS,
        "cannot read DaemonSet fngate-system/fngate-agent-",
    )
    .await;
}

/// A status check that RBAC denies reading the proxy Deployment, once the agent is ready,
/// fails the binding with that reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_deployment_read_fails_binding() {
    forbidden_read_fails_binding(
        &Resource::DEPLOYMENTS,
        "cannot read Deployment fngate-system/fngate-proxy-",
    )
    .await;
}

/// Forbids `get` on `resource` in `fngate-system`, binds a namespace with `install = true`,
/// and checks that the binding fails with a reason that contains `expected`.
async fn forbidden_read_fails_binding(resource: &Resource, expected: &str) {
    let dir = tempdir();
    let node_dir = dir.path().join("node");
    let nodes = vec![function_node("node-1").image(FNGATE_IMAGE, fngate_image())];
    let env = Env::start(Target::Sim { nodes }, dir, "", "").await;
    env.sim().forbid("get", resource, Some("fngate-system"));

    let body = json!({
        "kubernetes": {
            "kubeconfig": env.kubeconfig,
            "context": "kubesim",
            "namespace": env.namespace,
            "install": true,
            "agent_image": FNGATE_IMAGE,
            "agent_kubeconfig": env.kubeconfig,
            "function_dir": node_dir,
            "resync_interval_ms": 1000,
        }
    });
    let created = put_json(env.fngate.api, "/v1/namespaces/agents", &body).await;
    assert_eq!(created.status, 201, "{}", created.text());

    let status = wait_namespace_phase(&env, "agents", "Failed").await;
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.starts_with("forbidden by RBAC"), "{reason}");
    assert!(reason.contains(expected), "{reason}");
    assert!(
        !reason.contains("Status {"),
        "debug output in the reason: {reason}"
    );
}

/// Returns the system objects that a binding to the k8s namespace `runtime` installs, as the
/// kind, the namespace and the name: the node agent's and the proxy's.
fn binding_objects(runtime: &str) -> Vec<(Resource, String, String)> {
    let agent = format!("fngate-agent-{runtime}");
    let proxy = format!("fngate-proxy-{runtime}");
    let system = "fngate-system".to_owned();
    vec![
        (Resource::SERVICEACCOUNTS, system.clone(), agent.clone()),
        (Resource::CONFIGMAPS, system.clone(), agent.clone()),
        (Resource::DAEMONSETS, system.clone(), agent.clone()),
        (Resource::ROLES, runtime.to_owned(), agent.clone()),
        (Resource::ROLEBINDINGS, runtime.to_owned(), agent),
        (Resource::SERVICEACCOUNTS, system.clone(), proxy.clone()),
        (Resource::DEPLOYMENTS, system.clone(), proxy.clone()),
        (Resource::SERVICES, system, proxy.clone()),
        (Resource::ROLES, runtime.to_owned(), proxy.clone()),
        (Resource::ROLEBINDINGS, runtime.to_owned(), proxy),
    ]
}

/// Returns the binding of the namespace `default` as the API reports it, status included,
/// ready to be changed and put back: a PUT ignores the status fields.
async fn default_namespace_spec(env: &Env) -> Value {
    get(env.fngate.api, "/v1/namespaces/default").await.json()
}

/// Asserts that every system object of a binding to the k8s namespace `runtime` exists in
/// `sim` when `present` is true, and that none exists otherwise. A failure names the object,
/// followed by `failure`.
fn assert_binding_objects(sim: &Cluster, runtime: &str, present: bool, failure: &str) {
    for (resource, namespace, name) in binding_objects(runtime) {
        assert_eq!(
            sim.get(&resource, Some(&namespace), &name).is_some(),
            present,
            "{} {namespace}/{name} {failure}",
            resource.kind
        );
    }
}

/// Returns binding settings that install an agent able to become ready on kubesim.
fn agent_binding(kubeconfig: &Path, node_dir: &Path) -> String {
    format!(
        "install = true\nagent_image = \"{FNGATE_IMAGE}\"\nagent_kubeconfig = \"{}\"\nfunction_dir = \"{}\"\nresync_interval_ms = 1000",
        kubeconfig.display(),
        node_dir.display()
    )
}

/// Binding a namespace without functions to another k8s namespace removes every system object
/// of the old binding, and its agent pod, before the `PUT` returns, and installs the new
/// binding's objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebinding_removes_the_old_components() {
    let dir = tempdir();
    let binding = agent_binding(&dir.path().join("kubeconfig"), &dir.path().join("node"));
    let nodes = vec![function_node("node-1").image(FNGATE_IMAGE, fngate_image())];
    let env = Env::start(Target::Sim { nodes }, dir, &binding, "").await;
    wait_phase(&env, "Normal").await;
    let sim = env.sim();
    assert_binding_objects(sim, &env.namespace, true, "was not installed");
    let old_agent = "app.kubernetes.io/instance=fngate-agent-fngate-runtime";
    let agent_pods = |instance: &str| {
        let (key, value) = instance.split_once('=').unwrap();
        sim.list(&Resource::PODS, Some("fngate-system"))
            .into_iter()
            .filter(|pod| pod["metadata"]["labels"][key] == value)
            .count()
    };
    assert_eq!(agent_pods(old_agent), 1, "the old agent is not running");

    let runtime = "fngate-runtime-2";
    sim.create(
        &Resource::NAMESPACES,
        json!({"metadata": {"name": runtime}}),
    )
    .unwrap();
    let mut namespace = default_namespace_spec(&env).await;
    namespace["kubernetes"]["namespace"] = json!(runtime);
    let changed = put_json(env.fngate.api, "/v1/namespaces/default", &namespace).await;
    assert_eq!(changed.status, 200, "{}", changed.text());

    assert_binding_objects(
        sim,
        &env.namespace,
        false,
        &format!("of the old binding is still there\n{}", env.fngate.stderr()),
    );
    wait_phase(&env, "Normal").await;
    assert_binding_objects(sim, runtime, true, "of the new binding is missing");
    let config = sim
        .get(
            &Resource::CONFIGMAPS,
            Some("fngate-system"),
            "fngate-agent-fngate-runtime-2",
        )
        .unwrap();
    assert_eq!(config["data"]["runtime-namespace"], runtime);

    // Deleting the DaemonSet deletes its pod, which stops within its grace period.
    let deadline = Instant::now() + WAIT_LIMIT;
    while agent_pods(old_agent) > 0 {
        assert!(
            Instant::now() < deadline,
            "the old agent pod is still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        agent_pods("app.kubernetes.io/instance=fngate-agent-fngate-runtime-2"),
        1,
        "the new agent is not running"
    );
}

/// Binding a namespace to another cluster while the old cluster is unreachable still succeeds:
/// the new binding is installed and reaches Normal, and the failed removal is logged with the
/// object it could not delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebinding_from_unreachable_cluster_succeeds() {
    let other_dir = tempdir();
    let mut config = ClusterConfig::new(other_dir.path().join("kubesim-logs"));
    config.nodes = vec![function_node("node-b").image(FNGATE_IMAGE, fngate_image())];
    let other = Cluster::start(config)
        .await
        .expect("kubesim failed to start");
    let other_kubeconfig = other_dir.path().join("kubeconfig");
    other
        .write_kubeconfig(&other_kubeconfig, "kubesim-b")
        .unwrap();
    ensure_namespace(&client(&other_kubeconfig, None).await, RUNTIME_NAMESPACE).await;

    let dir = tempdir();
    let binding = agent_binding(&dir.path().join("kubeconfig"), &dir.path().join("node"));
    let nodes = vec![function_node("node-a").image(FNGATE_IMAGE, fngate_image())];
    let mut env = Env::start(Target::Sim { nodes }, dir, &binding, "").await;
    wait_phase(&env, "Normal").await;
    env.sim
        .take()
        .expect("the test started kubesim")
        .shutdown()
        .await;

    let mut namespace = default_namespace_spec(&env).await;
    namespace["kubernetes"]["kubeconfig"] = json!(other_kubeconfig);
    namespace["kubernetes"]["context"] = json!("kubesim-b");
    namespace["kubernetes"]["agent_kubeconfig"] = json!(other_kubeconfig);
    let changed = put_json(env.fngate.api, "/v1/namespaces/default", &namespace).await;
    assert_eq!(changed.status, 200, "{}", changed.text());

    let stderr = env.fngate.stderr();
    assert!(
        stderr.contains("cannot remove the binding's system components"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cannot delete DaemonSet fngate-agent-fngate-runtime"),
        "{stderr}"
    );
    wait_phase(&env, "Normal").await;
    assert_binding_objects(
        &other,
        RUNTIME_NAMESPACE,
        true,
        "is missing in the new cluster",
    );
}

/// Turning `install` off in place leaves the system objects in the cluster, and deleting the
/// namespace afterwards still removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_install_is_removed_on_delete() {
    let dir = tempdir();
    let binding = agent_binding(&dir.path().join("kubeconfig"), &dir.path().join("node"));
    let nodes = vec![function_node("node-1").image(FNGATE_IMAGE, fngate_image())];
    let env = Env::start(Target::Sim { nodes }, dir, &binding, "").await;
    wait_phase(&env, "Normal").await;

    let mut namespace = default_namespace_spec(&env).await;
    namespace["kubernetes"]["install"] = json!(false);
    let changed = put_json(env.fngate.api, "/v1/namespaces/default", &namespace).await;
    assert_eq!(changed.status, 200, "{}", changed.text());
    let sim = env.sim();
    assert_binding_objects(
        sim,
        &env.namespace,
        true,
        "was removed when install was turned off",
    );

    let deleted = request(
        env.fngate.api,
        Method::DELETE,
        "/v1/namespaces/default",
        Bytes::new(),
        &[],
    )
    .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text());
    assert_binding_objects(
        sim,
        &env.namespace,
        false,
        "is still there after the namespace was deleted",
    );
}

/// Bindings made through the API are checked against the cluster: a k8s namespace that does not
/// exist and a relative kubeconfig path are rejected with the field named, and a valid binding
/// reports its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_binding_is_checked_and_reports_status() {
    let dir = tempdir();
    let env = Env::start_sim(dir, "", "").await;
    let put = |namespace: &str, binding: Value| {
        let body = json!({ "kubernetes": binding });
        let api = env.fngate.api;
        let path = format!("/v1/namespaces/{namespace}");
        async move { put_json(api, &path, &body).await }
    };
    let kubeconfig = env.kubeconfig.display().to_string();

    let missing = put(
        "other",
        json!({"kubeconfig": kubeconfig, "context": "kubesim", "namespace": "no-such-ns", "install": false}),
    )
    .await;
    assert_eq!(missing.status, 400, "{}", missing.text());
    assert!(
        missing.text().contains("kubernetes.namespace"),
        "{}",
        missing.text()
    );
    assert!(
        missing.text().contains("does not exist"),
        "{}",
        missing.text()
    );

    let unknown_context = put(
        "other",
        json!({"kubeconfig": kubeconfig, "context": "nope", "namespace": env.namespace, "install": false}),
    )
    .await;
    assert_eq!(unknown_context.status, 400, "{}", unknown_context.text());
    let text = unknown_context.text();
    assert!(text.contains("kubernetes.context"), "{text}");
    assert!(text.contains("context \\\"nope\\\" is not in"), "{text}");
    assert!(text.contains("it has: kubesim"), "{text}");

    let absent = put(
        "other",
        json!({"kubeconfig": "/nonexistent/kubeconfig", "namespace": env.namespace, "install": false}),
    )
    .await;
    assert_eq!(absent.status, 400, "{}", absent.text());
    let text = absent.text();
    assert_eq!(
        text.matches("/nonexistent/kubeconfig").count(),
        1,
        "the path is repeated: {text}"
    );

    let relative = put(
        "other",
        json!({"kubeconfig": "kubeconfig", "namespace": env.namespace, "install": false}),
    )
    .await;
    assert_eq!(relative.status, 400, "{}", relative.text());
    assert!(
        relative.text().contains("kubernetes.kubeconfig"),
        "{}",
        relative.text()
    );

    // A port beyond u16 parses, so validation rejects it with the field and the range.
    let proxy_settings = [
        (
            json!({"support_service_port": 70000}),
            "kubernetes.support_service_port",
            "between 1 and 65535, got 70000",
        ),
        (
            json!({"proxy_replicas": 0}),
            "kubernetes.proxy_replicas",
            "between 1 and 100, got 0",
        ),
        (
            json!({"service_type": "External"}),
            "kubernetes.service_type",
            "use one of",
        ),
        (
            json!({"service_annotations": {"bad key!": "x"}}),
            "kubernetes.service_annotations.bad key!",
            "annotation key",
        ),
    ];
    for (setting, field, needle) in proxy_settings {
        let mut binding = json!({"kubeconfig": kubeconfig, "context": "kubesim", "namespace": env.namespace, "install": false});
        binding
            .as_object_mut()
            .unwrap()
            .extend(setting.as_object().unwrap().clone());
        let rejected = put("other", binding).await;
        assert_eq!(rejected.status, 400, "{setting}: {}", rejected.text());
        let error = &rejected.json()["error"];
        assert_eq!(error["code"], "InvalidParameterValue", "{setting}: {error}");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(field), "{setting}: {message}");
        assert!(message.contains(needle), "{setting}: {message}");
    }

    let valid = put(
        "other",
        json!({"kubeconfig": kubeconfig, "context": "kubesim", "namespace": env.namespace, "install": false}),
    )
    .await;
    assert_eq!(valid.status, 201, "{}", valid.text());
    let status = get(env.fngate.api, "/v1/namespaces/other").await.json();
    assert_eq!(status["status"]["phase"], "Normal", "{status}");

    // The CLI shows the same.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_fngate"))
        .arg("namespaces")
        .arg("--api")
        .arg(format!("http://{}", env.fngate.api))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "NAMESPACE",
            "MODE",
            "K8S",
            "NAMESPACE",
            "PHASE",
            "REPLICAS",
            "REASON"
        ]
    );
    assert!(
        rows.contains(&vec!["other", "k8s", env.namespace.as_str(), "Normal", "0"]),
        "{stdout}"
    );
}

/// Changing a bound namespace's nodeSelector while its function runs is taken in place: the
/// running pod keeps serving, and the next pod (after a function update) lands on the node the
/// new selector picks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_node_selector_change_moves_new_pods() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let nodes = vec![
        function_node("node-a"),
        NodeConfig::new("node-b")
            .label("fngate.io/pool", "other")
            .image(IMAGE, runtime_image()),
    ];
    let selector = "node_selector = { \"fngate.io/pool\" = \"functions\" }";
    let env = Env::start(
        Target::Sim { nodes },
        dir,
        selector,
        &web_toml("site", &code, ""),
    )
    .await;
    let first = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(first.status, 200, "{}", first.text());
    let pod = &env.runtime_pods().await[0];
    assert_eq!(
        pod.spec.as_ref().unwrap().node_name.as_deref(),
        Some("node-a")
    );

    let mut namespace = get(env.fngate.api, "/v1/namespaces/default").await.json();
    namespace.as_object_mut().unwrap().remove("status");
    namespace["kubernetes"]["node_selector"] = json!({"fngate.io/pool": "other"});
    let changed = put_json(env.fngate.api, "/v1/namespaces/default", &namespace).await;
    assert_eq!(changed.status, 200, "{}", changed.text());
    let warm = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(
        pid_of(&warm),
        pid_of(&first),
        "the running pod was replaced"
    );

    let update = json!({"kind": "web", "code": {"directory": code.dir}, "env": {"V": "2"}});
    let updated = put_json(
        env.fngate.api,
        "/v1/namespaces/default/functions/site",
        &update,
    )
    .await;
    assert_eq!(updated.status, 200, "{}", updated.text());
    let next = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(next.status, 200, "{}", next.text());
    let pods = env
        .wait_pods("one pod on node-b", |pods| {
            pods.len() == 1 && pods[0].spec.as_ref().unwrap().node_name.as_deref() == Some("node-b")
        })
        .await;
    assert_eq!(
        pods[0]
            .spec
            .as_ref()
            .unwrap()
            .node_selector
            .as_ref()
            .unwrap()["fngate.io/pool"],
        "other"
    );
}

/// A namespace change rejected for its quota leaves the binding as it was: the next pod keeps
/// the old placement instead of the rejected node selector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_namespace_change_keeps_placement() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim(dir, "", &web_toml("site", &code, "memory_mb = 128")).await;

    let mut namespace = get(env.fngate.api, "/v1/namespaces/default").await.json();
    namespace.as_object_mut().unwrap().remove("status");
    namespace["memory_quota_mb"] = json!(64);
    namespace["kubernetes"]["node_selector"] = json!({"fngate.io/pool": "nowhere"});
    let rejected = put_json(env.fngate.api, "/v1/namespaces/default", &namespace).await;
    assert_eq!(rejected.status, 409, "{}", rejected.text());

    let reply = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let pod = env.only_pod().await;
    let selector = pod.spec.as_ref().unwrap().node_selector.clone();
    assert!(
        selector
            .as_ref()
            .is_none_or(|s| !s.contains_key("fngate.io/pool")),
        "the rejected node selector reached the pod: {selector:?}"
    );
}

/// Two function namespaces cannot both install the system components of one k8s namespace:
/// deleting either would remove the other's node agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_install_target_rejected() {
    let dir = tempdir();
    let binding = agent_binding(&dir.path().join("kubeconfig"), &dir.path().join("node"));
    let nodes = vec![function_node("node-1").image(FNGATE_IMAGE, fngate_image())];
    let env = Env::start(Target::Sim { nodes }, dir, &binding, "").await;

    let body = json!({
        "kubernetes": {
            "kubeconfig": env.kubeconfig,
            "context": "kubesim",
            "namespace": env.namespace,
            "install": true,
        }
    });
    let second = put_json(env.fngate.api, "/v1/namespaces/team2", &body).await;
    assert_eq!(second.status, 409, "{}", second.text());
    let message = second.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains("\"default\""), "{message}");
    assert!(message.contains("install = false"), "{message}");

    let mut without_install = body.clone();
    without_install["kubernetes"]["install"] = json!(false);
    let accepted = put_json(env.fngate.api, "/v1/namespaces/team2", &without_install).await;
    assert_eq!(accepted.status, 201, "{}", accepted.text());
}

/// A pod deleted by someone else while it starts (an eviction, say) is replaced at once, and the
/// request that waited for it is served by the replacement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_deleted_while_starting_is_replaced() {
    let dir = tempdir();
    let code = web_function(dir.path(), "slow");
    // Starts slowly, so the pod can be deleted before it is ready.
    write_executable(
        &code.dir.join("scf_bootstrap"),
        "#!/bin/bash\nsleep 1\nexec python3 app.py\n",
    );
    let env = Env::start_sim(dir, "", &web_toml("slow", &code, "")).await;
    let proxy = env.fngate.proxy;
    let call = tokio::spawn(async move { get(proxy, "/web/default/slow/").await });

    let first = env.wait_pods("created", |pods| pods.len() == 1).await;
    let evicted = name_of(&first[0]);
    env.sim()
        .delete(&Resource::PODS, Some(&env.namespace), &evicted, None)
        .unwrap();

    let reply = call.await.unwrap();
    assert_eq!(
        reply.status,
        200,
        "{}\n{}",
        reply.text(),
        env.fngate.stderr()
    );
    let pods = env.runtime_pods().await;
    assert!(
        pods.iter().any(|p| name_of(p) != evicted),
        "no replacement: {:?}",
        pods.iter().map(summary).collect::<Vec<_>>()
    );
}

/// A directory code source missing on the node keeps the pod ContainerCreating, as the kubelet
/// does. The start then times out with the kubelet's mount message in the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_code_directory_reports_the_mount_failure() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim(
        dir,
        "",
        &web_toml(
            "site",
            &code,
            "start_timeout_ms = 1000\nqueue_budget_ms = 20000",
        ),
    )
    .await;
    std::fs::remove_dir_all(&code.dir).unwrap();

    let reply = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("within 1000ms"), "{message}");
    assert!(message.contains("MountVolume.SetUp failed"), "{message}");
}

/// Starts fngate bound to kubesim with the system components installed, two proxy replicas
/// and a zip-packaged web function `site` with `extra` lines, and waits for Normal.
async fn installed_replicas_env(extra: &str) -> Env {
    let dir = tempdir();
    let code = web_function(dir.path(), "src");
    let package = dir.path().join("site.zip");
    zip_function(&code, &package);
    let binding = format!(
        "{}\nproxy_replicas = 2",
        agent_binding(&dir.path().join("kubeconfig"), &dir.path().join("node"))
    );
    let functions = format!(
        "[[function]]\nnamespace = \"default\"\nname = \"site\"\nkind = \"web\"\n{extra}\ncode = {{ zip_file = \"{}\" }}\n",
        package.display()
    );
    let nodes = vec![function_node("node-1").image(FNGATE_IMAGE, fngate_image())];
    let env = Env::start(Target::Sim { nodes }, dir, &binding, &functions).await;
    wait_phase(&env, "Normal").await;
    env
}

/// The installed proxy Deployment serves: each of its pods, running `fngate proxy`, routes a
/// request to a runtime pod labelled with its own name, which the agent delivered code for,
/// and reuses that pod for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_proxy_pods_serve_requests() {
    let env = installed_replicas_env("").await;

    let proxies: Vec<(String, std::net::SocketAddr)> = env
        .sim()
        .list(&Resource::PODS, Some("fngate-system"))
        .into_iter()
        .filter(|pod| pod["metadata"]["labels"]["app.kubernetes.io/name"] == "fngate-proxy")
        .map(|pod| {
            let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
            let ip = pod["status"]["podIP"].as_str().unwrap();
            (name, format!("{ip}:8080").parse().unwrap())
        })
        .collect();
    assert_eq!(proxies.len(), 2, "{proxies:?}");

    let mut first_pids = Vec::new();
    for (name, addr) in &proxies {
        let reply = get(*addr, "/web/default/site/hello").await;
        assert_eq!(
            reply.status,
            200,
            "through {name}: {}\n{}",
            reply.text(),
            env.fngate.stderr()
        );
        assert_eq!(reply.json()["path"], "/hello");
        first_pids.push(pid_of(&reply));
    }
    assert_ne!(first_pids[0], first_pids[1], "two proxies shared a pod");
    let mut replicas: Vec<String> = env
        .runtime_pods()
        .await
        .iter()
        .map(|pod| pod.metadata.labels.as_ref().unwrap()["fngate.io/replica"].clone())
        .collect();
    replicas.sort();
    let mut names: Vec<String> = proxies.iter().map(|(name, _)| name.clone()).collect();
    names.sort();
    assert_eq!(replicas, names);

    let again = get(proxies[0].1, "/web/default/site/").await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(pid_of(&again), first_pids[0], "the warm pod was not reused");
}

/// With a proxy Deployment installed, `min_instances` keeps a warm pod for each proxy replica
/// and none for the proxy inside fngate serve, which the binding's clients do not use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_instances_warm_per_installed_replica() {
    let env = installed_replicas_env("min_instances = 1").await;

    // The local scaler started with the function, before the replicas joined, so a local
    // minimum pod would exist by the time both replicas' pods do.
    let pods = env
        .wait_pods("one per proxy replica", |pods| pods.len() >= 2)
        .await;
    let mut replicas: Vec<String> = pods
        .iter()
        .map(|pod| pod.metadata.labels.as_ref().unwrap()["fngate.io/replica"].clone())
        .collect();
    replicas.sort();
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    assert!(!replicas.contains(&"local".to_owned()), "{replicas:?}");
    assert_ne!(replicas[0], replicas[1], "{replicas:?}");
}

/// Writes a zip with `files` (name, mode and content).
fn zip_files(path: &Path, files: &[(&str, u32, &str)]) {
    use std::io::Write;
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    for (name, mode, content) in files {
        let options = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
        zip.start_file(*name, options).unwrap();
        zip.write_all(content.as_bytes()).unwrap();
    }
    zip.finish().unwrap();
}

/// Serves `<layers>/greeting.txt` and `<layers>/extra.txt` on the pod's address.
const LAYER_APP: &str = r#"#!/bin/bash
exec python3 -c '
import os
from http.server import HTTPServer, BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        layers = os.environ["FNGATE_LAYER_DIR"]
        body = open(os.path.join(layers, "greeting.txt"), "rb").read() + b" " + open(os.path.join(layers, "extra.txt"), "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
HTTPServer((os.environ["FNGATE_INSTANCE_IP"], int(os.environ["PORT"])), H).serve_forever()
'
"#;

/// The node agent delivers a function's layers beside its code: it fetches each layer package,
/// checks its digest, merges them in order into the layers directory the pod names, and the
/// runtime reads the merged files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_delivers_layers() {
    let dir = tempdir();
    let code = dir.path().join("code.zip");
    zip_files(&code, &[("scf_bootstrap", 0o755, LAYER_APP)]);
    let (first, second) = (dir.path().join("first.zip"), dir.path().join("second.zip"));
    zip_files(
        &first,
        &[
            ("greeting.txt", 0o644, "first"),
            ("extra.txt", 0o644, "from-first"),
        ],
    );
    zip_files(&second, &[("greeting.txt", 0o644, "second")]);
    let node_dir = dir.path().join("node");
    let log = dir.path().join("agent.log");
    let functions = format!(
        "[[function]]\nnamespace = \"default\"\nname = \"site\"\nkind = \"web\"\ncode = {{ zip_file = \"{}\" }}\nlayers = [{{ zip_file = \"{}\" }}, {{ zip_file = \"{}\" }}]\n",
        code.display(),
        first.display(),
        second.display()
    );
    let binding = format!("function_dir = \"{}\"", node_dir.display());
    let env = Env::start_sim(dir, &binding, &functions).await;
    let agent = Agent::start(&env, &node_dir, &log);

    let reply = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(
        reply.status,
        200,
        "{}\n{}\n{}",
        reply.text(),
        env.fngate.stderr(),
        agent.log()
    );
    assert_eq!(reply.text(), "second from-first");
    let pod = &env.runtime_pods().await[0];
    let annotations = pod.metadata.annotations.as_ref().unwrap();
    let layers = &annotations["fngate.io/layers-version"];
    assert!(layers.starts_with("default/site/layers/"), "{layers}");
    assert_eq!(annotations["fngate.io/layer-sha256s"].split(',').count(), 2);
    assert!(node_dir.join(layers).join("extra.txt").is_file());
}
