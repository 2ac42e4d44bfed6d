//! `warm`: steady load on warm instances through fngate's proxy, against the same instances
//! reached directly and through nginx and haproxy. Reports throughput, latency percentiles, proxy
//! CPU time per request and proxy memory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::fngate::Fngate;
use crate::oha::{self, Load, LoadResult};
use crate::procs::{self, Memory};
use crate::proxies::{self, RefProxy};
use crate::report::{Machine, Report};
use crate::settings::Settings;
use crate::{client, upstream, warm_report};

/// Name of the benchmark function.
const FUNCTION: &str = "warm";

/// Size of the large request body, echoed back by the instance.
pub const LARGE_BODY_BYTES: usize = 64 * 1024;

/// Instance and proxy worker count: one per core of the 2-core benchmark machine, the same as
/// fngate's tokio runtime on it.
const PROXY_WORKERS: usize = 2;

/// Destination of a load run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    Direct,
    Nginx,
    Haproxy,
    Fngate,
}

impl Target {
    pub const ALL: [Target; 4] = [
        Target::Direct,
        Target::Nginx,
        Target::Haproxy,
        Target::Fngate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Nginx => "nginx",
            Target::Haproxy => "haproxy",
            Target::Fngate => "fngate",
        }
    }
}

/// The request sent in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyKind {
    /// `GET` with no body; the instance returns a small body.
    Small,
    /// `POST` of 64 KiB, echoed back.
    Large,
}

impl BodyKind {
    pub fn label(self) -> &'static str {
        match self {
            BodyKind::Small => "GET, small body",
            BodyKind::Large => "POST 64 KiB, echoed",
        }
    }

    pub fn slug(self) -> &'static str {
        match self {
            BodyKind::Small => "get",
            BodyKind::Large => "post64k",
        }
    }
}

/// One load run against one target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub target: Target,
    pub body: BodyKind,
    pub connections: usize,
    pub repeat: u32,
    pub load: LoadResult,
    /// Proxy CPU time (user + system) per completed request, in microseconds.
    pub cpu_us_per_request: Option<f64>,
    pub memory: Option<Memory>,
}

/// Everything a load run needs to reach each target.
struct Targets {
    fngate: Fngate,
    nginx: RefProxy,
    haproxy: RefProxy,
    instances: Vec<SocketAddr>,
    body_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Targets {
    fn url(&self, target: Target) -> String {
        match target {
            Target::Direct => format!("http://{}/", self.instances[0]),
            Target::Nginx => format!("http://{}/", self.nginx.addr),
            Target::Haproxy => format!("http://{}/", self.haproxy.addr),
            Target::Fngate => format!("http://{}/web/default/{FUNCTION}/", self.fngate.proxy),
        }
    }

    /// Processes whose CPU and memory are the proxy's; none for direct runs.
    fn pids(&self, target: Target) -> Vec<i32> {
        match target {
            Target::Direct => Vec::new(),
            Target::Nginx => self.nginx.pids(),
            Target::Haproxy => self.haproxy.pids(),
            Target::Fngate => vec![self.fngate.pid()],
        }
    }
}

/// Runs the scenario and returns its report.
pub async fn run(settings: &Settings) -> anyhow::Result<Report> {
    let machine = Machine::read();
    proxies::require("nginx")?;
    proxies::require("haproxy")?;
    let oha = tokio::task::spawn_blocking(oha::ensure_installed).await??;
    let targets = start_targets(settings).await?;
    for target in Target::ALL {
        check_target(&targets, target)
            .await
            .with_context(|| format!("functional check of {} failed", target.name()))?;
    }
    warm_up(&oha, &targets, settings).await?;
    let samples = measure(&oha, &targets, settings).await?;
    let Targets {
        fngate,
        nginx,
        haproxy,
        ..
    } = targets;
    nginx.stop();
    haproxy.stop();
    tokio::task::spawn_blocking(move || fngate.stop()).await?;
    warm_report::build(settings, machine, samples)
}

/// Rebuilds the report from the samples of an earlier run, stored in its JSON `data`.
pub fn rebuild(
    settings: &Settings,
    machine: Machine,
    data: serde_json::Value,
) -> anyhow::Result<Report> {
    warm_report::build(settings, machine, serde_json::from_value(data)?)
}

/// Connection counts and bodies measured.
pub fn points(quick: bool) -> (Vec<usize>, Vec<BodyKind>) {
    let connections = if quick {
        vec![1, 64]
    } else {
        vec![1, 16, 64, 256]
    };
    (connections, vec![BodyKind::Small, BodyKind::Large])
}

async fn start_targets(settings: &Settings) -> anyhow::Result<Targets> {
    let binary = settings.fngate_bin.clone();
    let fngate = tokio::task::spawn_blocking(move || Fngate::start(&binary)).await??;

    let spec = serde_json::json!({
        "memory_mb": 64,
        "concurrency": 512,
        "min_instances": 2,
        "max_instances": 2,
        "keep_warm_ms": 86_400_000,
        "timeout_ms": 60_000,
        "queue_limit": 10_000,
    });
    fngate.put_upstream_function(FUNCTION, "", spec).await?;
    let instances = fngate
        .wait_ready_instances(FUNCTION, 2, Duration::from_secs(60))
        .await?;
    let instances: Vec<SocketAddr> = instances.into_iter().take(2).collect();

    let nginx = proxies::start_nginx(&instances, PROXY_WORKERS)?;
    let haproxy = proxies::start_haproxy(&instances, PROXY_WORKERS)?;

    let dir = tempfile::tempdir().context("failed to create a temporary directory")?;
    let body_file = dir.path().join("body-64k.bin");
    std::fs::write(&body_file, large_body())
        .with_context(|| format!("failed to write {}", body_file.display()))?;
    Ok(Targets {
        fngate,
        nginx,
        haproxy,
        instances,
        body_file,
        _dir: dir,
    })
}

fn large_body() -> Vec<u8> {
    (0..LARGE_BODY_BYTES)
        .map(|i| b'a' + (i % 26) as u8)
        .collect()
}

/// Checks that a target returns the instance's body for GET and echoes a 64 KiB POST.
async fn check_target(targets: &Targets, target: Target) -> anyhow::Result<()> {
    let url = targets.url(target);
    let (addr, path) = split_url(&url)?;
    let reply = client::send(addr, Method::GET, &path, Bytes::new()).await?;
    if reply.status != StatusCode::OK || reply.body.as_ref() != upstream::GET_BODY {
        bail!(
            "GET {url} returned {} with body {:?}",
            reply.status,
            reply.text()
        );
    }
    let body = Bytes::from(large_body());
    let reply = client::send(addr, Method::POST, &path, body.clone()).await?;
    if reply.status != StatusCode::OK || reply.body != body {
        bail!(
            "POST {url} with {} bytes returned {} with {} bytes, expected the same bytes back",
            body.len(),
            reply.status,
            reply.body.len()
        );
    }
    Ok(())
}

fn split_url(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http URL: {url}"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr = authority
        .parse()
        .with_context(|| format!("invalid address in {url}"))?;
    Ok((addr, path.to_owned()))
}

async fn warm_up(oha: &Path, targets: &Targets, settings: &Settings) -> anyhow::Result<()> {
    let duration = settings.duration.min(Duration::from_secs(2));
    for target in Target::ALL {
        let load = Load {
            url: &targets.url(target),
            connections: 16,
            duration,
            body: None,
        };
        run_load(oha, &load).await?;
    }
    Ok(())
}

async fn run_load(oha: &Path, load: &Load<'_>) -> anyhow::Result<LoadResult> {
    let oha = oha.to_owned();
    let url = load.url.to_owned();
    let body = load.body.map(Path::to_owned);
    let (connections, duration) = (load.connections, load.duration);
    tokio::task::spawn_blocking(move || {
        let load = Load {
            url: &url,
            connections,
            duration,
            body: body.as_deref(),
        };
        oha::run(&oha, &load)
    })
    .await?
}

/// Runs every point, interleaving targets within each repeat.
async fn measure(
    oha: &Path,
    targets: &Targets,
    settings: &Settings,
) -> anyhow::Result<Vec<Sample>> {
    let (connection_counts, bodies) = points(settings.quick);
    let mut samples = Vec::new();
    for body in bodies {
        for &connections in &connection_counts {
            for repeat in 0..settings.repeats {
                for target in Target::ALL {
                    let sample =
                        measure_one(oha, targets, settings, target, body, connections, repeat)
                            .await?;
                    eprintln!(
                        "fngate-loadtest warm: {:8} {:20} c={:3}: {:9.0} req/s, p50 {:.3} ms, p99 {:.3} ms",
                        target.name(),
                        body.label(),
                        connections,
                        sample.load.requests_per_sec,
                        sample.load.p50_ms,
                        sample.load.p99_ms
                    );
                    samples.push(sample);
                }
            }
        }
    }
    Ok(samples)
}

async fn measure_one(
    oha: &Path,
    targets: &Targets,
    settings: &Settings,
    target: Target,
    body: BodyKind,
    connections: usize,
    repeat: u32,
) -> anyhow::Result<Sample> {
    let url = targets.url(target);
    let load = Load {
        url: &url,
        connections,
        duration: settings.duration,
        body: (body == BodyKind::Large).then_some(targets.body_file.as_path()),
    };
    let pids = targets.pids(target);
    let cpu_before = procs::cpu_time_sum(&pids)?;
    let result = run_load(oha, &load).await?;
    let pids_after = targets.pids(target);
    let cpu_after = procs::cpu_time_sum(&pids_after)?;
    let (cpu_us_per_request, memory) = if pids.is_empty() {
        (None, None)
    } else {
        let cpu = cpu_after.saturating_sub(cpu_before).as_secs_f64() * 1e6;
        let completed = (result.ok + result.bad_status).max(1) as f64;
        (Some(cpu / completed), Some(Memory::sum(&pids_after)?))
    };
    Ok(Sample {
        target,
        body,
        connections,
        repeat,
        load: result,
        cpu_us_per_request,
        memory,
    })
}
