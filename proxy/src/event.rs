//! Event invocations: read and check the JSON event, take a slot, and exchange it with the
//! instance as `POST /event-invoke`.
//!
//! The exchange with the instance runs in its own task that owns the slot. A client that
//! disconnects while its event runs does not free the slot early, because the instance keeps
//! working on the event (SCF does not cancel a started invocation). The slot is returned when the
//! instance answers or the execution timeout passes. A client that disconnects while queued
//! leaves the queue at once.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::handler::{
    acquire, add_timing, content_length, fail_instance, retries_exhausted, server_timing,
    timeout_error, MAX_RETRIES,
};
use crate::headers::{FUNCTION_ERROR, NOT_STARTED, RUNTIME_ERROR};
use crate::pool::Permit;
use crate::request_id::RequestId;
use crate::table::{Function, FunctionSettings};
use crate::upstream::{self, SendError};

/// Largest event function response read into memory, as SCF's 6 MB response limit.
const MAX_EVENT_RESPONSE_BYTES: usize = 6 * 1024 * 1024;

/// Longest error text from a function that is copied into an error message.
const MAX_ERROR_MESSAGE_BYTES: usize = 4096;

/// How long a client may take to send an event body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Runtime wrapper error code for a full invocation queue. A full queue does not mean the
/// instance is unhealthy.
const TOO_MANY_PENDING: &[u8] = b"TooManyPendingInvocations";

/// Result of one attempt to hand an event to an instance.
enum Attempt {
    Done(Box<Result<Response<ProxyBody>, ProxyError>>),
    /// The instance never received the event; another instance may take it.
    Retry(String),
}

impl Attempt {
    fn done(result: Result<Response<ProxyBody>, ProxyError>) -> Self {
        Attempt::Done(Box::new(result))
    }
}

/// Handles `POST /functions/{namespace}/{function}/invocations`.
pub(crate) async fn invoke(
    function: &Arc<Function>,
    settings: Arc<FunctionSettings>,
    request: Request<Incoming>,
    request_id: &RequestId,
) -> Result<Response<ProxyBody>, ProxyError> {
    if request.method() != Method::POST {
        return Err(ProxyError::MethodNotAllowed {
            method: request.method().to_string(),
            path: request.uri().path().to_owned(),
            allowed: "POST",
        });
    }
    let event = match tokio::time::timeout(
        BODY_READ_TIMEOUT,
        read_event(request, settings.max_body_bytes),
    )
    .await
    {
        Ok(event) => event?,
        Err(_) => {
            return Err(ProxyError::BodyReadTimeout {
                timeout: BODY_READ_TIMEOUT,
            })
        }
    };

    let queue_deadline = Instant::now() + settings.queue_budget;
    let mut last_cause = String::new();
    for _ in 0..=MAX_RETRIES {
        let permit = acquire(function, &settings, queue_deadline, &last_cause).await?;
        let timing = server_timing(function, &permit);
        let exchange = tokio::spawn(exchange(
            Arc::clone(function),
            Arc::clone(&settings),
            permit,
            event.clone(),
            request_id.clone(),
        ));
        let attempt = exchange.await.map_err(|error| ProxyError::Internal {
            what: format!("event exchange task failed: {error}"),
        })?;
        match attempt {
            Attempt::Done(result) => {
                let mut response = (*result)?;
                add_timing(&mut response, timing);
                return Ok(response);
            }
            Attempt::Retry(cause) => {
                function.metrics().record_retry();
                last_cause = cause;
            }
        }
    }
    Err(retries_exhausted(function, &last_cause))
}

/// Sends the event on the slot held by `permit` and reads the whole response, within the
/// execution timeout. Runs as its own task so that the slot outlives a departed client.
async fn exchange(
    function: Arc<Function>,
    settings: Arc<FunctionSettings>,
    permit: Permit,
    event: Bytes,
    request_id: RequestId,
) -> Attempt {
    let instance = Arc::clone(permit.instance());
    // One timer covers sending the event and reading the response.
    let deadline = tokio::time::sleep_until(Instant::now() + settings.timeout);
    let mut deadline = pin!(deadline);
    let request = event_request(&function, &settings, event, &request_id);

    let sent = tokio::select! {
        biased;
        sent = upstream::send(&instance, request) => sent,
        () = deadline.as_mut() => return timed_out(&function, &settings, &permit),
    };
    let (response, sender) = match sent {
        Err(SendError::NotSent { cause, .. }) => {
            fail_instance(&function, &instance, &cause);
            return Attempt::Retry(cause);
        }
        Err(SendError::Failed(error)) => {
            return Attempt::done(Err(upstream_failed(&function, &permit, &error.to_string())))
        }
        Ok(pair) => pair,
    };

    let (parts, body) = response.into_parts();
    let limited = Limited::new(body, MAX_EVENT_RESPONSE_BYTES);
    let collected = tokio::select! {
        biased;
        collected = limited.collect() => collected,
        () = deadline.as_mut() => return timed_out(&function, &settings, &permit),
    };
    let body = match collected {
        Err(error) if error.is::<LengthLimitError>() => {
            return Attempt::done(Err(ProxyError::ResponseTooLarge {
                function: function.key.to_string(),
                limit: MAX_EVENT_RESPONSE_BYTES as u64,
            }))
        }
        Err(error) => {
            return Attempt::done(Err(upstream_failed(&function, &permit, &error.to_string())))
        }
        Ok(collected) => collected.to_bytes(),
    };
    instance.conns.put(sender);

    if parts.headers.get(NOT_STARTED).is_some_and(|v| v == "true") {
        let cause = wrapper_message(&body);
        let busy = parts
            .headers
            .get(RUNTIME_ERROR)
            .is_some_and(|v| v == TOO_MANY_PENDING);
        if !busy {
            fail_instance(&function, &instance, &cause);
        }
        return Attempt::Retry(cause);
    }
    Attempt::done(event_response(&function, &settings, &permit, parts, body))
}

fn event_request(
    function: &Function,
    settings: &FunctionSettings,
    event: Bytes,
    request_id: &RequestId,
) -> Request<upstream::UpstreamBody> {
    let mut request = Request::new(Either::Left(Full::new(event)));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = Uri::from_static("/event-invoke");
    // Room for `Content-Type` and the six `X-Scf-*` headers, so the map never grows.
    let mut headers = HeaderMap::with_capacity(7);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    function.set_scf_headers(&mut headers, request_id.header_value(), settings);
    *request.headers_mut() = headers;
    request
}

/// Reports a timed-out invocation. The instance is replaced, because it may still be busy
/// with the event and a custom runtime takes one event at a time.
fn timed_out(function: &Function, settings: &FunctionSettings, permit: &Permit) -> Attempt {
    fail_instance(
        function,
        permit.instance(),
        "invocation exceeded the execution timeout",
    );
    Attempt::done(Err(timeout_error(function, settings)))
}

fn upstream_failed(function: &Function, permit: &Permit, cause: &str) -> ProxyError {
    ProxyError::UpstreamFailed {
        function: function.key.to_string(),
        instance: permit.instance().id(),
        cause: cause.to_owned(),
    }
}

/// Reads an event body up to `limit` bytes and checks that it is JSON. An empty body is `{}`.
async fn read_event(request: Request<Incoming>, limit: u64) -> Result<Bytes, ProxyError> {
    if content_length(request.headers()).is_some_and(|len| len > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let limited = Limited::new(
        request.into_body(),
        usize::try_from(limit).unwrap_or(usize::MAX),
    );
    let body = match limited.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => {
            return Err(ProxyError::BodyTooLarge { limit })
        }
        Err(error) => {
            return Err(ProxyError::InvalidRequest(format!(
                "failed to read the request body: {error}"
            )))
        }
    };
    if body.is_empty() {
        return Ok(Bytes::from_static(b"{}"));
    }
    if let Err(error) = serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
        return Err(ProxyError::InvalidRequest(format!(
            "request body is not valid JSON ({error}); send the event as a JSON document"
        )));
    }
    Ok(body)
}

/// Maps an event function's response. A 2xx passes through as 200, the runtime wrapper's own
/// failures keep their meaning, and any other status is the function's error.
fn event_response(
    function: &Function,
    settings: &FunctionSettings,
    permit: &Permit,
    parts: http::response::Parts,
    body: Bytes,
) -> Result<Response<ProxyBody>, ProxyError> {
    if let Some(runtime_error) = parts.headers.get(RUNTIME_ERROR) {
        if runtime_error == "TimeLimitReached" {
            return Err(timeout_error(function, settings));
        }
        return Err(upstream_failed(function, permit, &wrapper_message(&body)));
    }
    if !parts.status.is_success() {
        let kind = parts
            .headers
            .get(FUNCTION_ERROR)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("status");
        return Err(ProxyError::UserCode {
            function: function.key.to_string(),
            message: format!(
                "{kind} {}: {}",
                parts.status.as_u16(),
                truncated_text(&body)
            ),
        });
    }
    let mut response = Response::new(Either::Left(Full::new(body)));
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/json"));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    Ok(response)
}

/// The message of a runtime wrapper's JSON error, or the body as text when it is not one.
fn wrapper_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|json| json["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| truncated_text(body))
}

fn truncated_text(body: &[u8]) -> String {
    let end = body.len().min(MAX_ERROR_MESSAGE_BYTES);
    String::from_utf8_lossy(&body[..end]).trim().to_owned()
}
