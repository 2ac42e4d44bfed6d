//! `churn`: fngate's proxy library in this process, loaded by oha at 64 connections while a task
//! adds and removes instances of the function at a fixed rate. Reports latency against runs
//! without churn and the instance-list changes per second achieved.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use fngate_proxy::{
    server, Function, FunctionKey, FunctionKind, FunctionSettings, Instance, InstanceState, Pool,
    Proxy, Router,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::oha::{self, Load, LoadResult};
use crate::plot::{self, GroupedBars};
use crate::procs::ChildGuard;
use crate::report::{Machine, Plot, Report, Table};
use crate::settings::Settings;
use crate::stats::{fmt, median, ratio};
use crate::upstream::LISTENING_PREFIX;

/// Connections oha keeps open.
const CONNECTIONS: usize = 64;

/// Slots per instance; high enough that requests never queue.
const CONCURRENCY: u32 = 512;

/// Kind of change the churn task makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChurnMode {
    /// No changes: the baseline.
    None,
    /// Rolling replacement: a new routable instance (a new id at one of the two live addresses,
    /// so with no pooled connections yet), then the oldest one drained.
    Replace,
    /// An instance that is never routable (added in state draining) is added and removed, so
    /// only the instance-list swaps cost anything.
    SwapOnly,
}

impl ChurnMode {
    fn label(self) -> &'static str {
        match self {
            ChurnMode::None => "none",
            ChurnMode::Replace => "replace instances",
            ChurnMode::SwapOnly => "list swaps only",
        }
    }
}

/// One load run at one churn rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChurnSample {
    pub mode: ChurnMode,
    /// Requested instance-list changes per second.
    pub rate: u32,
    pub repeat: u32,
    pub changes: u64,
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub changes_per_sec: f64,
    pub load: LoadResult,
}

/// Lists the (mode, rate) runs of one repeat, baseline first.
fn runs(quick: bool) -> Vec<(ChurnMode, u32)> {
    let replace_rates: &[u32] = if quick {
        &[100, 1000]
    } else {
        &[10, 100, 1000]
    };
    let swap_rates: &[u32] = if quick { &[1000] } else { &[100, 1000] };
    let mut runs = vec![(ChurnMode::None, 0)];
    runs.extend(replace_rates.iter().map(|&rate| (ChurnMode::Replace, rate)));
    runs.extend(swap_rates.iter().map(|&rate| (ChurnMode::SwapOnly, rate)));
    runs
}

/// Starts the `upstream` subcommand of this binary on an ephemeral port.
pub fn spawn_upstream() -> anyhow::Result<(ChildGuard, SocketAddr)> {
    let exe = std::env::current_exe().context("failed to locate fngate-loadtest's binary")?;
    let mut child = Command::new(&exe)
        .arg("upstream")
        .env_remove("PORT")
        .env("FNGATE_INSTANCE_IP", "127.0.0.1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("failed to start {} upstream", exe.display()))?;
    let stdout = child
        .stdout
        .take()
        .context("upstream's stdout is not piped")?;
    let guard = ChildGuard::new("upstream", child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("failed to read the upstream's listen address")?;
    let addr = line
        .trim()
        .strip_prefix(LISTENING_PREFIX)
        .and_then(|addr| addr.parse().ok())
        .with_context(|| format!("unexpected first line from the upstream: {line:?}"))?;
    Ok((guard, addr))
}

/// Runs the scenario and returns its report.
pub async fn run(settings: &Settings) -> anyhow::Result<Report> {
    let machine = Machine::read();
    let oha = tokio::task::spawn_blocking(oha::ensure_installed).await??;
    let (_first, first_addr) = spawn_upstream()?;
    let (_second, second_addr) = spawn_upstream()?;
    let addrs = [first_addr, second_addr];
    // The proxy records metrics as in `fngate serve`, so the request path costs the same.
    let _metrics = fngate_proxy::metrics::install_recorder();
    let router = Arc::new(Router::new());
    router.add_namespace("default");
    let function = router.upsert(function_key("churn"), function_settings());
    for (id, addr) in (1..).zip(addrs) {
        function.pool.add_instance(Arc::new(Instance::new(
            id,
            addr,
            CONCURRENCY,
            Duration::ZERO,
        )));
    }
    router.mark_synced();
    let listener = server::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("failed to bind the in-process proxy")?;
    let url = format!("http://{}/web/default/churn/", listener.local_addr()?);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let proxy = Arc::new(Proxy::new(Arc::clone(&router)));
    let served = tokio::spawn(server::serve_proxy(
        listener,
        proxy,
        async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        },
        Duration::from_secs(1),
    ));
    let result = measure(&oha, &url, &function, addrs, settings).await;
    let _ = stop_tx.send(true);
    let _ = served.await;
    build_report(settings, machine, result?)
}

/// Key of function `default/<name>` at qualifier `$LATEST`.
pub fn function_key(name: &str) -> FunctionKey {
    FunctionKey {
        namespace: "default".to_owned(),
        name: name.to_owned(),
        qualifier: "$LATEST".to_owned(),
    }
}

/// Settings of the in-process web function: 512 slots per instance, so requests never queue.
pub fn function_settings() -> FunctionSettings {
    FunctionSettings {
        kind: FunctionKind::Web,
        memory_mb: 64,
        timeout: Duration::from_secs(60),
        queue_budget: Duration::from_secs(10),
        queue_limit: 10_000,
        max_body_bytes: 6 * 1024 * 1024,
        concurrency: CONCURRENCY,
    }
}

async fn measure(
    oha: &Path,
    url: &str,
    function: &Arc<Function>,
    addrs: [SocketAddr; 2],
    settings: &Settings,
) -> anyhow::Result<Vec<ChurnSample>> {
    let mut churner = Churner {
        pool: Arc::clone(&function.pool),
        addrs,
        live: VecDeque::from([1, 2]),
        next_id: 3,
    };
    warm_up(oha, url, settings).await?;
    let mut samples = Vec::new();
    for repeat in 0..settings.repeats {
        for (mode, rate) in runs(settings.quick) {
            let (stop_tx, stop_rx) = watch::channel(false);
            let task = tokio::spawn(async move {
                let outcome = churner.run(mode, rate, stop_rx).await;
                (outcome, churner)
            });
            let load = run_load(oha, url, settings.duration).await;
            let _ = stop_tx.send(true);
            let ((changes, elapsed), returned) = task.await?;
            churner = returned;
            let load = load?;
            let changes_per_sec = changes as f64 / elapsed.as_secs_f64();
            eprintln!(
                "fngate-loadtest churn: {:17} {rate:5}/s requested, {changes_per_sec:7.1}/s achieved: {:.0} req/s, p99 {:.3} ms",
                mode.label(),
                load.requests_per_sec,
                load.p99_ms
            );
            samples.push(ChurnSample {
                mode,
                rate,
                repeat,
                changes,
                changes_per_sec,
                load,
            });
        }
    }
    Ok(samples)
}

async fn warm_up(oha: &Path, url: &str, settings: &Settings) -> anyhow::Result<()> {
    let result = run_load(oha, url, settings.duration.min(Duration::from_secs(2))).await?;
    if result.ok == 0 {
        bail!("the in-process proxy returned no 2xx response during the warm-up: {result:?}");
    }
    Ok(())
}

async fn run_load(oha: &Path, url: &str, duration: Duration) -> anyhow::Result<LoadResult> {
    let (oha, url) = (oha.to_owned(), url.to_owned());
    tokio::task::spawn_blocking(move || {
        let load = Load {
            url: &url,
            connections: CONNECTIONS,
            duration,
            body: None,
        };
        oha::run(&oha, &load)
    })
    .await?
}

/// The churn task's state, kept across runs: the function's pool and the ids it routes to.
struct Churner {
    pool: Arc<Pool>,
    addrs: [SocketAddr; 2],
    /// Ids of the routable instances, oldest first.
    live: VecDeque<u64>,
    next_id: u64,
}

impl Churner {
    /// Changes the instance list at `rate` changes per second until `stop` is set. Returns the
    /// changes made and the time taken.
    async fn run(
        &mut self,
        mode: ChurnMode,
        rate: u32,
        mut stop: watch::Receiver<bool>,
    ) -> (u64, Duration) {
        let started = Instant::now();
        if mode == ChurnMode::None || rate == 0 {
            let _ = stop.wait_for(|stop| *stop).await;
            return (0, started.elapsed());
        }
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut changes = 0;
        let mut parked: Option<u64> = None;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
            match mode {
                ChurnMode::Replace => self.replace_step(),
                _ => parked = self.swap_step(parked),
            }
            changes += 1;
        }
        if let Some(id) = parked {
            self.pool.remove_instance(id, InstanceState::Draining);
        }
        (changes, started.elapsed())
    }

    /// Adds a routable instance while 2 are live, else drains the oldest, so 2 or 3 instances
    /// are routable at any time.
    fn replace_step(&mut self) {
        if self.live.len() > 2 {
            if let Some(oldest) = self.live.pop_front() {
                self.pool.remove_instance(oldest, InstanceState::Draining);
            }
            return;
        }
        let id = self.take_id();
        let addr = self.addrs[(id % 2) as usize];
        let instance = Instance::new(id, addr, CONCURRENCY, Duration::ZERO);
        self.pool.add_instance(Arc::new(instance));
        self.live.push_back(id);
    }

    /// Removes the parked instance if there is one, else adds a new one that takes no requests.
    /// Returns the id now parked.
    fn swap_step(&mut self, parked: Option<u64>) -> Option<u64> {
        if let Some(id) = parked {
            self.pool.remove_instance(id, InstanceState::Draining);
            return None;
        }
        let id = self.take_id();
        let instance = Instance::new(id, self.addrs[0], CONCURRENCY, Duration::ZERO);
        instance.set_state(InstanceState::Draining);
        self.pool.add_instance(Arc::new(instance));
        Some(id)
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }
}

/// Rebuilds the report from the samples of an earlier run, stored in its JSON `data`.
pub fn rebuild(
    settings: &Settings,
    machine: Machine,
    data: serde_json::Value,
) -> anyhow::Result<Report> {
    build_report(settings, machine, serde_json::from_value(data)?)
}

fn build_report(
    settings: &Settings,
    machine: Machine,
    samples: Vec<ChurnSample>,
) -> anyhow::Result<Report> {
    let mut report = Report::new(
        "churn",
        "Instance churn under load",
        settings.quick,
        machine,
    );
    report.method = vec![format!(
        "fngate's proxy library runs in this process (`Router`, `Pool`, `server::serve_proxy`, \
         with the Prometheus recorder installed as in `fngate serve`) in front of 2 `upstream` \
         processes. oha sends GET requests on {CONNECTIONS} keep-alive connections for {:.1} s \
         per run while a task changes the function's instance list at the given rate. \
         \"replace instances\" adds a new routable instance (a new id at one of the two live \
         addresses, so it starts with no pooled upstream connections) or drains the oldest, so \
         2 or 3 instances are routable; every change is one instance-list swap. \"list swaps \
         only\" adds and removes an instance that never takes requests, so the routable \
         instances and their connections stay. Runs are interleaved within each of {} \
         repeat(s); figures are medians over repeats.",
        settings.duration.as_secs_f64(),
        settings.repeats
    )];
    let points = runs(settings.quick);
    report.tables.push(churn_table(&samples, &points));
    std::fs::create_dir_all(&settings.out)?;
    let file = "churn-latency.svg".to_owned();
    latency_plot(&settings.out.join(&file), &samples, &points)?;
    report.plots.push(Plot {
        caption: "Latency percentiles by churn mode and rate".to_owned(),
        file,
    });
    report.data = serde_json::to_value(&samples)?;
    Ok(report)
}

fn churn_table(samples: &[ChurnSample], points: &[(ChurnMode, u32)]) -> Table {
    let mut table = Table::new(
        "",
        &[
            "churn",
            "changes/s requested",
            "changes/s achieved",
            "req/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "p99 change vs no churn",
            "errors",
        ],
    );
    let baseline_p99 = median_of(samples, ChurnMode::None, 0, |s| s.load.p99_ms);
    for &(mode, rate) in points {
        let pick = |f: fn(&ChurnSample) -> f64| median_of(samples, mode, rate, f);
        let p99 = pick(|s| s.load.p99_ms);
        let errors: u64 = samples
            .iter()
            .filter(|s| s.mode == mode && s.rate == rate)
            .map(|s| s.load.errors + s.load.bad_status)
            .sum();
        table.push(vec![
            mode.label().to_owned(),
            rate.to_string(),
            fmt(pick(|s| s.changes_per_sec), 1),
            fmt(pick(|s| s.load.requests_per_sec), 0),
            fmt(pick(|s| s.load.p50_ms), 3),
            fmt(p99, 3),
            fmt(pick(|s| s.load.p999_ms), 3),
            format!(
                "{:+.3} ms ({})",
                p99 - baseline_p99,
                ratio(p99, baseline_p99)
            ),
            errors.to_string(),
        ]);
    }
    table
}

fn latency_plot(
    path: &Path,
    samples: &[ChurnSample],
    points: &[(ChurnMode, u32)],
) -> anyhow::Result<()> {
    let percentiles: [(&str, Pick); 3] = [
        ("p50", |s| s.load.p50_ms),
        ("p99", |s| s.load.p99_ms),
        ("p99.9", |s| s.load.p999_ms),
    ];
    let series = percentiles
        .iter()
        .map(|(name, pick)| {
            let values = points
                .iter()
                .map(|&(mode, rate)| median_of(samples, mode, rate, *pick))
                .collect();
            ((*name).to_owned(), values)
        })
        .collect();
    let categories = points
        .iter()
        .map(|&(mode, rate)| match mode {
            ChurnMode::None => "no churn".to_owned(),
            ChurnMode::Replace => format!("replace {rate}/s"),
            ChurnMode::SwapOnly => format!("swap only {rate}/s"),
        })
        .collect();
    plot::grouped_bars(
        path,
        &GroupedBars {
            title: format!("Latency at {CONNECTIONS} connections by churn"),
            y_label: "milliseconds".to_owned(),
            categories,
            series,
        },
    )
}

/// Picks one figure of a sample.
type Pick = fn(&ChurnSample) -> f64;

fn median_of(samples: &[ChurnSample], mode: ChurnMode, rate: u32, pick: Pick) -> f64 {
    let values: Vec<f64> = samples
        .iter()
        .filter(|s| s.mode == mode && s.rate == rate)
        .map(pick)
        .collect();
    median(&values)
}
