//! A small HTTP/1 server: an accept loop that serves each connection in its own task, and a
//! handle that stops accepting and lets in-flight responses finish.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Pause after a failed accept, so a full file descriptor table does not spin the loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Request handler of one listener. Every request gets a response, so the error type is
/// `Infallible`.
pub(crate) trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// A running server. Dropping it aborts the accept loop and every connection.
#[derive(Debug)]
pub(crate) struct ServerHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// Stops accepting, signals every connection to close after its current response, and
    /// waits up to `max_wait` for them. Connections still open after that are aborted.
    pub(crate) async fn shutdown(mut self, max_wait: Duration) {
        self.stop.send_replace(true);
        if tokio::time::timeout(max_wait, &mut self.task)
            .await
            .is_err()
        {
            tracing::warn!(
                max_wait_ms = max_wait.as_millis(),
                "connections still open at shutdown; closing them"
            );
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `handler` on `listener` until the returned handle is shut down or dropped.
pub(crate) fn spawn<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    name: &'static str,
) -> ServerHandle {
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(listener, handler, stop_rx, name));
    ServerHandle { stop, task }
}

async fn accept_loop<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    mut stop_rx: watch::Receiver<bool>,
    name: &'static str,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(stream, peer, handler.clone(), stop_rx.clone()));
                }
                Err(error) => {
                    tracing::warn!(listener = name, %error, "failed to accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next() => {}
            _ = stop_requested(&mut stop_rx) => break,
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn serve_connection<H: Handler>(
    stream: TcpStream,
    peer: SocketAddr,
    handler: Arc<H>,
    mut stop_rx: watch::Receiver<bool>,
) {
    let service = service_fn(move |request| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler.handle(request).await) }
    });
    let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);

    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = stop_requested(&mut stop_rx) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// Completes once a stop is requested or the handle is gone.
async fn stop_requested(stop_rx: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped, which also means stop.
    let _ = stop_rx.wait_for(|stop| *stop).await;
}
