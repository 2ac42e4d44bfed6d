//! Scenario reports: the machine a run happened on, result tables, plots and target checks,
//! written as JSON and markdown under the output directory and, on request, into the marked
//! sections of a benchmark page such as `BENCHMARKS.md`.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The machine a scenario ran on, read from `/proc` when the scenario started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// When the scenario started, as `YYYY-MM-DD HH:MM UTC`.
    #[serde(default)]
    pub started: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub cpu_model: String,
    /// One-minute load average when the scenario started; above about 0.5 on this machine,
    /// something else was running.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub load_average_at_start: f64,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0);
        Machine {
            started: utc_now(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            cpu_model: cpuinfo
                .lines()
                .find_map(|line| line.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
                .unwrap_or_default(),
            load_average_at_start: load_average(),
        }
    }

    /// Describes the machine in one line: cores, CPU, memory, kernel and load.
    pub fn describe(&self) -> String {
        format!(
            "{} cores ({}), {} GiB memory, Linux {}; load average {:.2} at start",
            self.cores, self.cpu_model, self.memory_gib, self.kernel, self.load_average_at_start
        )
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .unwrap_or_default()
}

/// One-minute load average from `/proc/loadavg`.
pub fn load_average() -> f64 {
    read_trimmed("/proc/loadavg")
        .split_whitespace()
        .next()
        .and_then(|value| value.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A result table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Table {
    pub title: String,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: impl Into<String>, headers: &[&str]) -> Table {
        Table {
            title: title.into(),
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    pub fn to_markdown(&self) -> String {
        let mut text = String::new();
        if !self.title.is_empty() {
            text.push_str(&format!("**{}**\n\n", self.title));
        }
        text.push_str(&format!("| {} |\n", self.headers.join(" | ")));
        let rule: Vec<&str> = self.headers.iter().map(|_| "---").collect();
        text.push_str(&format!("|{}|\n", rule.join("|")));
        for row in &self.rows {
            text.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        text
    }
}

/// A target fngate aims for, with the measured figure and whether it is met.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    /// `None` when the run did not measure it (for example a `--quick` run without the point).
    pub met: Option<bool>,
}

impl TargetCheck {
    pub fn verdict(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "not measured",
        }
    }
}

/// An SVG plot written next to the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plot {
    pub caption: String,
    pub file: String,
}

/// Everything one scenario produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub title: String,
    pub command: String,
    /// When the report was built, at the end of the scenario.
    pub date: String,
    pub quick: bool,
    /// Repeats per point and seconds per load run, for rebuilding the report later.
    #[serde(default)]
    pub repeats: u32,
    #[serde(default)]
    pub duration_secs: f64,
    pub machine: Machine,
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub load_average_at_end: f64,
    /// Description of the method, one paragraph per entry.
    pub method: Vec<String>,
    pub tables: Vec<Table>,
    pub plots: Vec<Plot>,
    pub targets: Vec<TargetCheck>,
    pub notes: Vec<String>,
    /// The raw samples behind the tables.
    pub data: serde_json::Value,
}

impl Report {
    pub fn new(scenario: &str, title: &str, quick: bool, machine: Machine) -> Report {
        Report {
            scenario: scenario.to_owned(),
            title: title.to_owned(),
            command: command_line(),
            date: utc_now(),
            quick,
            repeats: 0,
            duration_secs: 0.0,
            machine,
            load_average_at_end: f64::NAN,
            method: Vec::new(),
            tables: Vec::new(),
            plots: Vec::new(),
            targets: Vec::new(),
            notes: Vec::new(),
            data: serde_json::Value::Null,
        }
    }

    /// Renders the report body; plot links are `image_dir` joined with the file name.
    pub fn to_markdown(&self, image_dir: &str) -> String {
        let mut text = format!(
            "Command: `{}`{}\n\nRun: {}finished {} on {}; load average {:.2} at the end.\n\n",
            self.command,
            if self.quick {
                " (quick: short runs, few points; figures are indicative only)"
            } else {
                ""
            },
            if self.machine.started.is_empty() {
                String::new()
            } else {
                format!("started {}, ", self.machine.started)
            },
            self.date,
            self.machine.describe(),
            self.load_average_at_end
        );
        for paragraph in &self.method {
            text.push_str(paragraph);
            text.push_str("\n\n");
        }
        for table in &self.tables {
            text.push_str(&table.to_markdown());
            text.push('\n');
        }
        for plot in &self.plots {
            text.push_str(&format!(
                "![{}]({}{})\n\n",
                plot.caption, image_dir, plot.file
            ));
        }
        if !self.targets.is_empty() {
            let mut targets = Table::new("Targets", &["target", "measured", "verdict"]);
            for check in &self.targets {
                targets.push(vec![
                    check.target.clone(),
                    check.measured.clone(),
                    check.verdict().to_owned(),
                ]);
            }
            text.push_str(&targets.to_markdown());
            text.push('\n');
        }
        for note in &self.notes {
            text.push_str(&format!("- {note}\n"));
        }
        text
    }

    /// Writes `<scenario>.json` and `<scenario>.md` under `out` and prints the markdown.
    pub fn write(&mut self, out: &Path) -> anyhow::Result<()> {
        if self.load_average_at_end.is_nan() {
            self.load_average_at_end = load_average();
        }
        std::fs::create_dir_all(out)
            .with_context(|| format!("failed to create output directory {}", out.display()))?;
        let json_path = out.join(format!("{}.json", self.scenario));
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(&json_path, json)
            .with_context(|| format!("failed to write {}", json_path.display()))?;
        let markdown = self.to_markdown("");
        let md_path = out.join(format!("{}.md", self.scenario));
        std::fs::write(&md_path, format!("# {}\n\n{markdown}", self.title))
            .with_context(|| format!("failed to write {}", md_path.display()))?;
        println!("\n## {}\n\n{markdown}", self.title);
        println!(
            "fngate-loadtest: wrote {} and {}",
            json_path.display(),
            md_path.display()
        );
        Ok(())
    }
}

/// Reads a report written by [`Report::write`].
pub fn read_report(out: &Path, scenario: &str) -> Option<Report> {
    let text = std::fs::read_to_string(out.join(format!("{scenario}.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

/// Builds a markdown table of every target in the reports found under `out`, with each report's
/// finish time.
pub fn target_summary(out: &Path, scenarios: &[&str]) -> String {
    let mut table = Table::new("", &["target", "measured", "verdict", "scenario, finished"]);
    for scenario in scenarios {
        let Some(report) = read_report(out, scenario) else {
            continue;
        };
        let run = format!(
            "{scenario}, {}{}",
            report.date,
            if report.quick { " (quick)" } else { "" }
        );
        for check in &report.targets {
            table.push(vec![
                check.target.clone(),
                check.measured.clone(),
                check.verdict().to_owned(),
                run.clone(),
            ]);
        }
    }
    table.to_markdown()
}

/// Replaces the section of `page` between `<!-- BEGIN fngate-loadtest NAME -->` and
/// `<!-- END fngate-loadtest NAME -->` with `body`, appending a new section when the markers are
/// missing.
pub fn update_page(page: &Path, name: &str, heading: &str, body: &str) -> anyhow::Result<()> {
    let begin = format!("<!-- BEGIN fngate-loadtest {name} -->");
    let end = format!("<!-- END fngate-loadtest {name} -->");
    let text = std::fs::read_to_string(page).unwrap_or_default();
    let block = format!("{begin}\n{}\n{end}", body.trim_end());
    let updated = match (text.find(&begin), text.find(&end)) {
        (Some(start), Some(stop)) if start < stop => {
            format!("{}{block}{}", &text[..start], &text[stop + end.len()..])
        }
        _ => format!("{}\n## {heading}\n\n{block}\n", text.trim_end()),
    };
    std::fs::write(page, updated).with_context(|| format!("failed to write {}", page.display()))
}

/// Returns the link prefix from `page`'s directory to `out`, such as `loadtest/results/`.
pub fn image_dir_for(page: &Path, out: &Path) -> String {
    let page_dir = page
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (Ok(page_dir), Ok(out)) = (page_dir.canonicalize(), out.canonicalize()) else {
        return format!("{}/", out.display());
    };
    match out.strip_prefix(&page_dir) {
        Ok(relative) if relative.as_os_str().is_empty() => String::new(),
        Ok(relative) => format!("{}/", relative.display()),
        Err(_) => format!("{}/", out.display()),
    }
}

fn command_line() -> String {
    let mut args = std::env::args();
    let program = args
        .next()
        .map(PathBuf::from)
        .and_then(|path| path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "fngate-loadtest".to_owned());
    std::iter::once(program)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Returns the current time as `YYYY-MM-DD HH:MM UTC`.
pub fn utc_now() -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let (year, month, day) = civil_date(seconds / 86_400);
    let minute_of_day = seconds % 86_400 / 60;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        minute_of_day / 60,
        minute_of_day % 60
    )
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day), counting in
/// 400-year eras of 146097 days that start on 1 March.
fn civil_date(days_since_epoch: u64) -> (u64, u64, u64) {
    let days = days_since_epoch + 719_468;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_date_known_days() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(59), (1970, 3, 1));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert_eq!(civil_date(20_454), (2026, 1, 1));
    }

    #[test]
    fn page_section_replaced_or_appended() {
        let dir = tempfile::tempdir().expect("temp dir");
        let page = dir.path().join("PAGE.md");
        std::fs::write(&page, "# Page\n").expect("write page");
        update_page(&page, "warm", "Warm", "first").expect("append");
        update_page(&page, "warm", "Warm", "second").expect("replace");
        let text = std::fs::read_to_string(&page).expect("read page");
        assert!(text.contains("second"));
        assert!(!text.contains("first"));
        assert_eq!(text.matches("## Warm").count(), 1);
    }

    #[test]
    fn table_renders_markdown() {
        let mut table = Table::new("", &["a", "b"]);
        table.push(vec!["1".to_owned(), "2".to_owned()]);
        assert_eq!(table.to_markdown(), "| a | b |\n|---|---|\n| 1 | 2 |\n");
    }
}
