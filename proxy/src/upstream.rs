//! Connections from the proxy to instances: a small idle pool per instance, and sending with a
//! precise record of whether the request could have reached the instance.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;

use crate::instance::Instance;

/// Body sent to an instance: a buffered event, or a web request streamed with a size limit.
pub type UpstreamBody = Either<Full<Bytes>, Limited<Incoming>>;

pub(crate) type Sender = SendRequest<UpstreamBody>;

/// Largest read buffer of one client or instance connection. hyper's default lets a buffer grow
/// to about 400 KiB while bodies stream through and keeps it while the connection idles. With
/// 64 KiB bodies at 256 connections that was most of the proxy's memory (peak 166 MiB, and
/// 110 MiB with this bound). Large bodies then take more reads, which cost 64 KiB POSTs
/// throughput in the benchmark (BENCHMARKS.md).
pub(crate) const MAX_READ_BUFFER: usize = 64 * 1024;

/// How long a TCP connect to an instance may take before the instance counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Idle keep-alive connections to one instance, one list per proxy worker thread.
///
/// hyper drives each connection from a task on the runtime that opened it. On a single-threaded
/// worker runtime, a request that reused another worker's connection would wake that worker twice
/// per request, so a worker reuses only its own connections and opens new ones otherwise. Each
/// list keeps at most as many connections as the instance has slots, since HTTP/1.1 carries one
/// request per connection at a time. Outside worker threads (a multi-threaded runtime, tests) all
/// callers share the first list.
pub(crate) struct ConnPool {
    idle: Box<[Mutex<Vec<Sender>>]>,
    max_idle: usize,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle: usize = self.idle.iter().map(|list| list.lock().len()).sum();
        f.debug_struct("ConnPool").field("idle", &idle).finish()
    }
}

impl ConnPool {
    pub(crate) fn new(max_idle: usize) -> Self {
        let lists = worker::count();
        ConnPool {
            idle: (0..lists).map(|_| Mutex::new(Vec::new())).collect(),
            max_idle,
        }
    }

    fn own(&self) -> &Mutex<Vec<Sender>> {
        &self.idle[worker::index() % self.idle.len()]
    }

    fn take(&self) -> Option<Sender> {
        self.own().lock().pop()
    }

    /// Returns a connection whose last response was read to the end. Called on the thread that
    /// took or opened it: tasks on a worker's single-threaded runtime never move.
    pub(crate) fn put(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.own().lock();
        if idle.len() < self.max_idle {
            idle.push(sender);
        }
    }

    pub(crate) fn clear(&self) {
        for list in self.idle.iter() {
            list.lock().clear();
        }
    }
}

/// The index of the proxy worker thread running the current code, for [`ConnPool`].
pub(crate) mod worker {
    use std::cell::Cell;
    use std::sync::OnceLock;

    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(0) };
    }

    static COUNT: OnceLock<usize> = OnceLock::new();

    /// Number of connection lists per instance. Fixed at the first call: by
    /// [`set_count`] when the process runs worker threads, otherwise 1.
    pub(crate) fn count() -> usize {
        *COUNT.get_or_init(|| 1)
    }

    /// Sets the number of worker threads before any instance exists. Returns false when the
    /// count was already fixed to another value.
    pub(crate) fn set_count(threads: usize) -> bool {
        *COUNT.get_or_init(|| threads.max(1)) == threads.max(1)
    }

    pub(crate) fn index() -> usize {
        INDEX.with(Cell::get)
    }

    pub(crate) fn enter(index: usize) {
        INDEX.with(|cell| cell.set(index));
    }
}

/// Failure to send a request to an instance.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No byte of the request reached the instance, so sending it to another instance is safe.
    /// Carries the request back.
    NotSent {
        request: Box<Request<UpstreamBody>>,
        cause: String,
    },
    /// The request was written, at least in part, and then the exchange failed.
    Failed(hyper::Error),
}

/// Sends `request` to `instance` on a pooled connection or a new one. Returns the response and
/// the connection, which the caller puts back once the response body was read to the end.
pub(crate) async fn send(
    instance: &Instance,
    mut request: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, Sender), SendError> {
    while let Some(mut sender) = instance.conns.take() {
        if sender.is_closed() || !sender.is_ready() {
            continue;
        }
        match sender.try_send_request(request).await {
            Ok(response) => return Ok((response, sender)),
            Err(mut error) => match error.take_message() {
                // The pooled connection was closed before anything was written.
                Some(unsent) => request = unsent,
                None => return Err(SendError::Failed(error.into_error())),
            },
        }
    }
    let mut sender = match connect(instance.addr()).await {
        Ok(sender) => sender,
        Err(cause) => {
            return Err(SendError::NotSent {
                request: Box::new(request),
                cause,
            })
        }
    };
    match sender.try_send_request(request).await {
        Ok(response) => Ok((response, sender)),
        Err(mut error) => match error.take_message() {
            Some(request) => Err(SendError::NotSent {
                request: Box::new(request),
                cause: format!(
                    "connection to {} closed: {}",
                    instance.addr(),
                    error.error()
                ),
            }),
            None => Err(SendError::Failed(error.into_error())),
        },
    }
}

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(format!("connect to {addr} failed: {error}")),
        Err(_) => {
            return Err(format!(
                "connect to {addr} timed out after {}ms",
                CONNECT_TIMEOUT.as_millis()
            ))
        }
    };
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::Builder::new()
        .max_buf_size(MAX_READ_BUFFER)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|error| format!("HTTP handshake with {addr} failed: {error}"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%addr, %error, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}
