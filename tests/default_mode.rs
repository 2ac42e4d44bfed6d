//! End-to-end tests of default mode: the real `fngate` binary, real instance processes, HTTP on
//! loopback.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use hyper::Method;
use tokio::io::AsyncWriteExt;

fn web_toml(name: &str, code: &Code, extra: &str) -> String {
    format!(
        "[[function]]\nnamespace = \"default\"\nname = \"{name}\"\nkind = \"web\"\ncode = {{ directory = \"{}\" }}\n{extra}\n",
        code.dir.display()
    )
}

fn event_toml(name: &str, code: &Code, extra: &str) -> String {
    format!(
        "[[function]]\nnamespace = \"default\"\nname = \"{name}\"\nkind = \"event\"\ncode = {{ directory = \"{}\" }}\n{extra}\n",
        code.dir.display()
    )
}

fn pid_of(reply: &Reply) -> i64 {
    reply.json()["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("no pid in {}", reply.text()))
}

#[tokio::test]
async fn cold_start_then_warm_reuse() {
    let dir = tempdir();
    let code = web_function(dir.path(), "site");
    let fngate = Fngate::start(
        dir,
        &platform_file(&web_toml("site", &code, "concurrency = 1")),
    );

    let first = get(fngate.proxy, "/web/default/site/a/b?x=1").await;
    assert_eq!(first.status, 200, "{}", first.text());
    let timing = first
        .header("server-timing")
        .expect("cold start has no Server-Timing");
    assert!(
        timing.contains("queue;dur=") && timing.contains("boot;dur="),
        "{timing}"
    );
    let request_id = first.header("x-request-id").expect("no X-Request-Id");
    let seen = first.json();
    assert_eq!(seen["path"], "/a/b");
    assert_eq!(seen["query"], "x=1");
    assert_eq!(seen["headers"]["x-scf-request-id"], request_id.as_str());
    assert_eq!(seen["headers"]["x-scf-name"], "site");
    assert_eq!(seen["headers"]["x-scf-namespace"], "default");
    assert_eq!(seen["headers"]["x-scf-version"], "$LATEST");
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");

    let pid = pid_of(&first);
    for _ in 0..4 {
        let warm = get(fngate.proxy, "/web/default/site/").await;
        assert_eq!(warm.status, 200);
        assert_eq!(pid_of(&warm), pid, "a warm call went to another instance");
        assert!(
            warm.header("server-timing").is_none(),
            "warm call reported a cold start"
        );
        assert!(warm.header("x-request-id").is_some());
    }
    assert_eq!(fngate.instances("default", "site").await.len(), 1);
    assert_eq!(
        fngate
            .metric("fngate_cold_starts_total", &[("function", "site")])
            .await,
        1.0
    );

    let logs = fngate.log_files("default", "site");
    assert_eq!(
        logs.len(),
        1,
        "expected one log file per instance: {logs:?}"
    );
}

#[tokio::test]
async fn event_function_through_runtime_wrapper() {
    let dir = tempdir();
    let code = script_function(dir.path(), "echo", "bootstrap", EVENT_BOOTSTRAP);
    let fngate = Fngate::start(dir, &platform_file(&event_toml("echo", &code, "")));

    let first = invoke(&fngate, "default", "echo", r#"{"name": "fngate"}"#).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let body = first.json();
    assert_eq!(body["echo"]["name"], "fngate");
    assert_eq!(
        body["request_id"].as_str(),
        first.header("x-request-id").as_deref(),
        "the bootstrap's request_id header differs from the proxy's request id"
    );
    let second = invoke(&fngate, "default", "echo", "{}").await;
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(pid_of(&first), pid_of(&second));
}

#[tokio::test]
async fn concurrency_one_max_two_never_overlaps() {
    let dir = tempdir();
    let code = web_function(dir.path(), "slow");
    let extra = "concurrency = 1\nmax_instances = 2\ntimeout_ms = 20000\nqueue_budget_ms = 20000";
    let fngate = Fngate::start(dir, &platform_file(&web_toml("slow", &code, extra)));

    let calls: Vec<_> = (0..10)
        .map(|_| {
            let proxy = fngate.proxy;
            tokio::spawn(async move { get(proxy, "/web/default/slow/?ms=200").await })
        })
        .collect();
    let mut pids = std::collections::HashSet::new();
    for call in calls {
        let reply = call.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        let body = reply.json();
        assert_eq!(
            body["active"], 1,
            "an instance ran two calls at once: {body}"
        );
        assert_eq!(body["peak"], 1, "an instance ran two calls at once: {body}");
        pids.insert(pid_of(&reply));
    }
    assert!(
        pids.len() <= 2,
        "more instances than max_instances: {pids:?}"
    );
    assert!(fngate.instances("default", "slow").await.len() <= 2);
}

#[tokio::test]
async fn queue_budget_exceeded_gives_503() {
    let dir = tempdir();
    let code = web_function(dir.path(), "busy");
    let extra = "concurrency = 1\nmin_instances = 1\nmax_instances = 1\ntimeout_ms = 20000\nqueue_budget_ms = 300";
    let fngate = Fngate::start(dir, &platform_file(&web_toml("busy", &code, extra)));
    // The instance starts with the platform, so no request depends on a cold start within the
    // short budget.
    fngate.wait_for_ready("default", "busy", 1).await;
    assert_eq!(get(fngate.proxy, "/web/default/busy/").await.status, 200);

    let proxy = fngate.proxy;
    let slow = tokio::spawn(async move { get(proxy, "/web/default/busy/?ms=3000").await });
    fngate
        .wait_for_metric("fngate_in_flight_requests", &[("function", "busy")], |v| {
            v == 1.0
        })
        .await;

    let rejected = get(fngate.proxy, "/web/default/busy/").await;
    assert_eq!(rejected.status, 503, "{}", rejected.text());
    assert_eq!(rejected.error_code(), "InstanceUnavailable");
    assert!(rejected.text().contains("300ms"), "{}", rejected.text());
    assert!(rejected.json()["request_id"].is_string());
    assert_eq!(slow.await.unwrap().status, 200);
}

#[tokio::test]
async fn queue_limit_gives_429() {
    let dir = tempdir();
    let code = web_function(dir.path(), "narrow");
    let extra = "concurrency = 1\nmax_instances = 1\nqueue_limit = 1\ntimeout_ms = 20000\nqueue_budget_ms = 20000";
    let fngate = Fngate::start(dir, &platform_file(&web_toml("narrow", &code, extra)));
    assert_eq!(get(fngate.proxy, "/web/default/narrow/").await.status, 200);

    let proxy = fngate.proxy;
    let running = tokio::spawn(async move { get(proxy, "/web/default/narrow/?ms=1000").await });
    fngate
        .wait_for_metric(
            "fngate_in_flight_requests",
            &[("function", "narrow")],
            |v| v == 1.0,
        )
        .await;
    let queued = tokio::spawn(async move { get(proxy, "/web/default/narrow/").await });
    fngate
        .wait_for_metric("fngate_queue_depth", &[("function", "narrow")], |v| {
            v == 1.0
        })
        .await;

    let rejected = get(fngate.proxy, "/web/default/narrow/").await;
    assert_eq!(rejected.status, 429, "{}", rejected.text());
    assert_eq!(rejected.error_code(), "ResourceLimitReached");
    assert_eq!(running.await.unwrap().status, 200);
    assert_eq!(queued.await.unwrap().status, 200);
}

#[tokio::test]
async fn failing_bootstrap_gives_503_without_restart_storm() {
    let dir = tempdir();
    let script = "#!/bin/bash\necho 'cannot read settings.json' >&2\nexit 1\n";
    let code = script_function(dir.path(), "broken", "scf_bootstrap", script);
    let fngate = Fngate::start(dir, &platform_file(&web_toml("broken", &code, "")));

    let reply = get(fngate.proxy, "/web/default/broken/").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.error_code(), "ContainerStateExited");
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("exit status 1"), "{message}");
    assert!(message.contains("cannot read settings.json"), "{message}");

    for _ in 0..10 {
        let reply = get(fngate.proxy, "/web/default/broken/").await;
        assert_eq!(reply.status, 503, "{}", reply.text());
    }
    let failed = fngate
        .metric(
            "fngate_instance_starts_total",
            &[("function", "broken"), ("result", "failed")],
        )
        .await;
    assert!(
        (1.0..=3.0).contains(&failed),
        "{failed} starts for 11 requests: no back-off"
    );
}

#[tokio::test]
async fn killed_instance_gives_502_then_recovers() {
    let dir = tempdir();
    let code = web_function(dir.path(), "fragile");
    let extra = "concurrency = 1\nmax_instances = 1\ntimeout_ms = 20000";
    let fngate = Fngate::start(dir, &platform_file(&web_toml("fragile", &code, extra)));
    let pid = pid_of(&get(fngate.proxy, "/web/default/fragile/").await);

    let proxy = fngate.proxy;
    let doomed = tokio::spawn(async move { get(proxy, "/web/default/fragile/?ms=10000").await });
    fngate
        .wait_for_metric(
            "fngate_in_flight_requests",
            &[("function", "fragile")],
            |v| v == 1.0,
        )
        .await;
    assert!(signal(pid as i32, libc::SIGKILL));

    let failed = doomed.await.unwrap();
    assert_eq!(failed.status, 502, "{}", failed.text());
    assert_eq!(failed.error_code(), "ContainerStateExited");

    // A connection opened in the instant before the kernel closed the killed process's socket
    // can be accepted and then reset, so the next call waits until the platform saw the exit.
    fngate
        .wait_for_metric(
            "fngate_instance_exits_total",
            &[("function", "fragile")],
            |v| v == 1.0,
        )
        .await;
    let next = get(fngate.proxy, "/web/default/fragile/").await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_ne!(
        pid_of(&next),
        pid,
        "the next call reached the killed instance"
    );
}

/// Sends a request on a raw socket and returns the socket without reading the response.
async fn start_raw_request(addr: std::net::SocketAddr, path: &str) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

#[tokio::test]
async fn client_disconnect_frees_slot() {
    let dir = tempdir();
    let code = web_function(dir.path(), "hang");
    let extra = "concurrency = 1\nmax_instances = 1\ntimeout_ms = 120000\nqueue_budget_ms = 120000";
    let fngate = Fngate::start(dir, &platform_file(&web_toml("hang", &code, extra)));
    assert_eq!(get(fngate.proxy, "/web/default/hang/").await.status, 200);
    let labels = [("function", "hang")];

    // One request runs for a minute, the next waits behind it; both clients then go away.
    let running = start_raw_request(fngate.proxy, "/web/default/hang/?ms=60000").await;
    fngate
        .wait_for_metric("fngate_in_flight_requests", &labels, |v| v == 1.0)
        .await;
    let queued = start_raw_request(fngate.proxy, "/web/default/hang/").await;
    fngate
        .wait_for_metric("fngate_queue_depth", &labels, |v| v == 1.0)
        .await;
    drop(queued);
    fngate
        .wait_for_metric("fngate_queue_depth", &labels, |v| v == 0.0)
        .await;
    drop(running);

    // Well before the minute is up, the slot is free again.
    fngate
        .wait_for_metric("fngate_in_flight_requests", &labels, |v| v == 0.0)
        .await;
    let reply = get(fngate.proxy, "/web/default/hang/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test]
async fn bad_requests_get_json_errors() {
    let dir = tempdir();
    let code = script_function(dir.path(), "echo", "bootstrap", EVENT_BOOTSTRAP);
    let extra = "max_body_bytes = 1024";
    let fngate = Fngate::start(dir, &platform_file(&event_toml("echo", &code, extra)));

    let cases = [
        (
            Method::POST,
            "/functions/default/nope/invocations",
            "{}",
            404,
            "FunctionNotFound",
        ),
        (
            Method::POST,
            "/functions/elsewhere/echo/invocations",
            "{}",
            404,
            "FunctionNotFound",
        ),
        (
            Method::POST,
            "/functions/default/echo/invocations?qualifier=v9",
            "{}",
            404,
            "FunctionNotFound",
        ),
        (Method::GET, "/nowhere", "", 404, "RouteNotFound"),
        (
            Method::GET,
            "/functions/default/echo/invocations",
            "",
            405,
            "MethodNotAllowed",
        ),
        (
            Method::POST,
            "/functions/default/echo/invocations",
            "{not json",
            400,
            "InvalidParameterValue",
        ),
        (
            Method::GET,
            "/web/default/echo/",
            "",
            400,
            "InvalidParameterValue",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let reply = request(fngate.proxy, method.clone(), path, body.to_owned(), &[]).await;
        assert_eq!(reply.status, status, "{method} {path}: {}", reply.text());
        assert_eq!(
            reply.error_code(),
            code,
            "{method} {path}: {}",
            reply.text()
        );
        let json = reply.json();
        assert!(!json["error"]["message"].as_str().unwrap().is_empty());
        assert_eq!(
            json["request_id"].as_str(),
            reply.header("x-request-id").as_deref()
        );
    }
    assert!(
        fngate.instances("default", "echo").await.is_empty(),
        "a bad request started an instance"
    );
}

#[tokio::test]
async fn oversize_body_rejected_before_instance() {
    let dir = tempdir();
    let code = script_function(dir.path(), "echo", "bootstrap", EVENT_BOOTSTRAP);
    let fngate = Fngate::start(
        dir,
        &platform_file(&event_toml("echo", &code, "max_body_bytes = 1024")),
    );

    let event = format!("{{\"data\": \"{}\"}}", "x".repeat(4096));
    let reply = invoke(&fngate, "default", "echo", &event).await;
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert_eq!(reply.error_code(), "RequestTooLarge");
    assert!(reply.text().contains("1024"), "{}", reply.text());

    // Chunked, so the proxy cannot judge by Content-Length.
    let stream = tokio::net::TcpStream::connect(fngate.proxy).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let chunks = chunked_body(event.into_bytes());
    let request = hyper::Request::post("/functions/default/echo/invocations")
        .header("host", "fngate")
        .body(chunks)
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 413);

    assert!(fngate.instances("default", "echo").await.is_empty());
    assert!(
        fngate.log_files("default", "echo").is_empty(),
        "an instance was started"
    );
}

type Frames = std::vec::IntoIter<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>;

/// Builds a body without a length, sent as two chunks.
fn chunked_body(data: Vec<u8>) -> http_body_util::StreamBody<futures_util::stream::Iter<Frames>> {
    let middle = data.len() / 2;
    let frames = vec![
        Ok(hyper::body::Frame::data(Bytes::copy_from_slice(
            &data[..middle],
        ))),
        Ok(hyper::body::Frame::data(Bytes::copy_from_slice(
            &data[middle..],
        ))),
    ];
    http_body_util::StreamBody::new(futures_util::stream::iter(frames))
}

#[tokio::test]
async fn keep_warm_expiry_stops_instance() {
    let dir = tempdir();
    let code = web_function(dir.path(), "brief");
    let fngate = Fngate::start(
        dir,
        &platform_file(&web_toml("brief", &code, "keep_warm_ms = 1000")),
    );
    let pid = pid_of(&get(fngate.proxy, "/web/default/brief/").await) as i32;
    assert!(process_alive(pid));

    let deadline = std::time::Instant::now() + WAIT_LIMIT;
    while !fngate.instances("default", "brief").await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "instance still listed after keep-warm"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !process_alive(pid),
        "instance process {pid} still runs after it was stopped"
    );
    assert!(
        fngate.stderr().contains("keep-warm expired"),
        "{}",
        fngate.stderr()
    );
}

#[tokio::test]
async fn execution_timeout_gives_504() {
    let dir = tempdir();
    let code = web_function(dir.path(), "sluggish");
    let fngate = Fngate::start(
        dir,
        &platform_file(&web_toml("sluggish", &code, "timeout_ms = 300")),
    );

    let reply = get(fngate.proxy, "/web/default/sluggish/?ms=5000").await;
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.error_code(), "TimeLimitReached");
    fngate
        .wait_for_metric(
            "fngate_in_flight_requests",
            &[("function", "sluggish")],
            |v| v == 0.0,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let dir = tempdir();
    let code = web_function(dir.path(), "steady");
    let mut fngate = Fngate::start(
        dir,
        &platform_file(&web_toml("steady", &code, "timeout_ms = 20000")),
    );
    let pid = pid_of(&get(fngate.proxy, "/web/default/steady/").await) as i32;

    let proxy = fngate.proxy;
    let in_flight = tokio::spawn(async move { get(proxy, "/web/default/steady/?ms=1000").await });
    fngate
        .wait_for_metric(
            "fngate_in_flight_requests",
            &[("function", "steady")],
            |v| v == 1.0,
        )
        .await;

    let exit = tokio::task::block_in_place(|| fngate.terminate());
    assert_eq!(exit, Some(0), "{}", fngate.stderr());
    let reply = in_flight.await.unwrap();
    assert_eq!(
        reply.status,
        200,
        "the in-flight request was cut by shutdown: {}",
        reply.text()
    );
    assert!(!process_alive(pid), "instance outlived the platform");
}

/// A worker count above the bound is rejected at parse time, with the flag and the valid range.
#[test]
fn proxy_threads_above_bound_rejected() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fngate"))
        .args(["serve", "--proxy-threads", "257"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--api-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success(), "fngate started with 257 workers");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--proxy-threads"), "{stderr}");
    assert!(stderr.contains("0..=256"), "{stderr}");
}
