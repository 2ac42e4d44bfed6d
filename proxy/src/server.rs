//! Listeners: binding with the socket options a proxy needs, and an accept loop that serves HTTP/1.1
//! (with protocol upgrades) until shutdown, then drains open connections.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use crate::admin::Admin;
use crate::handler::{Client, Proxy};

/// Pending connections the kernel queues before `accept`.
const LISTEN_BACKLOG: i32 = 1024;

/// How long a client may take to send request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// After the shutdown grace period, how long queued requests get to send their 503 before
/// every remaining connection is closed.
const FORCE_CLOSE_DELAY: Duration = Duration::from_secs(1);

/// Binds a TCP listener with `SO_REUSEADDR`, so a restarted proxy can bind while old
/// connections sit in TIME_WAIT.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Binds `threads` TCP listeners to `addr` with `SO_REUSEPORT`, one per proxy worker thread. The
/// kernel spreads new connections across them. With port 0 the first listener picks the port and
/// the others bind to it.
///
/// Linux admits any socket of the same user with `SO_REUSEPORT` into the group, so a second
/// fngate on the same port would silently take part of the connections. A fixed port is first
/// bound without `SO_REUSEPORT`, which fails while anything listens on it.
pub fn bind_workers(
    addr: SocketAddr,
    threads: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        probe.set_reuse_address(true)?;
        probe.bind(&addr.into())?;
    }
    let mut addr = addr;
    let mut listeners = Vec::with_capacity(threads.max(1));
    for _ in 0..threads.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        let listener = std::net::TcpListener::from(socket);
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Sizes each instance's connection lists for `threads` proxy workers. Call it before the first
/// instance is created. [`spawn_workers`] calls it too, in case nothing did.
pub fn set_worker_threads(threads: usize) {
    crate::upstream::worker::set_count(threads);
}

/// Proxy worker threads started by [`spawn_workers`].
pub struct Workers {
    done: Vec<tokio::sync::oneshot::Receiver<()>>,
}

impl Workers {
    /// Resolves once every worker has drained its connections and stopped.
    pub async fn stopped(self) {
        for done in self.done {
            let _ = done.await;
        }
    }
}

/// Serves the proxy on one thread per listener, each with its own single-threaded tokio runtime.
/// A client connection, the requests on it and the instance connections they use then stay on
/// one thread, so forwarding a request needs no wake-up across threads. Each worker stops as
/// [`serve_proxy`] does once `stop` turns true.
pub fn spawn_workers(
    listeners: Vec<std::net::TcpListener>,
    proxy: Arc<Proxy>,
    stop: tokio::sync::watch::Receiver<bool>,
    grace: Duration,
) -> std::io::Result<Workers> {
    if !crate::upstream::worker::set_count(listeners.len()) {
        tracing::debug!(
            threads = listeners.len(),
            "instance connection lists were sized before the workers started; workers share them"
        );
    }
    let mut done = Vec::with_capacity(listeners.len());
    for (index, listener) in listeners.into_iter().enumerate() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let proxy = Arc::clone(&proxy);
        let mut stop = stop.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("fngate-proxy-{index}"))
            .spawn(move || {
                crate::upstream::worker::enter(index);
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(error) => {
                            tracing::error!(%error, worker = index, "proxy worker failed to register its listener and serves no connections");
                            return;
                        }
                    };
                    let shutdown = async move {
                        let _ = stop.wait_for(|stop| *stop).await;
                    };
                    serve_proxy(listener, proxy, shutdown, grace).await;
                });
                // Connection tasks still open after the forced close end with the runtime.
                drop(runtime);
                let _ = done_tx.send(());
            })?;
        done.push(done_rx);
    }
    Ok(Workers { done })
}

/// Serves the proxy on `listener` until `shutdown` resolves, then stops accepting and lets open
/// requests finish for up to `grace`. After that, queued requests get 503 and every connection
/// still open is closed.
pub async fn serve_proxy(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    // Each connection task holds a clone of `open_tx`; `open_rx` yields `None` once all closed.
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (force_tx, force_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let proxy = Arc::clone(&proxy);
        let peer = Client::new(client);
        let service = service_fn(move |request| {
            let proxy = Arc::clone(&proxy);
            let peer = peer.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(&peer, request).await) }
        });
        let connection = http1::Builder::new()
            .max_buf_size(crate::upstream::MAX_READ_BUFFER)
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let open = open_tx.clone();
        let stop = stop_rx.clone();
        let force = force_rx.clone();
        tokio::spawn(async move {
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => Some(result),
                () = flag_set(stop) => {
                    // Finishes the request in flight, then closes instead of keeping alive.
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        result = connection.as_mut() => Some(result),
                        () = flag_set(force) => None,
                    }
                }
            };
            if let Some(Err(error)) = result {
                tracing::debug!(%client, %error, "client connection ended with an error");
            }
            drop(open);
        });
    }
    drop(listener);
    proxy.start_shutdown();
    let _ = stop_tx.send(true);
    drop(open_tx);
    if tokio::time::timeout(grace, open_rx.recv()).await.is_err() {
        // Each worker thread logs its own connections, so the line names the worker.
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            worker = crate::upstream::worker::index(),
            "connections still open after the shutdown grace period; failing queued requests and closing connections"
        );
        proxy.fail_queued();
        let _ = tokio::time::timeout(FORCE_CLOSE_DELAY, open_rx.recv()).await;
        let _ = force_tx.send(true);
    }
}

/// Resolves once the flag is true, or at once when its sender is gone.
async fn flag_set(mut flag: tokio::sync::watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve_admin(listener: TcpListener, admin: Admin, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let admin = admin.clone();
        let service = service_fn(move |request| {
            let admin = admin.clone();
            async move { admin.handle(request).await }
        });
        tokio::spawn(async move {
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                tracing::debug!(%client, %error, "admin connection ended with an error");
            }
        });
    }
}
