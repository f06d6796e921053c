//! `gradscope`: read a gradkit JSON Lines log and summarise it, plot it, or check it.
//!
//! ```text
//! gradscope summary run.jsonl          per-layer table and findings
//! gradscope plot run.jsonl --out DIR   SVG plots into DIR
//! gradscope check run.jsonl            exit status 1 when a finding of warning severity or
//!                                      worse fires (--min-severity info|warning|critical)
//! gradscope preflight run.jsonl        the profile at initialisation (the first record, taken
//!                                      before any optimizer step; --step N for another):
//!                                      vanishing or exploding signal, dead or saturated units;
//!                                      exit status as `check`
//! ```
//!
//! Errors (a missing file, a log with no readable record) are one line on stderr and exit
//! status 2. Malformed lines are reported with their numbers and skipped.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use grad_diagnostics::{
    DetectorConfig, Error, Preflight, PreflightConfig, RunReport, Severity, StepRecord, plot,
    read_log,
};
use serde::de::DeserializeOwned;

/// Summarise, plot or check a gradkit gradient log (JSON Lines).
#[derive(Debug, Parser)]
#[command(name = "gradscope", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Detector thresholds as a JSON object of `DetectorConfig` fields; missing fields take
    /// their defaults, an unknown or invalid one is an error naming it.
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
    /// Exit with status 1 when a finding at or above a severity fires (for CI), 0 otherwise.
    Check {
        /// The log.
        log: PathBuf,
        /// The least severe finding that fails the check.
        #[arg(long, value_enum, default_value_t = MinSeverity::Warning)]
        min_severity: MinSeverity,
    },
    /// Print the preflight report of the record at initialisation: the per-layer gradient
    /// profile, the probed activations and the verdict; exit with status 1 when a finding at
    /// or above a severity fires.
    Preflight {
        /// The log.
        log: PathBuf,
        /// The observed step to read (default: the log's first record, which a training loop
        /// observing from step 0 takes before its first optimizer step).
        #[arg(long)]
        step: Option<u64>,
        /// Preflight thresholds as a JSON object of `PreflightConfig` fields.
        #[arg(long)]
        thresholds: Option<PathBuf>,
        /// The least severe finding that fails the check.
        #[arg(long, value_enum, default_value_t = MinSeverity::Warning)]
        min_severity: MinSeverity,
    },
}

/// `--min-severity`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MinSeverity {
    /// Any finding.
    Info,
    /// Warnings and critical findings (the default).
    Warning,
    /// Critical findings only.
    Critical,
}

impl MinSeverity {
    fn severity(self) -> Severity {
        match self {
            Self::Info => Severity::Info,
            Self::Warning => Severity::Warning,
            Self::Critical => Severity::Critical,
        }
    }
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

/// A configuration from a JSON object of `what`'s fields (the defaults without a file),
/// validated; an error names the file and the field.
fn read_config<T: DeserializeOwned + Default>(
    path: Option<&Path>,
    what: &str,
    validate: impl Fn(&T) -> Result<(), Error>,
) -> Result<T, String> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if !value.is_object() {
        // serde would read an array as the fields in order.
        return Err(format!(
            "{}: expected a JSON object of {what} fields",
            path.display()
        ));
    }
    let cfg = serde_json::from_value::<T>(value.clone()).map_err(|e| {
        // serde names an unknown field but not a field whose value is wrong: find it.
        let culprit = value.as_object().and_then(|fields| {
            fields.iter().find_map(|(k, v)| {
                let one = serde_json::Value::Object([(k.clone(), v.clone())].into_iter().collect());
                serde_json::from_value::<T>(one).is_err().then_some(k)
            })
        });
        match culprit {
            Some(k) => format!("{}: field `{k}`: {e}", path.display()),
            None => format!("{}: {e}", path.display()),
        }
    })?;
    validate(&cfg).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(cfg)
}

/// The findings' lines, then status 1 when one is at or above `min`.
fn verdict(findings: &[grad_diagnostics::Finding], min: MinSeverity) -> Result<ExitCode, String> {
    let failing = findings
        .iter()
        .filter(|f| f.severity >= min.severity())
        .count();
    if failing == 0 {
        Ok(ExitCode::SUCCESS)
    } else {
        say(&format!(
            "{failing} finding(s) at or above {min:?} severity"
        ))?;
        Ok(ExitCode::from(1))
    }
}

/// One line on stdout; a closed or full stdout is an error message, not a panic.
fn say(line: &str) -> Result<(), String> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").map_err(|e| format!("writing to stdout: {e}"))
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    let config: DetectorConfig = read_config(
        cli.detectors.as_deref(),
        "DetectorConfig",
        DetectorConfig::validate,
    )?;
    match cli.command {
        Command::Summary { log } => {
            let records = load(&log).map_err(|e| e.to_string())?;
            say(RunReport::from_records(&records, &config)
                .summary_table()
                .trim_end())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plot { log, out } => {
            let records = load(&log).map_err(|e| e.to_string())?;
            for path in plot::plot_all(&records, &out).map_err(|e| e.to_string())? {
                say(&path.display().to_string())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { log, min_severity } => {
            let records = load(&log).map_err(|e| e.to_string())?;
            let report = RunReport::from_records(&records, &config);
            for f in &report.findings {
                say(&format!("{f}"))?;
            }
            if report.findings.is_empty() {
                say(&format!(
                    "no findings in {} observations",
                    report.observations
                ))?;
            }
            verdict(&report.findings, min_severity)
        }
        Command::Preflight {
            log,
            step,
            thresholds,
            min_severity,
        } => {
            let thresholds: PreflightConfig = read_config(
                thresholds.as_deref(),
                "PreflightConfig",
                PreflightConfig::validate,
            )?;
            let records = load(&log).map_err(|e| e.to_string())?;
            let record = match step {
                None => records.first(),
                Some(n) => records.iter().find(|r| r.step == n),
            }
            .ok_or_else(|| {
                format!(
                    "{}: no record of step {} (the log holds steps {} to {})",
                    log.display(),
                    step.unwrap_or_default(),
                    records.first().map_or(0, |r| r.step),
                    records.last().map_or(0, |r| r.step)
                )
            })?;
            let pre = Preflight::from_record(record, &thresholds).map_err(|e| e.to_string())?;
            say(pre.report().trim_end())?;
            verdict(&pre.findings, min_severity)
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
