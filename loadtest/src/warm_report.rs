//! Tables, plots and target checks of the `warm` scenario, from its samples: the median over
//! repeats of each figure, as absolute values and as ratios to the direct and nginx runs.

use crate::plot::{self, GroupedBars, LineChart, Series};
use crate::report::{Machine, Plot, Report, Table, TargetCheck};
use crate::settings::Settings;
use crate::stats::{fmt, median, ratio};
use crate::warm::{self, BodyKind, Sample, Target};

/// Medians over repeats of one target at one point.
#[derive(Debug, Clone, Copy)]
struct Summary {
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    errors: u64,
    cpu_us: f64,
    rss_mib: f64,
    hwm_mib: f64,
}

fn summarize(samples: &[Sample], target: Target, body: BodyKind, connections: usize) -> Summary {
    let matching: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.target == target && s.body == body && s.connections == connections)
        .collect();
    let pick =
        |f: &dyn Fn(&Sample) -> f64| median(&matching.iter().map(|s| f(s)).collect::<Vec<_>>());
    let mib = |kib: u64| kib as f64 / 1024.0;
    Summary {
        rps: pick(&|s| s.load.requests_per_sec),
        p50: pick(&|s| s.load.p50_ms),
        p99: pick(&|s| s.load.p99_ms),
        p999: pick(&|s| s.load.p999_ms),
        errors: matching
            .iter()
            .map(|s| s.load.errors + s.load.bad_status)
            .sum(),
        cpu_us: pick(&|s| s.cpu_us_per_request.unwrap_or(f64::NAN)),
        rss_mib: pick(&|s| s.memory.map_or(f64::NAN, |m| mib(m.rss_kib))),
        hwm_mib: matching
            .iter()
            .filter_map(|s| s.memory.map(|m| mib(m.hwm_kib)))
            .fold(f64::NAN, f64::max),
    }
}

/// Builds the report, writes the plots under the output directory.
pub fn build(
    settings: &Settings,
    machine: Machine,
    samples: Vec<Sample>,
) -> anyhow::Result<Report> {
    let mut report = Report::new(
        "warm",
        "Warm instances: fngate against direct, nginx and haproxy",
        settings.quick,
        machine,
    );
    report.method = method(settings);

    let (connection_counts, bodies) = warm::points(settings.quick);
    for body in &bodies {
        report
            .tables
            .push(latency_table(&samples, *body, &connection_counts));
    }
    report
        .tables
        .push(cost_table(&samples, &bodies, &connection_counts));

    std::fs::create_dir_all(&settings.out)?;
    for body in &bodies {
        let file = format!("warm-throughput-{}.svg", body.slug());
        throughput_plot(
            &settings.out.join(&file),
            &samples,
            *body,
            &connection_counts,
        )?;
        report.plots.push(Plot {
            caption: format!("Throughput by connection count, {}", body.label()),
            file,
        });
    }

    let latency_connections = latency_plot_connections(&connection_counts);
    let file = "warm-latency.svg".to_owned();
    latency_plot(&settings.out.join(&file), &samples, latency_connections)?;
    report.plots.push(Plot {
        caption: format!("Latency percentiles at {latency_connections} connections, GET"),
        file,
    });

    report.targets = targets(&samples, &connection_counts);
    report.notes = notes();
    report.data = serde_json::to_value(&samples)?;
    Ok(report)
}

fn method(settings: &Settings) -> Vec<String> {
    vec![format!(
        "One web function with 2 warm instances (the `upstream` subcommand: hyper, one tokio \
         worker per core), concurrency 512. oha keeps HTTP/1.1 connections alive and runs for \
         {:.1} s per point; targets are interleaved (direct, nginx, haproxy, fngate) within each \
         of {} repeat(s), and each figure is the median over repeats. `direct` sends to one \
         instance with no proxy. nginx (2 workers) and haproxy (2 threads) proxy to both \
         instances with upstream keep-alive and no buffering to disk. Proxy CPU is utime + stime \
         from /proc/PID/stat (nginx: master + workers; fngate: the whole `fngate serve` \
         process, control plane included) over the run, divided by completed requests. Memory \
         is VmRSS after the run (median) and VmHWM (maximum).",
        settings.duration.as_secs_f64(),
        settings.repeats
    )]
}

fn latency_table(samples: &[Sample], body: BodyKind, connection_counts: &[usize]) -> Table {
    let mut table = Table::new(
        format!("{}: throughput and latency", body.label()),
        &[
            "connections",
            "target",
            "req/s",
            "× direct",
            "× nginx",
            "p50 ms",
            "p50 over direct ms",
            "p99 ms",
            "p99.9 ms",
            "errors",
        ],
    );
    for &connections in connection_counts {
        let direct = summarize(samples, Target::Direct, body, connections);
        let nginx = summarize(samples, Target::Nginx, body, connections);
        for target in Target::ALL {
            let s = summarize(samples, target, body, connections);
            table.push(vec![
                connections.to_string(),
                target.name().to_owned(),
                fmt(s.rps, 0),
                ratio(s.rps, direct.rps),
                ratio(s.rps, nginx.rps),
                fmt(s.p50, 3),
                fmt(s.p50 - direct.p50, 3),
                fmt(s.p99, 3),
                fmt(s.p999, 3),
                s.errors.to_string(),
            ]);
        }
    }
    table
}

fn cost_table(samples: &[Sample], bodies: &[BodyKind], connection_counts: &[usize]) -> Table {
    let mut table = Table::new(
        "Proxy CPU time and memory",
        &[
            "request",
            "connections",
            "proxy",
            "CPU µs/request",
            "CPU × nginx",
            "RSS MiB",
            "peak RSS MiB",
        ],
    );
    for &body in bodies {
        for &connections in connection_counts {
            let nginx = summarize(samples, Target::Nginx, body, connections);
            for target in [Target::Nginx, Target::Haproxy, Target::Fngate] {
                let s = summarize(samples, target, body, connections);
                table.push(vec![
                    body.slug().to_owned(),
                    connections.to_string(),
                    target.name().to_owned(),
                    fmt(s.cpu_us, 1),
                    ratio(s.cpu_us, nginx.cpu_us),
                    fmt(s.rss_mib, 1),
                    fmt(s.hwm_mib, 1),
                ]);
            }
        }
    }
    table
}

fn throughput_plot(
    path: &std::path::Path,
    samples: &[Sample],
    body: BodyKind,
    connection_counts: &[usize],
) -> anyhow::Result<()> {
    let series = Target::ALL
        .iter()
        .map(|&target| Series {
            name: target.name().to_owned(),
            points: connection_counts
                .iter()
                .map(|&c| (c as f64, summarize(samples, target, body, c).rps))
                .collect(),
        })
        .collect();
    plot::line_chart(
        path,
        &LineChart {
            title: format!("Throughput, {}", body.label()),
            x_label: "connections".to_owned(),
            y_label: "requests/s".to_owned(),
            log_x: true,
            log_y: false,
            legend_outside: false,
            series,
        },
    )
}

/// 64 connections when measured, else the largest count measured.
fn latency_plot_connections(connection_counts: &[usize]) -> usize {
    if connection_counts.contains(&64) {
        64
    } else {
        connection_counts.iter().copied().max().unwrap_or(1)
    }
}

fn latency_plot(
    path: &std::path::Path,
    samples: &[Sample],
    connections: usize,
) -> anyhow::Result<()> {
    let series = Target::ALL
        .iter()
        .map(|&target| {
            let s = summarize(samples, target, BodyKind::Small, connections);
            (target.name().to_owned(), vec![s.p50, s.p99, s.p999])
        })
        .collect();
    plot::grouped_bars(
        path,
        &GroupedBars {
            title: format!("Latency at {connections} connections, GET"),
            y_label: "milliseconds".to_owned(),
            categories: vec!["p50".to_owned(), "p99".to_owned(), "p99.9".to_owned()],
            series,
        },
    )
}

fn targets(samples: &[Sample], connection_counts: &[usize]) -> Vec<TargetCheck> {
    let at = |target, connections| summarize(samples, target, BodyKind::Small, connections);
    let has = |connections| connection_counts.contains(&connections);
    let mut checks = Vec::new();
    let (fngate, nginx) = (at(Target::Fngate, 64), at(Target::Nginx, 64));
    let throughput = fngate.rps / nginx.rps;
    checks.push(TargetCheck {
        target: "warm throughput at 64 connections (GET) ≥ 1.0× nginx".to_owned(),
        measured: format!(
            "{:.2}× ({:.0} vs {:.0} req/s)",
            throughput, fngate.rps, nginx.rps
        ),
        met: (has(64) && throughput.is_finite()).then_some(throughput >= 1.0),
    });
    checks.push(TargetCheck {
        target: "proxy CPU per request at 64 connections (GET) ≤ nginx's".to_owned(),
        measured: format!("{:.1} µs vs {:.1} µs", fngate.cpu_us, nginx.cpu_us),
        met: (has(64) && fngate.cpu_us.is_finite()).then_some(fngate.cpu_us <= nginx.cpu_us),
    });
    let added = at(Target::Fngate, 1).p50 - at(Target::Direct, 1).p50;
    checks.push(TargetCheck {
        target: "added p50 latency over direct at 1 connection (GET) ≤ 0.15 ms".to_owned(),
        measured: format!("{added:.3} ms"),
        met: (has(1) && added.is_finite()).then_some(added <= 0.15),
    });
    checks
}

fn notes() -> Vec<String> {
    vec![
        "Load generator, proxy and instances share the same cores, so absolute figures are \
         bounded by the machine; the ratios are the comparable part."
            .to_owned(),
        "`direct` loads one of the two instances, so its throughput is not a strict upper bound \
         for the proxies, which spread load over both."
            .to_owned(),
        "fngate's CPU and memory include its control plane, which is idle during the runs."
            .to_owned(),
    ]
}
