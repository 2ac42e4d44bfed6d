//! Forwarding through a real proxy listener to real upstream sockets on loopback: retries only
//! when a request provably never reached an instance, protocol upgrades, streamed bodies.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fngate_proxy::{
    server, FunctionKey, FunctionKind, FunctionSettings, Instance, InstanceState, Proxy, Router,
};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

fn settings(kind: FunctionKind) -> FunctionSettings {
    FunctionSettings {
        kind,
        memory_mb: 128,
        timeout: Duration::from_secs(10),
        queue_budget: Duration::from_secs(5),
        queue_limit: 100,
        max_body_bytes: 1 << 20,
        concurrency: 4,
    }
}

fn key(name: &str) -> FunctionKey {
    FunctionKey {
        namespace: "default".into(),
        name: name.into(),
        qualifier: "$LATEST".into(),
    }
}

/// Starts a proxy on port 0 and returns its address.
async fn start_proxy(router: Arc<Router>) -> SocketAddr {
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = Arc::new(Proxy::new(router));
    tokio::spawn(server::serve_proxy(
        listener,
        proxy,
        std::future::pending(),
        Duration::from_secs(1),
    ));
    addr
}

/// A hyper upstream that echoes the request body and reports the path and some headers.
async fn echo_upstream(connections: Arc<AtomicUsize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            connections.fetch_add(1, SeqCst);
            let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                let path = request.uri().to_string();
                let forwarded = request
                    .headers()
                    .get("x-forwarded-for")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let hop = request.headers().contains_key("x-hop");
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let response = Response::builder()
                    .header("x-path", path)
                    .header("x-saw-forwarded-for", forwarded)
                    .header("x-saw-hop", hop.to_string())
                    .header("connection", "keep-alive, x-upstream-hop")
                    .header("x-upstream-hop", "1")
                    .body(Full::new(body))
                    .unwrap();
                Ok::<_, Infallible>(response)
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// Returns an address where nothing listens.
async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

async fn send(proxy: SocketAddr, request: Request<Full<Bytes>>) -> (u16, hyper::HeaderMap, Bytes) {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

fn web_request(path: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("host", "proxy")
        .header("connection", "x-hop")
        .header("x-hop", "secret")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

#[tokio::test]
async fn connect_failure_retries_on_another_instance() {
    let router = Arc::new(Router::new());
    let function = router.upsert(key("site"), settings(FunctionKind::Web));
    let dead = Arc::new(Instance::new(1, dead_addr().await, 4, Duration::ZERO));
    let live_addr = echo_upstream(Arc::default()).await;
    function.pool.add_instance(Arc::clone(&dead));
    function
        .pool
        .add_instance(Arc::new(Instance::new(2, live_addr, 4, Duration::ZERO)));
    let proxy = start_proxy(Arc::clone(&router)).await;

    // Every request succeeds whichever instance it picks first.
    for _ in 0..10 {
        let (status, _, body) = send(proxy, web_request("/web/default/site/x", "hello")).await;
        assert_eq!(status, 200);
        assert_eq!(body, "hello");
    }
    assert_eq!(
        dead.state(),
        InstanceState::Failed,
        "unreachable instance still routable"
    );
    let routable: Vec<u64> = function.pool.instances().iter().map(|i| i.id()).collect();
    assert_eq!(routable, vec![2]);
    assert_eq!(function.pool.demand(), Default::default());
}

#[tokio::test]
async fn headers_forwarded_and_hop_by_hop_removed() {
    let router = Arc::new(Router::new());
    let function = router.upsert(key("site"), settings(FunctionKind::Web));
    let upstream = echo_upstream(Arc::default()).await;
    function
        .pool
        .add_instance(Arc::new(Instance::new(1, upstream, 4, Duration::ZERO)));
    let proxy = start_proxy(router).await;

    let (status, headers, _) = send(proxy, web_request("/web/default/site/a/b?q=1", "")).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-path"], "/a/b?q=1");
    assert_eq!(headers["x-saw-forwarded-for"], "127.0.0.1");
    assert_eq!(
        headers["x-saw-hop"], "false",
        "hop-by-hop request header reached the instance"
    );
    assert!(
        !headers.contains_key("x-upstream-hop"),
        "hop-by-hop response header reached the client"
    );
    assert!(headers.contains_key("x-request-id"));
}

#[tokio::test]
async fn pooled_connections_reused() {
    let router = Arc::new(Router::new());
    let function = router.upsert(key("site"), settings(FunctionKind::Web));
    let connections = Arc::new(AtomicUsize::new(0));
    let upstream = echo_upstream(Arc::clone(&connections)).await;
    function
        .pool
        .add_instance(Arc::new(Instance::new(1, upstream, 4, Duration::ZERO)));
    let proxy = start_proxy(router).await;

    for _ in 0..5 {
        let (status, _, _) = send(proxy, web_request("/web/default/site/", "x")).await;
        assert_eq!(status, 200);
    }
    assert_eq!(
        connections.load(SeqCst),
        1,
        "upstream connection was not kept alive"
    );
}

/// Reads one HTTP/1.1 request head and a Content-Length body from a raw socket.
async fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.ok()?;
    Some(body)
}

#[tokio::test]
async fn idle_connection_closed_by_instance_is_retried() {
    // This upstream answers one request per connection with a keep-alive response and then
    // closes, as a server with a short idle timeout does.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::channel(8);
    let counter = Arc::clone(&requests);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let mut reader = BufReader::new(stream);
            if read_request(&mut reader).await.is_some() {
                counter.fetch_add(1, SeqCst);
                let stream = reader.get_mut();
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
            drop(reader);
            closed_tx.send(()).await.unwrap();
        }
    });
    let router = Arc::new(Router::new());
    let function = router.upsert(key("site"), settings(FunctionKind::Web));
    let instance = Arc::new(Instance::new(1, upstream, 4, Duration::ZERO));
    function.pool.add_instance(Arc::clone(&instance));
    let proxy = start_proxy(router).await;

    for round in 1..=3 {
        let (status, _, body) = send(proxy, web_request("/web/default/site/", "")).await;
        assert_eq!(status, 200, "round {round}");
        assert_eq!(body, "ok");
        closed_rx.recv().await.unwrap();
    }
    assert_eq!(requests.load(SeqCst), 3, "a request was sent twice");
    assert_eq!(
        instance.state(),
        InstanceState::Ready,
        "a closed idle connection failed the instance"
    );
}

#[tokio::test]
async fn request_that_reached_instance_not_retried() {
    // This upstream reads the request, then closes without answering.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&requests);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let mut reader = BufReader::new(stream);
            if read_request(&mut reader).await.is_some() {
                counter.fetch_add(1, SeqCst);
            }
        }
    });
    let router = Arc::new(Router::new());
    let function = router.upsert(key("job"), settings(FunctionKind::Event));
    function
        .pool
        .add_instance(Arc::new(Instance::new(1, upstream, 4, Duration::ZERO)));
    let second = echo_upstream(Arc::default()).await;
    function
        .pool
        .add_instance(Arc::new(Instance::new(2, second, 4, Duration::ZERO)));
    let proxy = start_proxy(router).await;

    // Least-loaded picking with ties broken at random sends some requests to the first instance.
    let mut failures = 0;
    for _ in 0..20 {
        let request = Request::post("/functions/default/job/invocations")
            .header("host", "proxy")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let (status, _, body) = send(proxy, request).await;
        if status == 502 {
            failures += 1;
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["error"]["code"], "ContainerStateExited");
        } else {
            assert_eq!(status, 200);
        }
    }
    assert_eq!(
        failures,
        requests.load(SeqCst),
        "a request that reached an instance was retried"
    );
    assert!(failures > 0, "no request picked the failing instance");
}

#[tokio::test]
async fn upgrade_passes_through_and_holds_slot() {
    // This upstream switches protocols, then echoes bytes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut reader = BufReader::new(stream);
        read_request(&mut reader).await.unwrap();
        let mut stream = reader.into_inner();
        stream
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
            )
            .await
            .unwrap();
        let mut buffer = [0u8; 64];
        loop {
            let n = stream.read(&mut buffer).await.unwrap();
            if n == 0 {
                break;
            }
            stream.write_all(&buffer[..n]).await.unwrap();
        }
    });
    let router = Arc::new(Router::new());
    let function = router.upsert(key("chat"), settings(FunctionKind::Web));
    function
        .pool
        .add_instance(Arc::new(Instance::new(1, upstream, 4, Duration::ZERO)));
    let proxy = start_proxy(Arc::clone(&router)).await;

    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"GET /web/default/chat/ws HTTP/1.1\r\nhost: proxy\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut reader = BufReader::new(client);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).await.unwrap();
    assert!(status_line.starts_with("HTTP/1.1 101"), "{status_line}");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
    }
    let mut client = reader.into_inner();
    client.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    client.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping");
    assert_eq!(
        function.pool.demand().in_flight,
        1,
        "the tunnel does not hold its slot"
    );

    drop(client);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while function.pool.demand().in_flight != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot not returned after the tunnel closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
