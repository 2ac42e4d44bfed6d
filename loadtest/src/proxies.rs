//! nginx and haproxy as plain reverse proxies in front of the same instances fngate routes to,
//! each run as the current user from a temporary directory that contains its config, pid file
//! and logs.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tempfile::TempDir;

use crate::procs::{self, ChildGuard};

/// How long a proxy may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The advice printed when a reference proxy is missing.
pub const INSTALL_HINT: &str =
    "install the reference proxies with `apt-get install nginx-light haproxy` (as root)";

/// A reference proxy process with its listen address.
pub struct RefProxy {
    pub name: &'static str,
    pub addr: SocketAddr,
    guard: ChildGuard,
    _dir: TempDir,
}

impl RefProxy {
    /// The processes whose CPU time and memory count as the proxy's: the main process and its
    /// live children (nginx's workers).
    pub fn pids(&self) -> Vec<i32> {
        let main = self.guard.pid();
        let mut pids = vec![main];
        pids.extend(procs::children_of(main));
        pids
    }

    /// Stops the proxy now, instead of when it is dropped.
    pub fn stop(mut self) {
        self.guard.stop();
    }
}

/// Finds `name` or fails with the install advice.
pub fn require(name: &str) -> anyhow::Result<PathBuf> {
    procs::find_tool(name)
        .with_context(|| format!("{name} not found on PATH or in /usr/sbin; {INSTALL_HINT}"))
}

/// Starts nginx with `workers` worker processes and upstream keep-alive to `upstreams`.
pub fn start_nginx(upstreams: &[SocketAddr], workers: usize) -> anyhow::Result<RefProxy> {
    let binary = require("nginx")?;
    let dir = tempfile::tempdir().context("failed to create nginx's temporary directory")?;
    let port = procs::free_port()?;
    let config = nginx_config(dir.path(), port, upstreams, workers);
    let config_path = dir.path().join("nginx.conf");
    std::fs::write(&config_path, config)
        .with_context(|| format!("failed to write {}", config_path.display()))?;
    let child = Command::new(&binary)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&config_path)
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("failed to start {}", binary.display()))?;
    finish_start("nginx", child, port, dir)
}

/// Starts haproxy with `threads` threads and upstream keep-alive to `upstreams`.
pub fn start_haproxy(upstreams: &[SocketAddr], threads: usize) -> anyhow::Result<RefProxy> {
    let binary = require("haproxy")?;
    let dir = tempfile::tempdir().context("failed to create haproxy's temporary directory")?;
    let port = procs::free_port()?;
    let config = haproxy_config(port, upstreams, threads);
    let config_path = dir.path().join("haproxy.cfg");
    std::fs::write(&config_path, config)
        .with_context(|| format!("failed to write {}", config_path.display()))?;
    let child = Command::new(&binary)
        .arg("-f")
        .arg(&config_path)
        .arg("-db")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("failed to start {}", binary.display()))?;
    finish_start("haproxy", child, port, dir)
}

fn finish_start(
    name: &'static str,
    child: std::process::Child,
    port: u16,
    dir: TempDir,
) -> anyhow::Result<RefProxy> {
    let mut guard = ChildGuard::new(name, child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + START_TIMEOUT;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Some(status) = guard.exited() {
            bail!(
                "{name} exited with {status} at start (its messages are above); its config is in {}",
                dir.keep().display()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{name} did not accept connections on {addr} within {}s; its config is in {}",
                START_TIMEOUT.as_secs(),
                dir.keep().display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(RefProxy {
        name,
        addr,
        guard,
        _dir: dir,
    })
}

/// Builds an nginx config for a plain reverse proxy: both directions streamed (no buffering to
/// disk) through buffers large enough for the 64 KiB bodies, upstream connections kept alive, no
/// access log.
fn nginx_config(dir: &Path, port: u16, upstreams: &[SocketAddr], workers: usize) -> String {
    let dir = dir.display();
    // As root, nginx would switch its workers to `nobody`; the scenario runs everything as the
    // current user.
    let user = if procs::is_root() {
        "user root root;\n"
    } else {
        ""
    };
    let servers: String = upstreams
        .iter()
        .map(|addr| format!("        server {addr};\n"))
        .collect();
    format!(
        "{user}worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_max_body_size 16m;
    # Buffers that hold a 64 KiB body whole; with the 8 KiB defaults nginx moves such a body
    # in many small reads and writes, which made it about 3 times slower on the 64 KiB runs.
    client_body_buffer_size 128k;
    proxy_buffer_size 64k;
    proxy_buffers 8 64k;
    proxy_busy_buffers_size 128k;
    upstream functions {{
{servers}        keepalive 512;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://functions;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"
    )
}

/// Builds an haproxy config for a plain HTTP reverse proxy with keep-alive on both sides and idle
/// upstream connections reused across client connections.
fn haproxy_config(port: u16, upstreams: &[SocketAddr], threads: usize) -> String {
    let servers: String = upstreams
        .iter()
        .enumerate()
        .map(|(index, addr)| format!("    server instance{index} {addr}\n"))
        .collect();
    format!(
        "global
    nbthread {threads}
    maxconn 8000

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 75s

frontend benchmark
    bind 127.0.0.1:{port}
    default_backend functions

backend functions
    balance roundrobin
{servers}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_name_every_upstream() {
        let upstreams: Vec<SocketAddr> = vec![
            "127.0.0.1:4001".parse().expect("addr"),
            "127.0.0.1:4002".parse().expect("addr"),
        ];
        let nginx = nginx_config(Path::new("/tmp/x"), 8000, &upstreams, 2);
        assert!(nginx.contains("server 127.0.0.1:4001;"));
        assert!(nginx.contains("server 127.0.0.1:4002;"));
        assert!(nginx.contains("worker_processes 2;"));
        assert!(nginx.contains("listen 127.0.0.1:8000"));
        let haproxy = haproxy_config(8000, &upstreams, 2);
        assert!(haproxy.contains("server instance0 127.0.0.1:4001"));
        assert!(haproxy.contains("server instance1 127.0.0.1:4002"));
        assert!(haproxy.contains("nbthread 2"));
    }
}
