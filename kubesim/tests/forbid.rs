//! Denials set with `Cluster::forbid`, seen through kube-rs: the 403 status a real API server
//! sends when RBAC denies a request, and lifting a denial with `Cluster::permit`.

mod common;

use common::{start, within};
use fngate_kubesim::Resource;
use http_body_util::BodyExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

/// The user name of kubesim's bearer token by default.
const USER: &str = "system:serviceaccount:kube-system:kubesim";

fn api_error(error: kube::Error) -> kube::core::Status {
    match error {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Builds a DaemonSet manifest whose pods no node admits, so the controller starts none.
fn daemonset(name: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {"kubesim.test/nowhere": "true"},
                    "containers": [{"name": "c", "image": "none"}],
                },
            },
        },
    })
}

fn config_map(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
}

async fn create_namespace(client: &kube::Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
}

#[tokio::test]
async fn forbidden_apply_gets_rbac_status() {
    let h = start(|c| c).await;
    create_namespace(&h.client, "other").await;
    h.cluster
        .forbid("patch", &Resource::DAEMONSETS, Some("default"));
    let daemonsets: Api<DaemonSet> = Api::default_namespaced(h.client.clone());
    let apply = PatchParams::apply("kubesim-test");

    let denied = api_error(
        daemonsets
            .patch("agent", &apply, &Patch::Apply(daemonset("agent")))
            .await
            .unwrap_err(),
    );
    assert_eq!(denied.code, 403);
    assert_eq!(denied.reason, "Forbidden");
    assert_eq!(
        denied.message,
        format!(
            "daemonsets.apps \"agent\" is forbidden: User \"{USER}\" cannot patch resource \
             \"daemonsets\" in API group \"apps\" in the namespace \"default\""
        )
    );
    let details = denied.details.expect("a Forbidden status has details");
    assert_eq!(details.name, "agent");
    assert_eq!(details.group, "apps");
    assert_eq!(details.kind, "daemonsets");
    assert!(
        h.cluster
            .get(&Resource::DAEMONSETS, Some("default"), "agent")
            .is_none(),
        "the denied apply created the DaemonSet"
    );

    // The whole body, as a real server writes it.
    let request = http::Request::patch(
        "/apis/apps/v1/namespaces/default/daemonsets/agent?fieldManager=kubesim-test",
    )
    .header(http::header::CONTENT_TYPE, "application/apply-patch+yaml")
    .body(kube::client::Body::from(
        serde_json::to_vec(&daemonset("agent")).unwrap(),
    ))
    .unwrap();
    let response = within("the denied PATCH", h.client.send(request))
        .await
        .unwrap();
    assert_eq!(response.status(), http::StatusCode::FORBIDDEN);
    let body = within(
        "the body of the denied PATCH",
        response.into_body().collect(),
    )
    .await
    .unwrap()
    .to_bytes();
    let status: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status["kind"], "Status", "{status}");
    assert_eq!(status["apiVersion"], "v1", "{status}");
    assert_eq!(status["status"], "Failure", "{status}");
    assert_eq!(status["reason"], "Forbidden", "{status}");
    assert_eq!(status["code"], 403, "{status}");
    assert_eq!(
        status["details"],
        json!({"name": "agent", "group": "apps", "kind": "daemonsets"})
    );

    // Other namespaces, other verbs and subresources stay allowed.
    let other: Api<DaemonSet> = Api::namespaced(h.client.clone(), "other");
    other
        .patch("agent", &apply, &Patch::Apply(daemonset("agent")))
        .await
        .expect("a patch in another namespace is allowed");
    let missing = api_error(daemonsets.get("agent").await.unwrap_err());
    assert_eq!(missing.code, 404, "a get is allowed: {missing:?}");
    let mut object = daemonset("agent");
    object["metadata"]["namespace"] = json!("default");
    h.cluster
        .create(&Resource::DAEMONSETS, object)
        .expect("Cluster::create is never denied");
    let status_patch = json!({"status": {"numberMisscheduled": 0}});
    daemonsets
        .patch_status(
            "agent",
            &PatchParams::default(),
            &Patch::Merge(&status_patch),
        )
        .await
        .expect("a patch of the status subresource is allowed");
}

#[tokio::test]
async fn forbidden_messages_follow_request_scope() {
    let h = start(|c| c).await;
    create_namespace(&h.client, "other").await;
    let namespaces: Api<Namespace> = Api::all(h.client.clone());

    // A create names no object in its path, so the message and details name none.
    h.cluster.forbid("create", &Resource::CONFIGMAPS, None);
    let configmaps: Api<ConfigMap> = Api::namespaced(h.client.clone(), "other");
    let denied = api_error(
        configmaps
            .create(&PostParams::default(), &config_map("c"))
            .await
            .unwrap_err(),
    );
    assert_eq!(denied.code, 403);
    assert_eq!(
        denied.message,
        format!(
            "configmaps is forbidden: User \"{USER}\" cannot create resource \"configmaps\" \
             in API group \"\" in the namespace \"other\""
        )
    );
    let details = denied.details.expect("a Forbidden status has details");
    assert_eq!(details.name, "");
    assert_eq!(details.group, "");
    assert_eq!(details.kind, "configmaps");

    // A list of a cluster-scoped type is at the cluster scope.
    h.cluster.forbid("list", &Resource::NAMESPACES, None);
    let denied = api_error(namespaces.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(
        denied.message,
        format!(
            "namespaces is forbidden: User \"{USER}\" cannot list resource \"namespaces\" in \
             API group \"\" at the cluster scope"
        )
    );

    // A request for a namespace object is in that namespace.
    h.cluster
        .forbid("get", &Resource::NAMESPACES, Some("other"));
    let denied = api_error(namespaces.get("other").await.unwrap_err());
    assert_eq!(
        denied.message,
        format!(
            "namespaces \"other\" is forbidden: User \"{USER}\" cannot get resource \
             \"namespaces\" in API group \"\" in the namespace \"other\""
        )
    );
    namespaces
        .get("default")
        .await
        .expect("a get of another namespace is allowed");

    // `*` denies every verb, and authorization comes before the lookup: a missing object
    // gets 403, not 404.
    h.cluster.forbid("*", &Resource::SERVICES, Some("default"));
    let services: Api<Service> = Api::default_namespaced(h.client.clone());
    let denied = api_error(services.get("missing").await.unwrap_err());
    assert_eq!(denied.code, 403, "{denied:?}");
    assert!(
        denied.message.contains("cannot get resource \"services\""),
        "{}",
        denied.message
    );
    let denied = api_error(services.list(&ListParams::default()).await.unwrap_err());
    assert!(
        denied.message.contains("cannot list resource \"services\""),
        "{}",
        denied.message
    );
}

#[tokio::test]
async fn permit_lifts_a_denial() {
    let h = start(|c| c).await;
    let daemonsets: Api<DaemonSet> = Api::default_namespaced(h.client.clone());
    let apply = PatchParams::apply("kubesim-test");
    h.cluster
        .forbid("patch", &Resource::DAEMONSETS, Some("default"));
    h.cluster.forbid("create", &Resource::CONFIGMAPS, None);
    let denied = api_error(
        daemonsets
            .patch("agent", &apply, &Patch::Apply(daemonset("agent")))
            .await
            .unwrap_err(),
    );
    assert_eq!(denied.code, 403);

    assert!(
        !h.cluster
            .permit("patch", &Resource::DAEMONSETS, Some("other")),
        "a denial in another namespace was never set"
    );
    assert!(h
        .cluster
        .permit("patch", &Resource::DAEMONSETS, Some("default")));
    assert!(
        !h.cluster
            .permit("patch", &Resource::DAEMONSETS, Some("default")),
        "the denial was lifted already"
    );
    let applied = daemonsets
        .patch("agent", &apply, &Patch::Apply(daemonset("agent")))
        .await
        .expect("the apply is allowed once the denial is lifted");
    assert_eq!(applied.metadata.name.as_deref(), Some("agent"));

    // The other denial stays until it is lifted too.
    let configmaps: Api<ConfigMap> = Api::default_namespaced(h.client.clone());
    let denied = api_error(
        configmaps
            .create(&PostParams::default(), &config_map("c"))
            .await
            .unwrap_err(),
    );
    assert_eq!(denied.code, 403);
    assert!(h.cluster.permit("create", &Resource::CONFIGMAPS, None));
    configmaps
        .create(&PostParams::default(), &config_map("c"))
        .await
        .expect("the create is allowed once the denial is lifted");
}

#[test]
#[should_panic(expected = "unknown verb \"pach\"")]
fn forbid_rejects_an_unknown_verb() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let h = runtime.block_on(start(|c| c));
    h.cluster.forbid("pach", &Resource::DAEMONSETS, None);
}
