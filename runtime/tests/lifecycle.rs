//! How the wrapper ends: bootstrap exits before and after ready, init and invocation
//! timeouts, and stop requests with and without SIGKILL.

mod support;

use std::time::Duration;

use fngate_runtime::{ExitReason, RunError};
use support::{read_pid, start, start_with, wait_process_ended, PRELUDE};

#[tokio::test]
async fn exit_before_ready_returns_its_code() {
    let script = format!("{PRELUDE}echo 'failing on purpose' >&2\nexit 3\n");

    let Err(never) = start_with(&script, |_| {}).await else {
        panic!("the invoke listener was bound although the bootstrap never called init/ready");
    };

    assert_eq!(never.exit.code, 3);
    assert!(
        matches!(never.exit.reason, ExitReason::ExitedBeforeReady(_)),
        "{:?}",
        never.exit.reason
    );
    let message = never.exit.reason.to_string();
    assert!(
        message.starts_with("bootstrap exited with status 3"),
        "{message}"
    );
    assert!(
        message.contains("before calling /runtime/init/ready"),
        "{message}"
    );
}

#[tokio::test]
async fn init_timeout_kills_bootstrap() {
    let script = format!("{PRELUDE}exec sleep 600\n");

    let Err(never) = start_with(&script, |config| {
        config.init_timeout = Duration::from_millis(300)
    })
    .await
    else {
        panic!("the wrapper became ready without init/ready");
    };

    assert_eq!(never.exit.code, 1);
    let ExitReason::Failed(RunError::InitTimedOut { status, .. }) = &never.exit.reason else {
        panic!("expected InitTimedOut, got {:?}", never.exit.reason);
    };
    assert_eq!(status.code(), 128 + 9);
    assert!(
        never.exit.reason.to_string().contains("300 ms"),
        "{}",
        never.exit.reason
    );
}

#[tokio::test]
async fn exit_after_ready_returns_its_code() {
    // The bootstrap exits once the test has sent one invocation, which it never completes.
    let script =
        format!("{PRELUDE}ready\ncurl -sS -o /dev/null \"$api/invocation/next\"\nexit 7\n");
    let wrapper = start(&script).await;

    let response = wrapper
        .invoke(&[("X-Scf-Request-Id", "req-dies")], "{}")
        .await;

    assert_eq!(response.status, 502, "{}", response.text());
    assert_eq!(
        response.header("x-fngate-runtime-error"),
        Some("ContainerStateExited")
    );
    assert_eq!(
        response.header("x-fngate-not-started"),
        None,
        "the bootstrap had taken the event"
    );
    assert_eq!(response.header("x-scf-request-id"), Some("req-dies"));
    let error = response.json();
    assert_eq!(error["error"]["code"], "ContainerStateExited");
    let message = error["error"]["message"].as_str().expect("message");
    assert!(message.contains("status 7"), "{message}");

    let exit = wrapper.exit().await;
    assert_eq!(exit.code, 7);
    assert!(
        matches!(exit.reason, ExitReason::BootstrapExited(_)),
        "{:?}",
        exit.reason
    );
    assert_eq!(exit.reason.to_string(), "bootstrap exited with status 7");
}

#[tokio::test]
async fn invocation_timeout_gives_504_and_exits() {
    let script =
        format!("{PRELUDE}ready\ncurl -sS -o /dev/null \"$api/invocation/next\"\nexec sleep 600\n");
    // A loopback address of its own: another process may take the freed port on 127.0.0.1
    // before the check at the end, which would then read as the wrapper still listening.
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
    let own_ip = [127, 200, (seed >> 8) as u8, (seed as u8).max(1)];
    let Ok(wrapper) = start_with(&script, |config| {
        config.invoke_listen = std::net::SocketAddr::from((own_ip, 0));
    })
    .await
    else {
        panic!("the wrapper did not become ready");
    };
    let invoke_addr = wrapper.invoke_addr;

    let response = wrapper
        .invoke(
            &[("X-Scf-Request-Id", "req-slow"), ("X-Scf-Timeout", "300")],
            "{}",
        )
        .await;

    assert_eq!(response.status, 504, "{}", response.text());
    assert_eq!(
        response.header("x-fngate-runtime-error"),
        Some("TimeLimitReached")
    );
    assert_eq!(response.header("x-fngate-not-started"), None);
    assert_eq!(response.json()["error"]["code"], "TimeLimitReached");
    assert!(response.text().contains("300 ms"), "{}", response.text());

    let exit = wrapper.exit().await;
    assert_ne!(exit.code, 0);
    let ExitReason::Failed(RunError::InvocationTimedOut {
        request_id, status, ..
    }) = &exit.reason
    else {
        panic!("expected InvocationTimedOut, got {:?}", exit.reason);
    };
    assert_eq!(request_id, "req-slow");
    assert_eq!(status.code(), 128 + 9);
    let connect = tokio::net::TcpStream::connect(invoke_addr).await;
    assert!(
        connect.is_err(),
        "the invoke listener still accepts after the wrapper exited"
    );
}

#[tokio::test]
async fn stop_sends_sigterm_to_group() {
    // `sleep` in the background is a second member of the bootstrap's process group.
    let script = format!("{PRELUDE}sleep 600 &\necho $! > \"$dir/child_pid\"\nready\nwait\n");
    let wrapper = start(&script).await;
    let child_pid = read_pid(&wrapper.dir.path().join("child_pid"));

    let exit = wrapper.stop().await;

    assert_eq!(exit.code, 0, "{}", exit.reason);
    let ExitReason::Stopped(status) = &exit.reason else {
        panic!("expected Stopped, got {:?}", exit.reason);
    };
    assert_eq!(
        status.code(),
        128 + 15,
        "the bootstrap should end by SIGTERM"
    );
    assert!(
        wait_process_ended(child_pid).await,
        "the bootstrap's child {child_pid} is still running"
    );
}

#[tokio::test]
async fn stop_escalates_to_sigkill() {
    // Ignored signals stay ignored in children, so neither process reacts to SIGTERM.
    let script =
        format!("{PRELUDE}trap '' TERM\nsleep 600 &\necho $! > \"$dir/child_pid\"\nready\nwait\n");
    let wrapper = start_with(&script, |config| {
        config.stop_grace = Duration::from_millis(300)
    })
    .await
    .unwrap_or_else(|never| panic!("wrapper exited before ready: {}", never.exit.reason));
    let child_pid = read_pid(&wrapper.dir.path().join("child_pid"));

    let exit = wrapper.stop().await;

    assert_eq!(exit.code, 0, "{}", exit.reason);
    let ExitReason::Stopped(status) = &exit.reason else {
        panic!("expected Stopped, got {:?}", exit.reason);
    };
    assert_eq!(
        status.code(),
        128 + 9,
        "the bootstrap should end by SIGKILL"
    );
    assert!(
        wait_process_ended(child_pid).await,
        "the bootstrap's child {child_pid} is still running"
    );
}

#[tokio::test]
async fn stop_answers_running_invocation() {
    // The bootstrap writes to the FIFO after taking the invocation. The write blocks until the
    // test opens the FIFO for reading, so the read returns once the invocation is running.
    let script = format!(
        "{PRELUDE}mkfifo \"$dir/taken\"\nready\ncurl -sS -o /dev/null \"$api/invocation/next\"\necho taken > \"$dir/taken\"\nexec sleep 600\n"
    );
    let wrapper = start(&script).await;
    let invoke_addr = wrapper.invoke_addr;
    let pending = tokio::spawn(async move {
        support::request(
            invoke_addr,
            "POST",
            "/event-invoke",
            &[("X-Scf-Request-Id", "req-stop")],
            b"{}",
        )
        .await
    });
    assert_eq!(
        support::read_fifo(&wrapper.dir.path().join("taken")).await,
        "taken"
    );

    let exit = wrapper.stop().await;
    let response = pending.await.expect("invoke task");

    assert_eq!(exit.code, 0, "{}", exit.reason);
    assert_eq!(response.status, 502, "{}", response.text());
    assert_eq!(
        response.header("x-fngate-runtime-error"),
        Some("ContainerStateExited")
    );
    assert_eq!(response.header("x-fngate-not-started"), None);
    assert!(response.text().contains("stopped"), "{}", response.text());
}
