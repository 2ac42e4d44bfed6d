//! Every way a request can fail in the proxy, and the one place that turns a failure into an HTTP
//! response. Codes follow SCF's function status codes where one fits, so SCF users recognise
//! them.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::metrics::Outcome;
use crate::pool::AcquireError;
use crate::table::LookupError;

/// A failed request, classified by who caused it and whether a retry may help.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for {path:?}; invoke event functions with POST /functions/{{namespace}}/{{function}}/invocations and web functions under /web/{{namespace}}/{{function}}/")]
    RouteNotFound { path: String },
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("method {method} is not allowed on {path}; use {allowed}")]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: &'static str,
    },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("function {function}: {source}; retry later or raise the function's max_instances or queue_limit")]
    QueueFull {
        function: String,
        source: AcquireError,
    },
    #[error("function {function}: {message}")]
    NoInstance { function: String, message: String },
    #[error("function {function}: instances fail to start: {reason}")]
    StartFailed { function: String, reason: String },
    #[error("function {function}: instance {instance} failed: {cause}")]
    UpstreamFailed {
        function: String,
        instance: u64,
        cause: String,
    },
    #[error("function {function}: execution exceeded the timeout of {}ms", timeout.as_millis())]
    Timeout { function: String, timeout: Duration },
    #[error("function {function} returned an error: {message}")]
    UserCode { function: String, message: String },
    #[error("function {function}: response exceeds the limit of {limit} bytes")]
    ResponseTooLarge { function: String, limit: u64 },
    #[error("the proxy is shutting down; retry on another replica")]
    ShuttingDown,
    #[error("the request body did not arrive within {}s", timeout.as_secs())]
    BodyReadTimeout { timeout: Duration },
    #[error("internal error: {what}")]
    Internal { what: String },
}

impl ProxyError {
    /// HTTP status, error code and metric outcome of this error.
    pub fn classify(&self) -> (StatusCode, &'static str, Outcome) {
        use ProxyError::*;
        match self {
            RouteNotFound { .. } => (StatusCode::NOT_FOUND, "RouteNotFound", Outcome::BadRequest),
            Lookup(_) => (
                StatusCode::NOT_FOUND,
                "FunctionNotFound",
                Outcome::BadRequest,
            ),
            MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                Outcome::BadRequest,
            ),
            InvalidRequest(_) => (
                StatusCode::BAD_REQUEST,
                "InvalidParameterValue",
                Outcome::BadRequest,
            ),
            BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLarge",
                Outcome::BadRequest,
            ),
            QueueFull { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "ResourceLimitReached",
                Outcome::QueueFull,
            ),
            NoInstance { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "InstanceUnavailable",
                Outcome::NoInstance,
            ),
            StartFailed { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ContainerStateExited",
                Outcome::NoInstance,
            ),
            UpstreamFailed { .. } => (
                StatusCode::BAD_GATEWAY,
                "ContainerStateExited",
                Outcome::UpstreamFailed,
            ),
            Timeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "TimeLimitReached",
                Outcome::Timeout,
            ),
            UserCode { .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "UserCodeException",
                Outcome::UserError,
            ),
            ResponseTooLarge { .. } => (
                StatusCode::BAD_GATEWAY,
                "ResponseTooLarge",
                Outcome::UpstreamFailed,
            ),
            ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ShuttingDown",
                Outcome::NoInstance,
            ),
            BodyReadTimeout { .. } => (
                StatusCode::REQUEST_TIMEOUT,
                "RequestTimeout",
                Outcome::BadRequest,
            ),
            Internal { .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                Outcome::UpstreamFailed,
            ),
        }
    }

    /// Builds the JSON error response `{"error": {"code", "message"}, "request_id"}`.
    pub fn to_response(&self, request_id: &str) -> Response<crate::body::ProxyBody> {
        let (status, code, _) = self.classify();
        error_response(status, code, &self.to_string(), request_id)
            .map(|body| http_body_util::Either::Left(http_body_util::Full::new(body)))
    }
}

/// Builds a JSON error response with the request id in the body and the header.
pub fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: &str,
) -> Response<Bytes> {
    let body = serde_json::json!({
        "error": { "code": code, "message": message },
        "request_id": request_id,
    });
    let mut response = Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert(crate::headers::REQUEST_ID, value);
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}
