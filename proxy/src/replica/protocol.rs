//! Messages between a proxy replica and the control plane, as JSON bodies of
//! `GET /v1/namespaces/{namespace}/replicas/{replica}/routes?after={version}` and
//! `POST /v1/namespaces/{namespace}/replicas/{replica}/report`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::table::{FunctionKind, FunctionSettings};

/// The functions a replica routes, as of `version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Routes {
    /// Changes with every change of the namespace's functions; a replica polls with
    /// `after={version}` to wait for the next one.
    pub version: u64,
    /// Owner annotation of the pods the replica may route: those of the control plane that
    /// responded. A control plane that restarted has a new owner, and deletes the old pods.
    pub owner: String,
    /// How often the replica's pod watcher lists the runtime pods again.
    pub resync_interval_ms: u64,
    /// The k8s namespace of the runtime pods, from the namespace's binding.
    #[serde(default)]
    pub kube_namespace: String,
    pub functions: Vec<RouteEntry>,
}

/// One function version and the settings the proxy applies to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteEntry {
    pub name: String,
    pub qualifier: String,
    pub kind: Kind,
    pub memory_mb: u32,
    pub timeout_ms: u64,
    pub queue_budget_ms: u64,
    pub queue_limit: usize,
    pub max_body_bytes: u64,
    pub concurrency: u32,
}

/// [`FunctionKind`] on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Event,
    Web,
}

impl RouteEntry {
    pub fn new(name: &str, qualifier: &str, settings: &FunctionSettings) -> Self {
        RouteEntry {
            name: name.to_owned(),
            qualifier: qualifier.to_owned(),
            kind: match settings.kind {
                FunctionKind::Event => Kind::Event,
                FunctionKind::Web => Kind::Web,
            },
            memory_mb: settings.memory_mb,
            timeout_ms: millis(settings.timeout),
            queue_budget_ms: millis(settings.queue_budget),
            queue_limit: settings.queue_limit,
            max_body_bytes: settings.max_body_bytes,
            concurrency: settings.concurrency,
        }
    }

    pub fn settings(&self) -> FunctionSettings {
        FunctionSettings {
            kind: match self.kind {
                Kind::Event => FunctionKind::Event,
                Kind::Web => FunctionKind::Web,
            },
            memory_mb: self.memory_mb,
            timeout: Duration::from_millis(self.timeout_ms),
            queue_budget: Duration::from_millis(self.queue_budget_ms),
            queue_limit: self.queue_limit,
            max_body_bytes: self.max_body_bytes,
            concurrency: self.concurrency,
        }
    }
}

/// A replica's load: per function, its requests queued and in flight, and per routed instance
/// its requests in flight and idle time. Also the replica's heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub functions: Vec<FunctionReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionReport {
    pub name: String,
    pub qualifier: String,
    pub queued: usize,
    pub in_flight: usize,
    /// The instances the replica routes, and those it stopped routing while requests on them
    /// are still in flight, so that draining waits for them.
    pub instances: Vec<InstanceReport>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceReport {
    /// The instance id from the pod's `fngate.io/instance` label.
    pub id: u64,
    pub in_flight: u32,
    /// Milliseconds since a request last finished on the instance.
    pub idle_ms: u64,
    /// False once the replica stopped sending requests to the instance, so that draining can
    /// stop it when `in_flight` reaches zero.
    #[serde(default = "routed_default")]
    pub routed: bool,
}

fn routed_default() -> bool {
    true
}

/// The control plane's response to a report: the scaler's findings that the replica's waiting
/// requests need, for each function that has any.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportResponse {
    pub functions: Vec<FunctionNotice>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionNotice {
    pub name: String,
    pub qualifier: String,
    /// The last start failure, while the scaler backs off before the next attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_failure: Option<StartFailureNotice>,
    /// The reason the scaler cannot add instances now, such as an exhausted memory quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartFailureNotice {
    pub reason: String,
    /// Time until the scaler tries again; zero once that time has come.
    pub retry_in_ms: u64,
    /// Tells this failure apart from later ones, so a replica applies each once.
    #[serde(default)]
    pub id: u64,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_survive_the_wire() {
        let settings = FunctionSettings {
            kind: FunctionKind::Event,
            memory_mb: 256,
            timeout: Duration::from_millis(3_500),
            queue_budget: Duration::from_millis(900),
            queue_limit: 17,
            max_body_bytes: 4096,
            concurrency: 3,
        };
        let entry = RouteEntry::new("hello", "$LATEST", &settings);
        let json = serde_json::to_string(&entry).unwrap();
        assert!(json.contains(r#""kind":"event""#), "{json}");
        let back: RouteEntry = serde_json::from_str(&json).unwrap();
        assert_eq!(back.settings(), settings);
    }
}
