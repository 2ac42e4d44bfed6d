//! Denials that a test switches on and off. A request that matches a rule gets the 403
//! `Forbidden` status a real API server sends when RBAC grants the request to no role.

use crate::{Resource, Status};

/// Resource verbs as the API server's authorizer names them.
pub const VERBS: [&str; 8] = [
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
];

/// The user name of requests without an `Authorization` header, when those are served.
pub const ANONYMOUS_USER: &str = "system:anonymous";

/// One denied kind of request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// One of [`VERBS`], or `*` for every verb.
    pub verb: String,
    pub resource: Resource,
    /// The only namespace denied, or `None` for every namespace and the cluster scope.
    pub namespace: Option<String>,
}

/// The attributes of one request that the authorizer checks.
pub struct Attributes<'a> {
    pub user: &'a str,
    pub verb: &'static str,
    pub resource: Resource,
    pub subresource: Option<&'a str>,
    /// Empty for a request at the cluster scope.
    pub namespace: &'a str,
    /// Empty when the path names no object, as for a create, list or deletecollection.
    pub name: &'a str,
}

impl Rule {
    /// Returns whether the rule denies the request. Requests for a subresource (`status`, `log`)
    /// never match, as RBAC grants `pods` and `pods/status` apart.
    pub fn matches(&self, request: &Attributes) -> bool {
        (self.verb == "*" || self.verb == request.verb)
            && self.resource == request.resource
            && request.subresource.is_none()
            && self
                .namespace
                .as_deref()
                .is_none_or(|namespace| namespace == request.namespace)
    }
}

/// Builds the status of a denied request, with the message the real API server writes
/// (`forbiddenMessage` in k8s.io/apiserver's `endpoints/handlers/responsewriters/errors.go`).
pub fn forbidden(request: &Attributes) -> Status {
    let resource = match request.subresource {
        Some(subresource) => format!("{}/{subresource}", request.resource.plural),
        None => request.resource.plural.to_string(),
    };
    let scope = if request.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace {:?}", request.namespace)
    };
    let detail = format!(
        "User {:?} cannot {} resource {resource:?} in API group {:?} {scope}",
        request.user, request.verb, request.resource.group
    );
    Status::forbidden(&request.resource, request.name, &detail)
}
