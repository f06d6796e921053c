//! The non-tensor API against hostile input: detector thresholds at and past their bounds,
//! steps at the `u64` limits, partial and misspelt configuration files, a monitor with nothing
//! to monitor, probe windows at their limits, and the CLI with its stdout closed or full. Each
//! call ends in a clear error naming the argument, or a result; nothing panics or hangs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Module, Tensor};
use common::{Mlp, Style};
use grad_diagnostics::{
    DetectorConfig, GradMonitor, JsonlSink, MonitorConfig, Probe, ProbeKind, RunReport, StepRecord,
    plot,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gradkit-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn records() -> Vec<StepRecord> {
    let net = Mlp::new(4, 16, Style::Sigmoid, 5);
    let mut monitor = net.monitor();
    net.train(6, 0.1, &mut monitor);
    monitor.history().cloned().collect()
}

/// Runs `f` on a thread and fails the test if it does not return within `secs`.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("did not return in time (a hang)")
}

/// Thresholds at the edges of what `validate` accepts: each validates, and detection over a
/// real log returns.
#[test]
fn detector_thresholds_at_their_bounds_validate_and_detect() -> TestResult {
    let d = DetectorConfig::default;
    let table: Vec<(&str, DetectorConfig)> = vec![
        (
            "patience usize::MAX",
            DetectorConfig {
                patience: usize::MAX,
                ..d()
            },
        ),
        ("patience 1", DetectorConfig { patience: 1, ..d() }),
        (
            "growth_window usize::MAX",
            DetectorConfig {
                growth_window: usize::MAX,
                ..d()
            },
        ),
        (
            "growth_window 1",
            DetectorConfig {
                growth_window: 1,
                ..d()
            },
        ),
        (
            "growth_factor f64::MAX",
            DetectorConfig {
                growth_factor: f64::MAX,
                ..d()
            },
        ),
        (
            "growth_factor next above 1",
            DetectorConfig {
                growth_factor: 1.0 + f64::EPSILON,
                ..d()
            },
        ),
        (
            "exploding_norm MIN_POSITIVE",
            DetectorConfig {
                exploding_norm: f64::MIN_POSITIVE,
                ..d()
            },
        ),
        (
            "exploding_norm f64::MAX",
            DetectorConfig {
                exploding_norm: f64::MAX,
                ..d()
            },
        ),
        (
            "vanishing_norm f64::MAX",
            DetectorConfig {
                vanishing_norm: f64::MAX,
                ..d()
            },
        ),
        (
            "vanishing_ratio subnormal",
            DetectorConfig {
                vanishing_ratio: 5e-324,
                ..d()
            },
        ),
        (
            "dead_fraction 0",
            DetectorConfig {
                dead_fraction: 0.0,
                ..d()
            },
        ),
        (
            "dead_fraction 1",
            DetectorConfig {
                dead_fraction: 1.0,
                ..d()
            },
        ),
        (
            "saturation_fraction 0",
            DetectorConfig {
                saturation_fraction: 0.0,
                ..d()
            },
        ),
        (
            "band [MIN_POSITIVE, MAX]",
            DetectorConfig {
                update_ratio_band: [f64::MIN_POSITIVE, f64::MAX],
                ..d()
            },
        ),
    ];
    let rs = records();
    for (what, cfg) in table {
        cfg.validate()
            .map_err(|e| format!("{what}: rejected: {e}"))?;
        let report = RunReport::from_records(&rs, &cfg);
        assert!(!report.summary_table().is_empty(), "{what}");
    }
    Ok(())
}

/// Thresholds past their bounds: each is an error naming its field.
#[test]
fn detector_thresholds_past_their_bounds_name_the_field() -> TestResult {
    let d = DetectorConfig::default;
    let table: Vec<(&str, DetectorConfig)> = vec![
        ("patience", DetectorConfig { patience: 0, ..d() }),
        (
            "growth_window",
            DetectorConfig {
                growth_window: 0,
                ..d()
            },
        ),
        (
            "growth_factor",
            DetectorConfig {
                growth_factor: 1.0,
                ..d()
            },
        ),
        (
            "growth_factor",
            DetectorConfig {
                growth_factor: f64::NAN,
                ..d()
            },
        ),
        (
            "growth_factor",
            DetectorConfig {
                growth_factor: f64::INFINITY,
                ..d()
            },
        ),
        (
            "exploding_norm",
            DetectorConfig {
                exploding_norm: 0.0,
                ..d()
            },
        ),
        (
            "exploding_norm",
            DetectorConfig {
                exploding_norm: -1.0,
                ..d()
            },
        ),
        (
            "vanishing_norm",
            DetectorConfig {
                vanishing_norm: f64::NAN,
                ..d()
            },
        ),
        (
            "vanishing_ratio",
            DetectorConfig {
                vanishing_ratio: f64::INFINITY,
                ..d()
            },
        ),
        (
            "dead_fraction",
            DetectorConfig {
                dead_fraction: 1.5,
                ..d()
            },
        ),
        (
            "saturation_fraction",
            DetectorConfig {
                saturation_fraction: -0.1,
                ..d()
            },
        ),
        (
            "update_ratio_band",
            DetectorConfig {
                update_ratio_band: [1e-1, 1e-5],
                ..d()
            },
        ),
        (
            "update_ratio_band",
            DetectorConfig {
                update_ratio_band: [0.0, 1.0],
                ..d()
            },
        ),
        (
            "update_ratio_band",
            DetectorConfig {
                update_ratio_band: [1e-5, f64::NAN],
                ..d()
            },
        ),
    ];
    for (field, cfg) in table {
        let msg = cfg
            .validate()
            .err()
            .ok_or(format!("{field}: accepted {cfg:?}"))?
            .to_string();
        assert!(msg.contains(field), "{field}: {msg}");
        // The monitor refuses it the same way.
        let monitor = GradMonitor::new(
            grad_core::NamedVars::new([("w", candle_core::Var::new(&[1f32], &Device::Cpu)?)])?,
            MonitorConfig {
                detectors: cfg,
                ..MonitorConfig::default()
            },
        );
        assert!(
            monitor.is_err_and(|e| e.to_string().contains(field)),
            "{field}"
        );
    }
    Ok(())
}

/// Steps at the end of `u64`: the report, the summary and every plot return.
#[test]
fn steps_at_the_u64_limit_report_and_plot() -> TestResult {
    let mut rs = records();
    let n = rs.len() as u64;
    for (i, r) in rs.iter_mut().enumerate() {
        r.step = u64::MAX - (n - 1) + i as u64;
    }
    let report = RunReport::from_records(&rs, &DetectorConfig::default());
    assert!(report.summary_table().contains(&u64::MAX.to_string()));
    for f in &report.findings {
        assert!(f.steps[0] <= f.steps[1], "{f:?}");
    }
    // One record, and every record at the same step.
    let dir = temp_dir("hostile-steps");
    for set in [rs.clone(), rs[..1].to_vec(), vec![rs[0].clone(); 3]] {
        let out = dir.clone();
        let files = within(120, move || plot::plot_all(&set, &out))?;
        assert_eq!(files.len(), 5);
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// A monitor over no parameters is an error naming them; one whose history holds one
/// observation works; probes at the limits of their window count.
#[test]
fn monitors_and_probes_at_their_limits() -> TestResult {
    // Usually a monitor built before the model: an error, not a monitor that sees nothing.
    let empty = candle_nn::VarMap::new();
    let e = GradMonitor::from_var_map(&empty)
        .err()
        .ok_or("a monitor over no parameters was built")?;
    assert!(e.to_string().contains("parameter list"), "{e}");
    let tiny = MonitorConfig {
        history: 1,
        every: u64::MAX,
        ..MonitorConfig::default()
    };
    let w = candle_core::Var::new(&[1f32, 2.0], &Device::Cpu)?;
    let mut monitor = GradMonitor::new(grad_core::NamedVars::new([("w", w.clone())])?, tiny)?;
    let grads = w.as_tensor().sqr()?.sum_all()?.backward()?;
    // Step 0 is a multiple of every `every`; u64::MAX - 1 is not one of u64::MAX.
    assert!(monitor.observe(0, &grads)?.is_some());
    assert!(monitor.observe(u64::MAX - 1, &grads)?.is_none());
    assert_eq!(monitor.history().count(), 1);
    for window in [0, 1, u64::MAX] {
        let probe = Probe::new("p", ProbeKind::Relu, window);
        let x = Tensor::new(&[[-1f32, 2.0], [0.0, 3.0]], &Device::Cpu)?;
        for _ in 0..3 {
            probe.forward(&x)?;
        }
        let stats = probe.stats();
        let unit = |f: f64| (0.0..=1.0).contains(&f);
        assert!(unit(stats.nonpositive_fraction), "{window}: {stats:?}");
        assert!(stats.dead_fraction.is_none_or(unit), "{window}: {stats:?}");
    }
    Ok(())
}

fn gradscope() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gradscope"))
}

/// Waits for `child` at most `secs`, killing it on a hang.
fn wait(mut child: std::process::Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("gradscope did not return in {secs} s (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write_log(dir: &std::path::Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let log = dir.join("run.jsonl");
    let mut sink = JsonlSink::create(&log)?;
    for r in records() {
        sink.write(&r)?;
    }
    Ok(log)
}

/// `--detectors` takes a partial file with defaults for the rest, and names a misspelt or
/// invalid field.
#[test]
fn a_partial_detectors_file_takes_defaults_and_a_bad_one_names_its_field() -> TestResult {
    let dir = temp_dir("hostile-detectors");
    let log = write_log(&dir)?;
    let cases = [
        (r#"{"patience": 5}"#, 0, ""),
        (r#"{}"#, 0, ""),
        (
            r#"{"update_ratio_band": [1e-6, 1.0], "growth_window": 2}"#,
            0,
            "",
        ),
        (r#"{"patiense": 5}"#, 2, "patiense"),
        (r#"{"patience": 0}"#, 2, "patience"),
        (r#"{"patience": -1}"#, 2, "patience"),
        (r#"{"growth_factor": "ten"}"#, 2, "growth_factor"),
        (r#"[1, 2]"#, 2, "DetectorConfig"),
        ("", 2, "EOF"),
    ];
    for (i, (json, code, named)) in cases.into_iter().enumerate() {
        let file = dir.join(format!("detectors-{i}.json"));
        std::fs::write(&file, json)?;
        let child = gradscope()
            .args([
                "summary",
                log.to_str().unwrap(),
                "--detectors",
                file.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let out = child.wait_with_output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{json}: {err}");
        if code != 0 {
            assert_eq!(err.lines().count(), 1, "{json}: {err}");
            assert!(err.contains(named), "{json}: {err}");
        }
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// A closed stdout (a pipe whose reader is gone) and a full one (`/dev/full`): a one-line
/// error and exit status 2, never a panic.
#[test]
fn the_cli_with_stdout_closed_or_full_is_an_error_not_a_panic() -> TestResult {
    let dir = temp_dir("hostile-stdout");
    let log = write_log(&dir)?;
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let mut outs: Vec<(&str, Stdio)> = vec![("closed", Stdio::from(writer))];
    if let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") {
        outs.push(("full", Stdio::from(full)));
    }
    for (what, stdout) in outs {
        let child = gradscope()
            .args(["summary", log.to_str().unwrap()])
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stderr = String::new();
        let mut child = child;
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut stderr)?;
        }
        let status = wait(child, 60);
        assert_eq!(status.code(), Some(2), "{what}: {stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        assert!(stderr.starts_with("gradscope: error:"), "{what}: {stderr}");
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// Sinks and readers on paths they cannot use: an error naming the path, never a panic.
#[test]
fn sinks_and_readers_on_unusable_paths_name_the_path() -> TestResult {
    let dir = temp_dir("hostile-sinks");
    let file = dir.join("a-file");
    std::fs::write(&file, "x")?;
    let inside_a_file = file.join("run.jsonl");
    let missing = dir.join("missing").join("run.jsonl");
    for path in [&dir, &inside_a_file] {
        let e = JsonlSink::create(path)
            .err()
            .ok_or("created a sink on a directory")?;
        assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
        let e = JsonlSink::append(path)
            .err()
            .ok_or("appended to a directory")?;
        assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
    }
    let e = grad_diagnostics::read_log(&missing)
        .err()
        .ok_or("read a missing log")?;
    assert!(e.to_string().contains("missing"), "{e}");
    let e = grad_diagnostics::read_log(&dir)
        .err()
        .ok_or("read a directory as a log")?;
    assert!(e.to_string().contains(&*dir.to_string_lossy()), "{e}");
    // A TensorBoard directory that is a file.
    let e = grad_diagnostics::TensorBoardSink::create(&file)
        .err()
        .ok_or("a TensorBoard sink inside a file")?;
    assert!(e.to_string().contains("a-file"), "{e}");
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
