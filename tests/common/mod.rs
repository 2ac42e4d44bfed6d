//! Harness for end-to-end tests: starts the real `fngate` binary on port 0 with a platform file
//! written into a temporary directory, and talks to it over HTTP on loopback.

#![allow(dead_code)]

pub mod k8s;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Upper bound for anything a test waits for; hitting it fails the test.
pub const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// A running `fngate serve` process.
pub struct Fngate {
    child: Child,
    pub dir: tempfile::TempDir,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub api: SocketAddr,
    pub stderr_path: PathBuf,
    /// Lines printed on stdout before the ready line.
    pub banner: Vec<String>,
}

/// A function's code written into the test directory.
pub struct Code {
    pub dir: PathBuf,
}

/// Returns the lines `child` prints on its piped stdout, read on a thread of their own.
pub fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads one metric's value from the `/metrics` of the admin listener at `admin`, summed over
/// the series with the given label pairs; 0 when absent.
pub async fn metric_at(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let response = get(admin, "/metrics").await;
    let text = String::from_utf8_lossy(&response.body).to_string();
    text.lines()
        .filter(|line| line.starts_with(name) && !line.starts_with('#'))
        .filter(|line| line[name.len()..].starts_with(['{', ' ']))
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Writes an executable file.
pub fn write_executable(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Python web server used by web-function tests. Each response reports the instance's pid and
/// how many requests the instance was serving at that moment, counted by the instance itself.
pub const WEB_APP: &str = r#"
import json, os, sys, threading, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from urllib.parse import urlparse, parse_qs

lock = threading.Lock()
active = 0
peak = 0

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        global active, peak
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if url.path == "/crash":
            os._exit(3)
        with lock:
            active += 1
            peak = max(peak, active)
            now = active
        try:
            time.sleep(int(query.get("ms", ["0"])[0]) / 1000.0)
            body = json.dumps({
                "pid": os.getpid(),
                "active": now,
                "peak": peak,
                "path": url.path,
                "query": url.query,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }).encode()
        finally:
            with lock:
                active -= 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

ThreadingHTTPServer((os.environ.get("FNGATE_INSTANCE_IP", "127.0.0.1"), int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// Writes a web function served by [`WEB_APP`].
pub fn web_function(root: &Path, name: &str) -> Code {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("app.py"), WEB_APP).unwrap();
    write_executable(
        &dir.join("scf_bootstrap"),
        "#!/bin/bash\nexec python3 app.py\n",
    );
    Code { dir }
}

/// Writes a function whose bootstrap is the given shell script.
pub fn script_function(root: &Path, name: &str, file: &str, script: &str) -> Code {
    let dir = root.join(name);
    write_executable(&dir.join(file), script);
    Code { dir }
}

/// Bash + curl custom runtime that responds to each event with `{"echo": <event>, "pid": ...}`.
pub const EVENT_BOOTSTRAP: &str = r#"#!/bin/bash
api="http://$SCF_RUNTIME_API:$SCF_RUNTIME_API_PORT"
curl -sS -X POST "$api/runtime/init/ready" -d ' ' >/dev/null || exit 1
while true; do
  headers=$(mktemp)
  event=$(curl -sS -D "$headers" "$api/runtime/invocation/next") || exit 0
  request_id=$(grep -i '^request_id:' "$headers" | cut -d: -f2 | tr -d ' \r')
  rm -f "$headers"
  curl -sS -X POST "$api/runtime/invocation/response" \
    -d "{\"echo\": $event, \"pid\": $$, \"request_id\": \"$request_id\"}" >/dev/null
done
"#;

impl Fngate {
    /// Starts fngate with `platform_toml` as its platform file, in a fresh temporary directory
    /// that the `code` directories usually live in.
    pub fn start(dir: tempfile::TempDir, platform_toml: &str) -> Fngate {
        let config = dir.path().join("fngate.toml");
        std::fs::write(&config, platform_toml).unwrap();
        Fngate::start_with_file(dir, &config)
    }

    /// Starts fngate with an existing platform file; `dir` contains its data and logs.
    pub fn start_with_file(dir: tempfile::TempDir, config: &Path) -> Fngate {
        Fngate::start_with_grace(dir, config, 5000)
    }

    /// Starts fngate with a platform file and a shutdown grace period in milliseconds.
    pub fn start_with_grace(dir: tempfile::TempDir, config: &Path, grace_ms: u64) -> Fngate {
        let stderr_path = dir.path().join("fngate.stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_fngate"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--api-listen", "127.0.0.1:0"])
            .args(["--shutdown-grace-ms", &grace_ms.to_string()])
            .arg("--function-dir")
            .arg(dir.path().join("data"))
            .arg("--runtime-wrapper")
            .arg(env!("CARGO_BIN_EXE_fngate-runtime"))
            .env("FNGATE_LOG", "info,fngate_proxy=debug")
            .env("FNGATE_TEST_SECRET", "must-not-leak")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("failed to start fngate");

        let rx = stdout_lines(&mut child);
        let mut addrs = std::collections::HashMap::new();
        let mut banner = Vec::new();
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(remaining) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    panic!("fngate did not print its ready line; stderr:\n{stderr}");
                }
            };
            if line == "fngate: ready" {
                break;
            }
            banner.push(line.clone());
            for (prefix, name) in [
                ("fngate: proxy listening on http://", "proxy"),
                ("fngate: admin listening on http://", "admin"),
                ("fngate: control-plane API listening on http://", "api"),
            ] {
                if let Some(rest) = line.strip_prefix(prefix) {
                    let addr = rest.split_whitespace().next().unwrap();
                    addrs.insert(name, addr.parse::<SocketAddr>().unwrap());
                }
            }
        }
        Fngate {
            child,
            dir,
            proxy: addrs["proxy"],
            admin: addrs["admin"],
            api: addrs["api"],
            stderr_path,
            banner,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the process to exit, returning its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        signal(self.child.id() as i32, libc::SIGTERM);
        let deadline = Instant::now() + WAIT_LIMIT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!("fngate did not exit within {WAIT_LIMIT:?} of SIGTERM");
    }

    /// Reads one metric's value for the given label pairs from `/metrics`, 0 when absent.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_at(self.admin, name, labels).await
    }

    /// Waits until `condition` holds on a metric, failing the test after [`WAIT_LIMIT`].
    pub async fn wait_for_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        condition: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            let value = self.metric(name, labels).await;
            if condition(value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "metric {name}{labels:?} stuck at {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Instances of a function as the control-plane API lists them.
    pub async fn instances(&self, namespace: &str, function: &str) -> Vec<serde_json::Value> {
        let response = get(
            self.api,
            &format!("/v1/namespaces/{namespace}/functions/{function}"),
        )
        .await;
        assert_eq!(response.status, 200, "{}", response.text());
        let status: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        status["instances"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until the API lists `count` ready instances of the function.
    pub async fn wait_for_ready(&self, namespace: &str, function: &str, count: usize) {
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            let ready = self
                .instances(namespace, function)
                .await
                .iter()
                .filter(|instance| instance["state"] == "ready")
                .count();
            if ready >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{namespace}/{function} has {ready} ready instances, expected {count}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Files under the function's log directory.
    pub fn log_files(&self, namespace: &str, function: &str) -> Vec<PathBuf> {
        let dir = self
            .dir
            .path()
            .join("data")
            .join(namespace)
            .join(function)
            .join("logs");
        match std::fs::read_dir(dir) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl Drop for Fngate {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id() as i32, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn signal(pid: i32, signal: i32) -> bool {
    // SAFETY: kill(2) has no memory effects; a stale pid only makes it fail.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// True while a process with this pid exists.
pub fn process_alive(pid: i32) -> bool {
    signal(pid, 0)
}

/// A response read to the end.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }

    /// Returns the `error.code` of a JSON error body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// Sends one request on a new connection and reads the whole response.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: impl Into<Bytes>,
    headers: &[(&str, &str)],
) -> Reply {
    let stream = TcpStream::connect(addr).await.expect("connect failed");
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(body.into())).unwrap();
    let response = tokio::time::timeout(WAIT_LIMIT, sender.send_request(request))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(WAIT_LIMIT, response.into_body().collect())
        .await
        .expect("body timed out")
        .expect("body failed")
        .to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// Sends `PUT path` with `body` as JSON, as the control-plane API expects.
pub async fn put_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Reply {
    request(
        addr,
        Method::PUT,
        path,
        body.to_string(),
        &[("content-type", "application/json")],
    )
    .await
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, Method::GET, path, Bytes::new(), &[]).await
}

pub async fn invoke(fngate: &Fngate, namespace: &str, function: &str, event: &str) -> Reply {
    request(
        fngate.proxy,
        Method::POST,
        &format!("/functions/{namespace}/{function}/invocations"),
        event.to_owned(),
        &[("content-type", "application/json")],
    )
    .await
}

/// Builds a platform file with the `default` namespace and the given `[[function]]` tables.
pub fn platform_file(functions: &str) -> String {
    format!("[[namespace]]\nname = \"default\"\n\n{functions}")
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fngate-e2e")
        .tempdir()
        .unwrap()
}
