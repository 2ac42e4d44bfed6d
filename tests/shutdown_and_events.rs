//! Shutdown limits and event-invocation slot handling, through the real binary.

mod common;

use common::*;
use tokio::io::AsyncWriteExt;

fn function_toml(name: &str, kind: &str, code: &Code, extra: &str) -> String {
    format!(
        "[[function]]\nnamespace = \"default\"\nname = \"{name}\"\nkind = \"{kind}\"\ncode = {{ directory = \"{}\" }}\n{extra}\n",
        code.dir.display()
    )
}

/// Custom runtime whose invocations take one second, or hang when the event is `"hang"`.
const SLOW_BOOTSTRAP: &str = r#"#!/bin/bash
api="http://$SCF_RUNTIME_API:$SCF_RUNTIME_API_PORT"
curl -sS -X POST "$api/runtime/init/ready" -d ' ' >/dev/null || exit 1
while true; do
  event=$(curl -sS "$api/runtime/invocation/next") || exit 0
  if [ "$event" = '"hang"' ]; then sleep 100; fi
  sleep 1
  curl -sS -X POST "$api/runtime/invocation/response" -d "{\"pid\": $$}" >/dev/null
done
"#;

async fn raw_post(addr: std::net::SocketAddr, path: &str, body: &str) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// A departed client's event keeps running on the instance, so its slot stays taken until the
/// event finishes. Otherwise the next event would be sent to the busy instance and spend its
/// execution timeout waiting there.
#[tokio::test]
async fn departed_event_client_keeps_slot() {
    let dir = tempdir();
    let code = script_function(dir.path(), "slow", "bootstrap", SLOW_BOOTSTRAP);
    let extra = "max_instances = 1\ntimeout_ms = 1500\nqueue_budget_ms = 20000";
    let fngate = Fngate::start(
        dir,
        &platform_file(&function_toml("slow", "event", &code, extra)),
    );
    assert_eq!(invoke(&fngate, "default", "slow", "{}").await.status, 200);
    let labels = [("function", "slow")];

    let departed = raw_post(fngate.proxy, "/functions/default/slow/invocations", "{}").await;
    fngate
        .wait_for_metric("fngate_in_flight_requests", &labels, |v| v == 1.0)
        .await;
    drop(departed);

    let next = invoke(&fngate, "default", "slow", "{}").await;
    assert_eq!(next.status, 200, "{}", next.text());
    fngate
        .wait_for_metric("fngate_in_flight_requests", &labels, |v| v == 0.0)
        .await;
}

#[tokio::test]
async fn event_timeout_replaces_instance() {
    let dir = tempdir();
    let code = script_function(dir.path(), "stuck", "bootstrap", SLOW_BOOTSTRAP);
    let extra = "max_instances = 1\ntimeout_ms = 1500\nqueue_budget_ms = 20000";
    let fngate = Fngate::start(
        dir,
        &platform_file(&function_toml("stuck", "event", &code, extra)),
    );
    let first = invoke(&fngate, "default", "stuck", "{}").await;
    assert_eq!(first.status, 200, "{}", first.text());

    let hung = invoke(&fngate, "default", "stuck", "\"hang\"").await;
    assert_eq!(hung.status, 504, "{}", hung.text());
    assert_eq!(hung.error_code(), "TimeLimitReached");

    let next = invoke(&fngate, "default", "stuck", "{}").await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_ne!(
        next.json()["pid"],
        first.json()["pid"],
        "the stuck instance took the next event"
    );
}

#[tokio::test]
async fn chunked_web_body_over_limit_gives_413() {
    let dir = tempdir();
    let code = web_function(dir.path(), "upload");
    let fngate = Fngate::start(
        dir,
        &platform_file(&function_toml(
            "upload",
            "web",
            &code,
            "max_body_bytes = 1000",
        )),
    );
    let mut stream = tokio::net::TcpStream::connect(fngate.proxy).await.unwrap();
    let chunk = "x".repeat(2500);
    let request = format!(
        "POST /web/default/upload/echo HTTP/1.1\r\nHost: fngate\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len(),
        chunk.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response)
        .await
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("RequestTooLarge"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_bounds_drain() {
    let dir = tempdir();
    let code = web_function(dir.path(), "endless");
    let extra = "concurrency = 1\nmax_instances = 1\ntimeout_ms = 120000\nqueue_budget_ms = 120000";
    let config = dir.path().join("fngate.toml");
    std::fs::write(
        &config,
        platform_file(&function_toml("endless", "web", &code, extra)),
    )
    .unwrap();
    let mut fngate = Fngate::start_with_grace(dir, &config, 1000);
    assert_eq!(get(fngate.proxy, "/web/default/endless/").await.status, 200);
    let labels = [("function", "endless")];

    let proxy = fngate.proxy;
    let running = tokio::spawn(async move {
        let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = hyper::Request::get("/web/default/endless/?ms=60000")
            .header("host", "fngate")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        sender
            .send_request(request)
            .await
            .map(|r| r.status().as_u16())
    });
    fngate
        .wait_for_metric("fngate_in_flight_requests", &labels, |v| v == 1.0)
        .await;
    let queued = tokio::spawn(async move { get(proxy, "/web/default/endless/").await });
    fngate
        .wait_for_metric("fngate_queue_depth", &labels, |v| v == 1.0)
        .await;

    common::signal(fngate.pid() as i32, libc::SIGTERM);
    // The admin listener stays up while the proxy drains, and reports not ready.
    let deadline = std::time::Instant::now() + WAIT_LIMIT;
    while get(fngate.admin, "/readyz").await.status != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never reported the drain"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let queued = queued.await.unwrap();
    assert_eq!(queued.status, 503, "{}", queued.text());
    assert_eq!(queued.error_code(), "ShuttingDown");
    assert!(
        running.await.unwrap().is_err(),
        "the minute-long request was not cut at the grace period"
    );
    // terminate() fails the test if fngate outlives WAIT_LIMIT, far below the request's minute.
    let exit = tokio::task::block_in_place(|| fngate.terminate());
    assert_eq!(exit, Some(0), "{}", fngate.stderr());
}
