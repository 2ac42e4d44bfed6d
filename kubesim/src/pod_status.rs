//! Pod status as the kubelet derives it: conditions and phase from the container statuses.

use serde_json::{json, Value};

use crate::store::now_rfc3339;

/// The order in which the kubelet lists pod conditions.
const CONDITION_ORDER: [&str; 5] = [
    "PodReadyToStartContainers",
    "Initialized",
    "Ready",
    "ContainersReady",
    "PodScheduled",
];

/// Sets one pod condition. `lastTransitionTime` changes only when the status flips.
pub fn set_condition(
    pod: &mut Value,
    kind: &str,
    status: bool,
    reason: Option<&str>,
    message: Option<&str>,
) {
    if !pod.get("status").is_some_and(Value::is_object) {
        pod["status"] = json!({});
    }
    if !pod["status"].get("conditions").is_some_and(Value::is_array) {
        pod["status"]["conditions"] = json!([]);
    }
    let status_text = if status { "True" } else { "False" };
    let conditions = pod["status"]["conditions"]
        .as_array_mut()
        .expect("conditions was just made an array");
    let existing = conditions
        .iter()
        .position(|c| c.get("type").and_then(Value::as_str) == Some(kind));
    let transition = match existing {
        Some(index)
            if conditions[index].get("status").and_then(Value::as_str) == Some(status_text) =>
        {
            conditions[index]
                .get("lastTransitionTime")
                .cloned()
                .unwrap_or(Value::Null)
        }
        _ => json!(now_rfc3339()),
    };
    let mut condition = json!({
        "type": kind,
        "status": status_text,
        "lastProbeTime": null,
        "lastTransitionTime": transition,
    });
    if let Some(reason) = reason {
        condition["reason"] = json!(reason);
    }
    if let Some(message) = message {
        condition["message"] = json!(message);
    }
    match existing {
        Some(index) => conditions[index] = condition,
        None => {
            conditions.push(condition);
            let rank = |c: &Value| {
                let kind = c.get("type").and_then(Value::as_str).unwrap_or("");
                CONDITION_ORDER
                    .iter()
                    .position(|k| *k == kind)
                    .unwrap_or(CONDITION_ORDER.len())
            };
            conditions.sort_by_key(rank);
        }
    }
}

/// Recomputes `phase` and the `Ready` and `ContainersReady` conditions from
/// `status.containerStatuses`, as the kubelet does after every container change.
pub fn refresh(pod: &mut Value) {
    let restart_policy = pod
        .pointer("/spec/restartPolicy")
        .and_then(Value::as_str)
        .unwrap_or("Always")
        .to_string();
    let statuses = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if statuses.is_empty() {
        return;
    }
    let terminated_code = |s: &Value| {
        s.pointer("/state/terminated/exitCode")
            .and_then(Value::as_i64)
    };
    let all_terminated = statuses.iter().all(|s| terminated_code(s).is_some());
    let ever_started = statuses.iter().any(|s| {
        s.pointer("/state/running").is_some()
            || s.pointer("/lastState/terminated").is_some()
            || terminated_code(s).is_some()
    });
    let phase = if all_terminated && restart_policy != "Always" {
        if statuses.iter().all(|s| terminated_code(s) == Some(0)) {
            "Succeeded"
        } else {
            "Failed"
        }
    } else if ever_started {
        "Running"
    } else {
        "Pending"
    };
    pod["status"]["phase"] = json!(phase);

    let unready: Vec<&str> = statuses
        .iter()
        .filter(|s| s.get("ready").and_then(Value::as_bool) != Some(true))
        .filter_map(|s| s.get("name").and_then(Value::as_str))
        .collect();
    if unready.is_empty() {
        set_condition(pod, "ContainersReady", true, None, None);
        set_condition(pod, "Ready", true, None, None);
    } else if phase == "Succeeded" || phase == "Failed" {
        set_condition(pod, "ContainersReady", false, Some("PodCompleted"), None);
        set_condition(pod, "Ready", false, Some("PodCompleted"), None);
    } else {
        let message = format!("containers with unready status: [{}]", unready.join(" "));
        set_condition(
            pod,
            "ContainersReady",
            false,
            Some("ContainersNotReady"),
            Some(&message),
        );
        set_condition(
            pod,
            "Ready",
            false,
            Some("ContainersNotReady"),
            Some(&message),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_follows_restart_policy() {
        let mut pod = json!({
            "spec": {"restartPolicy": "Never"},
            "status": {"containerStatuses": [{"name": "a", "ready": false, "state": {"terminated": {"exitCode": 3}}}]},
        });
        refresh(&mut pod);
        assert_eq!(pod["status"]["phase"], "Failed");
        pod["spec"]["restartPolicy"] = json!("Always");
        refresh(&mut pod);
        assert_eq!(pod["status"]["phase"], "Running");
    }

    #[test]
    fn condition_keeps_transition_time() {
        let mut pod = json!({});
        set_condition(&mut pod, "Ready", false, None, None);
        pod["status"]["conditions"][0]["lastTransitionTime"] = json!("2000-01-01T00:00:00Z");
        set_condition(&mut pod, "Ready", false, Some("x"), None);
        assert_eq!(
            pod["status"]["conditions"][0]["lastTransitionTime"],
            "2000-01-01T00:00:00Z"
        );
        set_condition(&mut pod, "Ready", true, None, None);
        assert_ne!(
            pod["status"]["conditions"][0]["lastTransitionTime"],
            "2000-01-01T00:00:00Z"
        );
    }
}
