//! The invoke listener: `POST /event-invoke` from the platform, as SCF image functions receive
//! it, and `GET /healthz`.
//!
//! Each event is queued in the hub and the request waits until its [`Outcome`] arrives. The
//! time limit runs from the moment the bootstrap takes the event, and the supervisor enforces
//! it. A caller that disconnects while its event is queued withdraws the event. Once the
//! bootstrap took the event, a disconnect cancels nothing and the invocation runs to its end.
//!
//! An error response carries `X-Fngate-Not-Started: true` when the bootstrap never received
//! the event: the queue was full, the instance was stopping or closed, or the bootstrap exited
//! while the event was queued. The platform may retry such an invocation elsewhere.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use http::{Method, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::hub::{Hub, Invocation, Outcome, SubmitError, Ticket};
use crate::reply::{
    self, APPLICATION_JSON, X_FNGATE_FUNCTION_ERROR, X_FNGATE_NOT_STARTED, X_FNGATE_RUNTIME_ERROR,
    X_SCF_REQUEST_ID,
};
use crate::server::Handler;

pub(crate) const PATH_EVENT_INVOKE: &str = "/event-invoke";
pub(crate) const PATH_HEALTHZ: &str = "/healthz";

const DEFAULT_TIMEOUT_MS: u64 = 3000;
/// SCF's default memory size, used when `X-Scf-Memory` is missing.
const DEFAULT_MEMORY_MB: u64 = 128;
/// Largest accepted `X-Scf-Timeout`: one day, which also keeps deadline arithmetic far from
/// overflow.
const MAX_TIMEOUT_MS: u64 = 86_400_000;
const MAX_REQUEST_ID_LEN: usize = 256;

/// Values of `X-Fngate-Runtime-Error`: the reason an invocation failed outside the user's code.
pub(crate) mod runtime_error {
    pub const TIME_LIMIT_REACHED: &str = "TimeLimitReached";
    pub const CONTAINER_STATE_EXITED: &str = "ContainerStateExited";
    pub const INVOCATION_ABANDONED: &str = "InvocationAbandoned";
    pub const INSTANCE_STOPPING: &str = "InstanceStopping";
    pub const TOO_MANY_PENDING: &str = "TooManyPendingInvocations";
}

/// Value of `X-Fngate-Function-Error` when the bootstrap posted `/runtime/invocation/error`.
pub(crate) const USER_CODE_EXCEPTION: &str = "UserCodeException";

/// Handler of the invoke listener.
pub(crate) struct InvokeApi {
    hub: Arc<Hub>,
}

impl InvokeApi {
    pub(crate) fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }

    /// Builds the `/healthz` response: `{"status":"ok","queued":N}`, where `queued` counts the
    /// invocations waiting for the bootstrap.
    fn health(&self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({ "status": "ok", "queued": self.hub.queued_len() });
        reply::with_body(
            StatusCode::OK,
            Some(APPLICATION_JSON),
            Bytes::from(body.to_string()),
        )
    }

    async fn invoke(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let params = match InvokeParams::from_headers(request.headers()) {
            Ok(params) => params,
            Err(message) => {
                return reply::json_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidParameterValue",
                    &message,
                )
            }
        };
        let span = tracing::debug_span!(
            "invoke",
            request_id = %params.request_id,
            function = %params.function,
        );
        let response = self.run_invocation(request, &params).instrument(span).await;
        with_request_id(response, &params.request_id)
    }

    async fn run_invocation(
        &self,
        request: Request<Incoming>,
        params: &InvokeParams,
    ) -> Response<Full<Bytes>> {
        let content_type = request.headers().get(CONTENT_TYPE).cloned();
        let event = match reply::read_body(request).await {
            Ok(event) => event,
            Err(error) => return error.into_response(),
        };

        let (reply_tx, reply_rx) = oneshot::channel();
        let invocation = Invocation {
            request_id: params.request_id.clone(),
            memory_mb: params.memory_mb,
            timeout: params.timeout,
            content_type,
            event,
            reply: reply_tx,
        };
        let ticket = match self.hub.submit(invocation) {
            Ok(ticket) => ticket,
            Err(error) => return submit_error_response(&error),
        };

        // hyper drops this future when the caller's connection closes (observed with hyper
        // 1.13 and tested in tests/queue.rs), and the guard then takes the invocation out of
        // the queue unless the bootstrap already has it.
        let queued = WithdrawOnDrop {
            hub: &self.hub,
            ticket: Some(ticket),
        };
        let outcome = reply_rx.await;
        queued.disarm();

        match outcome {
            Ok(outcome) => outcome_response(outcome),
            // The hub sends an outcome for every invocation whose caller still waits, so this
            // is not expected. The bootstrap may have seen the event, so it is not marked as
            // not started.
            Err(_) => runtime_error(
                StatusCode::BAD_GATEWAY,
                runtime_error::CONTAINER_STATE_EXITED,
                "the runtime wrapper stopped before the invocation completed; retry the request",
            ),
        }
    }
}

/// Withdraws a queued invocation when dropped before [`disarm`](Self::disarm).
struct WithdrawOnDrop<'a> {
    hub: &'a Hub,
    ticket: Option<Ticket>,
}

impl WithdrawOnDrop<'_> {
    /// Keeps the invocation: it has its outcome, so nothing is left to withdraw.
    fn disarm(mut self) {
        self.ticket = None;
    }
}

impl Drop for WithdrawOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.hub.withdraw(ticket);
        }
    }
}

impl Handler for InvokeApi {
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        match path.as_str() {
            PATH_EVENT_INVOKE if method == Method::POST => self.invoke(request).await,
            PATH_EVENT_INVOKE => reply::method_not_allowed(&method, &path, Method::POST),
            PATH_HEALTHZ if method == Method::GET => self.health(),
            PATH_HEALTHZ => reply::method_not_allowed(&method, &path, Method::GET),
            _ => reply::not_found(&path),
        }
    }
}

/// The `X-Scf-*` request headers of one invocation, with defaults applied.
#[derive(Debug, PartialEq, Eq)]
struct InvokeParams {
    request_id: String,
    memory_mb: u64,
    timeout: Duration,
    /// `namespace/name:version` for logs, with `-` for a missing part.
    function: String,
}

impl InvokeParams {
    /// Reads the headers. The error is a message naming the invalid header and value.
    fn from_headers(headers: &HeaderMap) -> Result<Self, String> {
        let request_id = match header_text(headers, "x-scf-request-id")? {
            Some(id) if id.len() > MAX_REQUEST_ID_LEN => {
                return Err(format!(
                    "invalid X-Scf-Request-Id: {} bytes is longer than the limit of {MAX_REQUEST_ID_LEN}; send a shorter id",
                    id.len()
                ))
            }
            Some(id) => id.to_string(),
            None => uuid::Uuid::new_v4().to_string(),
        };
        let memory_mb = header_number(headers, "x-scf-memory", DEFAULT_MEMORY_MB, u64::MAX)?;
        let timeout_ms =
            header_number(headers, "x-scf-timeout", DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS)?;
        let part = |name| header_text(headers, name).ok().flatten().unwrap_or("-");
        let function = format!(
            "{}/{}:{}",
            part("x-scf-namespace"),
            part("x-scf-name"),
            part("x-scf-version")
        );
        Ok(Self {
            request_id,
            memory_mb,
            timeout: Duration::from_millis(timeout_ms),
            function,
        })
    }
}

/// Returns the trimmed header value, `None` when the header is missing or blank.
fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, String> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| format!("invalid {name}: the value must be visible ASCII"))?
        .trim();
    Ok(Some(text).filter(|text| !text.is_empty()))
}

fn header_number(headers: &HeaderMap, name: &str, default: u64, max: u64) -> Result<u64, String> {
    let Some(text) = header_text(headers, name)? else {
        return Ok(default);
    };
    match text.parse::<u64>() {
        Ok(value) if (1..=max).contains(&value) => Ok(value),
        _ => Err(format!(
            "invalid {name} {text:?}: expected a whole number from 1 to {max}"
        )),
    }
}

fn outcome_response(outcome: Outcome) -> Response<Full<Bytes>> {
    match outcome {
        Outcome::Response(body) => reply::with_body(StatusCode::OK, Some(APPLICATION_JSON), body),
        Outcome::Error(body) => {
            let content_type = reply::sniff_content_type(&body);
            let mut response = reply::with_body(StatusCode::INTERNAL_SERVER_ERROR, Some(content_type), body);
            let value = HeaderValue::from_static(USER_CODE_EXCEPTION);
            response.headers_mut().insert(X_FNGATE_FUNCTION_ERROR, value);
            response
        }
        Outcome::TimedOut { timeout } => runtime_error(
            StatusCode::GATEWAY_TIMEOUT,
            runtime_error::TIME_LIMIT_REACHED,
            &format!(
                "the function did not complete the invocation within its time limit of {} ms; the instance stops because its bootstrap is stuck. Raise the function's timeout if the work needs longer",
                timeout.as_millis()
            ),
        ),
        Outcome::Abandoned { next_request_id } => runtime_error(
            StatusCode::BAD_GATEWAY,
            runtime_error::INVOCATION_ABANDONED,
            &format!(
                "the bootstrap requested the next invocation ({next_request_id}) without posting a response or error for this one; post /runtime/invocation/response or /runtime/invocation/error once per invocation"
            ),
        ),
        Outcome::Exited(reason) => runtime_error(
            StatusCode::BAD_GATEWAY,
            runtime_error::CONTAINER_STATE_EXITED,
            &format!("{reason}; check the function's log"),
        ),
        Outcome::NotStarted(reason) => mark_not_started(runtime_error(
            StatusCode::BAD_GATEWAY,
            runtime_error::CONTAINER_STATE_EXITED,
            &format!("{reason}; check the function's log"),
        )),
    }
}

fn submit_error_response(error: &SubmitError) -> Response<Full<Bytes>> {
    let (status, code) = match error {
        SubmitError::QueueFull { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            runtime_error::TOO_MANY_PENDING,
        ),
        SubmitError::Stopping => (
            StatusCode::SERVICE_UNAVAILABLE,
            runtime_error::INSTANCE_STOPPING,
        ),
        SubmitError::Closed(_) => (
            StatusCode::BAD_GATEWAY,
            runtime_error::CONTAINER_STATE_EXITED,
        ),
    };
    // Every submit error means the event never entered the queue.
    mark_not_started(runtime_error(status, code, &error.to_string()))
}

/// Adds `X-Fngate-Not-Started: true`, for errors where the bootstrap never received the event.
fn mark_not_started(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    response
        .headers_mut()
        .insert(X_FNGATE_NOT_STARTED, HeaderValue::from_static("true"));
    response
}

/// Builds a JSON error that also names `code` in `X-Fngate-Runtime-Error`.
fn runtime_error(status: StatusCode, code: &'static str, message: &str) -> Response<Full<Bytes>> {
    let mut response = reply::json_error(status, code, message);
    response
        .headers_mut()
        .insert(X_FNGATE_RUNTIME_ERROR, HeaderValue::from_static(code));
    response
}

fn with_request_id(mut response: Response<Full<Bytes>>, request_id: &str) -> Response<Full<Bytes>> {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(X_SCF_REQUEST_ID, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    http::header::HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    #[test]
    fn not_started_header_only_when_event_unseen() {
        let cases = [
            (
                "response",
                outcome_response(Outcome::Response(Bytes::new())),
                false,
            ),
            (
                "error",
                outcome_response(Outcome::Error(Bytes::new())),
                false,
            ),
            (
                "timed out",
                outcome_response(Outcome::TimedOut {
                    timeout: Duration::from_millis(1),
                }),
                false,
            ),
            (
                "abandoned",
                outcome_response(Outcome::Abandoned {
                    next_request_id: "b".to_string(),
                }),
                false,
            ),
            (
                "exited while running",
                outcome_response(Outcome::Exited("exited".to_string())),
                false,
            ),
            (
                "exited while queued",
                outcome_response(Outcome::NotStarted("exited".to_string())),
                true,
            ),
            (
                "queue full",
                submit_error_response(&SubmitError::QueueFull { queued: 1 }),
                true,
            ),
            (
                "stopping",
                submit_error_response(&SubmitError::Stopping),
                true,
            ),
            (
                "closed",
                submit_error_response(&SubmitError::Closed("exited".to_string())),
                true,
            ),
        ];
        for (case, response, expected) in cases {
            let header = response.headers().get(X_FNGATE_NOT_STARTED);
            if expected {
                assert_eq!(header, Some(&HeaderValue::from_static("true")), "{case}");
            } else {
                assert_eq!(header, None, "{case}");
            }
        }
    }

    #[test]
    fn params_read_scf_headers() {
        let params = InvokeParams::from_headers(&headers(&[
            ("x-scf-request-id", "req-1"),
            ("x-scf-memory", "256"),
            ("x-scf-timeout", "1500"),
            ("x-scf-name", "hello"),
            ("x-scf-namespace", "default"),
            ("x-scf-version", "$LATEST"),
        ]))
        .expect("valid headers");

        assert_eq!(params.request_id, "req-1");
        assert_eq!(params.memory_mb, 256);
        assert_eq!(params.timeout, Duration::from_millis(1500));
        assert_eq!(params.function, "default/hello:$LATEST");
    }

    #[test]
    fn params_defaults() {
        let params = InvokeParams::from_headers(&HeaderMap::new()).expect("valid headers");

        assert_eq!(params.timeout, Duration::from_millis(DEFAULT_TIMEOUT_MS));
        assert_eq!(params.memory_mb, DEFAULT_MEMORY_MB);
        assert!(
            uuid::Uuid::parse_str(&params.request_id).is_ok(),
            "{}",
            params.request_id
        );
        assert_eq!(params.function, "-/-:-");
    }

    #[test]
    fn params_reject_bad_numbers() {
        for (name, value) in [
            ("x-scf-timeout", "0"),
            ("x-scf-timeout", "abc"),
            ("x-scf-timeout", "86400001"),
            ("x-scf-memory", "-1"),
        ] {
            let error =
                InvokeParams::from_headers(&headers(&[(name, value)])).expect_err("must fail");
            assert!(error.contains(name), "{error}");
            assert!(error.contains(value), "{error}");
        }
    }
}
