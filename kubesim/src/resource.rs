//! The built-in resource types the API server serves, and its discovery documents.

use serde_json::{json, Value};

/// One served resource type: an API group, version and plural name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resource {
    /// API group, `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// Plural name as it appears in URLs, such as `pods`.
    pub plural: &'static str,
    /// Kind of a single object, such as `Pod`.
    pub kind: &'static str,
    pub namespaced: bool,
    /// Whether the type has a `status` subresource, which splits writes of `status` from writes
    /// of the rest of the object.
    pub status_subresource: bool,
}

impl Resource {
    pub const NAMESPACES: Resource = Resource::core("namespaces", "Namespace", false, true);
    pub const NODES: Resource = Resource::core("nodes", "Node", false, true);
    pub const PODS: Resource = Resource::core("pods", "Pod", true, true);
    pub const SERVICES: Resource = Resource::core("services", "Service", true, true);
    pub const CONFIGMAPS: Resource = Resource::core("configmaps", "ConfigMap", true, false);
    pub const SERVICEACCOUNTS: Resource =
        Resource::core("serviceaccounts", "ServiceAccount", true, false);
    pub const DEPLOYMENTS: Resource = Resource::apps("deployments", "Deployment");
    pub const DAEMONSETS: Resource = Resource::apps("daemonsets", "DaemonSet");
    pub const ROLES: Resource = Resource::rbac("roles", "Role", true);
    pub const ROLEBINDINGS: Resource = Resource::rbac("rolebindings", "RoleBinding", true);
    pub const CLUSTERROLES: Resource = Resource::rbac("clusterroles", "ClusterRole", false);
    pub const CLUSTERROLEBINDINGS: Resource =
        Resource::rbac("clusterrolebindings", "ClusterRoleBinding", false);
    pub const EVENTS: Resource = Resource::core("events", "Event", true, false);
    /// Events in the `events.k8s.io` group, which kube-rs's event recorder writes.
    pub const EVENTS_V1: Resource = Resource {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status_subresource: false,
    };
    pub const LEASES: Resource = Resource {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status_subresource: false,
    };

    /// Every resource type the server serves.
    pub const ALL: [Resource; 15] = [
        Resource::NAMESPACES,
        Resource::NODES,
        Resource::PODS,
        Resource::SERVICES,
        Resource::CONFIGMAPS,
        Resource::SERVICEACCOUNTS,
        Resource::DEPLOYMENTS,
        Resource::DAEMONSETS,
        Resource::ROLES,
        Resource::ROLEBINDINGS,
        Resource::CLUSTERROLES,
        Resource::CLUSTERROLEBINDINGS,
        Resource::LEASES,
        Resource::EVENTS,
        Resource::EVENTS_V1,
    ];

    const fn core(
        plural: &'static str,
        kind: &'static str,
        namespaced: bool,
        status: bool,
    ) -> Resource {
        Resource {
            group: "",
            version: "v1",
            plural,
            kind,
            namespaced,
            status_subresource: status,
        }
    }

    const fn apps(plural: &'static str, kind: &'static str) -> Resource {
        Resource {
            group: "apps",
            version: "v1",
            plural,
            kind,
            namespaced: true,
            status_subresource: true,
        }
    }

    const fn rbac(plural: &'static str, kind: &'static str, namespaced: bool) -> Resource {
        Resource {
            group: "rbac.authorization.k8s.io",
            version: "v1",
            plural,
            kind,
            namespaced,
            status_subresource: false,
        }
    }

    /// Finds a served resource by group, version and plural name.
    pub fn lookup(group: &str, version: &str, plural: &str) -> Option<Resource> {
        Resource::ALL
            .into_iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    /// Returns the `apiVersion` of objects of this type: `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Returns the kind of a list of this type, such as `PodList`.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// Returns the singular name used in discovery, such as `pod`.
    pub fn singular(&self) -> String {
        self.kind.to_ascii_lowercase()
    }
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// Short names and categories as the real server lists them, for kubectl's `get cm` and
/// `get all`.
fn short_names(r: &Resource) -> (&'static [&'static str], bool) {
    match r.plural {
        "namespaces" => (&["ns"], false),
        "nodes" => (&["no"], false),
        "pods" => (&["po"], true),
        "services" => (&["svc"], true),
        "configmaps" => (&["cm"], false),
        "serviceaccounts" => (&["sa"], false),
        "deployments" => (&["deploy"], true),
        "events" if r.group.is_empty() => (&["ev"], false),
        "daemonsets" => (&["ds"], true),
        _ => (&[], false),
    }
}

fn resource_entry(r: &Resource) -> Value {
    let mut entry = json!({
        "name": r.plural,
        "singularName": r.singular(),
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": VERBS,
    });
    let (short, in_all) = short_names(r);
    if !short.is_empty() {
        entry["shortNames"] = json!(short);
    }
    if in_all {
        entry["categories"] = json!(["all"]);
    }
    entry
}

/// Builds the `APIResourceList` for one group version, or `None` when nothing is served there.
pub fn api_resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in Resource::ALL
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        resources.push(resource_entry(r));
        if r.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if *r == Resource::PODS {
            resources.push(json!({
                "name": "pods/log",
                "singularName": "",
                "namespaced": true,
                "kind": "Pod",
                "verbs": ["get"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// Builds the `APIVersions` document served at `/api`.
pub fn core_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
    })
}

fn named_groups() -> Vec<&'static str> {
    let mut groups: Vec<&'static str> = Vec::new();
    for r in Resource::ALL.iter().filter(|r| !r.group.is_empty()) {
        if !groups.contains(&r.group) {
            groups.push(r.group);
        }
    }
    groups
}

fn api_group(name: &str) -> Value {
    let version = json!({"groupVersion": format!("{name}/v1"), "version": "v1"});
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": name,
        "versions": [version.clone()],
        "preferredVersion": version,
    })
}

/// Builds the `APIGroupList` document served at `/apis`.
pub fn api_group_list() -> Value {
    let groups: Vec<Value> = named_groups()
        .into_iter()
        .map(|g| {
            let mut group = api_group(g);
            let object = group.as_object_mut().expect("api_group builds an object");
            object.remove("kind");
            object.remove("apiVersion");
            group
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// Builds the `APIGroup` document served at `/apis/{group}`.
pub fn api_group_document(name: &str) -> Option<Value> {
    named_groups().contains(&name).then(|| api_group(name))
}
