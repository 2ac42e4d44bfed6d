//! k8s mode under failure: crashed pods, a second binding sharing a k8s namespace, an API
//! server that stops responding, and the diagnostics an operator reads. Each test covers a
//! defect found by running fngate against kubesim as an operator would.
//!
//! The harness is tests/common/k8s.rs. Some tests put its `Relay` between fngate and the API
//! server, so that the API server can stop responding without closing connections, as an
//! overloaded or partitioned API server does.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::k8s::*;
use common::*;
use serde_json::json;

/// A pod whose runtime exited after it served requests is deleted, like a pod fngate stops
/// itself. Otherwise every crash leaves a Failed pod in the runtime namespace for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_pod_is_deleted() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim_with(dir, "", &web_toml("site", &code, ""), false).await;
    let warm = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(warm.status, 200, "{}", warm.text());
    let crashed = name_of(&env.only_pod().await);

    // The web app exits with status 3 on /crash, before it responds.
    let crash = get(env.fngate.proxy, "/web/default/site/crash").await;
    assert_eq!(crash.status, 502, "{}", crash.text());
    env.wait_pods("without the crashed pod", |pods| {
        !pods.iter().any(|p| name_of(p) == crashed)
    })
    .await;
}

/// Binding another function namespace to the same k8s namespace leaves the running pods of the
/// first alone: they belong to this fngate process, not to an earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_binding_leaves_pods_running() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim_with(dir, "", &web_toml("site", &code, ""), false).await;
    let warm = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(warm.status, 200, "{}", warm.text());
    let pod = name_of(&env.only_pod().await);

    let proxy = env.fngate.proxy;
    let slow = tokio::spawn(async move { get(proxy, "/web/default/site/?ms=2000").await });
    env.fngate
        .wait_for_metric(
            "fngate_in_flight_requests",
            &[("namespace", "default"), ("function", "site")],
            |v| v == 1.0,
        )
        .await;

    // Rejecting the binding is as good as accepting it, but deleting the pod is not.
    let lists_before = pod_lists(env.sim(), &env.namespace);
    let binding = json!({
        "kubernetes": {
            "kubeconfig": env.kubeconfig,
            "context": "kubesim",
            "namespace": RUNTIME_NAMESPACE,
            "runtime_image": IMAGE,
        }
    });
    let reply = put_json(env.fngate.api, "/v1/namespaces/other", &binding).await;
    assert!(
        reply.status < 500,
        "binding failed with {}: {}",
        reply.status,
        reply.text()
    );
    if reply.status < 300 {
        // The new binding's watcher lists the pods, and so does its cleanup of the pods of
        // earlier control planes.
        let deadline = Instant::now() + WAIT_LIMIT;
        while pod_lists(env.sim(), &env.namespace) < lists_before + 2 {
            assert!(
                Instant::now() < deadline,
                "the new binding never listed the pods"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let slow = slow.await.unwrap();
    assert_eq!(
        slow.status,
        200,
        "the in-flight request failed: {}\n{}",
        slow.text(),
        env.fngate.stderr()
    );
    assert_eq!(
        pod_deletes(env.sim(), &env.namespace, &pod),
        0,
        "{}",
        env.fngate.stderr()
    );
    let next = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(pid_of(&next), pid_of(&warm), "the warm pod was replaced");
}

/// `start_timeout_ms` bounds the whole start, including the pod's create request: an API server
/// that stops responding fails the start after the timeout, not after the queue budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_timeout_bounds_pod_create() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim_with(
        dir,
        "",
        &web_toml(
            "site",
            &code,
            "start_timeout_ms = 1000\nqueue_budget_ms = 20000",
        ),
        true,
    )
    .await;

    env.relay().freeze(true);
    let reply = get(env.fngate.proxy, "/web/default/site/").await;
    env.relay().freeze(false);

    // The start timeout, not the 20 s queue budget, ended the wait.
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(
        reply.error_code(),
        "ContainerStateExited",
        "{}",
        reply.text()
    );
    assert!(
        reply.text().contains("within 1000ms"),
        "not the start timeout: {}",
        reply.text()
    );
}

/// SIGTERM ends fngate in bounded time even when the API server stops responding: stopping a
/// pod must not wait forever for the API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_while_api_server_hangs() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let mut env = Env::start_sim_with(dir, "", &web_toml("site", &code, ""), true).await;
    let warm = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(warm.status, 200, "{}", warm.text());

    env.relay().freeze(true);
    // `terminate` fails the test when fngate is still running WAIT_LIMIT after SIGTERM.
    let code = tokio::task::block_in_place(|| env.fngate.terminate());
    env.relay().freeze(false);
    assert_eq!(code, Some(0), "{}", env.fngate.stderr());
}

/// An invalid binding is reported once, in the form docs/kubernetes.md shows, not with the rule
/// repeated after the location.
#[test]
fn invalid_binding_reported_once() {
    let dir = tempdir();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:9\nusers:\n- name: c\n  user:\n    token: t\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: c\ncurrent-context: c\n",
    )
    .unwrap();
    let config = dir.path().join("fngate.toml");
    std::fs::write(
        &config,
        format!(
            "[[namespace]]\nname = \"default\"\n[namespace.kubernetes]\nkubeconfig = \"{}\"\nnamespace = \"{RUNTIME_NAMESPACE}\"\ntolerations = [{{ key = \"dedicated\", operator = \"Equals\", value = \"functions\", effect = \"NoSchedule\" }}]\n",
            kubeconfig.display()
        ),
    )
    .unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_fngate"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--api-listen", "127.0.0.1:0"])
        .arg("--function-dir")
        .arg(dir.path().join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start fngate");
    let deadline = Instant::now() + WAIT_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("fngate kept running with an invalid binding");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();

    assert!(!status.success(), "fngate accepted the binding: {stderr}");
    let rule = r#"invalid kubernetes.tolerations[0].operator: unknown operator "Equals"; use "Equal" or "Exists""#;
    assert_eq!(stderr.matches(rule).count(), 1, "{stderr}");
}

/// The `boot;dur=` of a cold start is the pod's start time, so it never exceeds the time the
/// request queued for that pod. Reading it from `creationTimestamp`, which has whole seconds
/// and the API server's clock, adds up to a second or more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_boot_within_queue_time() {
    let dir = tempdir();
    let names = ["first", "second", "third"];
    let functions: String = names
        .iter()
        .map(|name| web_toml(name, &web_function(dir.path(), name), ""))
        .collect();
    let env = Env::start_sim_with(dir, "", &functions, false).await;

    for name in names {
        let reply = get(env.fngate.proxy, &format!("/web/default/{name}/")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let timing = reply
            .header("server-timing")
            .expect("no Server-Timing on a cold start");
        let queue = timing_value(&timing, "queue");
        let boot = timing_value(&timing, "boot");
        assert!(
            boot <= queue + 20.0,
            "{name}: boot {boot} ms is longer than the {queue} ms the request queued for it: {timing}"
        );
    }
}

/// Returns the `dur` of one entry of a `Server-Timing` value, in milliseconds.
fn timing_value(timing: &str, name: &str) -> f64 {
    timing
        .split(',')
        .map(str::trim)
        .find_map(|entry| entry.strip_prefix(&format!("{name};dur=")))
        .unwrap_or_else(|| panic!("no {name} in Server-Timing: {timing}"))
        .parse()
        .unwrap()
}

/// The instance id the control-plane API lists is the one on the pod's `fngate.io/instance`
/// label (and in fngate's log lines), so an operator can tell which pod an instance or a 502
/// message names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_instance_id_matches_pod_label() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let env = Env::start_sim_with(dir, "", &web_toml("site", &code, ""), false).await;
    let warm = get(env.fngate.proxy, "/web/default/site/").await;
    assert_eq!(warm.status, 200, "{}", warm.text());
    let pod = env.only_pod().await;
    let label = pod.metadata.labels.as_ref().unwrap()["fngate.io/instance"].clone();

    let instances = env.fngate.instances("default", "site").await;
    assert_eq!(instances.len(), 1, "{instances:?}");
    assert_eq!(
        instances[0]["id"].to_string(),
        label,
        "pod {} has instance label {label}, the API lists {:?}",
        name_of(&pod),
        instances[0]
    );
}
