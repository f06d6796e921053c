//! `gradscope`: read a gradkit JSON Lines log and summarise it, plot it, or check it.
//!
//! ```text
//! gradscope summary run.jsonl          per-layer table and findings
//! gradscope plot run.jsonl --out DIR   SVG plots into DIR
//! gradscope check run.jsonl            exit status 1 when a detector fires
//! ```
//!
//! Errors (a missing file, a log with no readable record) are one line on stderr and exit
//! status 2. Malformed lines are reported with their numbers and skipped.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use grad_diagnostics::{DetectorConfig, Error, RunReport, StepRecord, plot, read_log};

/// Summarise, plot or check a gradkit gradient log (JSON Lines).
#[derive(Debug, Parser)]
#[command(name = "gradscope", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Detector thresholds as JSON (fields of `DetectorConfig`); defaults otherwise.
    #[arg(long, global = true)]
    detectors: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the per-layer summary table and the findings.
    Summary {
        /// The log.
        log: PathBuf,
    },
    /// Draw the SVG plots.
    Plot {
        /// The log.
        log: PathBuf,
        /// Where to write the plots (created if missing).
        #[arg(long, default_value = "gradscope-plots")]
        out: PathBuf,
    },
    /// Exit with status 1 when a detector fires (for CI), 0 otherwise.
    Check {
        /// The log.
        log: PathBuf,
    },
}

fn load(path: &Path) -> Result<Vec<StepRecord>, Error> {
    let log = read_log(path)?;
    for bad in &log.bad_lines {
        eprintln!(
            "gradscope: warning: {}:{}: skipped: {}",
            path.display(),
            bad.line,
            bad.message
        );
    }
    if log.records.is_empty() {
        return Err(Error::EmptyLog {
            path: path.to_path_buf(),
        });
    }
    Ok(log.records)
}

fn detectors(path: Option<&Path>) -> Result<DetectorConfig, String> {
    let Some(path) = path else {
        return Ok(DetectorConfig::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cfg: DetectorConfig =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    cfg.validate()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(cfg)
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    let config = detectors(cli.detectors.as_deref())?;
    match cli.command {
        Command::Summary { log } => {
            let records = load(&log).map_err(|e| e.to_string())?;
            print!(
                "{}",
                RunReport::from_records(&records, &config).summary_table()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Plot { log, out } => {
            let records = load(&log).map_err(|e| e.to_string())?;
            for path in plot::plot_all(&records, &out).map_err(|e| e.to_string())? {
                println!("{}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { log } => {
            let records = load(&log).map_err(|e| e.to_string())?;
            let report = RunReport::from_records(&records, &config);
            for f in &report.findings {
                println!("{f}");
            }
            if report.findings.is_empty() {
                println!("no findings in {} observations", report.observations);
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::from(1))
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("gradscope: error: {message}");
            ExitCode::from(2)
        }
    }
}
