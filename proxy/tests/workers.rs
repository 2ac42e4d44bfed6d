//! Proxy worker threads: one listener per worker on a shared port (`SO_REUSEPORT`), and
//! instance connections that stay with the worker that opened them.
//!
//! The number of connection lists per instance is fixed once per process, so these tests live
//! in their own test binary and all use two workers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fngate_proxy::{server, FunctionKey, FunctionKind, FunctionSettings, Instance, Proxy, Router};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

const WORKERS: usize = 2;

/// Client connections opened before giving up on the kernel spreading them over both workers.
/// Each lands on a given worker with probability 1/2, so a correct proxy fails this bound with
/// probability 2^-63.
const MAX_CONNECTIONS: usize = 64;

fn key() -> FunctionKey {
    FunctionKey {
        namespace: "default".into(),
        name: "site".into(),
        qualifier: "$LATEST".into(),
    }
}

fn settings() -> FunctionSettings {
    FunctionSettings {
        kind: FunctionKind::Web,
        memory_mb: 128,
        timeout: Duration::from_secs(10),
        queue_budget: Duration::from_secs(5),
        queue_limit: 100,
        max_body_bytes: 1 << 20,
        concurrency: 4,
    }
}

/// Starts a hyper upstream that echoes each request body and counts the connections it
/// accepted.
async fn upstream(accepted: Arc<AtomicUsize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            accepted.fetch_add(1, SeqCst);
            let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                let body = request.into_body().collect().await.unwrap().to_bytes();
                Ok::<_, Infallible>(Response::new(Full::new(body)))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// Sends one request on a new client connection and returns the status and body.
async fn call(proxy: SocketAddr, body: &'static str) -> (u16, Bytes) {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::post("/web/default/site/")
        .header("host", "proxy")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

#[tokio::test]
async fn workers_keep_own_instance_connections() {
    server::set_worker_threads(WORKERS);
    let router = Arc::new(Router::new());
    let function = router.upsert(key(), settings());
    let accepted = Arc::new(AtomicUsize::new(0));
    let instance = upstream(Arc::clone(&accepted)).await;
    function
        .pool
        .add_instance(Arc::new(Instance::new(1, instance, 4, Duration::ZERO)));

    let listeners = server::bind_workers("127.0.0.1:0".parse().unwrap(), WORKERS).unwrap();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    assert_eq!(ports.len(), WORKERS);
    assert!(
        ports.iter().all(|&port| port == ports[0] && port != 0),
        "workers listen on different ports: {ports:?}"
    );
    let proxy_addr = listeners[0].local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let proxy = Arc::new(Proxy::new(Arc::clone(&router)));
    let workers = server::spawn_workers(listeners, proxy, stop_rx, Duration::from_secs(5)).unwrap();

    // One request at a time: a worker that reused another's connection would never open a
    // second one, and a worker that did not reuse its own would open one per request.
    let mut opened = 0;
    while accepted.load(SeqCst) < WORKERS {
        assert!(
            opened < MAX_CONNECTIONS,
            "{opened} client connections reached {} instance connection(s); \
             each worker should have opened its own",
            accepted.load(SeqCst)
        );
        let (status, body) = call(proxy_addr, "spread").await;
        assert_eq!((status, body.as_ref()), (200, b"spread".as_ref()));
        opened += 1;
    }
    for _ in 0..32 {
        let (status, body) = call(proxy_addr, "reuse").await;
        assert_eq!((status, body.as_ref()), (200, b"reuse".as_ref()));
    }
    assert_eq!(
        accepted.load(SeqCst),
        WORKERS,
        "workers opened instance connections instead of reusing their own"
    );

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), workers.stopped())
        .await
        .expect("workers did not stop after the stop signal");
    let refused = TcpStream::connect(proxy_addr).await;
    assert!(
        refused.is_err(),
        "the support service port still accepts connections after the workers stopped"
    );
}

#[test]
fn second_group_on_port_rejected() {
    let first = server::bind_workers("127.0.0.1:0".parse().unwrap(), WORKERS).unwrap();
    let addr = first[0].local_addr().unwrap();
    let second = server::bind_workers(addr, WORKERS);
    assert_eq!(
        second
            .map(|listeners| listeners.len())
            .map_err(|e| e.kind()),
        Err(std::io::ErrorKind::AddrInUse),
        "a second set of workers joined the listeners on {addr}"
    );
    drop(first);
    let again = server::bind_workers(addr, WORKERS).expect("port still taken after closing");
    assert_eq!(again.len(), WORKERS);
}
