//! Simplified workload controllers: deployments and daemonsets create, replace and delete
//! their pods and report status, and pods whose controller is gone are deleted.
//!
//! Deployments own their pods directly, without ReplicaSets, because kubesim does not serve
//! ReplicaSets.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::scheduler::placement_reason;
use crate::store::now_rfc3339;
use crate::store::{meta_str, DeleteOptions, Start, Store, Target};
use crate::{NodeConfig, Resource};

/// Label with the template hash that deployment pods carry, as the real controller sets it.
const DEPLOYMENT_HASH_LABEL: &str = "pod-template-hash";
/// Label with the template hash that daemonset pods carry.
const DAEMONSET_HASH_LABEL: &str = "controller-revision-hash";

/// Hashes a pod template into a short name-safe string, as the real controllers do with
/// their own hash function.
fn template_hash(template: &Value) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let text = serde_json::to_string(template).expect("JSON values serialize");
    // FNV-1a, 64 bit: stable across processes, unlike the standard library's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (0..10)
        .map(|_| {
            let c = ALPHABET[(hash % ALPHABET.len() as u64) as usize] as char;
            hash /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

fn is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|conditions| {
            conditions.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some("Ready")
                    && c.get("status").and_then(Value::as_str) == Some("True")
            })
        })
}

fn is_deleting(object: &Value) -> bool {
    object.pointer("/metadata/deletionTimestamp").is_some()
}

fn controller_uid(pod: &Value) -> Option<&str> {
    pod.pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))?
        .get("uid")?
        .as_str()
}

fn label<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object.pointer("/metadata/labels")?.get(key)?.as_str()
}

/// Builds a pod from an owner's template, labelled with the template hash.
fn pod_from_template(
    owner: &Value,
    resource: &Resource,
    hash_label: &str,
    hash: &str,
    generate_name: String,
) -> Value {
    let template = owner
        .pointer("/spec/template")
        .cloned()
        .unwrap_or(json!({}));
    let mut labels = template
        .pointer("/metadata/labels")
        .cloned()
        .unwrap_or(json!({}));
    labels[hash_label] = json!(hash);
    let mut metadata = json!({
        "generateName": generate_name,
        "labels": labels,
        "ownerReferences": [{
            "apiVersion": resource.api_version(),
            "kind": resource.kind,
            "name": meta_str(owner, "name").unwrap_or(""),
            "uid": meta_str(owner, "uid").unwrap_or(""),
            "controller": true,
            "blockOwnerDeletion": true,
        }],
    });
    if let Some(annotations) = template.pointer("/metadata/annotations") {
        metadata["annotations"] = annotations.clone();
    }
    json!({
        "metadata": metadata,
        "spec": template.get("spec").cloned().unwrap_or(json!({})),
    })
}

/// Sets `lastTransitionTime` and `lastUpdateTime` of workload conditions, keeping the previous
/// times of a condition whose status, reason and message did not change.
fn stamp_conditions(conditions: &mut [Value], previous: &[Value]) {
    let now = now_rfc3339();
    for condition in conditions {
        let before = previous
            .iter()
            .find(|p| p.get("type") == condition.get("type"));
        let same_status = before.is_some_and(|b| b.get("status") == condition.get("status"));
        let same_text = before.is_some_and(|b| {
            b.get("reason") == condition.get("reason")
                && b.get("message") == condition.get("message")
        });
        let transition = match before {
            Some(b) if same_status => b["lastTransitionTime"].clone(),
            _ => json!(now),
        };
        let update = match before {
            Some(b) if same_status && same_text => b["lastUpdateTime"].clone(),
            _ => json!(now),
        };
        condition["lastTransitionTime"] = transition;
        condition["lastUpdateTime"] = update;
    }
}

/// Sets a field of a status object, leaving it out when zero, as Go's `omitempty` does.
fn set_count(status: &mut Value, field: &str, count: usize) {
    if count > 0 {
        status[field] = json!(count);
    }
}

struct Controllers {
    store: Arc<Store>,
    nodes: Vec<NodeConfig>,
}

impl Controllers {
    fn create_pod(&self, namespace: &str, pod: Value, owner: &str) {
        if let Err(error) = self.store.create(&Resource::PODS, namespace, pod) {
            tracing::warn!(%error, %namespace, %owner, "kubesim controller: failed to create a pod");
        }
    }

    fn delete_pod(&self, pod: &Value) {
        let namespace = meta_str(pod, "namespace").unwrap_or("");
        let name = meta_str(pod, "name").unwrap_or("");
        let result = self
            .store
            .delete(&Resource::PODS, namespace, name, &DeleteOptions::default());
        if let Err(error) = result {
            if error.code != 404 {
                tracing::warn!(%error, %namespace, pod = %name, "kubesim controller: failed to delete a pod");
            }
        }
    }

    fn write_status(&self, resource: &Resource, owner: &Value, status: Value) {
        let namespace = meta_str(owner, "namespace").unwrap_or("");
        let name = meta_str(owner, "name").unwrap_or("");
        let uid = meta_str(owner, "uid").unwrap_or("");
        let result = self
            .store
            .update(resource, namespace, name, Target::Status, |current| {
                if meta_str(current, "uid") != Some(uid) {
                    return Err(crate::Status::not_found(resource, name));
                }
                let mut updated = current.clone();
                let mut status = status;
                let previous = current
                    .pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                if let Some(conditions) = status["conditions"].as_array_mut() {
                    stamp_conditions(conditions, &previous);
                }
                updated["status"] = status;
                Ok(updated)
            });
        if let Err(error) = result {
            tracing::debug!(%error, %namespace, %name, "kubesim controller: status not written");
        }
    }

    fn reconcile_deployment(&self, deployment: &Value, pods: &[Value]) {
        if is_deleting(deployment) {
            return;
        }
        let namespace = meta_str(deployment, "namespace").unwrap_or("").to_string();
        let name = meta_str(deployment, "name").unwrap_or("").to_string();
        let uid = meta_str(deployment, "uid").unwrap_or("");
        let desired = deployment
            .pointer("/spec/replicas")
            .and_then(Value::as_u64)
            .unwrap_or(1) as usize;
        let hash = template_hash(deployment.pointer("/spec/template").unwrap_or(&Value::Null));
        let owned: Vec<&Value> = pods
            .iter()
            .filter(|p| controller_uid(p) == Some(uid) && !is_deleting(p))
            .collect();
        let (current, old): (Vec<&Value>, Vec<&Value>) = owned
            .iter()
            .partition(|p| label(p, DEPLOYMENT_HASH_LABEL) == Some(hash.as_str()));

        for _ in current.len()..desired {
            let pod = pod_from_template(
                deployment,
                &Resource::DEPLOYMENTS,
                DEPLOYMENT_HASH_LABEL,
                &hash,
                format!("{name}-{hash}-"),
            );
            self.create_pod(&namespace, pod, &name);
        }
        for extra in current.iter().skip(desired) {
            self.delete_pod(extra);
        }
        let current_ready = current.iter().take(desired).filter(|p| is_ready(p)).count();
        if current_ready >= desired {
            for pod in &old {
                self.delete_pod(pod);
            }
        }

        let ready = owned.iter().filter(|p| is_ready(p)).count();
        let updated = current.len().min(desired);
        let mut status = json!({
            "observedGeneration": deployment.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        });
        set_count(&mut status, "replicas", owned.len());
        set_count(&mut status, "updatedReplicas", updated);
        set_count(&mut status, "readyReplicas", ready);
        set_count(&mut status, "availableReplicas", ready);
        set_count(
            &mut status,
            "unavailableReplicas",
            desired.saturating_sub(ready),
        );
        let available = ready >= desired;
        let complete = available && updated == desired && old.is_empty();
        status["conditions"] = json!([
            {
                "type": "Available",
                "status": if available { "True" } else { "False" },
                "reason": if available { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
                "message": if available { "Deployment has minimum availability." } else { "Deployment does not have minimum availability." },
            },
            {
                "type": "Progressing",
                "status": "True",
                "reason": if complete { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" },
                "message": if complete {
                    format!("Deployment \"{name}\" has successfully progressed.")
                } else {
                    format!("Deployment \"{name}\" is progressing.")
                },
            },
        ]);
        self.write_status(&Resource::DEPLOYMENTS, deployment, status);
    }

    fn reconcile_daemonset(&self, daemonset: &Value, pods: &[Value]) {
        if is_deleting(daemonset) {
            return;
        }
        let namespace = meta_str(daemonset, "namespace").unwrap_or("").to_string();
        let name = meta_str(daemonset, "name").unwrap_or("").to_string();
        let uid = meta_str(daemonset, "uid").unwrap_or("");
        let template = daemonset
            .pointer("/spec/template")
            .cloned()
            .unwrap_or(Value::Null);
        let hash = template_hash(&template);
        let template_pod = json!({"spec": template.get("spec").cloned().unwrap_or(json!({}))});
        let owned: Vec<&Value> = pods
            .iter()
            .filter(|p| controller_uid(p) == Some(uid))
            .collect();
        let node_of = |pod: &Value| {
            pod.pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms/0/matchFields/0/values/0")
                .and_then(Value::as_str)
                .map(str::to_string)
        };

        let mut desired_nodes = HashSet::new();
        let mut scheduled = 0;
        let mut ready = 0;
        let mut updated = 0;
        for node in &self.nodes {
            if placement_reason(&template_pod, node).is_some() {
                continue;
            }
            desired_nodes.insert(node.name.clone());
            let on_node: Vec<&&Value> = owned
                .iter()
                .filter(|p| node_of(p).as_deref() == Some(node.name.as_str()))
                .collect();
            if !on_node.is_empty() {
                scheduled += 1;
            }
            let live: Vec<&&Value> = on_node
                .iter()
                .copied()
                .filter(|p| !is_deleting(p))
                .collect();
            let current = live
                .iter()
                .any(|p| label(p, DAEMONSET_HASH_LABEL) == Some(hash.as_str()));
            ready += live.iter().filter(|p| is_ready(p)).count().min(1);
            if current {
                updated += 1;
            }
            for stale in live
                .iter()
                .filter(|p| label(p, DAEMONSET_HASH_LABEL) != Some(hash.as_str()))
            {
                self.delete_pod(stale);
            }
            if on_node.is_empty() {
                let mut pod = pod_from_template(
                    daemonset,
                    &Resource::DAEMONSETS,
                    DAEMONSET_HASH_LABEL,
                    &hash,
                    format!("{name}-"),
                );
                // The real controller pins each pod to its node through node affinity.
                pod["spec"]["affinity"]["nodeAffinity"]
                    ["requiredDuringSchedulingIgnoredDuringExecution"] = json!({
                    "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node.name]}]}],
                });
                self.create_pod(&namespace, pod, &name);
            }
        }
        let mut misscheduled = 0;
        for pod in owned.iter().filter(|p| !is_deleting(p)) {
            let placed = node_of(pod).is_some_and(|n| desired_nodes.contains(&n));
            if !placed {
                misscheduled += 1;
                self.delete_pod(pod);
            }
        }

        let mut status = json!({
            "observedGeneration": daemonset.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
            "desiredNumberScheduled": desired_nodes.len(),
            "currentNumberScheduled": scheduled,
            "numberMisscheduled": misscheduled,
            "numberReady": ready,
        });
        set_count(&mut status, "numberAvailable", ready);
        set_count(
            &mut status,
            "numberUnavailable",
            desired_nodes.len().saturating_sub(ready),
        );
        set_count(&mut status, "updatedNumberScheduled", updated);
        self.write_status(&Resource::DAEMONSETS, daemonset, status);
    }

    /// Deletes pods whose controlling deployment or daemonset no longer exists, as the
    /// garbage collector does with background propagation.
    fn collect_orphans(&self, pods: &[Value], owners: &HashSet<String>) {
        for pod in pods {
            let Some(references) = pod
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
            else {
                continue;
            };
            let orphaned = references.iter().any(|r| {
                let kind = r.get("kind").and_then(Value::as_str).unwrap_or("");
                let uid = r.get("uid").and_then(Value::as_str).unwrap_or("");
                matches!(kind, "Deployment" | "DaemonSet") && !owners.contains(uid)
            });
            if orphaned && !is_deleting(pod) {
                self.delete_pod(pod);
            }
        }
    }

    fn reconcile(&self) {
        let (pods, _) = self.store.list(&Resource::PODS, None);
        let (deployments, _) = self.store.list(&Resource::DEPLOYMENTS, None);
        let (daemonsets, _) = self.store.list(&Resource::DAEMONSETS, None);
        let owners: HashSet<String> = deployments
            .iter()
            .chain(&daemonsets)
            .filter_map(|owner| meta_str(owner, "uid").map(str::to_string))
            .collect();
        self.collect_orphans(&pods, &owners);
        for deployment in &deployments {
            self.reconcile_deployment(deployment, &pods);
        }
        for daemonset in &daemonsets {
            self.reconcile_daemonset(daemonset, &pods);
        }
    }
}

/// Runs the controllers whenever a pod, deployment or daemonset changes, until `shutdown`
/// turns true.
pub async fn run(store: Arc<Store>, nodes: Vec<NodeConfig>, mut shutdown: watch::Receiver<bool>) {
    let subscribe = |resource: &Resource| store.subscribe(resource, None, Start::Now, false);
    let (Ok(mut pods), Ok(mut deployments), Ok(mut daemonsets)) = (
        subscribe(&Resource::PODS),
        subscribe(&Resource::DEPLOYMENTS),
        subscribe(&Resource::DAEMONSETS),
    ) else {
        return;
    };
    let controllers = Controllers {
        store: store.clone(),
        nodes,
    };
    controllers.reconcile();
    loop {
        tokio::select! {
            event = pods.events.recv() => if event.is_none() { return },
            event = deployments.events.recv() => if event.is_none() { return },
            event = daemonsets.events.recv() => if event.is_none() { return },
            _ = shutdown.changed() => return,
        }
        while pods.events.try_recv().is_ok()
            || deployments.events.try_recv().is_ok()
            || daemonsets.events.try_recv().is_ok()
        {}
        controllers.reconcile();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_hash_is_stable_and_sensitive() {
        let a = json!({"spec": {"containers": [{"name": "c", "image": "one"}]}});
        let b = json!({"spec": {"containers": [{"name": "c", "image": "two"}]}});
        assert_eq!(template_hash(&a), template_hash(&a.clone()));
        assert_ne!(template_hash(&a), template_hash(&b));
        assert_eq!(template_hash(&a).len(), 10);
    }
}
