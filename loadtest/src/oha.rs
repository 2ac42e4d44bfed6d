//! HTTP/1.1 keep-alive load with oha (`oha --no-tui --output-format json`), installed with
//! `cargo install oha --locked` when it is not on `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::procs::{self, ChildGuard};

/// How long an oha run may take beyond its `-z` duration before it is killed.
const RUN_TIMEOUT_MARGIN: Duration = Duration::from_secs(60);

/// One oha run.
#[derive(Debug, Clone)]
pub struct Load<'a> {
    pub url: &'a str,
    pub connections: usize,
    pub duration: Duration,
    /// `POST` this file as the body; `GET` when `None`.
    pub body: Option<&'a Path>,
}

/// Figures of one oha run. Latencies are in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadResult {
    /// Responses with a 2xx status.
    pub ok: u64,
    /// Responses with any other status.
    pub bad_status: u64,
    /// Connection errors and timeouts, without requests cut off at the end of the run.
    pub errors: u64,
    /// Requests still in flight when the run ended, which oha aborts.
    pub aborted_at_deadline: u64,
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub seconds: f64,
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub requests_per_sec: f64,
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub p50_ms: f64,
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub p99_ms: f64,
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub p999_ms: f64,
}

/// Returns oha's path, installing it with `cargo install oha --locked` (several minutes) when it
/// is neither on `PATH` nor in `~/.cargo/bin`.
pub fn ensure_installed() -> anyhow::Result<PathBuf> {
    if let Some(path) = find() {
        return Ok(path);
    }
    eprintln!(
        "fngate-loadtest: oha not found on PATH; running `cargo install oha --locked` (this takes several minutes)"
    );
    let status = Command::new("cargo")
        .args(["install", "oha", "--locked"])
        .stdin(Stdio::null())
        .status()
        .context("failed to run `cargo install oha --locked`; is cargo on PATH?")?;
    if !status.success() {
        bail!("`cargo install oha --locked` failed with {status}; install oha by hand and rerun");
    }
    find().context(
        "oha is still not found after `cargo install oha --locked`; add ~/.cargo/bin to PATH",
    )
}

fn find() -> Option<PathBuf> {
    procs::find_tool("oha").or_else(|| {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))?;
        let candidate = home.join("bin/oha");
        candidate.is_file().then_some(candidate)
    })
}

/// Runs oha for `load.duration` and parses its JSON summary.
pub fn run(oha: &Path, load: &Load<'_>) -> anyhow::Result<LoadResult> {
    let seconds = load.duration.as_secs_f64().max(0.1);
    let mut command = Command::new(oha);
    command
        .args(["--no-tui", "--output-format", "json", "--no-color"])
        .args(["-c", &load.connections.to_string()])
        .args(["-z", &format!("{}ms", (seconds * 1000.0).round() as u64)])
        .args(["-t", "30s"]);
    if let Some(body) = load.body {
        command.args(["-m", "POST", "-T", "application/octet-stream", "-D"]);
        command.arg(body);
    }
    command
        .arg(load.url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command
        .spawn()
        .with_context(|| format!("failed to run {}", oha.display()))?;
    let limit = load.duration + RUN_TIMEOUT_MARGIN;
    let output = wait_with_timeout(child, limit)
        .with_context(|| format!("oha against {} did not finish", load.url))?;
    if !output.status.success() {
        bail!(
            "oha against {} failed with {}: {}",
            load.url,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "oha printed no JSON; was it built without `--output-format json`? stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    parse(&json)
}

/// Waits for `child` and collects its output, killing it after `limit`.
fn wait_with_timeout(
    mut child: std::process::Child,
    limit: Duration,
) -> anyhow::Result<std::process::Output> {
    use std::io::Read;
    let mut stdout = child.stdout.take().context("stdout is not piped")?;
    let mut stderr = child.stderr.take().context("stderr is not piped")?;
    let out_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let err_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let mut guard = ChildGuard::new("oha", child);
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = guard.exited() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            guard.stop();
            bail!("killed after {}s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(std::process::Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// Extracts the figures from oha's JSON output (oha 1.x).
pub fn parse(json: &serde_json::Value) -> anyhow::Result<LoadResult> {
    let seconds = json["summary"]["total"]
        .as_f64()
        .context("oha's JSON has no summary.total; is this oha 1.x?")?;
    let mut ok = 0;
    let mut bad_status = 0;
    if let Some(codes) = json["statusCodeDistribution"].as_object() {
        for (code, count) in codes {
            let count = count.as_u64().unwrap_or(0);
            if code.starts_with('2') {
                ok += count;
            } else {
                bad_status += count;
            }
        }
    }
    let mut errors = 0;
    let mut aborted_at_deadline = 0;
    if let Some(kinds) = json["errorDistribution"].as_object() {
        for (kind, count) in kinds {
            let count = count.as_u64().unwrap_or(0);
            if kind.contains("deadline") {
                aborted_at_deadline += count;
            } else {
                errors += count;
            }
        }
    }
    let percentile_ms = |key: &str| {
        json["latencyPercentiles"][key]
            .as_f64()
            .map_or(f64::NAN, |s| s * 1000.0)
    };
    Ok(LoadResult {
        ok,
        bad_status,
        errors,
        aborted_at_deadline,
        seconds,
        requests_per_sec: ok as f64 / seconds,
        p50_ms: percentile_ms("p50"),
        p99_ms: percentile_ms("p99"),
        p999_ms: percentile_ms("p99.9"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_oha_json() {
        let json = serde_json::json!({
            "summary": {"total": 2.0},
            "statusCodeDistribution": {"200": 1000, "502": 2},
            "errorDistribution": {"aborted due to deadline": 3, "connection closed": 1},
            "latencyPercentiles": {"p50": 0.001, "p99": 0.002, "p99.9": 0.004}
        });
        let result = parse(&json).expect("parse");
        assert_eq!(result.ok, 1000);
        assert_eq!(result.bad_status, 2);
        assert_eq!(result.errors, 1);
        assert_eq!(result.aborted_at_deadline, 3);
        assert_eq!(result.requests_per_sec, 500.0);
        assert_eq!(result.p50_ms, 1.0);
        assert_eq!(result.p999_ms, 4.0);
    }
}
