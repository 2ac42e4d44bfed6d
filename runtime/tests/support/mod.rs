//! Shared helpers for the wrapper tests: bootstrap scripts in a temporary directory, an
//! in-process wrapper run, and a raw HTTP/1.1 client that shows header names as sent.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fngate_runtime::{run_with, Exit, WrapperConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Upper bound for any single wait in a test, so a broken wrapper fails the test instead of
/// hanging it.
pub const TEST_LIMIT: Duration = Duration::from_secs(20);

/// Shell lines that every test bootstrap starts with: `api` is the runtime API base URL and
/// `dir` the bootstrap's directory.
pub const PRELUDE: &str = r#"#!/bin/bash
api="http://${SCF_RUNTIME_API}:${SCF_RUNTIME_API_PORT}/runtime"
dir="$(cd "$(dirname "$0")" && pwd)"
ready() { curl -sS -X POST -o /dev/null "$api/init/ready" || exit 90; }
"#;

/// Writes an executable file.
///
/// The content goes to a side file first and `install` copies it into place, so no process
/// of this test binary ever has the executable open for writing. Otherwise a `fork` in a
/// concurrent test could inherit that descriptor and make `execve` fail with ETXTBSY.
pub fn write_executable(dir: &Path, name: &str, content: &str) -> PathBuf {
    let source = dir.join(format!("{name}.source"));
    let target = dir.join(name);
    std::fs::write(&source, content).expect("write script source");
    let status = std::process::Command::new("install")
        .arg("-m")
        .arg("0755")
        .arg(&source)
        .arg(&target)
        .status()
        .expect("run install");
    assert!(
        status.success(),
        "install {} failed: {status}",
        target.display()
    );
    target
}

/// A wrapper running in this process on a tempdir bootstrap.
pub struct Wrapper {
    pub invoke_addr: SocketAddr,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Exit>,
}

/// A wrapper whose invoke listener was never bound: the run ended before ready.
pub struct NeverReady {
    pub exit: Exit,
    pub dir: tempfile::TempDir,
}

/// Starts the wrapper with `script` as the bootstrap, after `adjust` changed the config.
pub async fn start_with(
    script: &str,
    adjust: impl FnOnce(&mut WrapperConfig),
) -> Result<Wrapper, NeverReady> {
    let dir = tempfile::tempdir().expect("tempdir");
    let bootstrap = write_executable(dir.path(), "bootstrap", script);
    let mut config = WrapperConfig::new(loopback_port_0(), bootstrap);
    config.init_timeout = Duration::from_secs(10);
    config.stop_grace = Duration::from_secs(5);
    adjust(&mut config);

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (addr_tx, addr_rx) = oneshot::channel();
    let task = tokio::spawn(run_with(
        config,
        async move {
            let _ = stop_rx.await;
        },
        Some(addr_tx),
    ));

    match tokio::time::timeout(TEST_LIMIT, addr_rx)
        .await
        .expect("wrapper start timed out")
    {
        Ok(invoke_addr) => Ok(Wrapper {
            invoke_addr,
            dir,
            stop: Some(stop_tx),
            task,
        }),
        Err(_) => {
            let exit = tokio::time::timeout(TEST_LIMIT, task)
                .await
                .expect("wrapper exit timed out")
                .expect("wrapper task panicked");
            Err(NeverReady { exit, dir })
        }
    }
}

/// Starts the wrapper with `script` and the test defaults, and expects it to become ready.
pub async fn start(script: &str) -> Wrapper {
    match start_with(script, |_| {}).await {
        Ok(wrapper) => wrapper,
        Err(never) => panic!(
            "wrapper exited before ready: code {}, {}",
            never.exit.code, never.exit.reason
        ),
    }
}

pub fn loopback_port_0() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

impl Wrapper {
    /// Requests a stop, as SIGTERM would, and returns how the run ended.
    pub async fn stop(mut self) -> Exit {
        self.request_stop();
        self.exit().await
    }

    /// Requests a stop, as SIGTERM would, without waiting for the run to end.
    pub fn request_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Returns the number of queued invocations that `GET /healthz` reports.
    pub async fn queued(&self) -> u64 {
        let health = request(self.invoke_addr, "GET", "/healthz", &[], b"").await;
        assert_eq!(health.status, 200, "{}", health.text());
        health.json()["queued"]
            .as_u64()
            .unwrap_or_else(|| panic!("no queued count in {}", health.text()))
    }

    /// Waits up to [`TEST_LIMIT`] until `GET /healthz` reports `expected` queued invocations.
    pub async fn wait_queued(&self, expected: u64) {
        let deadline = tokio::time::Instant::now() + TEST_LIMIT;
        loop {
            let queued = self.queued().await;
            if queued == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the wrapper still reports {queued} queued invocations, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for the run to end on its own.
    pub async fn exit(self) -> Exit {
        tokio::time::timeout(TEST_LIMIT, self.task)
            .await
            .expect("wrapper did not exit in time")
            .expect("wrapper task panicked")
    }

    /// Returns the runtime API address that a script using [`PORT_FILE_LINE`] wrote.
    pub fn runtime_api_addr(&self) -> SocketAddr {
        let text =
            std::fs::read_to_string(self.dir.path().join("api_port")).expect("read api_port file");
        let port: u16 = text.trim().parse().expect("api_port contains a port");
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Sends `POST /event-invoke` with `headers` and `event`.
    pub async fn invoke(&self, headers: &[(&str, &str)], event: &str) -> RawResponse {
        request(
            self.invoke_addr,
            "POST",
            "/event-invoke",
            headers,
            event.as_bytes(),
        )
        .await
    }
}

/// Shell line that saves the runtime API port next to the bootstrap, for tests that talk to
/// the runtime API themselves.
pub const PORT_FILE_LINE: &str = "echo \"$SCF_RUNTIME_API_PORT\" > \"$dir/api_port\"\n";

/// A response as read from the socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// The status line and header lines exactly as received.
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Returns the first value of the header `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("body is not JSON ({error}): {}", self.text()))
    }
}

/// Sends `POST /event-invoke` with `headers` and the event `{}`, and returns the open
/// connection without reading the response. Dropping the stream closes the connection.
pub async fn send_invoke(addr: SocketAddr, headers: &[(&str, &str)]) -> TcpStream {
    let mut head = format!("POST /event-invoke HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 2\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n{}");
    let mut stream = tokio::time::timeout(TEST_LIMIT, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    stream
        .write_all(head.as_bytes())
        .await
        .expect("write request");
    stream
}

/// Sends one HTTP/1.1 request with `Connection: close` and reads the response to the end.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-length"))
    {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");

    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(head.as_bytes()).await.expect("write head");
        stream.write_all(body).await.expect("write body");
        let mut received = Vec::new();
        stream
            .read_to_end(&mut received)
            .await
            .expect("read response");
        received
    };
    let received = tokio::time::timeout(TEST_LIMIT, exchange)
        .await
        .expect("request timed out");
    parse_response(&received)
}

fn parse_response(received: &[u8]) -> RawResponse {
    let split = received
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {:?}", String::from_utf8_lossy(received)));
    let head = String::from_utf8_lossy(&received[..split]).into_owned();
    let body = received[split + 4..].to_vec();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    RawResponse { status, head, body }
}

/// Reads the FIFO at `path` until the writer closes it and returns the trimmed text. Opening
/// it blocks until the bootstrap opens it for writing, which makes the read a synchronization
/// point with the bootstrap.
pub async fn read_fifo(path: &Path) -> String {
    let owned = path.to_path_buf();
    let mut read = tokio::task::spawn_blocking(move || std::fs::read_to_string(owned));
    match tokio::time::timeout(TEST_LIMIT, &mut read).await {
        Ok(result) => result
            .expect("join the FIFO reader")
            .expect("read the FIFO")
            .trim()
            .to_string(),
        Err(_) => {
            // A non-blocking writer that closes at once ends the blocked open with EOF, so
            // the reader thread finishes and the test runtime can shut down.
            let _ = nonblocking_options().write(true).open(path);
            panic!("nothing was written to the FIFO {} in time", path.display());
        }
    }
}

/// Writes one line to the FIFO at `path`. Opening it blocks until the bootstrap opens it for
/// reading.
pub async fn write_fifo(path: &Path, line: &str) {
    let owned = path.to_path_buf();
    let line = format!("{line}\n");
    let mut write = tokio::task::spawn_blocking(move || std::fs::write(owned, line));
    match tokio::time::timeout(TEST_LIMIT, &mut write).await {
        Ok(result) => result
            .expect("join the FIFO writer")
            .expect("write the FIFO"),
        Err(_) => {
            // A non-blocking reader ends the blocked open, and the line fits in the pipe
            // buffer, so the writer thread finishes and the test runtime can shut down.
            let _reader = nonblocking_options().read(true).open(path);
            let _ = tokio::time::timeout(TEST_LIMIT, write).await;
            panic!("no process read the FIFO {} in time", path.display());
        }
    }
}

fn nonblocking_options() -> std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;

    let mut options = std::fs::OpenOptions::new();
    options.custom_flags(libc::O_NONBLOCK);
    options
}

/// Creates a FIFO at `path` with the `mkfifo` command.
pub fn make_fifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(
        status.success(),
        "mkfifo {} failed: {status}",
        path.display()
    );
}

/// Returns whether process `pid` is gone or a zombie, which no longer runs any code.
pub fn process_ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command name, which is in parentheses and may contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Waits up to [`TEST_LIMIT`] for process `pid` to end, because SIGKILL to a process that is
/// not this one's child takes effect asynchronously.
pub async fn wait_process_ended(pid: u32) -> bool {
    let deadline = tokio::time::Instant::now() + TEST_LIMIT;
    while tokio::time::Instant::now() < deadline {
        if process_ended(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

pub fn read_pid(path: &Path) -> u32 {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{} contains no pid: {text:?}", path.display()))
}
