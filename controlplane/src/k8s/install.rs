//! Initialisation of a bound cluster: fngate's system components in `fngate-system`, applied
//! with server-side apply, and the binding's status.
//!
//! A binding with `install = true` gets the node agent's ServiceAccount and a ConfigMap
//! describing the binding. It also gets a Role and RoleBinding in the runtime namespace (read
//! pods, nothing cluster-wide) and the agent DaemonSet, placed like the runtime pods so an agent
//! runs wherever they may. Applying is idempotent: re-applying an unchanged set changes
//! nothing, and re-applying after someone changed or deleted an object repairs it. The status moves from Initializing to Normal once the DaemonSet has a ready
//! agent, or to Failed with the reason.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde::Serialize;
use serde_json::{json, Value};

use crate::model::KubeBinding;

/// The namespace of fngate's own components in a bound cluster.
pub const SYSTEM_NAMESPACE: &str = "fngate-system";
/// Port of the node agent's status listener (`/healthz`, `/versions`) on its pod IP.
pub const AGENT_STATUS_PORT: u16 = 9310;
/// Field manager of fngate's server-side applies.
const FIELD_MANAGER: &str = "fngate";
/// Container waiting reasons of an agent pod that mean its image cannot be pulled.
const PULL_FAILURES: &[&str] = &["ErrImagePull", "ImagePullBackOff", "InvalidImageName"];

/// Phase of a binding, as the control-plane API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Phase {
    Initializing,
    Normal,
    Failed,
}

/// A binding's status: its phase and, unless Normal, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BindingStatus {
    pub phase: Phase,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl BindingStatus {
    pub fn initializing(reason: impl Into<String>) -> Self {
        BindingStatus {
            phase: Phase::Initializing,
            reason: reason.into(),
        }
    }

    pub fn normal() -> Self {
        BindingStatus {
            phase: Phase::Normal,
            reason: String::new(),
        }
    }

    pub fn failed(reason: impl Into<String>) -> Self {
        BindingStatus {
            phase: Phase::Failed,
            reason: reason.into(),
        }
    }
}

/// Names of one binding's objects; several bindings may share a cluster, each with its own
/// agent, named after its runtime namespace.
fn agent_name(binding: &KubeBinding) -> String {
    format!("fngate-agent-{}", binding.namespace)
}

/// Builds the system objects of a binding. `control_plane_url` is where agents fetch packages.
pub fn system_objects(
    function_namespace: &str,
    binding: &KubeBinding,
    control_plane_url: &str,
) -> Vec<Value> {
    let name = agent_name(binding);
    let labels = json!({
        "app.kubernetes.io/name": "fngate-agent",
        "app.kubernetes.io/managed-by": "fngate",
        "app.kubernetes.io/instance": name,
    });
    let function_dir = binding.function_dir.to_string_lossy();
    let mut args = vec![
        "agent".to_owned(),
        format!("--listen=$(POD_IP):{AGENT_STATUS_PORT}"),
        format!("--namespace={}", binding.namespace),
        format!("--control-plane={control_plane_url}"),
        format!("--function-dir={function_dir}"),
    ];
    if let Some(kubeconfig) = &binding.agent_kubeconfig {
        args.push(format!("--kubeconfig={}", kubeconfig.display()));
    }
    let mut pod_spec = json!({
        "serviceAccountName": name,
        "containers": [{
            "name": "agent",
            "image": binding.agent_image,
            "args": args,
            "env": [
                {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            ],
            "ports": [{"name": "status", "containerPort": AGENT_STATUS_PORT, "protocol": "TCP"}],
            // Ready once the agent listed its node's runtime pods.
            "readinessProbe": {
                "httpGet": {"path": "/healthz", "port": AGENT_STATUS_PORT},
                "periodSeconds": 2,
            },
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [{"name": "function-dir", "mountPath": function_dir}],
        }],
        "volumes": [{"name": "function-dir", "hostPath": {"path": function_dir, "type": "DirectoryOrCreate"}}],
    });
    super::pod::place(&mut pod_spec, binding);
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NAMESPACE}}),
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE, "labels": labels},
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": name, "namespace": binding.namespace, "labels": labels},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": binding.namespace, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": SYSTEM_NAMESPACE}],
        }),
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE, "labels": labels},
            "data": {
                "function-namespace": function_namespace,
                "runtime-namespace": binding.namespace,
                "function-dir": function_dir,
                "control-plane": control_plane_url,
            },
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE, "labels": labels},
            "spec": {
                "selector": {"matchLabels": {"app.kubernetes.io/instance": name}},
                "template": {"metadata": {"labels": labels}, "spec": pod_spec},
            },
        }),
    ]
}

/// Returns the API of one object, from its apiVersion and kind.
fn api_for(client: &kube::Client, object: &Value) -> Result<Api<DynamicObject>, String> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let plural = match kind {
        "Namespace" => "namespaces",
        "ServiceAccount" => "serviceaccounts",
        "Role" => "roles",
        "RoleBinding" => "rolebindings",
        "ConfigMap" => "configmaps",
        "DaemonSet" => "daemonsets",
        other => return Err(format!("no API known for kind {other}")),
    };
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    Ok(match object["metadata"]["namespace"].as_str() {
        Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
        None => Api::all_with(client.clone(), &resource),
    })
}

fn describe(object: &Value) -> String {
    format!(
        "{} {}",
        object["kind"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// Applies every object with server-side apply. Fails with the first error, naming the object,
/// and marks an error RBAC caused as forbidden.
pub async fn apply(client: &kube::Client, objects: &[Value]) -> Result<(), String> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for object in objects {
        let api = api_for(client, object)?;
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        if let Err(error) = api.patch(name, &params, &Patch::Apply(object)).await {
            return Err(match error {
                kube::Error::Api(status) if status.code == 403 => format!(
                    "forbidden by RBAC: cannot apply {}: {}",
                    describe(object),
                    status.message
                ),
                other => format!(
                    "cannot apply {}: {}",
                    describe(object),
                    super::describe_error(&other)
                ),
            });
        }
    }
    Ok(())
}

/// Deletes the binding's objects, the namespace `fngate-system` excepted since other bindings
/// may use it. Objects already gone are skipped. A failed delete does not stop the others, and
/// the error lists every failure.
pub async fn remove(client: &kube::Client, objects: &[Value]) -> Result<(), String> {
    let mut failures = Vec::new();
    for object in objects.iter().rev() {
        if object["kind"] == "Namespace" {
            continue;
        }
        let api = api_for(client, object)?;
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => failures.push(format!(
                "cannot delete {}: {}",
                describe(object),
                super::describe_error(&error)
            )),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

/// Reads the binding's status from its agent DaemonSet and the DaemonSet's pods.
pub async fn status(client: &kube::Client, binding: &KubeBinding) -> BindingStatus {
    let name = agent_name(binding);
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let daemonset = match daemonsets.get_opt(&name).await {
        Ok(Some(daemonset)) => daemonset,
        Ok(None) => {
            return BindingStatus::initializing(format!("DaemonSet {name} not created yet"))
        }
        Err(kube::Error::Api(status)) if status.code == 403 => {
            return BindingStatus::failed(format!(
                "forbidden by RBAC: cannot read DaemonSet {SYSTEM_NAMESPACE}/{name}: {}",
                status.message
            ))
        }
        Err(error) => {
            return BindingStatus::initializing(format!(
                "cannot read DaemonSet {SYSTEM_NAMESPACE}/{name}: {}",
                super::describe_error(&error)
            ))
        }
    };
    let status = daemonset.status.unwrap_or_default();
    if status.number_ready >= 1 {
        return BindingStatus::normal();
    }
    // Observed by the controller with nowhere to run: no node matches the placement rules.
    let observed = daemonset.metadata.generation.is_some()
        && status.observed_generation == daemonset.metadata.generation;
    if observed && status.desired_number_scheduled == 0 {
        return BindingStatus::failed(
            "no eligible nodes: no node matches the binding's node_selector, tolerations and affinity",
        );
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let selector = format!("app.kubernetes.io/instance={name}");
    // The first container waiting reason among the agent pods, which explains why none is ready.
    let mut agent_waiting = None;
    match pods.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => {
            for pod in list.items {
                let pod_name = pod.metadata.name.unwrap_or_default();
                let waiting = pod
                    .status
                    .and_then(|s| s.container_statuses)
                    .unwrap_or_default()
                    .into_iter()
                    .find_map(|c| c.state?.waiting.filter(|w| w.reason.is_some()));
                let Some(waiting) = waiting else { continue };
                let reason = waiting.reason.unwrap_or_default();
                let message = waiting.message.unwrap_or_default();
                if PULL_FAILURES.contains(&reason.as_str()) {
                    return BindingStatus::failed(format!(
                        "image not pullable: {reason} {message}"
                    ));
                }
                agent_waiting.get_or_insert(format!("; pod {pod_name}: {reason} {message}"));
            }
        }
        Err(kube::Error::Api(status)) if status.code == 403 => {
            return BindingStatus::failed(format!(
                "forbidden by RBAC: cannot list the agent pods in {SYSTEM_NAMESPACE}: {}",
                status.message
            ))
        }
        Err(error) => {
            agent_waiting = Some(format!(
                "; cannot list the agent pods: {}",
                super::describe_error(&error)
            ));
        }
    }
    BindingStatus::initializing(format!(
        "waiting for a ready node agent ({} ready of {} scheduled{})",
        status.number_ready,
        status.desired_number_scheduled,
        agent_waiting.as_deref().unwrap_or_default().trim_end()
    ))
}

/// Applies the binding's objects, then follows their status: every second while not Normal,
/// and every `resync` once Normal, re-applying each time, which repairs drift. Publishes each
/// new status through `publish`. Runs until cancelled.
pub async fn run(
    client: kube::Client,
    binding: KubeBinding,
    objects: Vec<Value>,
    resync: Duration,
    publish: impl Fn(BindingStatus),
) {
    let mut last: Option<BindingStatus> = None;
    loop {
        let current = match apply(&client, &objects).await {
            Ok(()) => status(&client, &binding).await,
            Err(reason) => BindingStatus::failed(reason),
        };
        if last.as_ref() != Some(&current) {
            match current.phase {
                Phase::Failed => tracing::warn!(k8s_namespace = %binding.namespace,
                    reason = %current.reason, "binding failed"),
                _ => tracing::info!(k8s_namespace = %binding.namespace,
                    phase = ?current.phase, reason = %current.reason, "binding status changed"),
            }
            publish(current.clone());
        }
        let wait = if current.phase == Phase::Normal {
            resync
        } else {
            Duration::from_secs(1)
        };
        last = Some(current);
        tokio::time::sleep(wait).await;
    }
}
