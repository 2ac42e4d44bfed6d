//! Request handling: route, look up the function, check the request, take a slot (queueing when
//! none is free), forward to the instance and stream the response back.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::body::{ProxyBody, WebBody};
use crate::error::ProxyError;
use crate::headers::{self, REQUEST_ID, SERVER_TIMING};
use crate::instance::{Instance, InstanceState};
use crate::metrics::Outcome;
use crate::pool::{AcquireError, Permit};
use crate::request_id::RequestId;
use crate::route::{self, Route};
use crate::table::{Function, FunctionKind, FunctionSettings, Router};
use crate::upstream::{self, SendError, Sender, UpstreamBody};
use crate::Invocation;

/// Sends to another instance at most this many times after an instance was unreachable.
pub(crate) const MAX_RETRIES: usize = 3;

/// The peer of one client connection. Its address is formatted for `X-Forwarded-For` once per
/// connection instead of once per request.
#[derive(Debug, Clone)]
pub struct Client {
    addr: SocketAddr,
    forwarded_for: HeaderValue,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Client {
            addr,
            forwarded_for: headers::forwarded_for(addr.ip()),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A web request that found its function, on its way to an instance.
struct WebCall {
    function: Arc<Function>,
    settings: Arc<FunctionSettings>,
    upstream_uri: Uri,
    invocation: Invocation,
}

/// The data plane's request handler, shared by every connection.
#[derive(Debug)]
pub struct Proxy {
    router: Arc<Router>,
    shutting_down: AtomicBool,
}

/// A slot with the response headers the instance sent on it.
struct Dispatched {
    response: Response<Incoming>,
    sender: Sender,
    permit: Permit,
    /// Fires when the execution timeout, counted from taking the slot, passes.
    deadline: Pin<Box<Sleep>>,
}

impl Proxy {
    pub fn new(router: Arc<Router>) -> Self {
        Proxy {
            router,
            shutting_down: AtomicBool::new(false),
        }
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// True while the table is synced and no shutdown started.
    pub fn is_ready(&self) -> bool {
        self.router.is_synced() && !self.shutting_down.load(SeqCst)
    }

    /// Fails every queued request with 503 `ShuttingDown`.
    pub fn fail_queued(&self) {
        for function in self.router.table().functions() {
            function.pool.fail_waiters(&AcquireError::ShuttingDown);
        }
    }

    /// Makes new requests fail with 503 while in-flight ones finish.
    pub fn start_shutdown(&self) {
        self.shutting_down.store(true, SeqCst);
    }

    /// Handles one request. Every outcome, failures included, becomes a response here.
    pub async fn handle(&self, client: &Client, request: Request<Incoming>) -> Response<ProxyBody> {
        let request_id = RequestId::next();
        let mut response = match self.route(client, request, &request_id).await {
            Ok(response) => response,
            Err(error) => error.to_response(request_id.as_str()),
        };
        response
            .headers_mut()
            .insert(REQUEST_ID, request_id.header_value().clone());
        response
    }

    async fn route(
        &self,
        client: &Client,
        request: Request<Incoming>,
        request_id: &RequestId,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if self.shutting_down.load(SeqCst) {
            return Err(ProxyError::ShuttingDown);
        }
        let qualifier = route::qualifier(request.uri().query())?;
        match route::parse(request.uri().path())? {
            Route::Invocation {
                namespace,
                function,
            } => {
                let function = self.router.lookup(namespace, function, &qualifier)?;
                let settings = function.settings();
                require_kind(&function, &settings, FunctionKind::Event)?;
                let invocation = Invocation::new(Arc::clone(&function));
                let result = crate::event::invoke(&function, settings, request, request_id).await;
                finish_on_error(invocation, result)
            }
            Route::Web {
                namespace,
                function,
                rest,
            } => {
                let function = self.router.lookup(namespace, function, &qualifier)?;
                let settings = function.settings();
                require_kind(&function, &settings, FunctionKind::Web)?;
                let upstream_uri = upstream_uri(rest, request.uri().query())?;
                let invocation = Invocation::new(Arc::clone(&function));
                let call = WebCall {
                    function,
                    settings,
                    upstream_uri,
                    invocation,
                };
                self.invoke_web(call, client, request, request_id).await
            }
        }
    }

    async fn invoke_web(
        &self,
        call: WebCall,
        client: &Client,
        mut request: Request<Incoming>,
        request_id: &RequestId,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let WebCall {
            function,
            settings,
            upstream_uri,
            invocation,
        } = call;
        if content_length(request.headers()).is_some_and(|len| len > settings.max_body_bytes) {
            return finish_on_error(
                invocation,
                Err(ProxyError::BodyTooLarge {
                    limit: settings.max_body_bytes,
                }),
            );
        }
        let upgrade = headers::is_upgrade(request.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));

        let (mut parts, body) = request.into_parts();
        parts.uri = upstream_uri;
        // Reserves room for the three forwarding and six `X-Scf-*` headers in one step, so that
        // adding them does not grow the map again. hyper parses at most 100 request headers, far
        // below the map's size limit, so reserving cannot fail.
        let _ = parts.headers.try_reserve(9);
        headers::remove_hop_by_hop(&mut parts.headers, upgrade);
        headers::add_forwarding(&mut parts.headers, &client.forwarded_for, "http");
        function.set_scf_headers(&mut parts.headers, request_id.header_value(), &settings);
        let limit = usize::try_from(settings.max_body_bytes).unwrap_or(usize::MAX);
        let upstream = Request::from_parts(parts, Either::Right(Limited::new(body, limit)));

        let dispatched = match self.dispatch(&function, &settings, upstream).await {
            Ok(dispatched) => dispatched,
            Err(error) => return finish_on_error(invocation, Err(error)),
        };
        let Dispatched {
            mut response,
            sender,
            permit,
            deadline,
        } = dispatched;
        let timing = server_timing(&function, &permit);

        if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) =
            (client_upgrade, response.status())
        {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(crate::tunnel::run(
                client_upgrade,
                upstream_upgrade,
                permit,
                invocation,
            ));
            drop(sender);
            let (parts, _) = response.into_parts();
            let mut response = Response::from_parts(parts, Either::Left(Full::new(Bytes::new())));
            add_timing(&mut response, timing);
            return Ok(response);
        }

        let (mut parts, body) = response.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers, false);
        let body = WebBody::new(body, deadline, settings.timeout, permit, sender, invocation);
        let mut response = Response::from_parts(parts, Either::Right(body));
        add_timing(&mut response, timing);
        Ok(response)
    }

    /// Takes a slot and sends the request, moving to another instance when the request provably
    /// never reached the chosen one.
    async fn dispatch(
        &self,
        function: &Arc<Function>,
        settings: &FunctionSettings,
        mut request: Request<UpstreamBody>,
    ) -> Result<Dispatched, ProxyError> {
        let queue_deadline = Instant::now() + settings.queue_budget;
        let mut last_cause = String::new();
        for _ in 0..=MAX_RETRIES {
            let permit = acquire(function, settings, queue_deadline, &last_cause).await?;
            // One timer for the whole execution: the response body keeps it, so a request
            // registers one timer rather than one for the headers and one for the body.
            let mut deadline =
                Box::pin(tokio::time::sleep_until(Instant::now() + settings.timeout));
            let instance = Arc::clone(permit.instance());
            let sent = tokio::select! {
                biased;
                sent = upstream::send(&instance, request) => sent,
                () = deadline.as_mut() => return Err(timeout_error(function, settings)),
            };
            match sent {
                Ok((response, sender)) => {
                    return Ok(Dispatched {
                        response,
                        sender,
                        permit,
                        deadline,
                    })
                }
                Err(SendError::Failed(error)) if exceeded_body_limit(&error) => {
                    return Err(ProxyError::BodyTooLarge {
                        limit: settings.max_body_bytes,
                    })
                }
                Err(SendError::Failed(error)) => {
                    return Err(upstream_failed(function, &permit, &error.to_string()))
                }
                Err(SendError::NotSent {
                    request: unsent,
                    cause,
                }) => {
                    fail_instance(function, &instance, &cause);
                    function.metrics().record_retry();
                    drop(permit);
                    request = *unsent;
                    last_cause = cause;
                }
            }
        }
        Err(retries_exhausted(function, &last_cause))
    }
}

/// True when sending failed because the streamed request body passed the function's limit.
fn exceeded_body_limit(error: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<LengthLimitError>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Takes a slot before `queue_deadline`, recording the time spent queued.
pub(crate) async fn acquire(
    function: &Arc<Function>,
    settings: &FunctionSettings,
    queue_deadline: Instant,
    last_cause: &str,
) -> Result<Permit, ProxyError> {
    let budget = queue_deadline.saturating_duration_since(Instant::now());
    let permit = match function.pool.acquire(budget).await {
        Ok(permit) => permit,
        Err(error) => return Err(acquire_error(function, settings, error, last_cause)),
    };
    if let Some(waited) = permit.queued_for() {
        function.metrics().record_queue_wait(waited);
    }
    Ok(permit)
}

/// Takes an instance out of routing and wakes the scaler, which stops and replaces it.
pub(crate) fn fail_instance(function: &Function, instance: &Instance, cause: &str) {
    tracing::warn!(function = %function.key, instance = instance.id(), %cause,
        "taking instance out of routing");
    function
        .pool
        .remove_instance(instance.id(), InstanceState::Failed);
    function.pool.notify_demand();
}

pub(crate) fn retries_exhausted(function: &Function, last_cause: &str) -> ProxyError {
    ProxyError::NoInstance {
        function: function.key.to_string(),
        message: format!(
            "no instance took the request after {} attempts; last error: {last_cause}",
            MAX_RETRIES + 1
        ),
    }
}

fn require_kind(
    function: &Function,
    settings: &FunctionSettings,
    expected: FunctionKind,
) -> Result<(), ProxyError> {
    let actual = settings.kind;
    if actual == expected {
        return Ok(());
    }
    let hint = match actual {
        FunctionKind::Event => format!(
            "it is an event function; invoke it with POST /functions/{}/{}/invocations",
            function.key.namespace, function.key.name
        ),
        FunctionKind::Web => format!(
            "it is a web function; send requests under /web/{}/{}/",
            function.key.namespace, function.key.name
        ),
    };
    Err(ProxyError::InvalidRequest(format!(
        "function {}/{} cannot be called this way: {hint}",
        function.key.namespace, function.key.name
    )))
}

/// Records the outcome of a failed invocation and passes the result on.
pub(crate) fn finish_on_error(
    invocation: Invocation,
    result: Result<Response<ProxyBody>, ProxyError>,
) -> Result<Response<ProxyBody>, ProxyError> {
    match &result {
        Ok(response) if response.status().is_success() => invocation.finish(Outcome::Success),
        Ok(_) => invocation.finish(Outcome::UserError),
        Err(error) => invocation.finish(error.classify().2),
    }
    result
}

pub(crate) fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn upstream_uri(rest: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
    let query_len = query.map_or(0, |query| query.len() + 1);
    let mut path_and_query = String::with_capacity(rest.len() + query_len);
    path_and_query.push_str(rest);
    if let Some(query) = query {
        path_and_query.push('?');
        path_and_query.push_str(query);
    }
    // Converting the `String` hands its buffer to the URI, where parsing a `&str` would copy it.
    Uri::try_from(path_and_query)
        .map_err(|error| ProxyError::InvalidRequest(format!("invalid request path: {error}")))
}

pub(crate) fn acquire_error(
    function: &Function,
    settings: &FunctionSettings,
    error: AcquireError,
    last_cause: &str,
) -> ProxyError {
    let name = function.key.to_string();
    match error {
        AcquireError::QueueFull { .. } => ProxyError::QueueFull {
            function: name,
            source: error,
        },
        AcquireError::StartFailed { reason } => ProxyError::StartFailed {
            function: name,
            reason,
        },
        AcquireError::BudgetExceeded {
            last_start_failure, ..
        } => {
            // Retries shrink the remaining budget; report the function's whole budget.
            let mut message = AcquireError::BudgetExceeded {
                budget: settings.queue_budget,
                last_start_failure: None,
            }
            .to_string();
            match last_start_failure {
                Some(reason) => message.push_str(&format!("; last start failure: {reason}")),
                None if function.pool.capacity_note().is_some() => {
                    let note = function.pool.capacity_note().unwrap_or_default();
                    message.push_str(&format!("; {note}"));
                }
                None if !last_cause.is_empty() => {
                    message.push_str(&format!("; last error: {last_cause}"))
                }
                None => message.push_str("; raise the function's max_instances or queue_budget_ms"),
            }
            ProxyError::NoInstance {
                function: name,
                message,
            }
        }
        AcquireError::ShuttingDown => ProxyError::ShuttingDown,
        AcquireError::Removed => ProxyError::NoInstance {
            function: name,
            message: "the function was removed while the request waited".to_owned(),
        },
    }
}

pub(crate) fn timeout_error(function: &Function, settings: &FunctionSettings) -> ProxyError {
    ProxyError::Timeout {
        function: function.key.to_string(),
        timeout: settings.timeout,
    }
}

pub(crate) fn upstream_failed(function: &Function, permit: &Permit, cause: &str) -> ProxyError {
    ProxyError::UpstreamFailed {
        function: function.key.to_string(),
        instance: permit.instance().id(),
        cause: cause.to_owned(),
    }
}

/// `Server-Timing` value for a request that waited for a slot: time queued, and the instance's
/// boot time when this request is the first it serves (a cold start).
pub(crate) fn server_timing(function: &Function, permit: &Permit) -> Option<HeaderValue> {
    let first_use = permit.instance().take_first_use();
    let queued = permit.queued_for()?;
    let mut value = format!("queue;dur={:.3}", millis(queued));
    if first_use {
        function.metrics().record_cold_start();
        value.push_str(&format!(
            ", boot;dur={:.3}",
            millis(permit.instance().boot_time())
        ));
    }
    HeaderValue::from_str(&value).ok()
}

pub(crate) fn add_timing(response: &mut Response<ProxyBody>, timing: Option<HeaderValue>) {
    if let Some(timing) = timing {
        response.headers_mut().insert(SERVER_TIMING, timing);
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
