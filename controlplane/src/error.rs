//! Errors of the control plane's operations, each mapped to one HTTP status by the API.

/// Failure of a control-plane operation.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// The request names an invalid value; `field` is its path, such as `function.concurrency`.
    #[error("invalid {field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{what} not found")]
    NotFound { what: String },
    /// The operation conflicts with the current state, such as deleting a namespace that still
    /// has functions.
    #[error("{0}")]
    Conflict(String),
    /// The code package could not be read or unpacked.
    #[error("code package {path}: {message}")]
    Code { path: String, message: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl PlatformError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        PlatformError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// HTTP status and stable error code for the API.
    pub fn status_and_code(&self) -> (u16, &'static str) {
        match self {
            PlatformError::Invalid { .. } => (400, "InvalidParameterValue"),
            PlatformError::NotFound { .. } => (404, "ResourceNotFound"),
            PlatformError::Conflict(_) => (409, "ResourceInUse"),
            PlatformError::Code { .. } => (400, "InvalidCode"),
            PlatformError::Internal(_) => (500, "InternalError"),
        }
    }
}
