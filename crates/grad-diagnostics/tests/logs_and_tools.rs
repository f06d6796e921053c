//! JSON Lines logs, SVG plots and the `gradscope` command line.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Mlp, Style};
use grad_diagnostics::{JsonlSink, StepRecord, plot, read_log};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gradkit-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A few observations of a real (vanishing) run.
fn records(style: Style) -> Vec<StepRecord> {
    let net = Mlp::new(6, 16, style, 9);
    let mut monitor = net.monitor();
    net.train(5, 0.1, &mut monitor);
    monitor.history().cloned().collect()
}

fn write_log(path: &Path, records: &[StepRecord]) {
    let mut sink = JsonlSink::create(path).unwrap();
    for r in records {
        sink.write(r).unwrap();
    }
}

#[test]
fn a_log_round_trips() -> TestResult {
    let dir = temp_dir("roundtrip");
    let rs = records(Style::Sigmoid);
    write_log(&dir.join("run.jsonl"), &rs);
    let back = read_log(dir.join("run.jsonl"))?;
    assert!(back.bad_lines.is_empty());
    assert!(back.records == rs, "records differ after a round trip");
    // Appending continues the log.
    JsonlSink::append(dir.join("run.jsonl"))?.write(&rs[0])?;
    assert_eq!(read_log(dir.join("run.jsonl"))?.records.len(), rs.len() + 1);
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn a_truncated_last_line_and_a_garbage_line_are_reported_and_the_rest_read() -> TestResult {
    let dir = temp_dir("damaged");
    let path = dir.join("run.jsonl");
    let rs = records(Style::Sigmoid);
    write_log(&path, &rs[..3]);
    let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
    writeln!(f, "this is not json")?;
    let whole = serde_json::to_string(&rs[3])?;
    write!(f, "{}", &whole[..whole.len() / 2])?; // a crash mid-write
    drop(f);
    let log = read_log(&path)?;
    assert!(log.records == rs[..3], "the three whole records read back");
    assert_eq!(
        log.bad_lines.iter().map(|b| b.line).collect::<Vec<_>>(),
        [4, 5]
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// The number of legend entries (one per series) among `names`.
fn series_count(svg: &str, names: impl Iterator<Item = String>) -> usize {
    names
        .filter(|n| svg.contains(&format!("\n{n}\n</text>")))
        .count()
}

#[test]
fn plots_are_valid_svg_with_one_series_per_layer() -> TestResult {
    let dir = temp_dir("plots");
    let mut rs = records(Style::Remedied);
    rs.iter_mut().for_each(|r| r.clip_threshold = Some(1.0));
    let files = plot::plot_all(&rs, &dir)?;
    assert_eq!(files.len(), 5);
    for f in &files {
        let svg = std::fs::read_to_string(f)?;
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{}",
            f.display()
        );
        // Well-formed enough for a parser: every element opened is closed.
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    }
    let layers = rs[0].layers.len();
    let update = std::fs::read_to_string(dir.join("update_ratio.svg"))?;
    assert_eq!(
        series_count(&update, rs[0].layers.iter().map(|l| l.name.clone())),
        layers
    );
    let flow = std::fs::read_to_string(dir.join("gradient_flow.svg"))?;
    assert_eq!(
        series_count(&flow, rs.iter().map(|r| format!("step {}", r.step))),
        rs.len().min(5)
    );
    let global = std::fs::read_to_string(dir.join("global_norm.svg"))?;
    assert!(global.contains("clip threshold"));
    let probes = std::fs::read_to_string(dir.join("probes.svg"))?;
    assert!(probes.contains("layer.1.act (dead)"));
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// Runs the CLI; a run that does not end within two minutes fails the test (a hang).
fn gradscope(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let out = within(120, move || {
        Command::new(env!("CARGO_BIN_EXE_gradscope"))
            .args(args)
            .output()
            .unwrap()
    });
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn gradscope_exit_statuses() -> TestResult {
    let dir = temp_dir("gradscope");
    let (sick, healthy) = (dir.join("sick.jsonl"), dir.join("healthy.jsonl"));
    let net = Mlp::new(20, 16, Style::Sigmoid, 1);
    let mut m = net.monitor();
    net.train(5, 0.1, &mut m);
    write_log(&sick, &m.history().cloned().collect::<Vec<_>>());
    write_log(&healthy, &records(Style::Remedied));

    let (code, out, _) = gradscope(&["check", sick.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("Vanishing"));
    let (code, out, _) = gradscope(&["check", healthy.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = gradscope(&["summary", sick.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("layer.0") && out.contains("vanishing"));
    let plots = dir.join("plots");
    let (code, out, _) = gradscope(&[
        "plot",
        sick.to_str().unwrap(),
        "--out",
        plots.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("gradient_flow.svg") && plots.join("global_norm.svg").exists());

    // Errors are one line, never a backtrace.
    let (code, _, err) = gradscope(&["summary", dir.join("missing.jsonl").to_str().unwrap()]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("gradscope: error:"));
    let garbage = dir.join("garbage.jsonl");
    std::fs::write(&garbage, "not json\n{\n")?;
    let (code, _, err) = gradscope(&["check", garbage.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("garbage.jsonl:1")
            && err.lines().last().unwrap().contains("no readable record")
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn check_fails_at_or_above_the_chosen_severity() -> TestResult {
    let dir = temp_dir("severity");
    // One Info-level finding (update ratio far too large) and nothing worse.
    let mut rs = records(Style::Remedied);
    for (i, r) in rs.iter_mut().enumerate() {
        r.step = i as u64;
        for l in &mut r.layers {
            l.update_ratio = Some(0.9);
        }
    }
    let log = dir.join("info.jsonl");
    write_log(&log, &rs);
    let findings = grad_diagnostics::detect(&rs, &Default::default());
    assert!(
        findings
            .iter()
            .all(|f| f.severity == grad_diagnostics::Severity::Info),
        "{findings:#?}"
    );
    assert!(!findings.is_empty());
    let path = log.to_str().unwrap();
    assert_eq!(gradscope(&["check", path]).0, 0, "warning is the default");
    assert_eq!(gradscope(&["check", path, "--min-severity", "info"]).0, 1);
    assert_eq!(
        gradscope(&["check", path, "--min-severity", "critical"]).0,
        0
    );
    let (code, _, err) = gradscope(&["check", path, "--min-severity", "loud"]);
    assert_eq!(code, 2, "{err}");
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// Issue 15, problem 8: appending to a log whose last line was cut off keeps the cut line apart
/// (one bad line) instead of gluing the next record onto it; nothing around it is lost.
#[test]
fn appending_after_a_truncated_line_loses_nothing_around_it() -> TestResult {
    let dir = temp_dir("append");
    let path = dir.join("log.jsonl");
    let rs = records(Style::Remedied);
    write_log(&path, &rs[..3]);
    let text = std::fs::read_to_string(&path)?;
    // Cut the third line in half, as a crash mid-write would.
    let cut = text.len() - text.lines().last().unwrap().len() / 2;
    std::fs::write(&path, &text[..cut])?;
    let mut sink = JsonlSink::append(&path)?;
    for r in &rs[3..] {
        sink.write(r)?;
    }
    let log = read_log(&path)?;
    assert_eq!(log.bad_lines.len(), 1);
    assert_eq!(log.bad_lines[0].line, 3);
    assert_eq!(log.records.len(), rs.len() - 1);
    assert_eq!(log.records[..2], rs[..2]);
    assert_eq!(log.records[2..], rs[3..]);
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn plots_include_the_gradient_histograms() -> TestResult {
    let dir = temp_dir("histograms");
    let rs = records(Style::Sigmoid);
    let path = plot::gradient_histograms(&rs, &dir.join("h.svg"))?;
    let svg = std::fs::read_to_string(path)?;
    assert!(svg.starts_with("<svg") && svg.contains("layer.0") && svg.contains("<rect"));
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// Runs `f` on another thread and fails if it has not returned within `secs`: a hang fails the
/// test instead of stalling CI.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .expect("did not return in time (a hang)")
}

#[test]
fn plots_of_values_at_the_f64_limits_return() -> TestResult {
    let dir = temp_dir("plots-limits");
    let mut rs = records(Style::Remedied);
    let extremes = [9e307, f64::MAX, 5e-324, f64::MIN_POSITIVE, 1.0];
    for (i, r) in rs.iter_mut().enumerate() {
        let v = extremes[i % extremes.len()];
        r.global_grad_norm = v;
        r.clip_threshold = Some(1e308);
        for l in &mut r.layers {
            l.grad_norm = v;
            l.update_ratio = Some(v);
        }
    }
    let out = dir.clone();
    let files = within(120, move || plot::plot_all(&rs, &out).unwrap());
    assert_eq!(files.len(), 5);
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn gradscope_preflight_reads_the_first_record() -> TestResult {
    let dir = temp_dir("preflight");
    let (sick, healthy) = (dir.join("sick.jsonl"), dir.join("healthy.jsonl"));
    let net = Mlp::new(12, 16, Style::Sigmoid, 2);
    let mut m = net.monitor();
    net.train(3, 0.1, &mut m);
    write_log(&sick, &m.history().cloned().collect::<Vec<_>>());
    write_log(&healthy, &records(Style::Remedied));

    let (code, out, _) = gradscope(&["preflight", sick.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("preflight at step 0"), "{out}");
    assert!(
        out.contains("VANISHING") && out.contains("layer.0"),
        "{out}"
    );
    assert!(out.contains("layer.1.act"), "the probe's row: {out}");
    let (code, out, _) = gradscope(&["preflight", sick.to_str().unwrap(), "--step", "2"]);
    assert_eq!(code, 1);
    assert!(out.starts_with("preflight at step 2"), "{out}");
    let (code, out, _) = gradscope(&["preflight", healthy.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("healthy signal") && out.contains("no findings"));
    // Thresholds from a file, checked like the detectors'.
    let loose = dir.join("loose.json");
    std::fs::write(&loose, r#"{"gradient_ratio": 1e30}"#)?;
    let args = ["preflight", sick.to_str().unwrap(), "--thresholds"];
    let (code, out, _) = gradscope(&[&args[..], &[loose.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{out}");
    std::fs::write(&loose, r#"{"gradient_ratio": 0.5}"#)?;
    let (code, _, err) = gradscope(&[&args[..], &[loose.to_str().unwrap()]].concat());
    assert_eq!(code, 2);
    assert!(err.contains("gradient_ratio"), "{err}");
    let (code, _, err) = gradscope(&["preflight", sick.to_str().unwrap(), "--step", "99"]);
    assert_eq!(code, 2);
    assert!(err.contains("no record of step 99"), "{err}");
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
