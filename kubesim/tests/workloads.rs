//! Deployment and daemonset controllers seen through kube-rs.

mod common;

use common::{start, within};
use fngate_kubesim::{Image, NodeConfig, Resource, Taint};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use kube::ResourceExt;
use serde_json::json;

/// Builds a node that can run `shell` (/bin/sleep).
fn node(name: &str) -> NodeConfig {
    NodeConfig::new(name).image("shell", Image::default().map("/bin/sleep", "/bin/sleep"))
}

fn template(labels: serde_json::Value, argument: &str) -> serde_json::Value {
    json!({
        "metadata": {"labels": labels},
        "spec": {"containers": [{"name": "c", "image": "shell", "command": ["/bin/sleep", argument]}]},
    })
}

async fn wait_deployment(
    api: &Api<Deployment>,
    name: &str,
    what: &str,
    accept: impl Fn(&Deployment) -> bool,
) -> Deployment {
    let condition = move |d: Option<&Deployment>| d.is_some_and(&accept);
    within(what, await_condition(api.clone(), name, condition))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn deployment_runs_replaces_and_collects_pods() {
    let h = start(|mut c| {
        c.nodes = vec![node("node-1")];
        c
    })
    .await;
    let api: Api<Deployment> = Api::default_namespaced(h.client.clone());
    let pods: Api<Pod> = Api::default_namespaced(h.client.clone());
    let apply = PatchParams::apply("kubesim-test");
    let deployment = |argument: &str| {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}, "template": template(json!({"app": "web"}), argument)},
        })
    };
    api.patch("web", &apply, &Patch::Apply(deployment("300")))
        .await
        .unwrap();

    let ready = wait_deployment(&api, "web", "two ready replicas", |d| {
        d.status
            .as_ref()
            .is_some_and(|s| s.ready_replicas == Some(2))
    })
    .await;
    let status = ready.status.unwrap();
    assert_eq!(status.available_replicas, Some(2));
    assert_eq!(status.updated_replicas, Some(2));
    assert_eq!(status.observed_generation, Some(1));
    let available = status
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Available")
        .unwrap();
    assert_eq!(available.status, "True");
    let first_pods = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items;
    assert_eq!(first_pods.len(), 2);
    for pod in &first_pods {
        let owner = &pod.owner_references()[0];
        assert_eq!(owner.kind, "Deployment");
        assert_eq!(owner.uid, ready.metadata.uid.clone().unwrap());
        assert!(pod.name_any().starts_with("web-"), "{}", pod.name_any());
    }

    api.patch("web", &apply, &Patch::Apply(deployment("301")))
        .await
        .unwrap();
    wait_deployment(&api, "web", "the new template rolled out", |d| {
        let status = d.status.as_ref();
        d.metadata.generation == Some(2)
            && status.is_some_and(|s| {
                s.observed_generation == Some(2)
                    && s.updated_replicas == Some(2)
                    && s.replicas == Some(2)
                    && s.ready_replicas == Some(2)
            })
    })
    .await;
    let old_names: Vec<String> = first_pods.iter().map(|p| p.name_any()).collect();
    within("the old pods to be removed", async {
        for name in &old_names {
            let gone = |pod: Option<&Pod>| pod.is_none();
            await_condition(pods.clone(), name, gone).await.unwrap();
        }
    })
    .await;
    let second_pods = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items;
    assert_eq!(second_pods.len(), 2);
    for pod in &second_pods {
        let command = pod.spec.as_ref().unwrap().containers[0]
            .command
            .clone()
            .unwrap();
        assert_eq!(command, vec!["/bin/sleep", "301"]);
    }

    api.delete("web", &DeleteParams::default()).await.unwrap();
    within("the pods of the deleted deployment to be removed", async {
        for pod in &second_pods {
            let gone = |pod: Option<&Pod>| pod.is_none();
            await_condition(pods.clone(), &pod.name_any(), gone)
                .await
                .unwrap();
        }
    })
    .await;
    assert!(h.cluster.list(&Resource::PODS, Some("default")).is_empty());
}

#[tokio::test]
async fn daemonset_runs_one_pod_per_admitted_node() {
    let h = start(|mut c| {
        c.nodes = vec![
            node("node-1"),
            node("node-2"),
            node("node-3").taint(Taint::new("dedicated", "other", "NoSchedule")),
        ];
        c
    })
    .await;
    let api: Api<DaemonSet> = Api::default_namespaced(h.client.clone());
    let daemonset = json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "agent"},
        "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": template(json!({"app": "agent"}), "300")},
    });
    api.patch(
        "agent",
        &PatchParams::apply("kubesim-test"),
        &Patch::Apply(daemonset),
    )
    .await
    .unwrap();
    let condition = |d: Option<&DaemonSet>| {
        d.and_then(|d| d.status.as_ref())
            .is_some_and(|s| s.number_ready == 2)
    };
    let ready = within(
        "two ready daemon pods",
        await_condition(api.clone(), "agent", condition),
    )
    .await
    .unwrap()
    .unwrap();
    let status = ready.status.unwrap();
    assert_eq!(
        status.desired_number_scheduled, 2,
        "the tainted node is not admitted"
    );
    assert_eq!(status.current_number_scheduled, 2);
    assert_eq!(status.number_misscheduled, 0);
    assert_eq!(status.updated_number_scheduled, Some(2));

    let pods: Api<Pod> = Api::default_namespaced(h.client.clone());
    let mut nodes: Vec<String> = pods
        .list(&ListParams::default().labels("app=agent"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.spec.unwrap().node_name.unwrap())
        .collect();
    nodes.sort();
    assert_eq!(nodes, vec!["node-1", "node-2"]);
}
