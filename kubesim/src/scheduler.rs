//! The scheduler: binds pending pods to a simulated node that fits them, or records why none
//! does in the `PodScheduled` condition, with the real scheduler's reason and message.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::pod_status::set_condition;
use crate::store::{meta_str, Start, Store, Target};
use crate::{NodeConfig, Resource, Status};

/// Parses a Kubernetes quantity such as `128Mi`, `1G` or `1e9` into bytes (or units).
pub fn parse_quantity(text: &str) -> Option<f64> {
    let text = text.trim();
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    for (suffix, factor) in suffixes {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    text.parse::<f64>().ok()
}

/// Sums the memory requests of a pod's containers, in bytes.
pub fn memory_request(pod: &Value) -> f64 {
    pod.pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(|containers| {
            containers
                .iter()
                .filter_map(|c| c.pointer("/resources/requests/memory"))
                .filter_map(|q| match q {
                    Value::String(s) => parse_quantity(s),
                    other => other.as_f64(),
                })
                .sum()
        })
        .unwrap_or(0.0)
}

/// Returns a node's labels plus the well-known ones a kubelet sets.
pub fn node_labels(node: &NodeConfig) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), node.name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        (
            "kubernetes.io/arch".to_string(),
            std::env::consts::ARCH
                .replace("x86_64", "amd64")
                .replace("aarch64", "arm64"),
        ),
    ]);
    labels.extend(node.labels.clone());
    labels
}

fn tolerates(tolerations: &[Value], key: &str, value: &str, effect: &str) -> bool {
    tolerations.iter().any(|t| {
        let field = |name: &str| t.get(name).and_then(Value::as_str).unwrap_or("");
        let effect_matches = field("effect").is_empty() || field("effect") == effect;
        let key_matches = match field("operator") {
            "Exists" => field("key").is_empty() || field("key") == key,
            _ => field("key") == key && field("value") == value,
        };
        effect_matches && key_matches
    })
}

fn expression_matches(expression: &Value, labels: &BTreeMap<String, String>) -> bool {
    let key = expression.get("key").and_then(Value::as_str).unwrap_or("");
    let values: Vec<&str> = expression
        .get("values")
        .and_then(Value::as_array)
        .map(|v| v.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let label = labels.get(key).map(String::as_str);
    let number = |text: &str| text.parse::<i64>().ok();
    match expression
        .get("operator")
        .and_then(Value::as_str)
        .unwrap_or("")
    {
        "In" => label.is_some_and(|l| values.contains(&l)),
        "NotIn" => !label.is_some_and(|l| values.contains(&l)),
        "Exists" => label.is_some(),
        "DoesNotExist" => label.is_none(),
        "Gt" => {
            matches!((label.and_then(number), values.first().and_then(|v| number(v))), (Some(l), Some(v)) if l > v)
        }
        "Lt" => {
            matches!((label.and_then(number), values.first().and_then(|v| number(v))), (Some(l), Some(v)) if l < v)
        }
        _ => false,
    }
}

fn field_expression_matches(expression: &Value, node_name: &str) -> bool {
    let mut labels = BTreeMap::new();
    if expression.get("key").and_then(Value::as_str) == Some("metadata.name") {
        labels.insert("metadata.name".to_string(), node_name.to_string());
    }
    expression_matches(expression, &labels)
}

fn selector_and_affinity_match(
    pod: &Value,
    node: &NodeConfig,
    labels: &BTreeMap<String, String>,
) -> bool {
    if let Some(selector) = pod.pointer("/spec/nodeSelector").and_then(Value::as_object) {
        let all = selector.iter().all(|(k, v)| {
            v.as_str()
                .is_some_and(|v| labels.get(k).map(String::as_str) == Some(v))
        });
        if !all {
            return false;
        }
    }
    let terms = pod
        .pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")
        .and_then(Value::as_array);
    let Some(terms) = terms else {
        return true;
    };
    terms.iter().any(|term| {
        let expressions = term.get("matchExpressions").and_then(Value::as_array);
        let fields = term.get("matchFields").and_then(Value::as_array);
        if expressions.is_none_or(Vec::is_empty) && fields.is_none_or(Vec::is_empty) {
            // An empty term matches no node, as in the real scheduler.
            return false;
        }
        expressions.is_none_or(|e| e.iter().all(|e| expression_matches(e, labels)))
            && fields.is_none_or(|f| f.iter().all(|f| field_expression_matches(f, &node.name)))
    })
}

/// Returns why `pod` cannot run on `node`, or `None` when it fits. `used` is the memory the
/// node's pods already request, in bytes.
pub fn unfit_reason(pod: &Value, node: &NodeConfig, used: f64) -> Option<String> {
    if let Some(reason) = placement_reason(pod, node) {
        return Some(reason);
    }
    let allocatable = node.memory_mb as f64 * 1024.0 * 1024.0;
    if used + memory_request(pod) > allocatable {
        return Some("Insufficient memory".to_string());
    }
    None
}

/// Returns why `pod` may not be placed on `node` by its taints, node selector or required node
/// affinity, regardless of free memory, or `None` when it may.
pub fn placement_reason(pod: &Value, node: &NodeConfig) -> Option<String> {
    let tolerations = pod
        .pointer("/spec/tolerations")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for taint in &node.taints {
        let blocking = matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute");
        if blocking && !tolerates(&tolerations, &taint.key, &taint.value, &taint.effect) {
            return Some(format!(
                "node(s) had untolerated taint {{{}: {}}}",
                taint.key, taint.value
            ));
        }
    }
    if !selector_and_affinity_match(pod, node, &node_labels(node)) {
        return Some("node(s) didn't match Pod's node affinity/selector".to_string());
    }
    None
}

/// Builds the real scheduler's message: `0/N nodes are available: ` and the reasons with
/// their node counts, sorted.
pub fn unschedulable_message(total_nodes: usize, reasons: &[String]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for reason in reasons {
        *counts.entry(reason.as_str()).or_default() += 1;
    }
    let parts: Vec<String> = counts
        .iter()
        .map(|(reason, count)| format!("{count} {reason}"))
        .collect();
    format!("0/{total_nodes} nodes are available: {}.", parts.join(", "))
}

fn is_terminal(pod: &Value) -> bool {
    matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    )
}

/// Runs one scheduling pass over every pending pod.
pub fn schedule_pass(store: &Store, nodes: &[NodeConfig]) {
    let (pods, _) = store.list(&Resource::PODS, None);
    let mut used: HashMap<String, f64> = HashMap::new();
    for pod in &pods {
        if let Some(node) = pod.pointer("/spec/nodeName").and_then(Value::as_str) {
            if !node.is_empty() && !is_terminal(pod) {
                *used.entry(node.to_string()).or_default() += memory_request(pod);
            }
        }
    }
    for pod in &pods {
        let bound = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        let deleting = pod.pointer("/metadata/deletionTimestamp").is_some();
        let scheduler = pod
            .pointer("/spec/schedulerName")
            .and_then(Value::as_str)
            .unwrap_or("default-scheduler");
        if bound || deleting || scheduler != "default-scheduler" {
            continue;
        }
        let namespace = meta_str(pod, "namespace").unwrap_or("").to_string();
        let name = meta_str(pod, "name").unwrap_or("").to_string();
        let uid = meta_str(pod, "uid").unwrap_or("").to_string();
        let mut reasons = Vec::new();
        let mut chosen = None;
        for node in nodes {
            match unfit_reason(pod, node, used.get(&node.name).copied().unwrap_or(0.0)) {
                Some(reason) => reasons.push(reason),
                None => {
                    chosen = Some(node.name.clone());
                    break;
                }
            }
        }
        let same_pod = |current: &Value| -> Result<Value, Status> {
            if meta_str(current, "uid") != Some(uid.as_str()) {
                return Err(Status::not_found(&Resource::PODS, &name));
            }
            Ok(current.clone())
        };
        let result = match &chosen {
            Some(node) => {
                *used.entry(node.clone()).or_default() += memory_request(pod);
                store.update(
                    &Resource::PODS,
                    &namespace,
                    &name,
                    Target::System,
                    |current| {
                        let mut pod = same_pod(current)?;
                        pod["spec"]["nodeName"] = json!(node);
                        set_condition(&mut pod, "PodScheduled", true, None, None);
                        Ok(pod)
                    },
                )
            }
            None => {
                let message = if nodes.is_empty() {
                    "no nodes available to schedule pods".to_string()
                } else {
                    unschedulable_message(nodes.len(), &reasons)
                };
                store.update(
                    &Resource::PODS,
                    &namespace,
                    &name,
                    Target::Status,
                    |current| {
                        let mut pod = same_pod(current)?;
                        set_condition(
                            &mut pod,
                            "PodScheduled",
                            false,
                            Some("Unschedulable"),
                            Some(&message),
                        );
                        Ok(pod)
                    },
                )
            }
        };
        if let Err(error) = result {
            tracing::debug!(%error, pod = %name, namespace = %namespace, "kubesim scheduler: pod changed while scheduling");
        }
    }
}

/// Runs scheduling passes whenever a pod changes, until `shutdown` turns true.
pub async fn run(store: Arc<Store>, nodes: Vec<NodeConfig>, mut shutdown: watch::Receiver<bool>) {
    let Ok(mut subscription) = store.subscribe(&Resource::PODS, None, Start::Now, false) else {
        return;
    };
    schedule_pass(&store, &nodes);
    loop {
        tokio::select! {
            event = subscription.events.recv() => {
                if event.is_none() {
                    return;
                }
                while subscription.events.try_recv().is_ok() {}
                schedule_pass(&store, &nodes);
            }
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Taint;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("128Mi"), Some(128.0 * 1024.0 * 1024.0));
        assert_eq!(parse_quantity("1G"), Some(1e9));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("x"), None);
    }

    #[test]
    fn affinity_operators() {
        let node = NodeConfig::new("n1").label("zone", "a").label("size", "5");
        let pod = |expressions: Value| {
            json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": expressions}]}}}}})
        };
        let cases = [
            (
                json!([{"key": "zone", "operator": "In", "values": ["a", "b"]}]),
                true,
            ),
            (
                json!([{"key": "zone", "operator": "NotIn", "values": ["a"]}]),
                false,
            ),
            (json!([{"key": "zone", "operator": "Exists"}]), true),
            (json!([{"key": "zone", "operator": "DoesNotExist"}]), false),
            (
                json!([{"key": "size", "operator": "Gt", "values": ["4"]}]),
                true,
            ),
            (
                json!([{"key": "size", "operator": "Lt", "values": ["4"]}]),
                false,
            ),
        ];
        for (expressions, fits) in cases {
            let reason = unfit_reason(&pod(expressions.clone()), &node, 0.0);
            assert_eq!(reason.is_none(), fits, "expressions {expressions}");
        }
    }

    #[test]
    fn taints_and_tolerations() {
        let node = NodeConfig::new("n1").taint(Taint::new("dedicated", "fn", "NoSchedule"));
        let plain = json!({"spec": {}});
        assert_eq!(
            unfit_reason(&plain, &node, 0.0).as_deref(),
            Some("node(s) had untolerated taint {dedicated: fn}")
        );
        let equal = json!({"spec": {"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "fn", "effect": "NoSchedule"}]}});
        assert_eq!(unfit_reason(&equal, &node, 0.0), None);
        let exists = json!({"spec": {"tolerations": [{"operator": "Exists"}]}});
        assert_eq!(unfit_reason(&exists, &node, 0.0), None);
        let wrong_effect = json!({"spec": {"tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}]}});
        assert!(unfit_reason(&wrong_effect, &node, 0.0).is_some());
    }

    #[test]
    fn message_counts_reasons() {
        let reasons = vec![
            "Insufficient memory".to_string(),
            "Insufficient memory".to_string(),
            "x".to_string(),
        ];
        assert_eq!(
            unschedulable_message(3, &reasons),
            "0/3 nodes are available: 2 Insufficient memory, 1 x."
        );
    }
}
