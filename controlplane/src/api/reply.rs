//! Builds the API's JSON responses, and its error responses:
//! `{"error": {"code": "...", "message": "..."}}` with a stable code.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};
use serde::Serialize;

use crate::error::PlatformError;

pub(crate) type ApiResponse = Response<Full<Bytes>>;

/// Why a request failed: a platform error, or one the API raises before reaching the platform.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error("no route for path {path:?}; the API serves /healthz and /v1/namespaces/...")]
    RouteNotFound { path: String },
    #[error("method {method} is not allowed on {path:?}; use {allow}")]
    MethodNotAllowed {
        method: Method,
        path: String,
        allow: &'static str,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("request body did not arrive in full within {} s", limit.as_secs())]
    BodyTimeout { limit: std::time::Duration },
}

impl ApiError {
    /// HTTP status and stable error code; platform errors keep their own mapping.
    pub(crate) fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Platform(error) => {
                let (status, code) = error.status_and_code();
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                (status, code)
            }
            ApiError::RouteNotFound { .. } => (StatusCode::NOT_FOUND, "RouteNotFound"),
            ApiError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed")
            }
            ApiError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "RequestTooLarge"),
            ApiError::BodyTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, "RequestTimeout"),
        }
    }

    /// Builds the error's JSON response, with an `Allow` header for a 405.
    pub(crate) fn into_response(self) -> ApiResponse {
        let (status, code) = self.status_and_code();
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: self.to_string(),
            },
        };
        let mut response = json(status, &body);
        if let ApiError::MethodNotAllowed { allow, .. } = self {
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize)]
struct ErrorDetail {
    code: &'static str,
    message: String,
}

/// Builds a JSON response with `status`. If `value` cannot be serialized, which the API's types
/// never cause, the response is a 500 error instead.
pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> ApiResponse {
    match serde_json::to_vec(value) {
        Ok(bytes) => with_body(status, Bytes::from(bytes)),
        Err(e) => {
            tracing::error!(error = %e, "failed to serialize an API response");
            let body = r#"{"error":{"code":"InternalError","message":"failed to serialize the response"}}"#;
            with_body(
                StatusCode::INTERNAL_SERVER_ERROR,
                Bytes::from_static(body.as_bytes()),
            )
        }
    }
}

fn with_body(status: StatusCode, body: Bytes) -> ApiResponse {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Builds an empty 204 response.
/// Builds the response for a code package: `application/zip`, with its digest as the entity tag.
pub(crate) fn package(digest: &str, bytes: Bytes) -> ApiResponse {
    let mut response = with_body(StatusCode::OK, bytes);
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/zip"),
    );
    if let Ok(etag) = hyper::header::HeaderValue::from_str(&format!("\"sha256:{digest}\"")) {
        headers.insert(hyper::header::ETAG, etag);
    }
    response
}

pub(crate) fn no_content() -> ApiResponse {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn error_json(response: ApiResponse) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn platform_errors_mapped() {
        let cases = [
            (
                PlatformError::invalid("concurrency", "must be 1"),
                400,
                "InvalidParameterValue",
            ),
            (
                PlatformError::NotFound {
                    what: "function \"f\"".into(),
                },
                404,
                "ResourceNotFound",
            ),
            (
                PlatformError::Conflict("namespace has functions".into()),
                409,
                "ResourceInUse",
            ),
            (
                PlatformError::Code {
                    path: "/a.zip".into(),
                    message: "corrupt".into(),
                },
                400,
                "InvalidCode",
            ),
            (PlatformError::Internal("boom".into()), 500, "InternalError"),
        ];
        for (error, status, code) in cases {
            let message = error.to_string();
            let response = ApiError::from(error).into_response();
            assert_eq!(response.status().as_u16(), status, "{code}");
            assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
            let body = error_json(response).await;
            assert_eq!(body["error"]["code"], code);
            assert_eq!(body["error"]["message"], message);
        }
    }

    #[tokio::test]
    async fn api_errors_mapped() {
        let not_found = ApiError::RouteNotFound { path: "/v2".into() }.into_response();
        assert_eq!(not_found.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            error_json(not_found).await["error"]["code"],
            "RouteNotFound"
        );

        let too_large = ApiError::BodyTooLarge { limit: 10 }.into_response();
        assert_eq!(too_large.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            error_json(too_large).await["error"]["code"],
            "RequestTooLarge"
        );
    }

    #[tokio::test]
    async fn method_not_allowed_has_allow() {
        let error = ApiError::MethodNotAllowed {
            method: Method::POST,
            path: "/v1/namespaces".into(),
            allow: "GET",
        };
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[ALLOW], "GET");
        let body = error_json(response).await;
        assert_eq!(body["error"]["code"], "MethodNotAllowed");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("POST") && message.contains("use GET"),
            "{message}"
        );
    }
}
