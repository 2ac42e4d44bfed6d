//! `table-scale`: fngate's routing table with many functions. Each size is measured in a fresh
//! child process (`table-scale-one`), so its memory figure starts from a clean heap. Reports the
//! time to build and swap in a table, to replace it with the same functions, to upsert one
//! function, lookup cost and memory.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fngate_proxy::{FunctionKey, Instance, Router};
use serde::{Deserialize, Serialize};

use crate::churn::{function_key, function_settings};
use crate::plot::{self, LineChart, Series};
use crate::procs::{self, ChildGuard};
use crate::report::{Machine, Plot, Report, Table, TargetCheck};
use crate::settings::Settings;
use crate::stats::{fmt, median};

/// How many times each timed table operation is repeated; the median is reported.
const TIMED_ROUNDS: usize = 5;

/// Time limit of one child process.
const CHILD_TIMEOUT: Duration = Duration::from_secs(600);

/// Options of the hidden `table-scale-one` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct OneArgs {
    #[arg(long)]
    pub functions: usize,
    #[arg(long, default_value_t = 10)]
    pub instances: usize,
    #[arg(long, default_value_t = 1_000_000)]
    pub lookups: usize,
}

/// Figures for one table size. Times are milliseconds unless named otherwise.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SizeResult {
    pub functions: usize,
    pub instances_per_function: usize,
    /// `Router::replace` into an empty router: every function is new.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub first_build_ms: f64,
    /// Adding the instances to every function's pool, in total.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub add_instances_ms: f64,
    /// `Router::replace` with the same functions (median): every function is looked up and keeps
    /// its pool, and the unchanged table is not swapped.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub rebuild_swap_ms: f64,
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub rebuild_swap_max_ms: f64,
    /// `Router::upsert` of one new function into the full table (median).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub upsert_one_ms: f64,
    /// `Router::lookup` of random existing keys.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub lookup_ns: f64,
    pub lookups: usize,
    pub rss_delta_mib: f64,
    pub bytes_per_function: f64,
}

fn sizes(quick: bool) -> Vec<usize> {
    if quick {
        vec![1_000, 10_000]
    } else {
        vec![1_000, 10_000, 100_000]
    }
}

/// Runs the scenario and returns its report.
pub async fn run(settings: &Settings) -> anyhow::Result<Report> {
    let machine = Machine::read();
    let lookups = if settings.quick { 200_000 } else { 2_000_000 };
    let mut results = Vec::new();
    for functions in sizes(settings.quick) {
        let result = tokio::task::spawn_blocking(move || run_child(functions, lookups)).await??;
        eprintln!(
            "fngate-loadtest table-scale: {functions} functions: replace with the same functions {:.2} ms, lookup {:.0} ns",
            result.rebuild_swap_ms, result.lookup_ns
        );
        results.push(result);
    }
    build_report(settings, machine, results)
}

fn run_child(functions: usize, lookups: usize) -> anyhow::Result<SizeResult> {
    let exe = std::env::current_exe().context("failed to locate fngate-loadtest's binary")?;
    let mut child = Command::new(exe)
        .args(["table-scale-one", "--functions", &functions.to_string()])
        .args(["--lookups", &lookups.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("failed to start the table-scale-one child process")?;
    let stdout = child.stdout.take().context("child stdout is not piped")?;
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout));
    let mut guard = ChildGuard::new("table-scale-one", child);
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let status = loop {
        if let Some(status) = guard.exited() {
            break status;
        }
        if Instant::now() >= deadline {
            guard.stop();
            bail!(
                "table-scale-one --functions {functions} did not finish within {}s",
                CHILD_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reading the child's output panicked"))??;
    if !status.success() {
        bail!("table-scale-one --functions {functions} failed with {status}");
    }
    serde_json::from_str(&output)
        .with_context(|| format!("table-scale-one printed no result: {output:?}"))
}

/// Measures one table size in this process and prints the result as JSON.
pub fn run_one(args: &OneArgs) -> anyhow::Result<()> {
    // As in `fngate serve`, each function registers its metric handles with the recorder.
    let _metrics = fngate_proxy::metrics::install_recorder();
    let keys: Vec<FunctionKey> = (0..args.functions)
        .map(|i| function_key(&format!("fn-{i:07}")))
        .collect();
    let entries = || {
        keys.iter()
            .map(|k| (k.clone(), function_settings()))
            .collect::<Vec<_>>()
    };
    let rss_before = procs::own_rss_kib();
    let router = Router::new();
    let batch = entries();
    let started = Instant::now();
    router.replace(batch);
    let first_build_ms = millis(started.elapsed());
    let started = Instant::now();
    add_instances(&router, args.instances);
    let add_instances_ms = millis(started.elapsed());
    let rss_after = procs::own_rss_kib();

    let mut rebuild = Vec::new();
    for _ in 0..TIMED_ROUNDS {
        let batch = entries();
        let started = Instant::now();
        router.replace(batch);
        rebuild.push(millis(started.elapsed()));
    }
    let mut upserts = Vec::new();
    for round in 0..TIMED_ROUNDS {
        let key = function_key(&format!("extra-{round}"));
        let started = Instant::now();
        router.upsert(key, function_settings());
        upserts.push(millis(started.elapsed()));
    }
    let lookup_ns = time_lookups(&router, &keys, args.lookups)?;
    let rss_delta_kib = rss_after.saturating_sub(rss_before) as f64;
    let result = SizeResult {
        functions: args.functions,
        instances_per_function: args.instances,
        first_build_ms,
        add_instances_ms,
        rebuild_swap_ms: median(&rebuild),
        rebuild_swap_max_ms: rebuild.iter().copied().fold(0.0, f64::max),
        upsert_one_ms: median(&upserts),
        lookup_ns,
        lookups: args.lookups,
        rss_delta_mib: rss_delta_kib / 1024.0,
        bytes_per_function: rss_delta_kib * 1024.0 / args.functions.max(1) as f64,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

fn millis(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1000.0
}

/// Gives every function `count` ready instances at distinct loopback addresses.
fn add_instances(router: &Router, count: usize) {
    let mut id = 1u64;
    for function in router.table().functions() {
        for _ in 0..count {
            let port = 1024 + (id % 60_000) as u16;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            function
                .pool
                .add_instance(Arc::new(Instance::new(id, addr, 1, Duration::ZERO)));
            id += 1;
        }
    }
}

/// Average time of one `Router::lookup` of a random existing key, in nanoseconds.
fn time_lookups(router: &Router, keys: &[FunctionKey], count: usize) -> anyhow::Result<f64> {
    if keys.is_empty() || count == 0 {
        return Ok(f64::NAN);
    }
    let order: Vec<usize> = (0..count).map(|_| fastrand::usize(..keys.len())).collect();
    let started = Instant::now();
    for &index in &order {
        let key = &keys[index];
        let found = router.lookup(&key.namespace, &key.name, &key.qualifier);
        if std::hint::black_box(found).is_err() {
            bail!("lookup of existing function {key} failed");
        }
    }
    Ok(started.elapsed().as_secs_f64() * 1e9 / count as f64)
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
    results: Vec<SizeResult>,
) -> anyhow::Result<Report> {
    let mut report = Report::new(
        "table-scale",
        "Routing table scale",
        settings.quick,
        machine,
    );
    report.method = vec![format!(
        "Each size runs in a fresh child process with the Prometheus recorder installed, as in \
         `fngate serve`. One namespace; functions `fn-0000000`…; 10 instances each, added to \
         each function's pool after the first build. Timed: `Router::replace` into an empty \
         router (every function new), `Router::replace` with the same functions ({TIMED_ROUNDS} \
         rounds, median and maximum: one lookup per function, every pool carries over, and the \
         unchanged table is not swapped), `Router::upsert` of one new function into the full \
         table ({TIMED_ROUNDS} rounds, median), and `Router::lookup` of random existing keys on \
         one thread. Building the input list is not timed, but dropping it inside \
         `Router::replace` is. Memory is the growth of this process's VmRSS over the first build \
         and the instance adds."
    )];
    report.tables.push(size_table(&results));
    std::fs::create_dir_all(&settings.out)?;
    let file = "table-scale.svg".to_owned();
    size_plot(&settings.out.join(&file), &results)?;
    report.plots.push(Plot {
        caption: "Table build, replace and upsert time by number of functions".to_owned(),
        file,
    });
    report.targets = vec![target(&results)];
    report.data = serde_json::to_value(&results)?;
    Ok(report)
}

fn size_table(results: &[SizeResult]) -> Table {
    let mut table = Table::new(
        "",
        &[
            "functions",
            "first build + swap ms",
            "replace, same functions ms (max)",
            "upsert one ms",
            "add 10 instances each ms",
            "lookup ns",
            "RSS growth MiB",
            "bytes/function",
        ],
    );
    for r in results {
        table.push(vec![
            r.functions.to_string(),
            fmt(r.first_build_ms, 2),
            format!(
                "{} ({})",
                fmt(r.rebuild_swap_ms, 2),
                fmt(r.rebuild_swap_max_ms, 2)
            ),
            fmt(r.upsert_one_ms, 3),
            fmt(r.add_instances_ms, 1),
            fmt(r.lookup_ns, 0),
            fmt(r.rss_delta_mib, 1),
            fmt(r.bytes_per_function, 0),
        ]);
    }
    table
}

fn size_plot(path: &std::path::Path, results: &[SizeResult]) -> anyhow::Result<()> {
    let series = |name: &str, pick: fn(&SizeResult) -> f64| Series {
        name: name.to_owned(),
        points: results
            .iter()
            .map(|r| (r.functions as f64, pick(r)))
            .collect(),
    };
    plot::line_chart(
        path,
        &LineChart {
            title: "Routing table operations by size".to_owned(),
            x_label: "functions".to_owned(),
            y_label: "milliseconds".to_owned(),
            log_x: true,
            log_y: true,
            legend_outside: false,
            series: vec![
                series("first build + swap", |r| r.first_build_ms),
                series("replace, same functions", |r| r.rebuild_swap_ms),
                series("upsert one", |r| r.upsert_one_ms),
            ],
        },
    )
}

/// The target is a table of 100k instances: with 10 instances per function, the
/// 10k-function size. The 100k-function size (1M instances) is reported beside it.
fn target(results: &[SizeResult]) -> TargetCheck {
    let size = |functions: usize| results.iter().find(|r| r.functions == functions);
    let measured = match (size(10_000), size(100_000)) {
        (Some(r), largest) => {
            let mut text = format!(
                "{:.2} ms (max {:.2} ms; first build {:.2} ms; one upsert {:.3} ms)",
                r.rebuild_swap_ms, r.rebuild_swap_max_ms, r.first_build_ms, r.upsert_one_ms
            );
            if let Some(l) = largest {
                text.push_str(&format!(
                    "; at 100k functions (1M instances): {:.2} ms, one upsert {:.3} ms",
                    l.rebuild_swap_ms, l.upsert_one_ms
                ));
            }
            text
        }
        (None, _) => "not run (quick)".to_owned(),
    };
    TargetCheck {
        target: "a table of 100k instances (10k functions × 10) rebuilt and swapped in ≤ 5 ms \
                 (median)"
            .to_owned(),
        measured,
        met: size(10_000).map(|r| r.rebuild_swap_ms <= 5.0),
    }
}
