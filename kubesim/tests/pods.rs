//! Scheduler and simulated node behaviour seen through kube-rs: pods run as local processes.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{client_for, next_matching, start, within, Harness};
use fngate_kubesim::{Cluster, ClusterConfig, Image, NodeConfig, Resource, Taint};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::wait::await_condition;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Returns the real path of the python3 interpreter, which may sit behind a shim on `PATH`.
fn python() -> PathBuf {
    let output = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 must be installed for the pod tests");
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

/// Builds a node that can run `python:3` (python3 at /usr/local/bin/python3) and `shell`
/// (/bin/sh, /bin/sleep).
fn node(name: &str) -> NodeConfig {
    NodeConfig::new(name)
        .image(
            "python:3",
            Image::default()
                .map("/usr/local/bin/python3", python())
                .env("PYTHONUNBUFFERED", "1"),
        )
        .image(
            "shell",
            Image::default()
                .map("/bin/sh", "/bin/sh")
                .map("/bin/sleep", "/bin/sleep")
                .env("FROM_IMAGE", "image-value"),
        )
}

async fn start_with_node() -> Harness {
    start(|mut c| {
        c.nodes = vec![node("node-1")];
        c
    })
    .await
}

fn pod(value: Value) -> Pod {
    serde_json::from_value(value).unwrap()
}

/// Waits until the pod satisfies `accept`, reading it through a kube-rs watch.
async fn wait_pod(api: &Api<Pod>, name: &str, what: &str, accept: impl Fn(&Pod) -> bool) -> Pod {
    let condition = move |pod: Option<&Pod>| pod.is_some_and(&accept);
    within(what, await_condition(api.clone(), name, condition))
        .await
        .unwrap()
        .expect("the pod exists")
}

fn pod_json(pod: &Pod) -> Value {
    serde_json::to_value(pod).unwrap()
}

fn condition(pod: &Pod, kind: &str) -> Option<(String, Option<String>, Option<String>)> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let c = conditions.iter().find(|c| c.type_ == kind)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn container_state(pod: &Pod) -> Value {
    pod_json(pod)
        .pointer("/status/containerStatuses/0/state")
        .cloned()
        .unwrap_or(Value::Null)
}

async fn http_get(ip: &str, port: u16) -> String {
    let mut stream = tokio::net::TcpStream::connect((ip, port)).await.unwrap();
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn pod_runs_becomes_ready_and_stops_gracefully() {
    let h = start_with_node().await;
    let api: Api<Pod> = Api::default_namespaced(h.client.clone());
    let start_rv = h.cluster.resource_version().to_string();
    let mut events = api
        .watch(&WatchParams::default(), &start_rv)
        .await
        .unwrap()
        .boxed();
    let spec = pod(json!({
        "metadata": {"name": "web"},
        "spec": {
            "terminationGracePeriodSeconds": 10,
            "containers": [{
                "name": "server",
                "image": "python:3",
                "command": ["/usr/local/bin/python3", "-m", "http.server", "--bind", "$(POD_IP)", "9000"],
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "ports": [{"containerPort": 9000, "name": "http"}],
                "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
            }],
        },
    }));
    api.create(&PostParams::default(), &spec).await.unwrap();

    let ready = wait_pod(&api, "web", "the pod to be Ready", |p| {
        condition(p, "Ready").is_some_and(|c| c.0 == "True")
    })
    .await;
    let status = ready.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let ip = status.pod_ip.clone().unwrap();
    assert!(
        ip.starts_with("127.") && !ip.starts_with("127.0."),
        "pod IP {ip}"
    );
    assert_eq!(status.pod_ips.unwrap()[0].ip, ip);
    assert!(status.host_ip.is_some());
    assert!(status.start_time.is_some());
    assert_eq!(
        ready.spec.as_ref().unwrap().node_name.as_deref(),
        Some("node-1")
    );
    let container = &status.container_statuses.unwrap()[0];
    assert!(container.ready);
    assert_eq!(container.started, Some(true));
    assert_eq!(condition(&ready, "ContainersReady").unwrap().0, "True");
    assert_eq!(condition(&ready, "PodScheduled").unwrap().0, "True");

    let response = within("the pod's HTTP answer", http_get(&ip, 9000)).await;
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    let log = h.cluster.pod_log("default", "web").unwrap();
    assert!(log.contains("\"GET / HTTP/1.1\" 200"), "log: {log}");

    let deleted = api.delete("web", &DeleteParams::default()).await.unwrap();
    let marked = deleted.left().expect("a graceful delete returns the pod");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert_eq!(marked.metadata.deletion_grace_period_seconds, Some(10));

    // Replay the whole life of the pod from the watch and check the order of states.
    let mut states = Vec::new();
    next_matching(&mut events, "the DELETED event", |event| {
        let (kind, pod) = match event.unwrap() {
            WatchEvent::Added(p) => ("ADDED", p),
            WatchEvent::Modified(p) => ("MODIFIED", p),
            WatchEvent::Deleted(p) => ("DELETED", p),
            WatchEvent::Bookmark(_) => return None,
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        };
        let state = container_state(&pod);
        let label = if kind == "DELETED" {
            "deleted".to_string()
        } else if let Some(code) = state.pointer("/terminated/exitCode") {
            format!("terminated {code}")
        } else if pod.metadata.deletion_timestamp.is_some() {
            "deleting".to_string()
        } else if let Some(reason) = state.pointer("/waiting/reason") {
            format!("waiting {}", reason.as_str().unwrap())
        } else if state.get("running").is_some() {
            format!("running ready={}", condition(&pod, "Ready").unwrap().0)
        } else if condition(&pod, "PodScheduled").is_some() {
            "scheduled".to_string()
        } else {
            "created".to_string()
        };
        if states.last() != Some(&label) {
            states.push(label);
        }
        (kind == "DELETED").then_some(())
    })
    .await;
    assert_eq!(
        states,
        vec![
            "created",
            "scheduled",
            "waiting ContainerCreating",
            "running ready=False",
            "running ready=True",
            "deleting",
            "terminated 143",
            "deleted",
        ],
        "143 is 128 + SIGTERM: the process stopped on SIGTERM within the grace period"
    );
    assert!(h
        .cluster
        .get(&Resource::PODS, Some("default"), "web")
        .is_none());
}

#[tokio::test]
async fn unschedulable_pods_report_reasons() {
    let h = start(|mut c| {
        c.nodes = vec![NodeConfig::new("node-1")
            .label("zone", "a")
            .memory_mb(1024)
            .taint(Taint::new("dedicated", "fn", "NoSchedule"))];
        c
    })
    .await;
    let api: Api<Pod> = Api::default_namespaced(h.client.clone());
    let toleration =
        json!([{"key": "dedicated", "operator": "Equal", "value": "fn", "effect": "NoSchedule"}]);
    let make = |name: &str, extra: Value, memory: &str| {
        let mut value = json!({
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "absent", "resources": {"requests": {"memory": memory}}}]},
        });
        for (key, field) in extra.as_object().unwrap() {
            value["spec"][key] = field.clone();
        }
        pod(value)
    };
    let cases = [
        (
            "selector",
            json!({"nodeSelector": {"zone": "b"}, "tolerations": toleration}),
            "64Mi",
            "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.",
        ),
        (
            "affinity",
            json!({"tolerations": toleration, "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}]}}}}),
            "64Mi",
            "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.",
        ),
        (
            "taint",
            json!({}),
            "64Mi",
            "0/1 nodes are available: 1 node(s) had untolerated taint {dedicated: fn}.",
        ),
        (
            "memory",
            json!({"tolerations": toleration}),
            "2Gi",
            "0/1 nodes are available: 1 Insufficient memory.",
        ),
    ];
    for (name, extra, memory, expected) in cases {
        api.create(&PostParams::default(), &make(name, extra, memory))
            .await
            .unwrap();
        let pending = wait_pod(&api, name, "the Unschedulable condition", |p| {
            condition(p, "PodScheduled").is_some()
        })
        .await;
        let (status, reason, message) = condition(&pending, "PodScheduled").unwrap();
        assert_eq!(status, "False", "pod {name}");
        assert_eq!(reason.as_deref(), Some("Unschedulable"), "pod {name}");
        assert_eq!(message.as_deref(), Some(expected), "pod {name}");
        assert_eq!(pending.status.unwrap().phase.as_deref(), Some("Pending"));
        assert_eq!(pending.spec.unwrap().node_name, None);
    }

    // A pod that fits takes 512 MiB; the next one no longer fits until the first is gone.
    api.create(
        &PostParams::default(),
        &make("first", json!({"tolerations": toleration}), "512Mi"),
    )
    .await
    .unwrap();
    wait_pod(&api, "first", "the first pod to bind", |p| {
        p.spec.as_ref().unwrap().node_name.is_some()
    })
    .await;
    api.create(
        &PostParams::default(),
        &make("second", json!({"tolerations": toleration}), "768Mi"),
    )
    .await
    .unwrap();
    let waiting = wait_pod(&api, "second", "the second pod to be unschedulable", |p| {
        condition(p, "PodScheduled").is_some()
    })
    .await;
    assert_eq!(
        condition(&waiting, "PodScheduled").unwrap().2.as_deref(),
        Some("0/1 nodes are available: 1 Insufficient memory.")
    );
    api.delete("first", &DeleteParams::default()).await.unwrap();
    let bound = wait_pod(
        &api,
        "second",
        "the second pod to bind after the first is gone",
        |p| p.spec.as_ref().unwrap().node_name.is_some(),
    )
    .await;
    assert_eq!(condition(&bound, "PodScheduled").unwrap().0, "True");
}

#[tokio::test]
async fn unknown_image_backs_off() {
    let h = start_with_node().await;
    let api: Api<Pod> = Api::default_namespaced(h.client.clone());
    let since = h.cluster.resource_version().to_string();
    let mut events = api
        .watch(&WatchParams::default(), &since)
        .await
        .unwrap()
        .boxed();
    api.create(
        &PostParams::default(),
        &pod(json!({
            "metadata": {"name": "nope"},
            "spec": {"containers": [{"name": "c", "image": "registry.example/nope:1"}]},
        })),
    )
    .await
    .unwrap();

    let mut reasons: Vec<String> = Vec::new();
    let backing_off = next_matching(&mut events, "ImagePullBackOff", |event| {
        let WatchEvent::Modified(pod) = event.unwrap() else {
            return None;
        };
        let reason = container_state(&pod)
            .pointer("/waiting/reason")
            .and_then(Value::as_str)
            .map(str::to_string)?;
        if reasons.last() != Some(&reason) {
            reasons.push(reason.clone());
        }
        (reason == "ImagePullBackOff").then_some(pod)
    })
    .await;
    assert_eq!(
        reasons,
        vec!["ContainerCreating", "ErrImagePull", "ImagePullBackOff"]
    );
    let message = container_state(&backing_off)["waiting"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.starts_with("Back-off pulling image \"registry.example/nope:1\""),
        "{message}"
    );
    assert_eq!(
        backing_off.status.unwrap().phase.as_deref(),
        Some("Pending")
    );

    api.delete("nope", &DeleteParams::default()).await.unwrap();
    within("the pod to be removed", async {
        let condition = |pod: Option<&Pod>| pod.is_none();
        await_condition(api.clone(), "nope", condition)
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn failed_exit_reports_code_and_log_tail() {
    let h = start_with_node().await;
    let api: Api<Pod> = Api::default_namespaced(h.client.clone());
    api.create(
        &PostParams::default(),
        &pod(json!({
            "metadata": {"name": "fails"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "c",
                    "image": "shell",
                    "command": ["/bin/sh", "-c", "echo first; echo second >&2; exit 3"],
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                }],
            },
        })),
    )
    .await
    .unwrap();

    let failed = wait_pod(&api, "fails", "phase Failed", |p| {
        p.status.as_ref().unwrap().phase.as_deref() == Some("Failed")
    })
    .await;
    let terminated = container_state(&failed)["terminated"].clone();
    assert_eq!(terminated["exitCode"], 3);
    assert_eq!(terminated["reason"], "Error");
    assert_eq!(terminated["message"], "first\nsecond\n");
    assert!(terminated.get("startedAt").is_some());
    assert!(terminated.get("finishedAt").is_some());
    assert_eq!(
        h.cluster.pod_log("default", "fails").as_deref(),
        Some("first\nsecond\n")
    );
    assert_eq!(
        api.logs("fails", &Default::default()).await.unwrap(),
        "first\nsecond\n"
    );
    assert_eq!(
        condition(&failed, "Ready").unwrap().1.as_deref(),
        Some("PodCompleted")
    );
}

#[tokio::test]
async fn crashing_container_restarts_with_back_off() {
    let h = start_with_node().await;
    let api: Api<Pod> = Api::default_namespaced(h.client.clone());
    api.create(&PostParams::default(), &pod(json!({
        "metadata": {"name": "crash"},
        "spec": {"containers": [{"name": "c", "image": "shell", "command": ["/bin/sh", "-c", "exit 1"]}]},
    })))
    .await
    .unwrap();

    let looping = wait_pod(&api, "crash", "two restarts", |p| {
        let json = pod_json(p);
        json.pointer("/status/containerStatuses/0/restartCount")
            .and_then(Value::as_u64)
            >= Some(2)
            && json
                .pointer("/status/containerStatuses/0/state/waiting/reason")
                .and_then(Value::as_str)
                == Some("CrashLoopBackOff")
    })
    .await;

    let json = pod_json(&looping);
    assert_eq!(
        json.pointer("/status/containerStatuses/0/lastState/terminated/exitCode"),
        Some(&json!(1))
    );
    assert_eq!(json.pointer("/status/phase"), Some(&json!("Running")));
    let message = json
        .pointer("/status/containerStatuses/0/state/waiting/message")
        .and_then(Value::as_str)
        .unwrap();
    assert!(
        message.contains("restarting failed container=c pod=crash_default"),
        "{message}"
    );
}

#[tokio::test]
async fn environment_and_working_dir_follow_the_spec() {
    let h = start_with_node().await;
    let config_maps: Api<ConfigMap> = Api::default_namespaced(h.client.clone());
    config_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "settings"}, "data": {"mode": "fast"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();

    let work = h.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let api: Api<Pod> = Api::default_namespaced(h.client.clone());
    api.create(&PostParams::default(), &pod(json!({
        "metadata": {"name": "env", "labels": {"team": "x"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "c",
                "image": "shell",
                "workingDir": work,
                "command": ["/bin/sh", "-c", "echo \"$NAME|$NS|$NODE|$MODE|$FROM_IMAGE|$GREETING|$TEAM|$(pwd)|${HOME:-unset}\""],
                "env": [
                    {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                    {"name": "GREETING", "value": "hi-$(NAME)"},
                    {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['team']"}}},
                ],
            }],
        },
    })))
    .await
    .unwrap();

    wait_pod(&api, "env", "phase Succeeded", |p| {
        p.status.as_ref().unwrap().phase.as_deref() == Some("Succeeded")
    })
    .await;
    let log = h.cluster.pod_log("default", "env").unwrap();
    assert_eq!(
        log,
        format!(
            "env|default|node-1|fast|image-value|hi-env|x|{}|unset\n",
            work.display()
        )
    );
}

#[tokio::test]
async fn unsupported_volume_fails_container_config() {
    let h = start_with_node().await;
    let api: Api<Pod> = Api::default_namespaced(h.client.clone());
    api.create(&PostParams::default(), &pod(json!({
        "metadata": {"name": "vol"},
        "spec": {
            "volumes": [{"name": "code", "hostPath": {"path": "/srv/code"}}],
            "containers": [{"name": "c", "image": "shell", "command": ["/bin/sh", "-c", "true"], "volumeMounts": [{"name": "code", "mountPath": "/code"}]}],
        },
    })))
    .await
    .unwrap();
    let failed = wait_pod(&api, "vol", "CreateContainerConfigError", |p| {
        container_state(p)
            .pointer("/waiting/reason")
            .and_then(Value::as_str)
            == Some("CreateContainerConfigError")
    })
    .await;
    let message = container_state(&failed)["waiting"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("/srv/code") && message.contains("/code"),
        "{message}"
    );
}

async fn running_pod_ip(cluster: &Cluster, dir: &tempfile::TempDir) -> String {
    let client = client_for(cluster, dir).await;
    let api: Api<Pod> = Api::default_namespaced(client);
    api.create(&PostParams::default(), &pod(json!({
        "metadata": {"name": "sleeper"},
        "spec": {"containers": [{"name": "c", "image": "shell", "command": ["/bin/sleep", "300"]}]},
    })))
    .await
    .unwrap();
    let running = wait_pod(&api, "sleeper", "phase Running", |p| {
        p.status.as_ref().unwrap().phase.as_deref() == Some("Running")
    })
    .await;
    running.status.unwrap().pod_ip.unwrap()
}

#[tokio::test]
async fn clusters_in_one_process_get_distinct_pod_ips() {
    let dir = tempfile::tempdir().unwrap();
    let mut clusters = Vec::new();
    for index in 0..2 {
        let mut config = ClusterConfig::new(dir.path().join(format!("logs-{index}")));
        config.nodes = vec![node("node-1")];
        clusters.push(Cluster::start(config).await.unwrap());
    }
    let first = running_pod_ip(&clusters[0], &dir).await;
    let second = running_pod_ip(&clusters[1], &dir).await;
    assert_ne!(first, second);

    let log = dir.path().join("logs-0");
    assert!(log.exists());
    for cluster in clusters {
        cluster.shutdown().await;
    }
}

/// Reads the process state letter from /proc, or `None` when the process is gone.
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim().chars().next()
}

#[tokio::test]
async fn dropping_cluster_kills_pod_processes() {
    let h = start_with_node().await;
    let api: Api<Pod> = Api::default_namespaced(h.client.clone());
    api.create(&PostParams::default(), &pod(json!({
        "metadata": {"name": "pid"},
        // The kubelet turns `$$` into `$`, so `$$$$` reaches the shell as `$$`, its pid.
        "spec": {"containers": [{"name": "c", "image": "shell", "command": ["/bin/sh", "-c", "echo $$$$; exec /bin/sleep 300"]}]},
    })))
    .await
    .unwrap();
    wait_pod(&api, "pid", "phase Running", |p| {
        p.status.as_ref().unwrap().phase.as_deref() == Some("Running")
    })
    .await;

    let pid: i32 = within("the pid in the log", async {
        loop {
            if let Some(pid) = h
                .cluster
                .pod_log("default", "pid")
                .and_then(|l| l.trim().parse().ok())
            {
                return pid;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        matches!(process_state(pid), Some(state) if state != 'Z'),
        "the pod process runs"
    );

    drop(h);
    within("the pod process to die", async {
        while matches!(process_state(pid), Some(state) if state != 'Z') {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn node_objects_and_field_selectors() {
    let h = start(|mut c| {
        c.nodes = vec![
            node("node-1").label("zone", "a"),
            node("node-2")
                .taint(Taint::new("dedicated", "fn", "NoSchedule"))
                .memory_mb(512),
        ];
        c
    })
    .await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(h.client.clone());
    let listed = nodes.list(&Default::default()).await.unwrap();
    let names: Vec<String> = listed
        .items
        .iter()
        .map(|n| n.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, vec!["node-1", "node-2"]);
    let first = &listed.items[0];
    assert_eq!(first.metadata.labels.as_ref().unwrap()["zone"], "a");
    assert_eq!(
        first.metadata.labels.as_ref().unwrap()["kubernetes.io/hostname"],
        "node-1"
    );
    let second = &listed.items[1];
    assert_eq!(
        second.spec.as_ref().unwrap().taints.as_ref().unwrap()[0].key,
        "dedicated"
    );
    let allocatable = second
        .status
        .as_ref()
        .unwrap()
        .allocatable
        .as_ref()
        .unwrap();
    assert_eq!(allocatable["memory"].0, "512Mi");

    let api: Api<Pod> = Api::default_namespaced(h.client.clone());
    api.create(&PostParams::default(), &pod(json!({
        "metadata": {"name": "sleeper"},
        "spec": {"containers": [{"name": "c", "image": "shell", "command": ["/bin/sleep", "300"]}]},
    })))
    .await
    .unwrap();
    wait_pod(&api, "sleeper", "phase Running", |p| {
        p.status.as_ref().unwrap().phase.as_deref() == Some("Running")
    })
    .await;
    let everywhere: Api<Pod> = Api::all(h.client.clone());
    let on_first = everywhere
        .list(&kube::api::ListParams::default().fields("spec.nodeName=node-1,status.phase=Running"))
        .await
        .unwrap();
    assert_eq!(on_first.items.len(), 1);
    let on_second = everywhere
        .list(&kube::api::ListParams::default().fields("spec.nodeName=node-2"))
        .await
        .unwrap();
    assert!(on_second.items.is_empty());
    let request = h
        .cluster
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path == "/api/v1/pods")
        .unwrap();
    assert!(request.query.contains("fieldSelector="), "{request:?}");
}
