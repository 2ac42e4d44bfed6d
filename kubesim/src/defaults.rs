//! Field defaults and update checks that the real API server applies to built-in types.
//!
//! Defaults matter beyond realism: a server-side apply of the same configuration must find
//! the stored object unchanged, and that holds only when defaulted fields are already there.

use serde_json::{json, Value};

use crate::{Resource, Status};

/// Sets `object[key]` to `value` unless it is present.
fn default_field(object: &mut Value, key: &str, value: Value) {
    if let Some(map) = object.as_object_mut() {
        map.entry(key.to_string()).or_insert(value);
    }
}

fn default_probe(probe: &mut Value) {
    default_field(probe, "timeoutSeconds", json!(1));
    default_field(probe, "periodSeconds", json!(10));
    default_field(probe, "successThreshold", json!(1));
    default_field(probe, "failureThreshold", json!(3));
    if let Some(get) = probe.get_mut("httpGet") {
        default_field(get, "scheme", json!("HTTP"));
        default_field(get, "path", json!("/"));
    }
}

fn default_container(container: &mut Value) {
    default_field(
        container,
        "terminationMessagePath",
        json!("/dev/termination-log"),
    );
    default_field(container, "terminationMessagePolicy", json!("File"));
    default_field(container, "resources", json!({}));
    let image = container.get("image").and_then(Value::as_str).unwrap_or("");
    let tag = image.rsplit('/').next().unwrap_or("");
    let pull_policy = if !tag.contains(':') || tag.ends_with(":latest") {
        "Always"
    } else {
        "IfNotPresent"
    };
    default_field(container, "imagePullPolicy", json!(pull_policy));
    if let Some(ports) = container.get_mut("ports").and_then(Value::as_array_mut) {
        for port in ports {
            default_field(port, "protocol", json!("TCP"));
        }
    }
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        if let Some(probe) = container.get_mut(probe) {
            default_probe(probe);
        }
    }
    if let Some(env) = container.get_mut("env").and_then(Value::as_array_mut) {
        for var in env {
            if let Some(field_ref) = var.pointer_mut("/valueFrom/fieldRef") {
                default_field(field_ref, "apiVersion", json!("v1"));
            }
        }
    }
}

/// Applies the defaults of a pod spec, for pods and pod templates.
fn default_pod_spec(spec: &mut Value) {
    if !spec.is_object() {
        return;
    }
    default_field(spec, "restartPolicy", json!("Always"));
    default_field(spec, "terminationGracePeriodSeconds", json!(30));
    default_field(spec, "dnsPolicy", json!("ClusterFirst"));
    default_field(spec, "schedulerName", json!("default-scheduler"));
    default_field(spec, "securityContext", json!({}));
    default_field(spec, "enableServiceLinks", json!(true));
    for list in ["containers", "initContainers"] {
        if let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) {
            containers.iter_mut().for_each(default_container);
        }
    }
}

fn quantity_set(container: &Value, section: &str, resource: &str) -> Option<String> {
    container
        .pointer(&format!("/resources/{section}/{resource}"))
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        })
}

/// Computes the QoS class the API server records in `status.qosClass`.
fn qos_class(spec: &Value) -> &'static str {
    let containers = spec
        .get("containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut any_set = false;
    let mut guaranteed = true;
    for container in &containers {
        for resource in ["cpu", "memory"] {
            let request = quantity_set(container, "requests", resource);
            let limit = quantity_set(container, "limits", resource);
            any_set |= request.is_some() || limit.is_some();
            if limit.is_none() || (request.is_some() && request != limit) {
                guaranteed = false;
            }
        }
    }
    if !any_set {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

fn default_service(object: &mut Value, next_ip: &mut u32) {
    let Some(spec) = object.get_mut("spec") else {
        object["spec"] = json!({});
        return default_service(object, next_ip);
    };
    default_field(spec, "type", json!("ClusterIP"));
    default_field(spec, "sessionAffinity", json!("None"));
    default_field(spec, "internalTrafficPolicy", json!("Cluster"));
    default_field(spec, "ipFamilies", json!(["IPv4"]));
    default_field(spec, "ipFamilyPolicy", json!("SingleStack"));
    if spec
        .get("clusterIP")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        let ip = format!("10.96.{}.{}", (*next_ip >> 8) & 0xff, *next_ip & 0xff);
        *next_ip += 1;
        spec["clusterIP"] = json!(ip);
    }

    let cluster_ip = spec["clusterIP"].clone();
    default_field(spec, "clusterIPs", json!([cluster_ip]));
    let node_ports = matches!(
        spec.get("type").and_then(Value::as_str),
        Some("NodePort" | "LoadBalancer")
    );
    if node_ports {
        default_field(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if spec.get("type").and_then(Value::as_str) == Some("LoadBalancer") {
        default_field(spec, "allocateLoadBalancerNodePorts", json!(true));
    }

    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for port in ports {
            default_field(port, "protocol", json!("TCP"));
            let number = port.get("port").cloned().unwrap_or(Value::Null);
            default_field(port, "targetPort", number);
            if node_ports && port.get("nodePort").is_none() {
                port["nodePort"] = json!(30000 + (*next_ip % 2768));
                *next_ip += 1;
            }
        }
    }
}

fn default_workload(resource: &Resource, object: &mut Value) {
    let Some(spec) = object.get_mut("spec") else {
        return;
    };
    default_field(spec, "revisionHistoryLimit", json!(10));
    if *resource == Resource::DEPLOYMENTS {
        default_field(spec, "replicas", json!(1));
        default_field(spec, "progressDeadlineSeconds", json!(600));
        default_field(
            spec,
            "strategy",
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}),
        );
    } else {
        default_field(
            spec,
            "updateStrategy",
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}),
        );
    }
    if let Some(template_spec) = spec.pointer_mut("/template/spec") {
        default_pod_spec(template_spec);
    }
}

/// Applies create-time defaults. `next_ip` numbers allocated service cluster IPs and node ports.
pub fn apply_on_create(resource: &Resource, object: &mut Value, next_ip: &mut u32) {
    match *resource {
        Resource::PODS => {
            if let Some(spec) = object.get_mut("spec") {
                default_pod_spec(spec);
                // The ServiceAccount admission plugin sets this on pods, not on templates.
                default_field(spec, "serviceAccountName", json!("default"));
            }
            let qos = qos_class(object.get("spec").unwrap_or(&Value::Null));
            object["status"] = json!({"phase": "Pending", "qosClass": qos});
        }
        Resource::SERVICES => {
            default_service(object, next_ip);
            object["status"] = json!({"loadBalancer": {}});
        }
        Resource::NAMESPACES => {
            let name = object["metadata"]["name"].clone();
            if !object["metadata"]
                .get("labels")
                .is_some_and(Value::is_object)
            {
                object["metadata"]["labels"] = json!({});
            }
            object["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
            object["spec"] = json!({"finalizers": ["kubernetes"]});
            object["status"] = json!({"phase": "Active"});
        }
        Resource::DEPLOYMENTS | Resource::DAEMONSETS => default_workload(resource, object),
        _ => {}
    }
}

/// Applies defaults again after an update, and keeps fields the server owns.
pub fn apply_on_update(resource: &Resource, current: &Value, object: &mut Value) {
    match *resource {
        Resource::PODS => {
            if let Some(spec) = object.get_mut("spec") {
                default_pod_spec(spec);
            }
        }
        Resource::SERVICES => {
            for field in ["clusterIP", "clusterIPs"] {
                let missing = object.pointer(&format!("/spec/{field}")).is_none();
                if let (true, Some(value), Some(spec)) = (
                    missing,
                    current.pointer(&format!("/spec/{field}")),
                    object.get_mut("spec"),
                ) {
                    spec[field] = value.clone();
                }
            }
            let mut unused = 0;
            default_service(object, &mut unused);
        }
        Resource::NAMESPACES if object.get("spec").is_none() => {
            object["spec"] = current["spec"].clone();
        }
        Resource::DEPLOYMENTS | Resource::DAEMONSETS => default_workload(resource, object),
        _ => {}
    }
}

fn mutable_pod_fields_cleared(spec: &Value) -> Value {
    let mut spec = spec.clone();
    if let Some(map) = spec.as_object_mut() {
        for field in [
            "activeDeadlineSeconds",
            "tolerations",
            "terminationGracePeriodSeconds",
        ] {
            map.remove(field);
        }
        for list in ["containers", "initContainers"] {
            if let Some(containers) = map.get_mut(list).and_then(Value::as_array_mut) {
                for container in containers {
                    if let Some(c) = container.as_object_mut() {
                        c.remove("image");
                    }
                }
            }
        }
    }
    spec
}

/// Rejects pod updates that change spec fields the real server keeps immutable.
pub fn check_pod_update(current: &Value, updated: &Value) -> Result<(), Status> {
    let before = mutable_pod_fields_cleared(current.get("spec").unwrap_or(&Value::Null));
    let after = mutable_pod_fields_cleared(updated.get("spec").unwrap_or(&Value::Null));
    if before == after {
        return Ok(());
    }
    let name = current["metadata"]["name"].as_str().unwrap_or("");
    Err(Status::invalid(
        &Resource::PODS,
        name,
        "spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
    ))
}
