//! A `fngate serve` process on loopback, with its listen addresses read from its banner, and the
//! control-plane API calls the scenarios need: deploy an `upstream` web function, wait for its
//! instances, read metrics, delete it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{Method, StatusCode};
use tempfile::TempDir;

use crate::client;
use crate::procs::ChildGuard;

/// How long fngate may take to print `fngate: ready`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `fngate serve`, stopped with SIGTERM when dropped.
pub struct Fngate {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub api: SocketAddr,
    guard: ChildGuard,
    dir: TempDir,
}

/// Listen addresses printed in fngate's banner.
#[derive(Default)]
struct Banner {
    proxy: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    api: Option<SocketAddr>,
}

impl Fngate {
    /// Starts `binary serve` on ephemeral loopback ports with a temporary function directory.
    pub fn start(binary: &Path) -> anyhow::Result<Fngate> {
        if !binary.is_file() {
            bail!(
                "fngate binary not found at {}; build it with `cargo build --release --locked -p fngate` or pass --fngate-bin",
                binary.display()
            );
        }
        let dir = tempfile::tempdir().context("failed to create fngate's temporary directory")?;
        let log_path = dir.path().join("fngate.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("failed to create {}", log_path.display()))?;
        let mut child = Command::new(binary)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--api-listen", "127.0.0.1:0"])
            .arg("--function-dir")
            .arg(dir.path().join("data"))
            .args(["--shutdown-grace-ms", "2000", "--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("failed to start {} serve", binary.display()))?;
        let stdout = child
            .stdout
            .take()
            .context("fngate's stdout is not piped")?;
        let guard = ChildGuard::new("fngate", child);
        let banner = read_banner(stdout).with_context(|| {
            format!(
                "fngate did not print `fngate: ready`; its log is {}: {}",
                log_path.display(),
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )
        })?;
        let (Some(proxy), Some(admin), Some(api)) = (banner.proxy, banner.admin, banner.api) else {
            bail!("fngate's banner lacks a listen address; was its output format changed?");
        };
        Ok(Fngate {
            proxy,
            admin,
            api,
            guard,
            dir,
        })
    }

    pub fn pid(&self) -> i32 {
        self.guard.pid()
    }

    /// Stops fngate (SIGTERM; it stops its instances first) and waits for it.
    pub fn stop(mut self) {
        self.guard.stop();
    }

    /// Writes a code directory whose `scf_bootstrap` execs this binary's `upstream` subcommand
    /// with `extra_args`, and returns the directory.
    pub fn write_upstream_code(&self, name: &str, extra_args: &str) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let exe = std::env::current_exe().context("failed to locate fngate-loadtest's binary")?;
        let code = self.dir.path().join("code").join(name);
        std::fs::create_dir_all(&code)
            .with_context(|| format!("failed to create {}", code.display()))?;
        let bootstrap = code.join("scf_bootstrap");
        let script = format!(
            "#!/bin/sh\nexec '{}' upstream {extra_args}\n",
            exe.display()
        );
        std::fs::write(&bootstrap, script)
            .with_context(|| format!("failed to write {}", bootstrap.display()))?;
        std::fs::set_permissions(&bootstrap, std::fs::Permissions::from_mode(0o755))?;
        Ok(code)
    }

    /// Creates or replaces web function `default/<name>` with `spec` (API fields; `kind` and
    /// `code` are filled in) running the `upstream` server.
    pub async fn put_upstream_function(
        &self,
        name: &str,
        upstream_args: &str,
        mut spec: serde_json::Value,
    ) -> anyhow::Result<()> {
        let code = self.write_upstream_code(name, upstream_args)?;
        spec["kind"] = "web".into();
        spec["code"] = serde_json::json!({ "directory": code });
        let path = format!("/v1/namespaces/default/functions/{name}");
        let reply = client::send(self.api, Method::PUT, &path, spec.to_string()).await?;
        if !reply.status.is_success() {
            bail!(
                "creating function {name} through the API failed with {}: {}",
                reply.status,
                reply.text()
            );
        }
        Ok(())
    }

    /// Deletes function `default/<name>`; its instances are drained and stopped afterwards.
    pub async fn delete_function(&self, name: &str) -> anyhow::Result<()> {
        let path = format!("/v1/namespaces/default/functions/{name}");
        let reply = client::send(self.api, Method::DELETE, &path, Bytes::new()).await?;
        if reply.status != StatusCode::NO_CONTENT && reply.status != StatusCode::NOT_FOUND {
            bail!(
                "deleting function {name} failed with {}: {}",
                reply.status,
                reply.text()
            );
        }
        Ok(())
    }

    /// Addresses of the function's instances in state `ready`.
    pub async fn ready_instances(&self, name: &str) -> anyhow::Result<Vec<SocketAddr>> {
        let status = client::get_json(
            self.api,
            &format!("/v1/namespaces/default/functions/{name}"),
        )
        .await?;
        let instances = status["instances"].as_array().cloned().unwrap_or_default();
        Ok(instances
            .iter()
            .filter(|instance| instance["state"] == "ready")
            .filter_map(|instance| instance["addr"].as_str()?.parse().ok())
            .collect())
    }

    /// Waits until the function has `count` ready instances and returns their addresses.
    pub async fn wait_ready_instances(
        &self,
        name: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<SocketAddr>> {
        let deadline = Instant::now() + timeout;
        loop {
            let ready = self.ready_instances(name).await?;
            if ready.len() >= count {
                return Ok(ready);
            }
            if Instant::now() >= deadline {
                bail!(
                    "function {name} has {} ready instances after {}s, expected {count}; see {}",
                    ready.len(),
                    timeout.as_secs(),
                    self.dir.path().join("fngate.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sum of the samples of Prometheus metric `metric` whose labels contain every pair in
    /// `labels`, from the admin port's `/metrics`.
    pub async fn metric_sum(&self, metric: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let reply = client::send(self.admin, Method::GET, "/metrics", Bytes::new()).await?;
        Ok(sum_metric(&reply.text(), metric, labels))
    }

    /// Lines of fngate's log (warnings and errors) that contain `text`, at most `limit`.
    pub fn log_lines(&self, text: &str, limit: usize) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.path().join("fngate.log")).unwrap_or_default();
        log.lines()
            .filter(|line| line.contains(text))
            .take(limit)
            .map(str::to_owned)
            .collect()
    }
}

/// Reads fngate's standard output until `fngate: ready`, collecting the listen addresses. The
/// rest of the output is read and dropped by a thread, so fngate never blocks on a full pipe.
fn read_banner(stdout: std::process::ChildStdout) -> anyhow::Result<Banner> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // The receiver is gone once the banner was read; later lines are dropped.
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + START_TIMEOUT;
    let mut banner = Banner::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).map_err(|error| match error {
            mpsc::RecvTimeoutError::Timeout => anyhow::anyhow!(
                "timed out after {}s waiting for fngate to start",
                START_TIMEOUT.as_secs()
            ),
            mpsc::RecvTimeoutError::Disconnected => anyhow::anyhow!("fngate exited"),
        })?;
        if line.trim() == "fngate: ready" {
            return Ok(banner);
        }
        let addr = || -> Option<SocketAddr> {
            let rest = line.split("http://").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        };
        if line.starts_with("fngate: proxy listening") {
            banner.proxy = addr();
        } else if line.starts_with("fngate: admin listening") {
            banner.admin = addr();
        } else if line.starts_with("fngate: control-plane API listening") {
            banner.api = addr();
        }
    }
}

/// Sums the samples of `metric` in Prometheus text whose labels include every pair in `labels`.
pub fn sum_metric(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (name_and_labels, value) = line.rsplit_once(' ')?;
            let (name, label_text) = match name_and_labels.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (name_and_labels, ""),
            };
            if name != metric {
                return None;
            }
            let matches = labels
                .iter()
                .all(|(key, value)| label_text.contains(&format!("{key}=\"{value}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_filters_labels() {
        let text = "# HELP x\n\
            fngate_instance_starts_total{namespace=\"default\",function=\"a\",result=\"ready\"} 3\n\
            fngate_instance_starts_total{namespace=\"default\",function=\"a\",result=\"failed\"} 1\n\
            fngate_instance_starts_total{namespace=\"default\",function=\"ab\",result=\"ready\"} 5\n";
        let ready = sum_metric(
            text,
            "fngate_instance_starts_total",
            &[("function", "a"), ("result", "ready")],
        );
        assert_eq!(ready, 3.0);
        let all = sum_metric(text, "fngate_instance_starts_total", &[("function", "a")]);
        assert_eq!(all, 4.0);
    }
}
