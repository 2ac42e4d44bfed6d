//! Response builders and request body reading shared by both listeners.
//!
//! Every error response is JSON of the form `{"error":{"code":"...","message":"..."}}`.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};

/// Maximum size of an event, result or error body, in bytes.
pub(crate) const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Names a runtime failure (timeout, bootstrap exit) on an invoke response.
pub(crate) const X_FNGATE_RUNTIME_ERROR: HeaderName =
    HeaderName::from_static("x-fngate-runtime-error");
/// Set to `true` on an invoke error response when the bootstrap never received the event, so
/// the platform may retry the invocation on another instance. Never set when the bootstrap
/// may have seen the event.
pub(crate) const X_FNGATE_NOT_STARTED: HeaderName = HeaderName::from_static("x-fngate-not-started");
/// Marks an invoke response whose body is the error posted by the function's code.
pub(crate) const X_FNGATE_FUNCTION_ERROR: HeaderName =
    HeaderName::from_static("x-fngate-function-error");
pub(crate) const X_SCF_REQUEST_ID: HeaderName = HeaderName::from_static("x-scf-request-id");

pub(crate) const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");
const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

/// A request body that could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error(
        "the request body is larger than the limit of {MAX_BODY_BYTES} bytes; send a smaller body"
    )]
    TooLarge,
    #[error("failed to read the request body: {0}")]
    Read(String),
}

impl BodyError {
    /// Converts the error to its JSON response: 413 for an oversized body, 400 otherwise.
    pub(crate) fn into_response(self) -> Response<Full<Bytes>> {
        match self {
            Self::TooLarge => json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLarge",
                &self.to_string(),
            ),
            Self::Read(_) => json_error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestBody",
                &self.to_string(),
            ),
        }
    }
}

/// Reads the whole body of `request`, rejecting it early when `Content-Length` is over the limit.
pub(crate) async fn read_body(request: Request<Incoming>) -> Result<Bytes, BodyError> {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return Err(BodyError::TooLarge);
    }

    match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(BodyError::TooLarge),
        Err(error) => Err(BodyError::Read(error.to_string())),
    }
}

/// Builds a response with `body` and optional content type.
pub(crate) fn with_body(
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    if let Some(content_type) = content_type {
        response.headers_mut().insert(CONTENT_TYPE, content_type);
    }
    response
}

/// Returns the content type for a body of unknown format: JSON if it parses as JSON,
/// plain text otherwise.
pub(crate) fn sniff_content_type(body: &[u8]) -> HeaderValue {
    if serde_json::from_slice::<serde_json::Value>(body).is_ok() {
        APPLICATION_JSON
    } else {
        TEXT_PLAIN
    }
}

/// Builds a JSON error response.
pub(crate) fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    with_body(
        status,
        Some(APPLICATION_JSON),
        Bytes::from(body.to_string()),
    )
}

/// Builds a 404 for a path that no route matches.
pub(crate) fn not_found(path: &str) -> Response<Full<Bytes>> {
    json_error(
        StatusCode::NOT_FOUND,
        "ResourceNotFound",
        &format!("no route for path {path:?}; check the URL"),
    )
}

/// Builds a 405 naming the method that `path` accepts.
pub(crate) fn method_not_allowed(
    method: &Method,
    path: &str,
    allowed: Method,
) -> Response<Full<Bytes>> {
    let message = format!("method {method} is not allowed on {path}; use {allowed}");
    let mut response = json_error(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", &message);
    if let Ok(value) = HeaderValue::from_str(allowed.as_str()) {
        response.headers_mut().insert(ALLOW, value);
    }
    response
}
