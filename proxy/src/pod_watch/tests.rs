//! Unit tests of the pod watcher: reading pods, and the tracker's routing decisions.

use super::*;

fn pod(json: serde_json::Value) -> Pod {
    serde_json::from_value(json).unwrap()
}

fn base(status: serde_json::Value) -> Pod {
    pod(serde_json::json!({
        "metadata": {
            "name": "p", "uid": "u1",
            "annotations": {
                ANNOTATION_NAMESPACE: "default",
                ANNOTATION_FUNCTION: "hello",
                ANNOTATION_QUALIFIER: "$LATEST",
            },
        },
        "status": status,
    }))
}

#[test]
fn running_ready_pod_is_runnable_with_its_key() {
    let view = PodView::from_pod(&base(serde_json::json!({
        "phase": "Running", "podIP": "127.1.2.3",
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [{"name": "runtime", "image": "i", "imageID": "", "ready": true,
            "restartCount": 0, "state": {"running": {}}}],
    })))
    .unwrap();
    assert!(view.runnable());
    assert_eq!(view.ready, Some(true));
    assert_eq!(view.key.unwrap().name, "hello");
    assert_eq!(view.ip, Some("127.1.2.3".parse().unwrap()));
}

#[test]
fn unschedulable_pod_fails_with_the_scheduler_message() {
    let view = PodView::from_pod(&base(serde_json::json!({
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."}],
    })))
    .unwrap();
    let failure = view.failure.unwrap();
    assert_eq!(failure.reason, "Unschedulable");
    assert!(failure.to_string().contains("didn't match"), "{failure}");
}

#[test]
fn pull_and_exit_failures_detected() {
    let waiting = |reason: &str| {
        PodView::from_pod(&base(serde_json::json!({
            "phase": "Pending",
            "containerStatuses": [{"name": "runtime", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": reason, "message": "m"}}}],
        })))
        .unwrap()
    };
    assert_eq!(
        waiting("ImagePullBackOff").failure.unwrap().reason,
        "ImagePullBackOff"
    );
    let creating = waiting("ContainerCreating");
    assert!(creating.failure.is_none());
    assert_eq!(creating.waiting.as_deref(), Some("ContainerCreating: m"));

    let exited = PodView::from_pod(&base(serde_json::json!({
        "phase": "Failed",
        "containerStatuses": [{"name": "runtime", "image": "i", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"terminated": {"exitCode": 3, "reason": "Error",
            "message": "boom"}}}],
    })))
    .unwrap();
    let failure = exited.failure.unwrap();
    assert_eq!(failure.exit_code, Some(3));
    assert_eq!(failure.to_string(), "Error (exit code 3): boom");
}

#[test]
fn draining_or_deleting_pods_are_not_runnable() {
    let mut pod = base(serde_json::json!({
        "phase": "Running", "podIP": "127.1.2.3",
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [{"name": "runtime", "image": "i", "imageID": "", "ready": true,
            "restartCount": 0, "state": {"running": {}}}],
    }));
    pod.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(ANNOTATION_DRAINING.to_owned(), "true".to_owned());
    assert!(!PodView::from_pod(&pod).unwrap().runnable());
    pod.metadata
        .annotations
        .as_mut()
        .unwrap()
        .remove(ANNOTATION_DRAINING);
    assert!(PodView::from_pod(&pod).unwrap().runnable());
    pod.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    assert!(!PodView::from_pod(&pod).unwrap().runnable());
}

mod tracker {
    use super::*;
    use crate::table::{FunctionKind, FunctionSettings};

    fn router_with(functions: &[&str]) -> Arc<Router> {
        let router = Arc::new(Router::new());
        router.add_namespace("default");
        for name in functions {
            router.upsert(
                FunctionKey {
                    namespace: "default".into(),
                    name: (*name).into(),
                    qualifier: "$LATEST".into(),
                },
                FunctionSettings {
                    kind: FunctionKind::Web,
                    memory_mb: 128,
                    timeout: Duration::from_secs(3),
                    queue_budget: Duration::from_secs(10),
                    queue_limit: 100,
                    max_body_bytes: 1 << 20,
                    concurrency: 1,
                },
            );
        }
        router
    }

    fn tracker(router: &Arc<Router>, port: u16) -> (Tracker, mpsc::UnboundedReceiver<String>) {
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            states: Mutex::new(HashMap::new()),
            source: router.add_source("test"),
        });
        let tracker = Tracker {
            pods: HashMap::new(),
            relist: None,
            router: Arc::clone(router),
            shared,
            probe_tx,
            port,
            owner: None,
            replica: None,
            function_namespace: None,
        };
        (tracker, probe_rx)
    }

    /// Builds a running pod of `function`; `ready` sets its Ready condition.
    fn running(uid: &str, name: &str, function: &str, ip: &str, ready: bool) -> Pod {
        pod(serde_json::json!({
            "metadata": {
                "name": name, "uid": uid,
                "annotations": {
                    ANNOTATION_NAMESPACE: "default",
                    ANNOTATION_FUNCTION: function,
                },
            },
            "status": {
                "phase": "Running", "podIP": ip,
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                "containerStatuses": [{"name": "runtime", "image": "i", "imageID": "",
                    "ready": ready, "restartCount": 0, "state": {"running": {}}}],
            },
        }))
    }

    fn pool_addrs(router: &Router, function: &str) -> Vec<String> {
        let function = router.lookup("default", function, "$LATEST").unwrap();
        let mut addrs: Vec<String> = function
            .pool
            .instances()
            .iter()
            .map(|i| i.addr().to_string())
            .collect();
        addrs.sort();
        addrs
    }

    #[tokio::test]
    async fn batch_swaps_each_function_once() {
        let router = router_with(&["a", "b"]);
        let (mut tracker, _probes) = tracker(&router, 9000);
        let mut batch = Vec::new();
        for i in 0..50 {
            let ip = format!("10.0.0.{i}");
            batch.push(Ok(Event::Apply(running(
                &format!("a{i}"),
                &format!("a{i}"),
                "a",
                &ip,
                true,
            ))));
        }
        for i in 0..30 {
            let ip = format!("10.0.1.{i}");
            batch.push(Ok(Event::Apply(running(
                &format!("b{i}"),
                &format!("b{i}"),
                "b",
                &ip,
                true,
            ))));
        }
        assert_eq!(tracker.apply(batch, "runtime"), 2);
        assert_eq!(pool_addrs(&router, "a").len(), 50);
        assert_eq!(pool_addrs(&router, "b").len(), 30);
    }

    #[tokio::test]
    async fn relist_drops_pods_missing_from_it() {
        let router = router_with(&["a"]);
        let (mut tracker, _probes) = tracker(&router, 9000);
        tracker.apply(
            vec![
                Ok(Event::Apply(running("u1", "p1", "a", "10.0.0.1", true))),
                Ok(Event::Apply(running("u2", "p2", "a", "10.0.0.2", true))),
            ],
            "runtime",
        );
        let first = tracker.pods["u1"].instance.clone().unwrap();
        let state = tracker.shared.states.lock()["u1"].subscribe();

        tracker.apply(
            vec![
                Ok(Event::Init),
                Ok(Event::InitApply(running("u2", "p2", "a", "10.0.0.2", true))),
                Ok(Event::InitDone),
            ],
            "runtime",
        );
        assert_eq!(pool_addrs(&router, "a"), ["10.0.0.2:9000"]);
        assert!(matches!(*state.borrow(), PodState::Gone));
        assert_eq!(first.state(), InstanceState::Failed);
        assert!(tracker.shared.source.is_synced());
    }

    #[tokio::test]
    async fn late_delete_keeps_replacement() {
        let router = router_with(&["a"]);
        let (mut tracker, _probes) = tracker(&router, 9000);
        tracker.apply(
            vec![Ok(Event::Apply(running("old", "p", "a", "10.0.0.1", true)))],
            "runtime",
        );
        tracker.apply(
            vec![
                Ok(Event::Apply(running("new", "p", "a", "10.0.0.2", true))),
                Ok(Event::Delete(running("old", "p", "a", "10.0.0.1", true))),
            ],
            "runtime",
        );
        assert_eq!(pool_addrs(&router, "a"), ["10.0.0.2:9000"]);
    }

    #[tokio::test]
    async fn retired_or_draining_pods_leave_routing_for_good() {
        let router = router_with(&["a"]);
        let (mut tracker, _probes) = tracker(&router, 9000);
        tracker.apply(
            vec![Ok(Event::Apply(running("u1", "p1", "a", "10.0.0.1", true)))],
            "runtime",
        );
        let instance = tracker.pods["u1"].instance.clone().unwrap();

        // The scaler retires the instance; a later status event must not route it again.
        router
            .lookup("default", "a", "$LATEST")
            .unwrap()
            .pool
            .remove_instance(instance.id(), InstanceState::Draining);
        tracker.apply(
            vec![Ok(Event::Apply(running("u1", "p1", "a", "10.0.0.1", true)))],
            "runtime",
        );
        assert!(pool_addrs(&router, "a").is_empty());

        // Another proxy's scaler marks its pod draining: this proxy stops routing to it.
        tracker.apply(
            vec![Ok(Event::Apply(running("u2", "p2", "a", "10.0.0.2", true)))],
            "runtime",
        );
        assert_eq!(pool_addrs(&router, "a"), ["10.0.0.2:9000"]);
        let mut draining = running("u2", "p2", "a", "10.0.0.2", true);
        draining
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ANNOTATION_DRAINING.to_owned(), "true".to_owned());
        tracker.apply(vec![Ok(Event::Apply(draining))], "runtime");
        assert!(pool_addrs(&router, "a").is_empty());
    }

    #[tokio::test]
    async fn probe_routes_before_the_kubelet_reports_ready() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let router = router_with(&["a"]);
        let (mut tracker, mut probes) = tracker(&router, port);
        tracker.apply(
            vec![Ok(Event::Apply(running(
                "u1",
                "p1",
                "a",
                "127.0.0.1",
                false,
            )))],
            "runtime",
        );
        assert!(pool_addrs(&router, "a").is_empty());

        let probed = tokio::time::timeout(Duration::from_secs(10), probes.recv())
            .await
            .expect("the probe never reached the listening port")
            .unwrap();
        assert_eq!(probed, "u1");
        assert_eq!(tracker.apply_probes(vec![probed]), 1);
        assert_eq!(pool_addrs(&router, "a"), [format!("127.0.0.1:{port}")]);

        // Once the kubelet reported Ready, its condition alone decides.
        tracker.apply(
            vec![Ok(Event::Apply(running(
                "u1",
                "p1",
                "a",
                "127.0.0.1",
                true,
            )))],
            "runtime",
        );
        tracker.apply(
            vec![Ok(Event::Apply(running(
                "u1",
                "p1",
                "a",
                "127.0.0.1",
                false,
            )))],
            "runtime",
        );
        assert!(pool_addrs(&router, "a").is_empty());
    }

    #[tokio::test]
    async fn unschedulable_pod_reports_failed_and_is_never_routed() {
        let router = router_with(&["a"]);
        let (mut tracker, _probes) = tracker(&router, 9000);
        let mut pending = base(serde_json::json!({
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable", "message": "0/1 nodes are available"}],
        }));
        pending
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ANNOTATION_FUNCTION.to_owned(), "a".to_owned());
        tracker.apply(vec![Ok(Event::Apply(pending))], "runtime");
        let state = tracker.shared.states.lock()["u1"].subscribe();
        let PodState::Failed(failure) = &*state.borrow() else {
            panic!("not failed: {:?}", *state.borrow());
        };
        assert_eq!(failure.reason, "Unschedulable");
        assert!(pool_addrs(&router, "a").is_empty());
    }

    #[tokio::test]
    async fn pods_of_another_owner_are_never_routed() {
        let router = router_with(&["a"]);
        let (mut tracker, _probes) = tracker(&router, 9000);
        tracker.owner = Some("current".to_owned());
        let owned_by = |uid: &str, ip: &str, owner: &str| {
            let mut pod = running(uid, uid, "a", ip, true);
            pod.metadata
                .annotations
                .as_mut()
                .unwrap()
                .insert(ANNOTATION_OWNER.to_owned(), owner.to_owned());
            pod
        };
        tracker.apply(
            vec![
                Ok(Event::Apply(owned_by("u1", "10.0.0.1", "previous"))),
                Ok(Event::Apply(owned_by("u2", "10.0.0.2", "current"))),
                Ok(Event::Apply(running("u3", "u3", "a", "10.0.0.3", true))),
            ],
            "runtime",
        );
        assert_eq!(pool_addrs(&router, "a"), ["10.0.0.2:9000"]);
    }

    #[tokio::test]
    async fn pods_of_another_replica_are_never_routed() {
        let router = router_with(&["a"]);
        let (mut tracker, _probes) = tracker(&router, 9000);
        tracker.replica = Some("proxy-1".to_owned());
        let of_replica = |uid: &str, ip: &str, replica: &str| {
            let mut pod = running(uid, uid, "a", ip, true);
            pod.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert(LABEL_REPLICA.to_owned(), replica.to_owned());
            pod
        };
        tracker.apply(
            vec![
                Ok(Event::Apply(of_replica("u1", "10.0.0.1", "proxy-2"))),
                Ok(Event::Apply(of_replica("u2", "10.0.0.2", "proxy-1"))),
                Ok(Event::Apply(running("u3", "u3", "a", "10.0.0.3", true))),
            ],
            "runtime",
        );
        assert_eq!(pool_addrs(&router, "a"), ["10.0.0.2:9000"]);
    }
}
