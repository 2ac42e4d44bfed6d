//! The `fngate-loadtest` command: benchmark scenarios for fngate, and the `upstream` server the
//! scenarios run as the function instance.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fngate_loadtest::report::{self, Report};
use fngate_loadtest::settings::{CommonArgs, Settings};
use fngate_loadtest::{churn, cold, table_scale, upstream, warm};

/// The allocator of the `fngate` binary. The churn and table-scale scenarios run fngate's proxy
/// library in this process, so they measure it with the allocator it ships with: under glibc's
/// allocator, one upsert into a 100k-function table took 6 ms instead of 0.1 ms.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "fngate-loadtest",
    version,
    about = "Benchmark scenarios for fngate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP/1.1 on $FNGATE_INSTANCE_IP:$PORT as a benchmark function instance: GET returns
    /// a small body, POST echoes the body. Exits on SIGTERM.
    Upstream(upstream::UpstreamArgs),
    /// Warm instances under oha load: direct, nginx, haproxy and fngate compared.
    Warm(CommonArgs),
    /// Bursts of simultaneous requests to a function with no instances.
    ColdBurst(CommonArgs),
    /// Instances added and removed at 10 to 1000 changes/s under load, in-process.
    Churn(CommonArgs),
    /// Routing tables of 1k to 100k functions: build, swap, lookup and memory.
    TableScale(CommonArgs),
    /// Every scenario in order: warm, cold-burst, churn, table-scale.
    All(CommonArgs),
    /// Rebuild the markdown, plots and page sections from the JSON results under --out, without
    /// running anything (after a change to how reports are written).
    Render(CommonArgs),
    /// Measure one routing-table size and print JSON (run by table-scale in a child process).
    #[command(hide = true)]
    TableScaleOne(table_scale::OneArgs),
}

/// Scenario names in the order `all` runs them, with their section headings on the page.
const SCENARIOS: [(&str, &str); 4] = [
    ("warm", "warm: steady load on warm instances"),
    ("cold-burst", "cold-burst: simultaneous cold starts"),
    ("churn", "churn: instance changes under load"),
    (
        "table-scale",
        "table-scale: routing tables with many functions",
    ),
];

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Upstream(args) => upstream::run(&args),
        Command::TableScaleOne(args) => table_scale::run_one(&args),
        Command::Warm(args) => run_scenarios(&args, &["warm"]),
        Command::ColdBurst(args) => run_scenarios(&args, &["cold-burst"]),
        Command::Churn(args) => run_scenarios(&args, &["churn"]),
        Command::TableScale(args) => run_scenarios(&args, &["table-scale"]),
        Command::Render(args) => render(&args),
        Command::All(args) => {
            let names: Vec<&str> = SCENARIOS.iter().map(|(name, _)| *name).collect();
            run_scenarios(&args, &names)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fngate-loadtest: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_scenarios(args: &CommonArgs, names: &[&str]) -> anyhow::Result<()> {
    let settings = Settings::resolve(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    for name in names {
        eprintln!("fngate-loadtest: running {name}");
        let mut report = runtime
            .block_on(run_until_signal(name, &settings))
            .with_context(|| format!("scenario {name} failed"))?;
        report.repeats = settings.repeats;
        report.duration_secs = settings.duration.as_secs_f64();
        report.write(&settings.out)?;
        if let Some(page) = &settings.page {
            update_page(page, &settings, &report)?;
        }
    }
    Ok(())
}

/// Runs a scenario until it ends or SIGTERM or SIGINT arrives. On a signal the scenario's future
/// is dropped, so its guards stop the processes it started.
async fn run_until_signal(name: &str, settings: &Settings) -> anyhow::Result<Report> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    tokio::select! {
        result = run_scenario(name, settings) => result,
        _ = terminate.recv() => anyhow::bail!("stopped by SIGTERM"),
        _ = interrupt.recv() => anyhow::bail!("stopped by SIGINT"),
    }
}

async fn run_scenario(name: &str, settings: &Settings) -> anyhow::Result<Report> {
    match name {
        "warm" => warm::run(settings).await,
        "cold-burst" => cold::run(settings).await,
        "churn" => churn::run(settings).await,
        "table-scale" => table_scale::run(settings).await,
        other => anyhow::bail!("unknown scenario {other:?}"),
    }
}

/// Rebuilds every report found under the output directory from its stored samples, keeping the
/// original command, dates, machine and run settings.
fn render(args: &CommonArgs) -> anyhow::Result<()> {
    let settings = Settings::resolve(args)?;
    let mut found = false;
    for (name, _) in SCENARIOS {
        let Some(old) = report::read_report(&settings.out, name) else {
            continue;
        };
        found = true;
        let mut run = settings.clone();
        run.quick = old.quick;
        if old.repeats > 0 && old.duration_secs > 0.0 {
            run.repeats = old.repeats;
            run.duration = std::time::Duration::from_secs_f64(old.duration_secs);
        }
        let rebuilt = match name {
            "warm" => warm::rebuild(&run, old.machine.clone(), old.data.clone()),
            "cold-burst" => cold::rebuild(&run, old.machine.clone(), old.data.clone()),
            "churn" => churn::rebuild(&run, old.machine.clone(), old.data.clone()),
            _ => table_scale::rebuild(&run, old.machine.clone(), old.data.clone()),
        };
        let mut report = rebuilt.with_context(|| {
            format!("failed to rebuild {name} from its JSON results; rerun the scenario")
        })?;
        report.command = old.command;
        report.date = old.date;
        report.load_average_at_end = old.load_average_at_end;
        report.repeats = run.repeats;
        report.duration_secs = run.duration.as_secs_f64();
        report.write(&settings.out)?;
        if let Some(page) = &settings.page {
            update_page(page, &settings, &report)?;
        }
    }
    if !found {
        anyhow::bail!(
            "no results found under {}; run a scenario first or pass --out",
            settings.out.display()
        );
    }
    Ok(())
}

/// Replaces the scenario's section and the target summary on the benchmark page.
fn update_page(page: &std::path::Path, settings: &Settings, report: &Report) -> anyhow::Result<()> {
    let image_dir = report::image_dir_for(page, &settings.out);
    let heading = SCENARIOS
        .iter()
        .find(|(name, _)| *name == report.scenario)
        .map_or(report.title.as_str(), |(_, heading)| heading);
    report::update_page(
        page,
        &report.scenario,
        heading,
        &report.to_markdown(&image_dir),
    )?;
    let summary = report::target_summary(&settings.out, &SCENARIOS.map(|(name, _)| name));
    report::update_page(page, "summary", "Targets", &summary)?;
    println!("fngate-loadtest: updated {}", page.display());
    Ok(())
}
