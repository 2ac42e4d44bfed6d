//! Options shared by every scenario, and their defaults resolved against the workspace root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

/// Flags every scenario takes.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// fngate binary to benchmark [default: target/release/fngate under the workspace root].
    #[arg(long, value_name = "PATH")]
    pub fngate_bin: Option<PathBuf>,
    /// A few seconds per scenario and fewer points, to check the harness still works (CI). The
    /// tables have the same shape; the figures are only indicative.
    #[arg(long)]
    pub quick: bool,
    /// How often each measurement is repeated; tables report the median [default: 3, quick: 1].
    #[arg(long, value_name = "N")]
    pub repeats: Option<u32>,
    /// Length of one load run in seconds [default: 10, quick: 1].
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Directory for the JSON, markdown and SVG results [default: loadtest/results under the
    /// workspace root].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Markdown page whose marked sections are replaced with the new results, such as
    /// BENCHMARKS.md; a missing section is appended.
    #[arg(long, value_name = "FILE")]
    pub page: Option<PathBuf>,
}

/// Resolved options.
#[derive(Debug, Clone)]
pub struct Settings {
    pub fngate_bin: PathBuf,
    pub quick: bool,
    pub repeats: u32,
    pub duration: Duration,
    pub out: PathBuf,
    pub page: Option<PathBuf>,
}

impl Settings {
    pub fn resolve(args: &CommonArgs) -> anyhow::Result<Settings> {
        let root = workspace_root();
        let duration_secs = args.duration.unwrap_or(if args.quick { 1.0 } else { 10.0 });
        if !(duration_secs > 0.0 && duration_secs <= 3600.0) {
            anyhow::bail!(
                "invalid --duration {duration_secs}: must be more than 0 and at most 3600 seconds"
            );
        }
        let repeats = args.repeats.unwrap_or(if args.quick { 1 } else { 3 });
        if !(1..=100).contains(&repeats) {
            anyhow::bail!("invalid --repeats {repeats}: must be between 1 and 100");
        }
        let fngate_bin = args
            .fngate_bin
            .clone()
            .unwrap_or_else(|| root.join("target/release/fngate"));
        let fngate_bin = absolute(&fngate_bin)?;
        let out = absolute(
            &args
                .out
                .clone()
                .unwrap_or_else(|| root.join("loadtest/results")),
        )?;
        Ok(Settings {
            fngate_bin,
            quick: args.quick,
            repeats,
            duration: Duration::from_secs_f64(duration_secs),
            out,
            page: args.page.clone(),
        })
    }
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_owned());
    }
    let cwd = std::env::current_dir().context("failed to read the current directory")?;
    Ok(cwd.join(path))
}

/// Finds the workspace root: the parent of `CARGO_MANIFEST_DIR` (set by `cargo run`, else the value
/// this binary was built with, if that directory still exists), else the nearest ancestor of the
/// current directory whose Cargo.toml declares `[workspace]`, else the current directory.
pub fn workspace_root() -> PathBuf {
    let from_manifest = |dir: PathBuf| -> Option<PathBuf> {
        let root = dir.parent()?.to_owned();
        root.join("Cargo.toml").is_file().then_some(root)
    };
    if let Some(root) = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .and_then(from_manifest)
    {
        return root;
    }
    if let Some(root) = from_manifest(PathBuf::from(env!("CARGO_MANIFEST_DIR"))) {
        return root;
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    cwd.ancestors()
        .find(|dir| {
            std::fs::read_to_string(dir.join("Cargo.toml"))
                .is_ok_and(|text| text.contains("[workspace]"))
        })
        .map_or(cwd.clone(), Path::to_owned)
}
