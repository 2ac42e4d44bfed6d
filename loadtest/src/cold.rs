//! `cold-burst`: N simultaneous requests to a web function with no instances. Reports the time to
//! the first and last response, instances created against ⌈N / concurrency⌉, errors, and the
//! platform's own share of each cold start: `queue` minus `boot` from `Server-Timing`.

use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::burst::{self, Outcome};
use crate::fngate::Fngate;
use crate::plot::{self, LineChart, Series};
use crate::procs;
use crate::report::{Machine, Plot, Report, Table, TargetCheck};
use crate::settings::Settings;
use crate::stats::{fmt, mean, median, percentile};

/// How long each request of a burst may take, cold start included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the instances of a deleted function may take to exit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(90);

/// Per-instance concurrency values measured.
const CONCURRENCY: [u32; 2] = [1, 4];

/// One burst.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BurstResult {
    pub concurrency: u32,
    pub requests: usize,
    pub repeat: u32,
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub first_ms: f64,
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub last_ms: f64,
    pub ok: usize,
    pub errors: usize,
    pub error_examples: Vec<String>,
    /// `fngate_upstream_retries_total` for the function: requests moved to another instance
    /// because the first one never received them.
    #[serde(default)]
    pub upstream_retries: f64,
    /// Instances that fngate logged as exited unexpectedly, which it had counted as ready.
    pub exited_unexpectedly: usize,
    /// The error of the first failed or exited instance in fngate's log, shortened.
    pub failure_example: Option<String>,
    pub instances_ready: f64,
    pub instances_failed: f64,
    pub instances_needed: usize,
    /// `queue − boot` of each response that was an instance's first, in milliseconds.
    pub platform_share_ms: Vec<f64>,
    pub boot_ms: Vec<f64>,
    /// Completion times of successful responses, sorted, in milliseconds since the release.
    pub completions_ms: Vec<f64>,
}

fn burst_sizes(quick: bool) -> Vec<usize> {
    if quick {
        vec![10, 50]
    } else {
        vec![10, 100, 1000]
    }
}

/// Runs the scenario and returns its report.
pub async fn run(settings: &Settings) -> anyhow::Result<Report> {
    let machine = Machine::read();
    let limit = procs::raise_open_file_limit()?;
    if limit < 8192 {
        eprintln!(
            "fngate-loadtest cold-burst: open-file limit is {limit}; a 1000-request burst needs about 5000 in fngate"
        );
    }
    let binary = settings.fngate_bin.clone();
    let fngate = tokio::task::spawn_blocking(move || Fngate::start(&binary)).await??;
    let mut results = Vec::new();
    for concurrency in CONCURRENCY {
        for requests in burst_sizes(settings.quick) {
            for repeat in 0..settings.repeats {
                let result = one_burst(&fngate, concurrency, requests, repeat).await?;
                eprintln!(
                    "fngate-loadtest cold-burst: c={concurrency} N={requests}: last response at {:.1} ms, {} errors, {} instances (needed {})",
                    result.last_ms, result.errors, result.instances_ready, result.instances_needed
                );
                results.push(result);
            }
        }
    }
    tokio::task::spawn_blocking(move || fngate.stop()).await?;
    build_report(settings, machine, results)
}

async fn one_burst(
    fngate: &Fngate,
    concurrency: u32,
    requests: usize,
    repeat: u32,
) -> anyhow::Result<BurstResult> {
    let name = format!("cold-c{concurrency}-n{requests}-r{repeat}");
    let spec = serde_json::json!({
        "memory_mb": 64,
        "concurrency": concurrency,
        "min_instances": 0,
        "max_instances": 1000,
        "keep_warm_ms": 86_400_000,
        "timeout_ms": 60_000,
        "queue_limit": 100_000,
        "queue_budget_ms": REQUEST_TIMEOUT.as_millis() as u64,
        "start_timeout_ms": REQUEST_TIMEOUT.as_millis() as u64,
    });
    fngate
        .put_upstream_function(&name, "--workers 1", spec)
        .await?;

    let path = format!("/web/default/{name}/");
    let outcomes = burst::run(fngate.proxy, &path, requests, REQUEST_TIMEOUT).await;
    let labels = [("function", name.as_str()), ("result", "ready")];
    let ready = fngate
        .metric_sum("fngate_instance_starts_total", &labels)
        .await?;
    let labels = [("function", name.as_str()), ("result", "failed")];
    let failed = fngate
        .metric_sum("fngate_instance_starts_total", &labels)
        .await?;
    let labels = [("function", name.as_str())];
    let retries = fngate
        .metric_sum("fngate_upstream_retries_total", &labels)
        .await?;
    let failure_lines = fngate.log_lines(&format!("default/{name}:"), usize::MAX);
    fngate.delete_function(&name).await?;
    let pid = fngate.pid();
    let left = tokio::task::spawn_blocking(move || procs::wait_no_children(pid, DRAIN_TIMEOUT))
        .await
        .context("waiting for instances to exit failed")?;
    if left > 0 {
        eprintln!(
            "fngate-loadtest cold-burst: {left} instance processes of {name} still run {}s after the function was deleted",
            DRAIN_TIMEOUT.as_secs()
        );
    }
    let mut result = summarize(concurrency, requests, repeat, &outcomes, ready, failed);
    result.upstream_retries = retries;
    result.exited_unexpectedly = failure_lines
        .iter()
        .filter(|line| line.contains("exited unexpectedly"))
        .count();
    result.failure_example = failure_lines.iter().find_map(|line| {
        let (_, error) = line.split_once("error=")?;
        Some(error.chars().take(200).collect())
    });
    Ok(result)
}

fn summarize(
    concurrency: u32,
    requests: usize,
    repeat: u32,
    outcomes: &[Outcome],
    instances_ready: f64,
    instances_failed: f64,
) -> BurstResult {
    let mut completions: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.is_ok())
        .map(|o| o.done_ms)
        .collect();
    completions.sort_by(f64::total_cmp);
    let mut error_examples: Vec<String> = Vec::new();
    for outcome in outcomes.iter().filter(|o| !o.is_ok()) {
        let text = match (&outcome.error, outcome.status) {
            (Some(error), _) => error.clone(),
            (None, status) => format!("status {}", status.unwrap_or(0)),
        };
        if error_examples.len() < 3 && !error_examples.contains(&text) {
            error_examples.push(text);
        }
    }
    let mut platform_share_ms = Vec::new();
    let mut boot_ms = Vec::new();
    for timing in outcomes.iter().filter_map(|o| o.server_timing.as_deref()) {
        if let (Some(queue), Some(boot)) = burst::parse_server_timing(timing) {
            platform_share_ms.push(queue - boot);
            boot_ms.push(boot);
        }
    }
    BurstResult {
        concurrency,
        requests,
        repeat,
        first_ms: completions.first().copied().unwrap_or(f64::NAN),
        last_ms: completions.last().copied().unwrap_or(f64::NAN),
        ok: completions.len(),
        errors: outcomes.len() - completions.len(),
        error_examples,
        upstream_retries: 0.0,
        exited_unexpectedly: 0,
        failure_example: None,
        instances_ready,
        instances_failed,
        instances_needed: requests.div_ceil(concurrency as usize),
        platform_share_ms,
        boot_ms,
        completions_ms: completions,
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
    results: Vec<BurstResult>,
) -> anyhow::Result<Report> {
    let mut report = Report::new("cold-burst", "Cold-start bursts", settings.quick, machine);
    report.method = vec![format!(
        "Each burst creates a new web function with no instances (the `upstream` subcommand on \
         one thread, `memory_mb` 64, `max_instances` 1000, no namespace quota), opens N \
         connections, then sends one GET on each at the same moment and times the responses \
         from that moment. Instances created is `fngate_instance_starts_total` for the \
         function, with `result=\"failed\"` in brackets; \"exited after ready\" counts the \
         instances fngate logged as exited unexpectedly, and retries is \
         `fngate_upstream_retries_total` (all three: the highest of the repeats); \
         needed is ⌈N / concurrency⌉. The platform share of a cold start is `queue` \
         minus `boot` from the `Server-Timing` header of each response that carries both \
         (fngate adds `boot` to an instance's first response; \"responses with boot\" counts \
         them, median over repeats): time spent queued that the instance's own boot does not \
         explain. {} repeat(s); \
         times are medians over repeats, shares are pooled over repeats. The function is \
         deleted and its instances have exited before the next burst.",
        settings.repeats
    )];
    report.tables.push(burst_table(&results));
    std::fs::create_dir_all(&settings.out)?;
    let file = "cold-burst-timeline.svg".to_owned();
    timeline_plot(&settings.out.join(&file), &results)?;
    report.plots.push(Plot {
        caption: "Share of responses completed over time since the burst was released".to_owned(),
        file,
    });
    report.targets = targets(&results);
    report.notes = error_notes(&results);
    report.data = serde_json::to_value(&results)?;
    Ok(report)
}

/// Results of one (concurrency, N) point over its repeats.
fn point(results: &[BurstResult], concurrency: u32, requests: usize) -> Vec<&BurstResult> {
    results
        .iter()
        .filter(|r| r.concurrency == concurrency && r.requests == requests)
        .collect()
}

fn pooled(runs: &[&BurstResult], pick: fn(&BurstResult) -> &Vec<f64>) -> Vec<f64> {
    runs.iter().flat_map(|r| pick(r).iter().copied()).collect()
}

fn burst_table(results: &[BurstResult]) -> Table {
    let mut table = Table::new(
        "",
        &[
            "concurrency",
            "N",
            "first response ms",
            "last response ms",
            "errors",
            "instances created (failed)",
            "exited after ready",
            "retries",
            "responses with boot",
            "needed",
            "platform share mean ms",
            "platform share p50 ms",
            "platform share p99 ms",
            "boot p50 ms",
        ],
    );
    let mut points: Vec<(u32, usize)> = results
        .iter()
        .map(|r| (r.concurrency, r.requests))
        .collect();
    points.dedup();
    for (concurrency, requests) in points {
        let runs = point(results, concurrency, requests);
        let times = |pick: fn(&BurstResult) -> f64| {
            median(&runs.iter().map(|r| pick(r)).collect::<Vec<_>>())
        };
        let share = pooled(&runs, |r| &r.platform_share_ms);
        let boot = pooled(&runs, |r| &r.boot_ms);
        let created = runs.iter().map(|r| r.instances_ready).fold(0.0, f64::max);
        let failed = runs.iter().map(|r| r.instances_failed).fold(0.0, f64::max);
        let exited = runs
            .iter()
            .map(|r| r.exited_unexpectedly)
            .max()
            .unwrap_or(0);
        let retries = runs.iter().map(|r| r.upstream_retries).fold(0.0, f64::max);
        table.push(vec![
            concurrency.to_string(),
            requests.to_string(),
            fmt(times(|r| r.first_ms), 1),
            fmt(times(|r| r.last_ms), 1),
            runs.iter().map(|r| r.errors).sum::<usize>().to_string(),
            format!("{created:.0} ({failed:.0})"),
            exited.to_string(),
            format!("{retries:.0}"),
            fmt(times(|r| r.platform_share_ms.len() as f64), 0),
            requests.div_ceil(concurrency as usize).to_string(),
            fmt(mean(&share), 2),
            fmt(median(&share), 2),
            fmt(percentile(&share, 99.0), 2),
            fmt(median(&boot), 2),
        ]);
    }
    table
}

fn timeline_plot(path: &std::path::Path, results: &[BurstResult]) -> anyhow::Result<()> {
    let series = results
        .iter()
        .filter(|r| r.repeat == 0 && !r.completions_ms.is_empty())
        .map(|r| {
            let count = r.completions_ms.len() as f64;
            Series {
                name: format!("concurrency {}, N={}", r.concurrency, r.requests),
                points: r
                    .completions_ms
                    .iter()
                    .enumerate()
                    .map(|(i, ms)| (*ms, (i + 1) as f64 / count))
                    .collect(),
            }
        })
        .collect();
    plot::line_chart(
        path,
        &LineChart {
            title: "Cold-start bursts: responses completed".to_owned(),
            x_label: "ms since release".to_owned(),
            y_label: "share of responses".to_owned(),
            log_x: true,
            log_y: false,
            legend_outside: true,
            series,
        },
    )
}

fn targets(results: &[BurstResult]) -> Vec<TargetCheck> {
    let smallest = results.iter().map(|r| r.requests).min().unwrap_or(0);
    let share = pooled(&point(results, 1, smallest), |r| &r.platform_share_ms);
    let share_mean = mean(&share);
    let mut checks = vec![TargetCheck {
        target: format!(
            "platform share of a local cold start (mean, concurrency 1, N={smallest}) ≤ 5 ms"
        ),
        measured: format!(
            "{} ms (median {} ms, p99 {} ms)",
            fmt(share_mean, 2),
            fmt(median(&share), 2),
            fmt(percentile(&share, 99.0), 2)
        ),
        met: share_mean.is_finite().then_some(share_mean <= 5.0),
    }];
    for concurrency in CONCURRENCY {
        let runs = point(results, concurrency, 1000);
        let needed = 1000usize.div_ceil(concurrency as usize);
        let errors: usize = runs.iter().map(|r| r.errors).sum();
        let created = runs
            .iter()
            .map(|r| r.instances_ready + r.instances_failed)
            .fold(0.0, f64::max);
        checks.push(TargetCheck {
            target: format!(
                "1000-request cold burst, concurrency {concurrency}: no errors and at most {needed} instances"
            ),
            measured: if runs.is_empty() {
                "not run (quick)".to_owned()
            } else {
                format!("{errors} errors, {created:.0} instances")
            },
            met: (!runs.is_empty()).then_some(errors == 0 && created <= needed as f64),
        });
    }
    checks
}

fn error_notes(results: &[BurstResult]) -> Vec<String> {
    let mut notes = vec![
        "`queue − boot` pairs a request with the instance that served it first, which need not \
         be the instance its arrival started, so single values can be negative. Over a whole \
         burst the pairing cancels out in the mean (the mean time from a request queueing to an \
         instance start, plus the hand-over after readiness) only when every new instance's \
         first response carries `boot`. Where \"responses with boot\" is below the instances \
         created, the other instances became ready after the earlier ones had already served \
         the whole queue (the `upstream` answers in microseconds), so they served no request in \
         the burst and have no first response; the mean then covers the requests that did \
         wait for a boot. (With a handler that takes 300 ms, 20 simultaneous requests gave 20 \
         instances and 19 responses with `boot`.)"
            .to_owned(),
    ];
    for r in results {
        if !r.error_examples.is_empty() {
            notes.push(format!(
                "concurrency {}, N={}, repeat {}: {} errors, for example: {}",
                r.concurrency,
                r.requests,
                r.repeat,
                r.errors,
                r.error_examples.join("; ")
            ));
        }
        let created = r.instances_ready + r.instances_failed;
        if created > r.instances_needed as f64 {
            notes.push(format!(
                "concurrency {}, N={}, repeat {}: {created:.0} instances started, more than the \
                 {} needed",
                r.concurrency, r.requests, r.repeat, r.instances_needed
            ));
        }
        if r.instances_failed > 0.0 || r.exited_unexpectedly > 0 {
            notes.push(format!(
                "concurrency {}, N={}, repeat {}: {:.0} instance starts failed and {} instances \
                 exited unexpectedly after fngate counted them ready; first error: {}",
                r.concurrency,
                r.requests,
                r.repeat,
                r.instances_failed,
                r.exited_unexpectedly,
                r.failure_example
                    .as_deref()
                    .unwrap_or("none logged at warn level")
            ));
        }
    }
    notes
}
