//! SCF's custom runtime API, served to the bootstrap on a loopback port.
//!
//! Routes: `POST /runtime/init/ready`, `GET /runtime/invocation/next` (long poll),
//! `POST /runtime/invocation/response` and `POST /runtime/invocation/error`. A response or
//! error post applies to the invocation most recently handed out by `next`.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::sync::watch;

use crate::hub::{Completion, HandedOut, Hub};
use crate::reply::{self, APPLICATION_JSON};
use crate::server::Handler;

pub(crate) const PATH_INIT_READY: &str = "/runtime/init/ready";
pub(crate) const PATH_NEXT: &str = "/runtime/invocation/next";
pub(crate) const PATH_RESPONSE: &str = "/runtime/invocation/response";
pub(crate) const PATH_ERROR: &str = "/runtime/invocation/error";

// SCF's runtime API names these headers in lowercase with underscores. HTTP allows `_` in a
// header name, and hyper sends the names as given here.
const REQUEST_ID: HeaderName = HeaderName::from_static("request_id");
const MEMORY_LIMIT_IN_MB: HeaderName = HeaderName::from_static("memory_limit_in_mb");
const TIME_LIMIT_IN_MS: HeaderName = HeaderName::from_static("time_limit_in_ms");

/// Handler of the runtime API listener.
pub(crate) struct RuntimeApi {
    hub: Arc<Hub>,
    ready: watch::Sender<bool>,
}

impl RuntimeApi {
    /// Creates the handler. `ready` turns true on the first `/runtime/init/ready`.
    pub(crate) fn new(hub: Arc<Hub>, ready: watch::Sender<bool>) -> Self {
        Self { hub, ready }
    }

    async fn complete(
        &self,
        request: Request<Incoming>,
        completion: Completion,
    ) -> Response<Full<Bytes>> {
        let body = match reply::read_body(request).await {
            Ok(body) => body,
            Err(error) => return error.into_response(),
        };
        match self.hub.complete(completion, body) {
            Ok(request_id) => {
                tracing::debug!(%request_id, ?completion, "invocation completed");
                reply::with_body(StatusCode::OK, None, Bytes::new())
            }
            Err(error) => reply::json_error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterValue",
                &error.to_string(),
            ),
        }
    }
}

impl Handler for RuntimeApi {
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let expected = match path.as_str() {
            PATH_NEXT => Method::GET,
            PATH_INIT_READY | PATH_RESPONSE | PATH_ERROR => Method::POST,
            _ => return reply::not_found(&path),
        };
        if method != expected {
            return reply::method_not_allowed(&method, &path, expected);
        }

        match path.as_str() {
            PATH_INIT_READY => {
                if !self.ready.send_replace(true) {
                    tracing::info!("bootstrap called {PATH_INIT_READY}");
                }
                reply::with_body(StatusCode::OK, None, Bytes::new())
            }
            PATH_NEXT => next_response(self.hub.next().await),
            PATH_RESPONSE => self.complete(request, Completion::Response).await,
            _ => self.complete(request, Completion::Error).await,
        }
    }
}

fn next_response(handed_out: HandedOut) -> Response<Full<Bytes>> {
    tracing::debug!(request_id = %handed_out.request_id, "handed an invocation to the bootstrap");
    let Ok(request_id) = HeaderValue::try_from(handed_out.request_id) else {
        // The invoke listener accepts only request ids that are valid header values.
        return reply::json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "the request id is not a valid header value",
        );
    };
    let content_type = handed_out.content_type.unwrap_or(APPLICATION_JSON);
    let mut response = reply::with_body(StatusCode::OK, Some(content_type), handed_out.event);
    let headers = response.headers_mut();
    headers.insert(REQUEST_ID, request_id);
    headers.insert(MEMORY_LIMIT_IN_MB, HeaderValue::from(handed_out.memory_mb));
    let timeout_ms = u64::try_from(handed_out.timeout.as_millis()).unwrap_or(u64::MAX);
    headers.insert(TIME_LIMIT_IN_MS, HeaderValue::from(timeout_ms));
    response
}
