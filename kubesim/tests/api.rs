//! API server behaviour seen through kube-rs: CRUD, errors, selectors, watches, patches.

mod common;

use std::time::Duration;

use common::{next, next_matching, start, within};
use fngate_kubesim::Resource;
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use kube::{Resource as _, ResourceExt};
use serde_json::json;

fn config_map(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "data": {"key": name},
    }))
    .unwrap()
}

fn api_error(error: kube::Error) -> kube::core::Status {
    match error {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn rv_of<K: kube::Resource>(object: &K) -> u64 {
    object
        .resource_version()
        .expect("object has a resourceVersion")
        .parse()
        .unwrap()
}

#[tokio::test]
async fn crud_and_status_errors() {
    let h = start(|c| c).await;
    let api: Api<ConfigMap> = Api::default_namespaced(h.client.clone());

    let created = api
        .create(&PostParams::default(), &config_map("one", json!({})))
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some(), "create sets a uid");
    assert!(
        created.metadata.creation_timestamp.is_some(),
        "create sets creationTimestamp"
    );
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(created.metadata.namespace.as_deref(), Some("default"));

    let fetched = api.get("one").await.unwrap();
    assert_eq!(fetched.metadata.uid, created.metadata.uid);
    assert_eq!(fetched.data.unwrap()["key"], "one");

    let duplicate = api_error(
        api.create(&PostParams::default(), &config_map("one", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!(duplicate.code, 409);
    assert_eq!(duplicate.reason, "AlreadyExists");
    assert_eq!(duplicate.message, "configmaps \"one\" already exists");

    let missing = api_error(api.get("nope").await.unwrap_err());
    assert_eq!(missing.code, 404);
    assert_eq!(missing.reason, "NotFound");
    assert_eq!(missing.message, "configmaps \"nope\" not found");

    let mut changed = created.clone();
    changed.data = Some([("key".to_string(), "two".to_string())].into());
    let replaced = api
        .replace("one", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert!(
        rv_of(&replaced) > rv_of(&created),
        "a write bumps the resourceVersion"
    );

    let stale = api_error(
        api.replace("one", &PostParams::default(), &changed)
            .await
            .unwrap_err(),
    );
    assert_eq!(stale.code, 409);
    assert_eq!(stale.reason, "Conflict");

    let elsewhere: Api<ConfigMap> = Api::namespaced(h.client.clone(), "missing-ns");
    let no_namespace = api_error(
        elsewhere
            .create(&PostParams::default(), &config_map("x", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!(no_namespace.code, 404);
    assert_eq!(no_namespace.message, "namespaces \"missing-ns\" not found");

    let deleted = api.delete("one", &DeleteParams::default()).await.unwrap();
    assert!(
        deleted.is_right(),
        "a configmap delete returns a success Status"
    );
    assert_eq!(api_error(api.get("one").await.unwrap_err()).code, 404);
    assert!(h
        .cluster
        .get(&Resource::CONFIGMAPS, Some("default"), "one")
        .is_none());
}

#[tokio::test]
async fn missing_or_wrong_token_is_401() {
    let h = start(|c| c).await;
    let path = h.dir.path().join("bad-kubeconfig");
    h.cluster.write_kubeconfig(&path, "bad").unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("current-context: \"bad\""));
    std::fs::write(&path, text.replace(h.cluster.token(), "wrong-token")).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let api: Api<ConfigMap> = Api::default_namespaced(client);
    let error = api_error(api.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(error.code, 401);
    assert_eq!(error.reason, "Unauthorized");

    let address = h.cluster.url().trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request =
        format!("GET /api/v1/namespaces HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    within(
        "the unauthenticated response",
        stream.read_to_string(&mut response),
    )
    .await
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 401"), "response: {response}");
    assert!(
        response.contains("\"kind\":\"Status\""),
        "response: {response}"
    );
}

#[tokio::test]
async fn label_selectors_and_pages() {
    let h = start(|c| c).await;
    let api: Api<ConfigMap> = Api::default_namespaced(h.client.clone());
    for (name, labels) in [
        ("a", json!({"app": "web", "tier": "front"})),
        ("b", json!({"app": "web"})),
        ("c", json!({"app": "db"})),
        ("d", json!({})),
    ] {
        api.create(&PostParams::default(), &config_map(name, labels))
            .await
            .unwrap();
    }
    let names = |list: kube::core::ObjectList<ConfigMap>| {
        list.items.iter().map(|c| c.name_any()).collect::<Vec<_>>()
    };
    let cases = [
        ("app=web", vec!["a", "b"]),
        ("app==db", vec!["c"]),
        ("app!=web", vec!["c", "d"]),
        ("app in (web, db)", vec!["a", "b", "c"]),
        ("app notin (web)", vec!["c", "d"]),
        ("tier", vec!["a"]),
        ("!app", vec!["d"]),
        ("app=web,!tier", vec!["b"]),
    ];
    for (selector, expected) in cases {
        let list = api
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap();
        assert_eq!(names(list), expected, "selector {selector:?}");
    }
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=c"))
        .await
        .unwrap();
    assert_eq!(names(by_name), vec!["c"]);

    let first = api.list(&ListParams::default().limit(3)).await.unwrap();
    assert_eq!(first.metadata.remaining_item_count, Some(1));
    let token = first
        .metadata
        .continue_
        .clone()
        .expect("a short page has a continue token");
    let list_rv = first.metadata.resource_version.clone().unwrap();
    assert_eq!(list_rv, h.cluster.resource_version().to_string());
    assert_eq!(names(first), vec!["a", "b", "c"]);
    let second = api
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(second.metadata.continue_, None);
    assert_eq!(names(second), vec!["d"]);

    api.create(&PostParams::default(), &config_map("e", json!({})))
        .await
        .unwrap();
    h.cluster.compact();
    let expired = api_error(
        api.list(&ListParams::default().limit(3).continue_token(&token))
            .await
            .unwrap_err(),
    );
    assert_eq!(expired.code, 410);
    assert_eq!(expired.reason, "Expired");

    let all_namespaces: Api<ConfigMap> = Api::all(h.client.clone());
    assert_eq!(
        all_namespaces
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        5
    );
}

/// Collects watch events other than bookmarks as `TYPE name` strings until `stop` is seen.
async fn collect_until(
    stream: &mut (impl futures_util::Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin),
    stop: &str,
) -> Vec<String> {
    let mut seen = Vec::new();
    within("watch events", async {
        while let Some(event) = stream.next().await {
            let line = match event.unwrap() {
                WatchEvent::Added(o) => format!("ADDED {}", o.name_any()),
                WatchEvent::Modified(o) => format!("MODIFIED {}", o.name_any()),
                WatchEvent::Deleted(o) => format!("DELETED {}", o.name_any()),
                WatchEvent::Bookmark(_) => continue,
                WatchEvent::Error(e) => format!("ERROR {}", e.code),
            };
            let done = line == stop;
            seen.push(line);
            if done {
                return;
            }
        }
        panic!("watch ended early; saw {seen:?}");
    })
    .await;
    seen
}

#[tokio::test]
async fn watch_from_version_replays_later_events() {
    let h = start(|c| c).await;
    let api: Api<ConfigMap> = Api::default_namespaced(h.client.clone());
    let a = api
        .create(&PostParams::default(), &config_map("a", json!({})))
        .await
        .unwrap();
    let since = a.resource_version().unwrap();
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"x": "1"}})),
    )
    .await
    .unwrap();
    api.create(&PostParams::default(), &config_map("b", json!({})))
        .await
        .unwrap();
    api.delete("a", &DeleteParams::default()).await.unwrap();

    let mut stream = api
        .watch(&WatchParams::default(), &since)
        .await
        .unwrap()
        .boxed();
    api.create(&PostParams::default(), &config_map("marker", json!({})))
        .await
        .unwrap();
    let seen = collect_until(&mut stream, "ADDED marker").await;
    assert_eq!(
        seen,
        vec!["MODIFIED a", "ADDED b", "DELETED a", "ADDED marker"]
    );

    // A replay of the same history shows the deletion with the last state of the object and
    // a resourceVersion of its own.
    let mut replay = api
        .watch(&WatchParams::default(), &since)
        .await
        .unwrap()
        .boxed();
    let mut modified_rv = 0;
    let deleted = next_matching(&mut replay, "the DELETED event", |event| {
        match event.unwrap() {
            WatchEvent::Modified(o) => {
                modified_rv = rv_of(&o);
                None
            }
            WatchEvent::Deleted(o) => Some(o),
            _ => None,
        }
    })
    .await;
    assert_eq!(deleted.name_any(), "a");
    assert_eq!(
        deleted.data.clone().unwrap()["x"],
        "1",
        "DELETED carries the last state"
    );
    assert!(
        rv_of(&deleted) > modified_rv,
        "DELETED has a new resourceVersion"
    );

    let mut selected = api
        .watch(&WatchParams::default().labels("app=web"), "0")
        .await
        .unwrap()
        .boxed();
    api.create(
        &PostParams::default(),
        &config_map("c", json!({"app": "web"})),
    )
    .await
    .unwrap();
    api.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "db"}}})),
    )
    .await
    .unwrap();
    api.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "web"}}})),
    )
    .await
    .unwrap();
    api.create(
        &PostParams::default(),
        &config_map("end", json!({"app": "web"})),
    )
    .await
    .unwrap();
    let seen = collect_until(&mut selected, "ADDED end").await;
    assert_eq!(seen, vec!["ADDED c", "DELETED c", "ADDED c", "ADDED end"]);

    h.cluster.compact();
    let mut expired = api
        .watch(&WatchParams::default(), &since)
        .await
        .unwrap()
        .boxed();
    match next(&mut expired, "the 410 error event").await.unwrap() {
        WatchEvent::Error(status) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
            assert!(
                status.message.starts_with("too old resource version"),
                "{}",
                status.message
            );
        }
        other => panic!("expected an ERROR event, got {other:?}"),
    }
    assert!(within("the end of the expired watch", expired.next())
        .await
        .is_none());
}

#[tokio::test]
async fn watch_timeout_ends_stream() {
    let h = start(|c| c).await;
    let api: Api<ConfigMap> = Api::default_namespaced(h.client.clone());
    let mut stream = api
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .boxed();
    let end = within("the watch to time out", async {
        while let Some(event) = stream.next().await {
            event.unwrap();
        }
    });
    end.await;
}

#[tokio::test]
async fn bookmarks_carry_current_version() {
    let h = start(|mut c| {
        c.bookmark_interval = Duration::from_millis(100);
        c
    })
    .await;
    let api: Api<ConfigMap> = Api::default_namespaced(h.client.clone());
    let now = h.cluster.resource_version().to_string();
    let mut stream = api
        .watch(&WatchParams::default(), &now)
        .await
        .unwrap()
        .boxed();
    let elsewhere: Api<ConfigMap> = Api::namespaced(h.client.clone(), "kube-system");
    let other = elsewhere
        .create(&PostParams::default(), &config_map("other", json!({})))
        .await
        .unwrap();
    let target = rv_of(&other);
    let reached = next_matching(
        &mut stream,
        "a bookmark at the new resourceVersion",
        |event| match event.unwrap() {
            WatchEvent::Bookmark(b) => {
                (b.metadata.resource_version.parse::<u64>().unwrap() >= target).then_some(true)
            }
            other => panic!("expected only bookmarks, got {other:?}"),
        },
    )
    .await;
    assert!(reached);
}

/// Drives a watcher through a cut stream and a compaction, for one initial list strategy.
async fn watcher_recovers(streaming: bool) {
    let h = start(|mut c| {
        c.bookmark_interval = Duration::from_secs(3600);
        c
    })
    .await;
    let api: Api<ConfigMap> = Api::default_namespaced(h.client.clone());
    api.create(
        &PostParams::default(),
        &config_map("x", json!({"app": "w"})),
    )
    .await
    .unwrap();
    let mut config = watcher::Config::default().labels("app=w");
    if streaming {
        config = config.streaming_lists();
    }
    let mut events = watcher(api.clone(), config).boxed();

    let label = |e: &watcher::Event<ConfigMap>| match e {
        watcher::Event::Init => "Init".to_string(),
        watcher::Event::InitApply(o) => format!("InitApply {}", o.name_any()),
        watcher::Event::InitDone => "InitDone".to_string(),
        watcher::Event::Apply(o) => format!("Apply {}", o.name_any()),
        watcher::Event::Delete(o) => format!("Delete {}", o.name_any()),
    };
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("InitDone") {
        seen.push(label(&next(&mut events, "the initial list").await.unwrap()));
    }
    assert_eq!(seen, vec!["Init", "InitApply x", "InitDone"]);

    h.cluster.cut_watches();
    api.create(
        &PostParams::default(),
        &config_map("y", json!({"app": "w"})),
    )
    .await
    .unwrap();
    let event = next(&mut events, "the event after a cut").await.unwrap();
    assert_eq!(
        label(&event),
        "Apply y",
        "a cut watch resumes without a relist"
    );
    let resumed = h
        .cluster
        .requests()
        .into_iter()
        .filter(|r| {
            r.watch
                && r.query.contains("resourceVersion=")
                && !r.query.contains("resourceVersion=0")
        })
        .count();
    assert!(resumed >= 1, "the watcher resumed from a resourceVersion");

    api.create(
        &PostParams::default(),
        &config_map("z", json!({"app": "other"})),
    )
    .await
    .unwrap();
    h.cluster.compact();
    h.cluster.cut_watches();
    let error = next(&mut events, "the 410 after compaction").await;
    match error {
        Err(watcher::Error::WatchError(status)) => assert_eq!(status.code, 410),
        other => panic!("expected a 410 watch error, got {other:?}"),
    }
    let mut relist = Vec::new();
    while relist.last().map(String::as_str) != Some("InitDone") {
        relist.push(label(&next(&mut events, "the relist").await.unwrap()));
    }
    assert_eq!(
        relist,
        vec!["Init", "InitApply x", "InitApply y", "InitDone"]
    );

    api.create(
        &PostParams::default(),
        &config_map("after", json!({"app": "w"})),
    )
    .await
    .unwrap();
    assert_eq!(
        label(
            &next(&mut events, "a live event after the relist")
                .await
                .unwrap()
        ),
        "Apply after"
    );
}

#[tokio::test]
async fn watcher_recovers_with_list_watch() {
    watcher_recovers(false).await;
}

#[tokio::test]
async fn watcher_recovers_with_streaming_lists() {
    watcher_recovers(true).await;
}

#[tokio::test]
async fn server_side_apply_is_idempotent() {
    let h = start(|c| c).await;
    let api: Api<ConfigMap> = Api::default_namespaced(h.client.clone());
    let params = PatchParams::apply("kubesim-test");
    let config = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa", "labels": {"a": "1"}}, "data": {"k": "v"}});

    let created = api
        .patch("ssa", &params, &Patch::Apply(config.clone()))
        .await
        .unwrap();
    let managed = created.metadata.managed_fields.clone().unwrap();
    assert_eq!(managed.len(), 1);
    assert_eq!(managed[0].manager.as_deref(), Some("kubesim-test"));
    assert_eq!(managed[0].operation.as_deref(), Some("Apply"));
    let first_rv = rv_of(&created);

    let mut stream = api
        .watch(&WatchParams::default(), &first_rv.to_string())
        .await
        .unwrap()
        .boxed();
    let again = api
        .patch("ssa", &params, &Patch::Apply(config.clone()))
        .await
        .unwrap();
    assert_eq!(
        rv_of(&again),
        first_rv,
        "an identical apply keeps the resourceVersion"
    );
    assert_eq!(
        again.metadata.managed_fields,
        created.metadata.managed_fields
    );

    let mut changed = config.clone();
    changed["data"]["k"] = json!("w");
    let updated = api
        .patch("ssa", &params.clone().force(), &Patch::Apply(changed))
        .await
        .unwrap();
    assert!(rv_of(&updated) > first_rv);
    assert_eq!(updated.data.unwrap()["k"], "w");
    assert_eq!(updated.metadata.labels.unwrap()["a"], "1");
    let seen = collect_until(&mut stream, "MODIFIED ssa").await;
    assert_eq!(
        seen,
        vec!["MODIFIED ssa"],
        "the identical apply emitted no event"
    );

    let no_manager = api_error(
        api.patch("ssa", &PatchParams::default(), &Patch::Apply(config))
            .await
            .unwrap_err(),
    );
    assert_eq!(no_manager.code, 400);
}

#[tokio::test]
async fn merge_json_and_strategic_patches() {
    let h = start(|c| c).await;
    let api: Api<ConfigMap> = Api::default_namespaced(h.client.clone());
    api.create(&PostParams::default(), &config_map("p", json!({})))
        .await
        .unwrap();
    let merged = api
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"key": null, "new": "1"}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.data.clone().unwrap().len(), 1);
    assert_eq!(merged.data.unwrap()["new"], "1");

    let operations: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/data/new", "value": "1"},
        {"op": "replace", "path": "/data/new", "value": "2"},
    ]))
    .unwrap();
    let patched = api
        .patch("p", &PatchParams::default(), &Patch::<()>::Json(operations))
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap()["new"], "2");
    let failing: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/data/new", "value": "1"}])).unwrap();
    let error = api_error(
        api.patch("p", &PatchParams::default(), &Patch::<()>::Json(failing))
            .await
            .unwrap_err(),
    );
    assert_eq!(error.code, 422);

    let deployments: Api<Deployment> = Api::default_namespaced(h.client.clone());
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "d"},
        "spec": {
            "selector": {"matchLabels": {"app": "d"}},
            "template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": [
                {"name": "main", "image": "one", "env": [{"name": "A", "value": "1"}]},
                {"name": "side", "image": "two"}
            ]}}
        }
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "main", "env": [{"name": "B", "value": "2"}]}]}}}});
    let patched = deployments
        .patch("d", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .unwrap();
    let containers = patched.spec.unwrap().template.spec.unwrap().containers;
    assert_eq!(containers.len(), 2, "containers merge by name");
    assert_eq!(containers[0].image.as_deref(), Some("one"));
    assert_eq!(containers[0].env.as_ref().unwrap().len(), 2);
    assert_eq!(patched.metadata.generation, Some(2));
}

#[tokio::test]
async fn status_subresource_is_separate() {
    let h = start(|c| c).await;
    let api: Api<Service> = Api::default_namespaced(h.client.clone());
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "s"},
        "spec": {"type": "LoadBalancer", "selector": {"app": "s"}, "ports": [{"port": 80}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &service).await.unwrap();
    let ingress = |s: &Service| {
        s.status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.clone())
    };
    assert_eq!(ingress(&created), None, "create drops status");
    let spec = created.spec.clone().unwrap();
    assert!(spec.cluster_ip.is_some(), "create allocates a cluster IP");
    assert!(
        spec.ports.as_ref().unwrap()[0].node_port.is_some(),
        "a LoadBalancer service gets a node port"
    );

    let with_status = api
        .patch_status(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.2"}]}}, "spec": {"selector": {"app": "x"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        ingress(&with_status).unwrap()[0].ip.as_deref(),
        Some("192.0.2.2")
    );
    assert_eq!(
        with_status
            .spec
            .as_ref()
            .unwrap()
            .selector
            .as_ref()
            .unwrap()["app"],
        "s",
        "a status write ignores spec"
    );
    assert_eq!(with_status.metadata.generation, Some(1));

    let main = api
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.3"}]}}, "spec": {"selector": {"app": "y"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        ingress(&main).unwrap()[0].ip.as_deref(),
        Some("192.0.2.2"),
        "a main write ignores status"
    );
    assert_eq!(
        main.spec.as_ref().unwrap().selector.as_ref().unwrap()["app"],
        "y"
    );
    assert_eq!(main.metadata.generation, Some(2));
    assert_eq!(
        main.spec.as_ref().unwrap().cluster_ip,
        spec.cluster_ip,
        "the cluster IP stays"
    );

    let unchanged = api
        .patch_status(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.2"}]}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        unchanged.resource_version(),
        main.resource_version(),
        "a no-op status write keeps the resourceVersion"
    );
}

#[tokio::test]
async fn namespace_delete_removes_contents() {
    let h = start(|c| c).await;
    let namespaces: Api<Namespace> = Api::all(h.client.clone());
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "gone"}})).unwrap();
    let created = namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Active"));
    let api: Api<ConfigMap> = Api::namespaced(h.client.clone(), "gone");
    api.create(&PostParams::default(), &config_map("inside", json!({})))
        .await
        .unwrap();
    assert!(
        h.cluster
            .get(&Resource::SERVICEACCOUNTS, Some("gone"), "default")
            .is_some(),
        "a new namespace gets a default service account"
    );

    namespaces
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(api_error(api.get("inside").await.unwrap_err()).code, 404);
    assert_eq!(
        api_error(namespaces.get("gone").await.unwrap_err()).code,
        404
    );
}

#[tokio::test]
async fn discovery_lists_served_groups() {
    let h = start(|c| c).await;
    let discovery = kube::Discovery::new(h.client.clone()).run().await.unwrap();
    let groups: Vec<String> = discovery.groups().map(|g| g.name().to_string()).collect();
    for group in [
        "",
        "apps",
        "rbac.authorization.k8s.io",
        "coordination.k8s.io",
        "events.k8s.io",
    ] {
        assert!(
            groups.iter().any(|g| g == group),
            "group {group:?} in {groups:?}"
        );
    }
    let apps = discovery.get("apps").unwrap();
    let kinds: Vec<String> = apps
        .recommended_resources()
        .into_iter()
        .map(|(r, _)| r.kind)
        .collect();
    assert!(kinds.contains(&"Deployment".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"DaemonSet".to_string()), "{kinds:?}");
}

#[tokio::test]
async fn anonymous_access_is_opt_in() {
    let h = start(|mut c| {
        c.allow_anonymous = true;
        c
    })
    .await;
    let address = h.cluster.url().trim_start_matches("http://").to_string();
    let get = |authorization: &'static str| {
        let address = address.clone();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
            let request = format!(
                "GET /api/v1/namespaces HTTP/1.1\r\nHost: {address}\r\n{authorization}Connection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            within("the response", stream.read_to_string(&mut response))
                .await
                .unwrap();
            response
        }
    };
    let anonymous = get("").await;
    assert!(anonymous.starts_with("HTTP/1.1 200"), "{anonymous}");
    let wrong = get("Authorization: Bearer wrong\r\n").await;
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
}

#[tokio::test]
async fn delete_collection_by_label() {
    let h = start(|c| c).await;
    let api: Api<ConfigMap> = Api::default_namespaced(h.client.clone());
    for (name, app) in [("a", "web"), ("b", "web"), ("c", "db")] {
        api.create(
            &PostParams::default(),
            &config_map(name, json!({"app": app})),
        )
        .await
        .unwrap();
    }
    let deleted = api
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("app=web"),
        )
        .await
        .unwrap();
    let names: Vec<String> = deleted
        .left()
        .expect("deletecollection returns the deleted objects")
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    assert_eq!(names, vec!["a", "b"]);
    let left: Vec<String> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    assert_eq!(left, vec!["c"]);
}

#[tokio::test]
async fn event_recorder_creates_then_patches() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};

    let h = start(|c| c).await;
    let api: Api<ConfigMap> = Api::default_namespaced(h.client.clone());
    let object = api
        .create(&PostParams::default(), &config_map("watched", json!({})))
        .await
        .unwrap();
    let reporter = Reporter {
        controller: "kubesim-test".to_string(),
        instance: None,
    };
    let recorder = Recorder::new(h.client.clone(), reporter);
    let event = Event {
        type_: EventType::Normal,
        reason: "Checked".to_string(),
        note: Some("first".to_string()),
        action: "Check".to_string(),
        secondary: None,
    };
    let reference = object.object_ref(&());
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap();

    let events = h.cluster.list(&Resource::EVENTS_V1, Some("default"));
    assert_eq!(
        events.len(),
        1,
        "the repeat is recorded as a series: {events:?}"
    );
    assert_eq!(events[0]["reason"], "Checked");
    assert_eq!(events[0]["regarding"]["name"], "watched");
    assert_eq!(events[0]["series"]["count"], 2);
}

#[tokio::test]
async fn pod_spec_updates_are_restricted() {
    use k8s_openapi::api::core::v1::Pod;

    let h = start(|c| c).await;
    let api: Api<Pod> = Api::default_namespaced(h.client.clone());
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "one", "command": ["/bin/true"]}]},
    }))
    .unwrap();
    api.create(&PostParams::default(), &pod).await.unwrap();

    let image = json!({"spec": {"containers": [{"name": "c", "image": "two"}]}});
    let updated = api
        .patch("p", &PatchParams::default(), &Patch::Strategic(image))
        .await
        .unwrap();
    let container = &updated.spec.unwrap().containers[0];
    assert_eq!(container.image.as_deref(), Some("two"));
    assert_eq!(container.command, Some(vec!["/bin/true".to_string()]));

    let command = json!({"spec": {"containers": [{"name": "c", "command": ["/bin/false"]}]}});
    let error = api_error(
        api.patch("p", &PatchParams::default(), &Patch::Strategic(command))
            .await
            .unwrap_err(),
    );
    assert_eq!(error.code, 422);
    assert_eq!(error.reason, "Invalid");
    assert!(
        error.message.contains("pod updates may not change fields"),
        "{}",
        error.message
    );

    let labels = api
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap();
    assert_eq!(labels.labels()["a"], "b");
}

/// Receives `count` labels from a watcher driver task.
async fn take(
    received: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    count: usize,
) -> Vec<String> {
    let mut labels = Vec::new();
    for _ in 0..count {
        let label = within("a watcher event", received.recv()).await;
        labels.push(label.expect("the watcher task ended"));
    }
    labels
}

#[tokio::test]
async fn blocked_watch_resumes_after_compaction() {
    let h = start(|mut c| {
        c.bookmark_interval = Duration::from_secs(3600);
        c
    })
    .await;
    let api: Api<ConfigMap> = Api::default_namespaced(h.client.clone());
    for name in ["x", "y"] {
        api.create(
            &PostParams::default(),
            &config_map(name, json!({"app": "w"})),
        )
        .await
        .unwrap();
    }
    // Drive the watcher in a task, so it resumes at once when its stream is cut.
    let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
    let mut events = watcher(api.clone(), watcher::Config::default().labels("app=w")).boxed();
    let driver = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let label = match event {
                Ok(watcher::Event::Init) => "Init".to_string(),
                Ok(watcher::Event::InitApply(o)) => format!("InitApply {}", o.name_any()),
                Ok(watcher::Event::InitDone) => "InitDone".to_string(),
                Ok(watcher::Event::Apply(o)) => format!("Apply {}", o.name_any()),
                Ok(watcher::Event::Delete(o)) => format!("Delete {}", o.name_any()),
                Err(watcher::Error::WatchError(status)) => format!("Error {}", status.code),
                Err(other) => format!("Error {other}"),
            };
            if sender.send(label).is_err() {
                return;
            }
        }
    });
    assert_eq!(
        take(&mut received, 4).await,
        vec!["Init", "InitApply x", "InitApply y", "InitDone"]
    );

    let watches = || h.cluster.requests().iter().filter(|r| r.watch).count();
    let before = watches();
    h.cluster.block_watches(true);
    h.cluster.cut_watches();
    within("the resumed watch request", async {
        while watches() == before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    api.delete("x", &DeleteParams::default()).await.unwrap();
    h.cluster.compact();
    h.cluster.block_watches(false);

    assert_eq!(
        take(&mut received, 1).await,
        vec!["Error 410"],
        "the held watch started after the compaction, so it must fail with 410"
    );
    assert_eq!(
        take(&mut received, 3).await,
        vec!["Init", "InitApply y", "InitDone"]
    );
    driver.abort();
}

/// A long generateName is cut, as by the API server, so the name with its 5-character suffix
/// is 63 characters and keeps the prefix's start.
#[tokio::test]
async fn generate_name_cut_to_fit() {
    let h = start(|c| c).await;
    let api: Api<ConfigMap> = Api::default_namespaced(h.client.clone());
    let prefix = format!("{}-", "l".repeat(70));
    let object: ConfigMap = serde_json::from_value(json!({
        "metadata": {"generateName": prefix},
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &object).await.unwrap();
    let name = created.name_any();
    assert_eq!(name.len(), 63, "{name}");
    assert!(name.starts_with(&prefix[..58]), "{name}");
}
