//! Initialisation of a bound cluster: fngate's system components in `fngate-system`, applied
//! with server-side apply, and the binding's status.
//!
//! A binding with `install = true` gets the node agent's ServiceAccount and a ConfigMap
//! describing the binding. It also gets a Role and RoleBinding in the runtime namespace (read
//! pods, nothing cluster-wide) and the agent DaemonSet, placed like the runtime pods so an agent
//! runs wherever they may. Beside the agent it gets the proxy: a Deployment running
//! `fngate proxy`, its ServiceAccount with the same read-only Role, and a Service on the
//! binding's support service port. Applying is idempotent: re-applying an unchanged set changes
//! nothing, and re-applying after someone changed or deleted an object repairs it. The status
//! moves from Initializing to Normal once the DaemonSet has a ready agent and the proxy
//! Deployment is available, or to Failed with the reason.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
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
/// Container waiting reasons of a system pod that mean its image cannot be pulled.
const PULL_FAILURES: &[&str] = &["ErrImagePull", "ImagePullBackOff", "InvalidImageName"];
/// Prefix of the names of a binding's proxy objects (Deployment, Service, ServiceAccount, Role
/// and RoleBinding), followed by the runtime k8s namespace.
pub const PROXY_NAME_PREFIX: &str = "fngate-proxy-";
/// Container port of the proxy's support service listener (`fngate proxy --listen`), the
/// proxy Service's target port.
pub const PROXY_PORT: u16 = 8080;
/// Container port of the proxy's admin listener (`fngate proxy --admin-listen`), which serves
/// `/readyz` and `/healthz` to the kubelet's probes.
pub const PROXY_ADMIN_PORT: u16 = 9090;
/// User and group id of the proxy pods: the non-root user of the fngate image.
const PROXY_USER: u32 = 65532;

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

/// Returns the name of a binding's proxy Deployment, Service, ServiceAccount, Role and
/// RoleBinding.
pub fn proxy_name(binding: &KubeBinding) -> String {
    format!("{PROXY_NAME_PREFIX}{}", binding.namespace)
}

/// Builds the system objects of a binding: the namespace `fngate-system`, then the node agent's
/// objects, then the proxy's. `control_plane_url` is where agents fetch packages and where the
/// proxy pods connect.
pub fn system_objects(
    function_namespace: &str,
    binding: &KubeBinding,
    control_plane_url: &str,
) -> Vec<Value> {
    let mut objects = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NAMESPACE}}),
    ];
    objects.extend(agent_objects(
        function_namespace,
        binding,
        control_plane_url,
    ));
    objects.extend(proxy_objects(
        function_namespace,
        binding,
        control_plane_url,
    ));
    objects
}

/// Builds the node agent's ServiceAccount, Role, RoleBinding, ConfigMap and DaemonSet.
fn agent_objects(
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

    let mut volume_mounts = vec![json!({"name": "function-dir", "mountPath": function_dir})];
    let mut volumes = vec![
        json!({"name": "function-dir", "hostPath": {"path": function_dir, "type": "DirectoryOrCreate"}}),
    ];
    if let Some(kubeconfig) = &binding.agent_kubeconfig {
        args.push(format!("--kubeconfig={}", kubeconfig.display()));
        let (mount, volume) = kubeconfig_volume(&kubeconfig.to_string_lossy());
        volume_mounts.push(mount);
        volumes.push(volume);
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
            "volumeMounts": volume_mounts,
        }],
        "volumes": volumes,
    });
    super::pod::place(&mut pod_spec, binding);

    let mut objects = vec![json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE, "labels": labels},
    })];
    objects.extend(pod_reader_rbac(&name, &labels, &binding.namespace));
    objects.extend([
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
    ]);
    objects
}

/// Builds the proxy's ServiceAccount, Role, RoleBinding, Deployment and Service. The proxy
/// pods run `fngate proxy`, are placed anywhere (the binding's placement rules are for runtime
/// pods), and read the runtime pods through the kube API with their own service account.
fn proxy_objects(
    function_namespace: &str,
    binding: &KubeBinding,
    control_plane_url: &str,
) -> Vec<Value> {
    let name = proxy_name(binding);
    let labels = json!({
        "app.kubernetes.io/name": "fngate-proxy",
        "app.kubernetes.io/managed-by": "fngate",
        "app.kubernetes.io/instance": name,
    });
    let pod_spec = proxy_pod_spec(&name, function_namespace, binding, control_plane_url);

    let mut service_metadata =
        json!({"name": name, "namespace": SYSTEM_NAMESPACE, "labels": labels});
    if !binding.service_annotations.is_empty() {
        service_metadata["annotations"] = json!(binding.service_annotations);
    }

    let mut objects = vec![json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE, "labels": labels},
        "automountServiceAccountToken": true,
    })];
    objects.extend(pod_reader_rbac(&name, &labels, &binding.namespace));
    objects.extend([
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE, "labels": labels},
            "spec": {
                "replicas": binding.proxy_replicas,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": pod_spec},
            },
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": service_metadata,
            "spec": {
                "type": binding.service_type,
                "selector": labels,
                "ports": [{
                    "name": "http",
                    "port": binding.support_service_port,
                    "targetPort": "proxy",
                    "protocol": "TCP",
                }],
            },
        }),
    ]);
    objects
}

/// Builds the pod spec of the proxy Deployment, whose service account is `name`.
fn proxy_pod_spec(
    name: &str,
    function_namespace: &str,
    binding: &KubeBinding,
    control_plane_url: &str,
) -> Value {
    // The listeners bind the pod IP, as the agent's does: the Service and the kubelet's
    // probes reach that address, and on kubesim every pod shares the host's port space.
    let mut args = vec![
        "proxy".to_owned(),
        format!("--listen=$(POD_IP):{PROXY_PORT}"),
        format!("--admin-listen=$(POD_IP):{PROXY_ADMIN_PORT}"),
        format!("--namespace={function_namespace}"),
        format!("--kube-namespace={}", binding.namespace),
        format!("--control-plane={control_plane_url}"),
        // A rollout lets requests finish for as long as the longest function timeout.
        format!("--shutdown-grace-ms={}", crate::validate::TIMEOUT_MS_MAX),
    ];
    if let Some(kubeconfig) = &binding.agent_kubeconfig {
        args.push(format!("--kubeconfig={}", kubeconfig.display()));
    }

    let mut pod_spec = json!({
        "serviceAccountName": name,
        "automountServiceAccountToken": true,
        // The proxy exits as soon as its connections are drained; this only bounds the wait.
        "terminationGracePeriodSeconds": crate::validate::TIMEOUT_MS_MAX / 1000 + 10,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": PROXY_USER,
            "runAsGroup": PROXY_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [{
            "name": "proxy",
            "image": binding.agent_image,
            "args": args,
            "env": [
                // The replica name: the runtime pods this proxy starts carry it as a label.
                {"name": "FNGATE_REPLICA", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            ],
            "ports": [
                {"name": "proxy", "containerPort": PROXY_PORT, "protocol": "TCP"},
                {"name": "admin", "containerPort": PROXY_ADMIN_PORT, "protocol": "TCP"},
            ],
            // Ready once the proxy has its routing table and every pod watcher listed.
            "readinessProbe": {
                "httpGet": {"path": "/readyz", "port": PROXY_ADMIN_PORT},
                "periodSeconds": 2,
            },
            "livenessProbe": {
                "httpGet": {"path": "/healthz", "port": PROXY_ADMIN_PORT},
                "periodSeconds": 10,
            },
            // No memory limit: the proxy buffers request bodies, each up to the function's
            // max_body_bytes, so its peak depends on the functions and the load.
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "runAsNonRoot": true,
                "capabilities": {"drop": ["ALL"]},
            },
        }],
    });
    if let Some(kubeconfig) = &binding.agent_kubeconfig {
        let (mount, volume) = kubeconfig_volume(&kubeconfig.to_string_lossy());
        pod_spec["containers"][0]["volumeMounts"] = json!([mount]);
        pod_spec["volumes"] = json!([volume]);
    }
    pod_spec
}

/// Builds a Role in the runtime namespace that grants `get`, `list` and `watch` on pods and
/// nothing else, and the RoleBinding that grants it to the ServiceAccount `name` in
/// `fngate-system`.
fn pod_reader_rbac(name: &str, labels: &Value, runtime_namespace: &str) -> [Value; 2] {
    [
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": name, "namespace": runtime_namespace, "labels": labels},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": runtime_namespace, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": SYSTEM_NAMESPACE}],
        }),
    ]
}

/// Builds the read-only mount and hostPath volume of the kubeconfig at `path` on the node,
/// mounted at the same path so that `--kubeconfig` names it inside the container too.
fn kubeconfig_volume(path: &str) -> (Value, Value) {
    (
        json!({"name": "kubeconfig", "mountPath": path, "readOnly": true}),
        json!({"name": "kubeconfig", "hostPath": {"path": path, "type": "File"}}),
    )
}

/// Returns the API of one object, from its apiVersion and kind.
fn api_for(client: &kube::Client, object: &Value) -> Result<Api<DynamicObject>, String> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let plural = plural_of(kind).ok_or_else(|| format!("no API known for kind {kind}"))?;
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    Ok(match object["metadata"]["namespace"].as_str() {
        Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
        None => Api::all_with(client.clone(), &resource),
    })
}

/// Returns the resource name of a kind of system object, `None` for a kind fngate never applies.
fn plural_of(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Namespace" => "namespaces",
        "ServiceAccount" => "serviceaccounts",
        "Role" => "roles",
        "RoleBinding" => "rolebindings",
        "ConfigMap" => "configmaps",
        "DaemonSet" => "daemonsets",
        "Deployment" => "deployments",
        "Service" => "services",
        _ => return None,
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

/// Reads the binding's status: Normal once the agent DaemonSet has a ready pod and the proxy
/// Deployment is available. The agent is checked first, so while both wait, the reason names
/// the agent.
pub async fn status(client: &kube::Client, binding: &KubeBinding) -> BindingStatus {
    let agent = agent_status(client, binding).await;
    if agent.phase != Phase::Normal {
        return agent;
    }
    proxy_status(client, binding).await
}

/// Reads the agent's status from its DaemonSet and the DaemonSet's pods.
async fn agent_status(client: &kube::Client, binding: &KubeBinding) -> BindingStatus {
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
    let agent_waiting = match pod_problem(client, &name, "agent").await {
        Ok(waiting) => waiting,
        Err(failed) => return failed,
    };
    BindingStatus::initializing(format!(
        "waiting for a ready node agent ({} ready of {} scheduled{})",
        status.number_ready,
        status.desired_number_scheduled,
        agent_waiting.as_deref().unwrap_or_default().trim_end()
    ))
}

/// Reads the proxy's status from its Deployment's `Available` condition and the Deployment's
/// pods.
async fn proxy_status(client: &kube::Client, binding: &KubeBinding) -> BindingStatus {
    let name = proxy_name(binding);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let deployment = match deployments.get_opt(&name).await {
        Ok(Some(deployment)) => deployment,
        Ok(None) => {
            return BindingStatus::initializing(format!("Deployment {name} not created yet"))
        }
        Err(kube::Error::Api(status)) if status.code == 403 => {
            return BindingStatus::failed(format!(
                "forbidden by RBAC: cannot read Deployment {SYSTEM_NAMESPACE}/{name}: {}",
                status.message
            ))
        }
        Err(error) => {
            return BindingStatus::initializing(format!(
                "cannot read Deployment {SYSTEM_NAMESPACE}/{name}: {}",
                super::describe_error(&error)
            ))
        }
    };
    let desired = deployment.spec.and_then(|spec| spec.replicas).unwrap_or(1);
    let status = deployment.status.unwrap_or_default();
    let available = status
        .conditions
        .unwrap_or_default()
        .iter()
        .any(|condition| condition.type_ == "Available" && condition.status == "True");
    if available {
        return BindingStatus::normal();
    }
    let proxy_waiting = match pod_problem(client, &name, "proxy").await {
        Ok(waiting) => waiting,
        Err(failed) => return failed,
    };
    BindingStatus::initializing(format!(
        "waiting for Deployment {name} to become available ({} ready of {desired} desired{})",
        status.ready_replicas.unwrap_or(0),
        proxy_waiting.as_deref().unwrap_or_default().trim_end()
    ))
}

/// Looks through the pods labelled `app.kubernetes.io/instance=<instance>` in `fngate-system`
/// for why they are not ready. Returns the first container waiting reason, or the scheduler's
/// reason for a pod that is not scheduled, as `"; pod NAME: REASON MESSAGE"`. Returns a Failed
/// status for an image that cannot be pulled and for a list that RBAC denies. `component`
/// names the pods in messages ("agent", "proxy").
async fn pod_problem(
    client: &kube::Client,
    instance: &str,
    component: &str,
) -> Result<Option<String>, BindingStatus> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let selector = format!("app.kubernetes.io/instance={instance}");
    let list = match pods.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => list,
        Err(kube::Error::Api(status)) if status.code == 403 => {
            return Err(BindingStatus::failed(format!(
                "forbidden by RBAC: cannot list the {component} pods in {SYSTEM_NAMESPACE}: {}",
                status.message
            )))
        }
        Err(error) => {
            return Ok(Some(format!(
                "; cannot list the {component} pods: {}",
                super::describe_error(&error)
            )))
        }
    };
    let mut first_problem = None;
    for pod in list.items {
        let pod_name = pod.metadata.name.unwrap_or_default();
        let status = pod.status.unwrap_or_default();
        let waiting = status
            .container_statuses
            .unwrap_or_default()
            .into_iter()
            .find_map(|c| c.state?.waiting.filter(|w| w.reason.is_some()));
        if let Some(waiting) = waiting {
            let reason = waiting.reason.unwrap_or_default();
            let message = waiting.message.unwrap_or_default();
            if PULL_FAILURES.contains(&reason.as_str()) {
                return Err(BindingStatus::failed(format!(
                    "image not pullable: {reason} {message}"
                )));
            }
            first_problem.get_or_insert(format!("; pod {pod_name}: {reason} {message}"));
            continue;
        }
        let unscheduled = status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False");
        if let Some(condition) = unscheduled {
            first_problem.get_or_insert(format!(
                "; pod {pod_name}: {} {}",
                condition.reason.unwrap_or_default(),
                condition.message.unwrap_or_default()
            ));
        }
    }
    Ok(first_problem)
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

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://fngate.example:8082";

    fn binding(extra: &str) -> KubeBinding {
        toml::from_str(&format!(
            "namespace = \"runtime\"\nagent_image = \"registry.example/fngate:1\"\n\
             node_selector = {{ \"fngate.io/pool\" = \"functions\" }}\n{extra}"
        ))
        .unwrap()
    }

    /// Returns the object of `kind` named `name`, panicking with the kinds and names present.
    fn object(objects: &[Value], kind: &str, name: &str) -> Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .cloned()
            .unwrap_or_else(|| {
                let present: Vec<String> = objects.iter().map(describe).collect();
                panic!("no {kind} {name} among {present:?}")
            })
    }

    fn proxy(objects: &[Value], kind: &str) -> Value {
        object(objects, kind, "fngate-proxy-runtime")
    }

    #[test]
    fn proxy_names_follow_the_runtime_namespace() {
        let objects = system_objects("team", &binding(""), URL);
        for kind in [
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "Deployment",
            "Service",
        ] {
            let found = proxy(&objects, kind);
            let namespace = &found["metadata"]["namespace"];
            let expected = if kind.starts_with("Role") {
                "runtime"
            } else {
                SYSTEM_NAMESPACE
            };
            assert_eq!(namespace, expected, "{kind}");
            assert_eq!(
                found["metadata"]["labels"]["app.kubernetes.io/name"],
                "fngate-proxy"
            );
        }
    }

    #[test]
    fn every_object_kind_has_an_api() {
        let objects = system_objects("team", &binding(""), URL);
        for found in &objects {
            let kind = found["kind"].as_str().unwrap();
            assert!(plural_of(kind).is_some(), "{kind}");
        }
    }

    #[test]
    fn proxy_role_grants_only_pod_reads() {
        let objects = system_objects("team", &binding(""), URL);
        let role = proxy(&objects, "Role");
        assert_eq!(
            role["rules"],
            json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}])
        );
        let role_binding = proxy(&objects, "RoleBinding");
        assert_eq!(
            role_binding["roleRef"],
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "fngate-proxy-runtime"})
        );
        assert_eq!(
            role_binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "fngate-proxy-runtime", "namespace": SYSTEM_NAMESPACE}])
        );
        let account = proxy(&objects, "ServiceAccount");
        assert_eq!(account["automountServiceAccountToken"], true);
    }

    #[test]
    fn proxy_service_follows_the_binding() {
        let defaults = system_objects("team", &binding(""), URL);
        let service = proxy(&defaults, "Service");
        assert_eq!(service["spec"]["type"], "ClusterIP");
        assert_eq!(
            service["spec"]["ports"],
            json!([{"name": "http", "port": 8080, "targetPort": "proxy", "protocol": "TCP"}])
        );
        assert!(
            service["metadata"].get("annotations").is_none(),
            "{service}"
        );
        let deployment = proxy(&defaults, "Deployment");
        assert_eq!(
            service["spec"]["selector"],
            deployment["spec"]["template"]["metadata"]["labels"]
        );

        let annotation = "service.beta.kubernetes.io/aws-load-balancer-internal";
        let custom = binding(&format!(
            "support_service_port = 443\nservice_type = \"LoadBalancer\"\n\
             service_annotations = {{ \"{annotation}\" = \"true\" }}"
        ));
        let service = proxy(&system_objects("team", &custom, URL), "Service");
        assert_eq!(service["spec"]["type"], "LoadBalancer");
        assert_eq!(service["spec"]["ports"][0]["port"], 443);
        assert_eq!(service["spec"]["ports"][0]["targetPort"], "proxy");
        assert_eq!(
            service["metadata"]["annotations"],
            json!({ annotation: "true" })
        );
    }

    #[test]
    fn proxy_deployment_follows_the_binding() {
        let defaults = system_objects("team", &binding(""), URL);
        let deployment = proxy(&defaults, "Deployment");
        assert_eq!(deployment["spec"]["replicas"], 2);
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        assert_eq!(deployment["spec"]["selector"]["matchLabels"], *labels);
        assert_eq!(labels["app.kubernetes.io/instance"], "fngate-proxy-runtime");

        let five = system_objects("team", &binding("proxy_replicas = 5"), URL);
        assert_eq!(proxy(&five, "Deployment")["spec"]["replicas"], 5);

        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "fngate-proxy-runtime");
        assert_eq!(pod["automountServiceAccountToken"], true);
        // Longer than the proxy's shutdown grace, so a draining proxy is never killed early.
        assert_eq!(pod["terminationGracePeriodSeconds"], 910);
        // Placement rules are for runtime pods and the agent; the proxy runs anywhere.
        for field in ["nodeSelector", "tolerations", "affinity"] {
            assert!(pod.get(field).is_none(), "{field} in {pod}");
        }
        let container = &pod["containers"][0];
        assert_eq!(container["image"], "registry.example/fngate:1");
        assert_eq!(
            container["args"],
            json!([
                "proxy",
                "--listen=$(POD_IP):8080",
                "--admin-listen=$(POD_IP):9090",
                "--namespace=team",
                "--kube-namespace=runtime",
                format!("--control-plane={URL}"),
                "--shutdown-grace-ms=900000",
            ])
        );
        assert_eq!(
            container["env"][0],
            json!({"name": "FNGATE_REPLICA", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
        );
        assert_eq!(
            container["ports"],
            json!([
                {"name": "proxy", "containerPort": 8080, "protocol": "TCP"},
                {"name": "admin", "containerPort": 9090, "protocol": "TCP"},
            ])
        );
        assert_eq!(
            container["readinessProbe"]["httpGet"],
            json!({"path": "/readyz", "port": 9090})
        );
        assert_eq!(
            container["livenessProbe"]["httpGet"],
            json!({"path": "/healthz", "port": 9090})
        );
        assert!(pod.get("volumes").is_none(), "{pod}");
    }

    #[test]
    fn proxy_runs_unprivileged() {
        let objects = system_objects("team", &binding(""), URL);
        let pod = &proxy(&objects, "Deployment")["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["runAsUser"], 65532);
        assert_eq!(pod["securityContext"]["runAsGroup"], 65532);
        let container = &pod["containers"][0]["securityContext"];
        assert_eq!(container["runAsNonRoot"], true);
        assert_eq!(container["allowPrivilegeEscalation"], false);
        assert_eq!(container["readOnlyRootFilesystem"], true);
        assert_eq!(container["capabilities"], json!({"drop": ["ALL"]}));
    }

    #[test]
    fn node_kubeconfig_is_mounted_at_its_path() {
        let path = "/etc/fngate/kubeconfig";
        let objects = system_objects(
            "team",
            &binding(&format!("agent_kubeconfig = \"{path}\"")),
            URL,
        );
        let proxy_pod = proxy(&objects, "Deployment")["spec"]["template"]["spec"].clone();
        let agent_pod = object(&objects, "DaemonSet", "fngate-agent-runtime")["spec"]["template"]
            ["spec"]
            .clone();
        for (component, pod) in [("proxy", proxy_pod), ("agent", agent_pod)] {
            let container = &pod["containers"][0];
            let args = container["args"].as_array().unwrap();
            assert_eq!(
                args.last().unwrap(),
                &json!(format!("--kubeconfig={path}")),
                "{component}"
            );
            let mounts = container["volumeMounts"].as_array().unwrap();
            assert!(
                mounts
                    .contains(&json!({"name": "kubeconfig", "mountPath": path, "readOnly": true})),
                "{component}: {mounts:?}"
            );
            let volumes = pod["volumes"].as_array().unwrap();
            assert!(
                volumes.contains(
                    &json!({"name": "kubeconfig", "hostPath": {"path": path, "type": "File"}})
                ),
                "{component}: {volumes:?}"
            );
        }
    }
}
