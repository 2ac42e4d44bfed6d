//! Failures as the API server reports them: `metav1.Status` bodies with matching HTTP codes.

use serde_json::{json, Value};

use crate::Resource;

/// A failed API request, rendered as a `metav1.Status` object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct Status {
    pub code: u16,
    /// Machine-readable reason, such as `NotFound` or `Conflict`.
    pub reason: &'static str,
    pub message: String,
    /// The object the request was about, for `details`.
    pub details: Option<Box<StatusDetails>>,
}

/// `details` of a Status: which object a failure is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusDetails {
    pub name: String,
    /// API group, empty for the core group.
    pub group: String,
    /// The plural resource name, which the real server puts into `details.kind`.
    pub kind: String,
}

impl Status {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Status {
        Status {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn about(mut self, resource: &Resource, name: &str) -> Status {
        self.details = Some(Box::new(StatusDetails {
            name: name.to_string(),
            group: resource.group.to_string(),
            kind: resource.plural.to_string(),
        }));
        self
    }

    fn qualified(resource: &Resource) -> String {
        if resource.group.is_empty() {
            resource.plural.to_string()
        } else {
            format!("{}.{}", resource.plural, resource.group)
        }
    }

    pub fn not_found(resource: &Resource, name: &str) -> Status {
        let message = format!("{} \"{name}\" not found", Status::qualified(resource));
        Status::new(404, "NotFound", message).about(resource, name)
    }

    pub fn already_exists(resource: &Resource, name: &str) -> Status {
        let message = format!("{} \"{name}\" already exists", Status::qualified(resource));
        Status::new(409, "AlreadyExists", message).about(resource, name)
    }

    pub fn conflict(resource: &Resource, name: &str) -> Status {
        let message = format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            Status::qualified(resource)
        );
        Status::new(409, "Conflict", message).about(resource, name)
    }

    pub fn conflict_with(resource: &Resource, name: &str, detail: &str) -> Status {
        let message = format!(
            "Operation cannot be fulfilled on {} \"{name}\": {detail}",
            Status::qualified(resource)
        );
        Status::new(409, "Conflict", message).about(resource, name)
    }

    pub fn invalid(resource: &Resource, name: &str, detail: &str) -> Status {
        let message = format!("{} \"{name}\" is invalid: {detail}", resource.kind);
        Status::new(422, "Invalid", message).about(resource, name)
    }

    pub fn bad_request(message: impl Into<String>) -> Status {
        Status::new(400, "BadRequest", message)
    }

    /// Builds a 403 status. An empty `name` (a request that names no object) is left out of the
    /// message and the details, as the real server does.
    pub fn forbidden(resource: &Resource, name: &str, detail: &str) -> Status {
        let qualified = Status::qualified(resource);
        let message = if name.is_empty() {
            format!("{qualified} is forbidden: {detail}")
        } else {
            format!("{qualified} \"{name}\" is forbidden: {detail}")
        };
        Status::new(403, "Forbidden", message).about(resource, name)
    }

    pub fn unauthorized() -> Status {
        Status::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn expired(message: impl Into<String>) -> Status {
        Status::new(410, "Expired", message)
    }

    pub fn method_not_allowed(method: &str) -> Status {
        Status::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource: {method}"),
        )
    }

    pub fn path_not_found(path: &str) -> Status {
        Status::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource: {path}"),
        )
    }

    pub fn unsupported_media_type(content_type: &str) -> Status {
        Status::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json; got {content_type:?}"),
        )
    }

    /// Renders the `metav1.Status` JSON body.
    pub fn to_json(&self) -> Value {
        let mut body = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            body["details"] = json!({"kind": details.kind});
            if !details.name.is_empty() {
                body["details"]["name"] = json!(details.name);
            }
            if !details.group.is_empty() {
                body["details"]["group"] = json!(details.group);
            }
        }
        body
    }
}

/// Renders the `Status` with `status: Success` that the server returns for some deletes.
pub fn success(resource: &Resource, name: &str, uid: &str) -> Value {
    let mut details = json!({"name": name, "kind": resource.plural, "uid": uid});
    if !resource.group.is_empty() {
        details["group"] = json!(resource.group);
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    })
}
