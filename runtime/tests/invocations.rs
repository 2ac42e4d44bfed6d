//! Invocations through a ready wrapper: events reach real bootstrap processes, results and
//! errors come back, and the runtime API rejects what SCF's custom runtime API rejects.

mod support;

use support::{request, start, PORT_FILE_LINE, PRELUDE};

/// Returns a bash bootstrap that echoes the event and the three runtime API headers it received.
/// `sed` matches the header names case-sensitively, so a renamed header shows up as empty.
fn echo_script() -> String {
    format!(
        r#"{PRELUDE}ready
headers="$dir/headers"
while true; do
    curl -sS -D "$headers" -o "$dir/event" "$api/invocation/next" || exit 91
    field() {{ sed -n "s/^$1: //p" "$headers" | tr -d '\r\n'; }}
    {{
        printf '{{"event": '; cat "$dir/event"
        printf ', "request_id": "%s", "memory": "%s", "timeout": "%s"}}' \
            "$(field request_id)" "$(field memory_limit_in_mb)" "$(field time_limit_in_ms)"
    }} > "$dir/result"
    curl -sS -X POST -o /dev/null --data-binary "@$dir/result" "$api/invocation/response" || exit 92
done
"#
    )
}

/// Returns a bootstrap that saves the runtime API port, reports ready and then waits, so the test
/// itself plays the bootstrap's part on the runtime API.
fn manual_script() -> String {
    format!("{PRELUDE}{PORT_FILE_LINE}ready\nexec sleep 600\n")
}

#[tokio::test]
async fn echo_bootstrap_round_trip() {
    let wrapper = start(&echo_script()).await;

    let response = wrapper
        .invoke(
            &[
                ("X-Scf-Request-Id", "req-echo-1"),
                ("X-Scf-Memory", "256"),
                ("X-Scf-Timeout", "7000"),
                ("X-Scf-Name", "echo"),
                ("X-Scf-Namespace", "default"),
                ("X-Scf-Version", "$LATEST"),
                ("Content-Type", "application/json"),
            ],
            r#"{"name":"fngate"}"#,
        )
        .await;

    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(response.header("x-scf-request-id"), Some("req-echo-1"));
    let result = response.json();
    assert_eq!(result["event"], serde_json::json!({"name": "fngate"}));
    assert_eq!(result["request_id"], "req-echo-1");
    assert_eq!(result["memory"], "256");
    assert_eq!(result["timeout"], "7000");

    let exit = wrapper.stop().await;
    assert_eq!(exit.code, 0, "{}", exit.reason);
}

#[tokio::test]
async fn missing_headers_get_defaults() {
    let wrapper = start(&echo_script()).await;

    let response = wrapper.invoke(&[], "[1, 2, 3]").await;

    assert_eq!(response.status, 200, "{}", response.text());
    let generated = response
        .header("x-scf-request-id")
        .expect("generated request id")
        .to_string();
    assert!(!generated.is_empty());
    let result = response.json();
    assert_eq!(result["event"], serde_json::json!([1, 2, 3]));
    assert_eq!(result["request_id"], generated.as_str());
    assert_eq!(result["timeout"], "3000");
    assert_eq!(result["memory"], "128");

    wrapper.stop().await;
}

#[tokio::test]
async fn sequential_invocations_reuse_bootstrap() {
    let wrapper = start(&echo_script()).await;

    for index in 0..5 {
        let request_id = format!("seq-{index}");
        let response = wrapper
            .invoke(&[("X-Scf-Request-Id", &request_id)], &index.to_string())
            .await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.json()["event"], index);
        assert_eq!(response.json()["request_id"], request_id.as_str());
    }

    wrapper.stop().await;
}

#[tokio::test]
async fn next_headers_survive_on_the_wire() {
    let wrapper = start(&manual_script()).await;
    let api = wrapper.runtime_api_addr();
    let invoke_addr = wrapper.invoke_addr;
    let pending = tokio::spawn(async move {
        let headers = [
            ("X-Scf-Request-Id", "req-raw"),
            ("X-Scf-Memory", "512"),
            ("X-Scf-Timeout", "9000"),
        ];
        request(invoke_addr, "POST", "/event-invoke", &headers, b"{\"k\":1}").await
    });

    let next = request(api, "GET", "/runtime/invocation/next", &[], b"").await;

    assert_eq!(next.status, 200);
    assert!(
        next.head.contains("\r\nrequest_id: req-raw\r\n"),
        "{}",
        next.head
    );
    assert!(
        next.head.contains("\r\nmemory_limit_in_mb: 512\r\n"),
        "{}",
        next.head
    );
    assert!(
        next.head.contains("\r\ntime_limit_in_ms: 9000\r\n"),
        "{}",
        next.head
    );
    assert_eq!(next.text(), "{\"k\":1}");

    let posted = request(
        api,
        "POST",
        "/runtime/invocation/response",
        &[],
        b"{\"ok\":true}",
    )
    .await;
    assert_eq!(posted.status, 200);
    let response = pending.await.expect("invoke task");
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "{\"ok\":true}");

    wrapper.stop().await;
}

#[tokio::test]
async fn error_post_then_late_response() {
    let wrapper = start(&manual_script()).await;
    let api = wrapper.runtime_api_addr();
    let invoke_addr = wrapper.invoke_addr;
    let pending = tokio::spawn(async move {
        request(
            invoke_addr,
            "POST",
            "/event-invoke",
            &[("X-Scf-Request-Id", "req-err")],
            b"{}",
        )
        .await
    });
    let next = request(api, "GET", "/runtime/invocation/next", &[], b"").await;
    assert_eq!(next.status, 200);

    let error_post = request(
        api,
        "POST",
        "/runtime/invocation/error",
        &[],
        b"division by zero",
    )
    .await;
    let late = request(api, "POST", "/runtime/invocation/response", &[], b"{}").await;
    let response = pending.await.expect("invoke task");

    assert_eq!(error_post.status, 200);
    assert_eq!(response.status, 500);
    assert_eq!(
        response.header("x-fngate-function-error"),
        Some("UserCodeException")
    );
    assert_eq!(response.header("x-scf-request-id"), Some("req-err"));
    assert_eq!(response.text(), "division by zero");
    assert_eq!(late.status, 400);
    let late_error = late.json();
    assert_eq!(late_error["error"]["code"], "InvalidParameterValue");
    let message = late_error["error"]["message"].as_str().expect("message");
    assert!(message.contains("req-err"), "{message}");
    assert!(message.contains("already completed"), "{message}");

    wrapper.stop().await;
}

#[tokio::test]
async fn post_without_next_rejected() {
    let wrapper = start(&manual_script()).await;
    let api = wrapper.runtime_api_addr();

    for path in ["/runtime/invocation/response", "/runtime/invocation/error"] {
        let response = request(api, "POST", path, &[], b"{}").await;
        assert_eq!(response.status, 400, "{path}");
        assert_eq!(
            response.json()["error"]["code"],
            "InvalidParameterValue",
            "{path}"
        );
        let message = response.json()["error"]["message"]
            .as_str()
            .expect("message")
            .to_string();
        assert!(message.contains("/runtime/invocation/next"), "{message}");
    }

    wrapper.stop().await;
}

#[tokio::test]
async fn runtime_api_unknown_routes() {
    let wrapper = start(&manual_script()).await;
    let api = wrapper.runtime_api_addr();

    let unknown = request(api, "GET", "/runtime/unknown", &[], b"").await;
    let wrong_method = request(api, "GET", "/runtime/init/ready", &[], b"").await;
    let post_next = request(api, "POST", "/runtime/invocation/next", &[], b"").await;

    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["code"], "ResourceNotFound");
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.header("allow"), Some("POST"));
    assert_eq!(wrong_method.json()["error"]["code"], "MethodNotAllowed");
    assert_eq!(post_next.status, 405);
    assert_eq!(post_next.header("allow"), Some("GET"));

    wrapper.stop().await;
}

#[tokio::test]
async fn invoke_listener_routes() {
    let wrapper = start(&manual_script()).await;
    let addr = wrapper.invoke_addr;

    let health = request(addr, "GET", "/healthz", &[], b"").await;
    let get_invoke = request(addr, "GET", "/event-invoke", &[], b"").await;
    let unknown = request(addr, "POST", "/invoke", &[], b"").await;
    let bad_timeout = request(
        addr,
        "POST",
        "/event-invoke",
        &[("X-Scf-Timeout", "soon")],
        b"{}",
    )
    .await;

    assert_eq!(health.status, 200);
    assert_eq!(
        health.json(),
        serde_json::json!({"status": "ok", "queued": 0})
    );
    assert_eq!(get_invoke.status, 405);
    assert_eq!(get_invoke.header("allow"), Some("POST"));
    assert_eq!(unknown.status, 404);
    assert_eq!(bad_timeout.status, 400);
    assert!(
        bad_timeout.text().contains("x-scf-timeout"),
        "{}",
        bad_timeout.text()
    );

    wrapper.stop().await;
}

#[tokio::test]
async fn oversized_event_gets_413() {
    let wrapper = start(&manual_script()).await;
    let too_long = (16 * 1024 * 1024 + 1).to_string();

    // Only the declared length is sent. The wrapper must reject it without waiting for a body.
    let response = wrapper.invoke(&[("Content-Length", &too_long)], "").await;

    assert_eq!(response.status, 413);
    assert_eq!(response.json()["error"]["code"], "RequestTooLarge");

    wrapper.stop().await;
}

#[tokio::test]
async fn hello_event_example_works() {
    let script_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/hello-event/bootstrap"
    );
    let script = std::fs::read_to_string(script_path).expect("read the hello-event example");
    let wrapper = start(&script).await;

    let response = wrapper
        .invoke(&[("X-Scf-Request-Id", "req-hello")], r#"{"who":"world"}"#)
        .await;

    assert_eq!(response.status, 200, "{}", response.text());
    let result = response.json();
    assert_eq!(result["hello"], serde_json::json!({"who": "world"}));
    assert_eq!(result["request_id"], "req-hello");

    let exit = wrapper.stop().await;
    assert_eq!(exit.code, 0, "{}", exit.reason);
}
