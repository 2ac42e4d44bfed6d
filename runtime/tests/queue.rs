//! Invocations waiting in the wrapper's queue: a caller that disconnects withdraws its
//! invocation, and error responses carry `X-Fngate-Not-Started: true` exactly when the
//! bootstrap never received the event.

mod support;

use std::path::Path;

use fngate_runtime::ExitReason;
use support::{
    read_fifo, request, send_invoke, start, start_with, write_fifo, RawResponse, Wrapper, PRELUDE,
    TEST_LIMIT,
};
use tokio::task::JoinHandle;

/// Returns a bootstrap that takes one invocation at a time and waits for the test between
/// taking it and posting its result. After `next` it appends the request id to `seen` and
/// writes it to the FIFO `taken`. Then it reads a command from the FIFO `go`: `exit` ends the
/// bootstrap with status 3, anything else posts `{"id": "<request id>"}` as the response.
fn gated_script() -> String {
    format!(
        r#"{PRELUDE}mkfifo "$dir/taken" "$dir/go"
ready
while true; do
    curl -sS -D "$dir/headers" -o /dev/null "$api/invocation/next" || exit 91
    id=$(sed -n 's/^request_id: //p' "$dir/headers" | tr -d '\r\n')
    echo "$id" >> "$dir/seen"
    echo "$id" > "$dir/taken"
    read -r command < "$dir/go"
    if [ "$command" = exit ]; then exit 3; fi
    curl -sS -X POST -o /dev/null --data-binary "{{\"id\": \"$id\"}}" "$api/invocation/response" || exit 92
done
"#
    )
}

/// Time limit of the test's invocations, longer than any wait in a passing test, so no
/// invocation times out while the bootstrap waits for the test.
const INVOCATION_TIMEOUT_MS: &str = "60000";

/// Sends an invocation in a task of its own, so the test can go on while it waits.
fn spawn_invoke(wrapper: &Wrapper, request_id: &'static str) -> JoinHandle<RawResponse> {
    let addr = wrapper.invoke_addr;
    tokio::spawn(async move {
        let headers = [
            ("X-Scf-Request-Id", request_id),
            ("X-Scf-Timeout", INVOCATION_TIMEOUT_MS),
        ];
        request(addr, "POST", "/event-invoke", &headers, b"{}").await
    })
}

async fn response_of(task: JoinHandle<RawResponse>) -> RawResponse {
    tokio::time::timeout(TEST_LIMIT, task)
        .await
        .expect("invocation did not complete in time")
        .expect("invoke task panicked")
}

fn seen_request_ids(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("seen"))
        .expect("read the seen file")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn disconnected_queued_invocation_never_runs() {
    let wrapper = start(&gated_script()).await;
    let dir = wrapper.dir.path().to_path_buf();
    let first = spawn_invoke(&wrapper, "req-first");
    assert_eq!(read_fifo(&dir.join("taken")).await, "req-first");

    let gone = send_invoke(
        wrapper.invoke_addr,
        &[
            ("X-Scf-Request-Id", "req-gone"),
            ("X-Scf-Timeout", INVOCATION_TIMEOUT_MS),
        ],
    )
    .await;
    wrapper.wait_queued(1).await;
    drop(gone);
    // Only an explicit withdrawal empties the queue here, because `next` is not called until
    // the first invocation completes.
    wrapper.wait_queued(0).await;

    let last = spawn_invoke(&wrapper, "req-last");
    wrapper.wait_queued(1).await;
    write_fifo(&dir.join("go"), "respond").await;
    let first = response_of(first).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.json()["id"], "req-first");

    assert_eq!(read_fifo(&dir.join("taken")).await, "req-last");
    write_fifo(&dir.join("go"), "respond").await;
    let last = response_of(last).await;
    assert_eq!(last.status, 200, "{}", last.text());
    assert_eq!(last.json()["id"], "req-last");
    assert_eq!(seen_request_ids(&dir), ["req-first", "req-last"]);

    wrapper.stop().await;
}

#[tokio::test]
async fn not_started_header_marks_unseen_events() {
    let wrapper = start_with(&gated_script(), |config| config.max_queued = 1)
        .await
        .unwrap_or_else(|never| panic!("wrapper exited before ready: {}", never.exit.reason));
    let dir = wrapper.dir.path().to_path_buf();
    let running = spawn_invoke(&wrapper, "req-running");
    assert_eq!(read_fifo(&dir.join("taken")).await, "req-running");
    let queued = spawn_invoke(&wrapper, "req-queued");
    wrapper.wait_queued(1).await;

    let rejected = wrapper
        .invoke(&[("X-Scf-Request-Id", "req-rejected")], "{}")
        .await;
    assert_eq!(rejected.status, 503, "{}", rejected.text());
    assert_eq!(
        rejected.header("x-fngate-runtime-error"),
        Some("TooManyPendingInvocations")
    );
    assert_eq!(rejected.header("x-fngate-not-started"), Some("true"));

    write_fifo(&dir.join("go"), "exit").await;
    let running = response_of(running).await;
    let queued = response_of(queued).await;

    assert_eq!(running.status, 502, "{}", running.text());
    assert_eq!(
        running.header("x-fngate-runtime-error"),
        Some("ContainerStateExited")
    );
    assert_eq!(
        running.header("x-fngate-not-started"),
        None,
        "the bootstrap had taken this event"
    );
    assert_eq!(queued.status, 502, "{}", queued.text());
    assert_eq!(
        queued.header("x-fngate-runtime-error"),
        Some("ContainerStateExited")
    );
    assert_eq!(queued.header("x-fngate-not-started"), Some("true"));
    assert!(
        queued.text().contains("before the invocation started"),
        "{}",
        queued.text()
    );
    assert_eq!(seen_request_ids(&dir), ["req-running"]);

    let exit = wrapper.exit().await;
    assert_eq!(exit.code, 3, "{}", exit.reason);
}

#[tokio::test]
async fn stopping_instance_marks_new_invocations() {
    // On SIGTERM the bootstrap reports through the FIFO `term`, then waits for the test before
    // it exits, which keeps the wrapper in its stopping state.
    let script = format!(
        r#"{PRELUDE}mkfifo "$dir/term" "$dir/finish"
trap 'echo term > "$dir/term"; read -r _ < "$dir/finish"; exit 0' TERM
ready
sleep 600 &
wait
"#
    );
    let mut wrapper = start_with(&script, |config| config.stop_grace = TEST_LIMIT)
        .await
        .unwrap_or_else(|never| panic!("wrapper exited before ready: {}", never.exit.reason));
    let dir = wrapper.dir.path().to_path_buf();

    wrapper.request_stop();
    assert_eq!(read_fifo(&dir.join("term")).await, "term");
    let response = wrapper
        .invoke(&[("X-Scf-Request-Id", "req-late")], "{}")
        .await;
    write_fifo(&dir.join("finish"), "exit").await;
    let exit = wrapper.exit().await;

    assert_eq!(response.status, 503, "{}", response.text());
    assert_eq!(
        response.header("x-fngate-runtime-error"),
        Some("InstanceStopping")
    );
    assert_eq!(response.header("x-fngate-not-started"), Some("true"));
    assert_eq!(exit.code, 0, "{}", exit.reason);
    assert!(
        matches!(exit.reason, ExitReason::Stopped(_)),
        "{:?}",
        exit.reason
    );
}
