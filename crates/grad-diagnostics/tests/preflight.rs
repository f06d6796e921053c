//! Preflight at initialisation: the verdict on the digits MLP's depth and width variants, dead
//! and saturated units, the monitor left as it was, the record read back from a log, and bad
//! input.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking"
)]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{Mlp, Style};
use grad_diagnostics::{
    FindingKind, GradMonitor, JsonlSink, Preflight, PreflightConfig, Severity, Verdict, read_log,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A batch of 128 digits and its labels.
fn batch() -> (Tensor, Tensor) {
    let data =
        grad_testkit::digits::load(&grad_testkit::digits::default_path(), &Device::Cpu).unwrap();
    (
        data.train.images.narrow(0, 0, 128).unwrap(),
        data.train.labels.narrow(0, 0, 128).unwrap(),
    )
}

fn preflight(mlp: &Mlp, x: &Tensor, y: &Tensor) -> Preflight {
    let mut monitor = mlp.preflight_monitor();
    monitor
        .preflight(
            || candle_nn::loss::cross_entropy(&mlp.forward(x), y),
            &PreflightConfig::default(),
        )
        .unwrap()
}

#[test]
fn sigmoid_variants_vanish_and_the_remedied_ones_do_not() -> TestResult {
    let (x, y) = batch();
    // (style, smallest and largest first/last gradient ratio, largest variance drift)
    let mut margins: Vec<(String, f64, f64, f64)> = Vec::new();
    let mut note = |style: Style, pre: &Preflight| {
        let name = format!("{style:?}");
        let (r, d) = (
            pre.gradient_ratio.unwrap(),
            pre.variance_drift.map_or(1.0, |d| d.max(1.0 / d)),
        );
        match margins.iter_mut().find(|m| m.0 == name) {
            Some(m) => *m = (name, m.1.min(r), m.2.max(r), m.3.max(d)),
            None => margins.push((name, r, r, d)),
        }
    };
    for depth in [8, 12, 16, 20, 24] {
        for width in [32, 64, 128] {
            let seed = (depth * 1000 + width) as u64;
            let sick = preflight(&Mlp::new(depth, width, Style::Sigmoid, seed), &x, &y);
            let case = format!("sigmoid depth {depth} width {width}");
            note(Style::Sigmoid, &sick);
            assert_eq!(
                sick.verdict,
                Verdict::Vanishing,
                "{case}\n{}",
                sick.report()
            );
            let f = sick
                .findings
                .iter()
                .find(|f| f.kind == FindingKind::Vanishing)
                .expect("a vanishing finding");
            assert_eq!(f.steps, [0, 0], "{case}");
            // The layers named are the input side's, and never the last.
            assert_eq!(
                f.layers.first().map(String::as_str),
                Some("layer.0"),
                "{case}"
            );
            assert!(!f.layers.contains(&format!("layer.{depth}")), "{case}");
            let ratio = sick.gradient_ratio.unwrap();
            assert!(ratio < 1e-2, "{case}: {ratio}");
            assert!(sick.per_layer_factor.unwrap() < 1.0, "{case}");
            assert!(f.remedy.contains("gradkit::layers::batch_norm"), "{case}");
            for style in [Style::KaimingLeaky, Style::Remedied] {
                let pre = preflight(&Mlp::new(depth, width, style, seed), &x, &y);
                note(style, &pre);
                assert!(
                    pre.is_healthy(),
                    "{style:?} depth {depth} width {width}\n{}",
                    pre.report()
                );
                assert_eq!(pre.verdict, Verdict::Healthy);
                assert_eq!(pre.activations.len(), depth);
            }
        }
    }
    for (style, lo, hi, drift) in margins {
        println!(
            "preflight {style}: first/last gradient ratio {lo:.1e} to {hi:.1e}, variance drift up to {drift:.1}x"
        );
    }
    Ok(())
}

#[test]
fn an_init_too_large_explodes() -> TestResult {
    let (x, y) = batch();
    let pre = preflight(&Mlp::new(12, 64, Style::ScaledRelu(3.0), 1), &x, &y);
    assert_eq!(pre.verdict, Verdict::Exploding, "{}", pre.report());
    // A ReLU net's layers share one gradient scale however its weights are scaled (each
    // weight gradient is the upstream signal times the downstream one): only the forward
    // signal shows the growth, 9x in variance per layer.
    let ratio = pre.gradient_ratio.unwrap();
    assert!((1e-2..1e2).contains(&ratio), "{ratio}");
    assert!(pre.variance_drift.unwrap() > 1e9);
    let f = pre
        .findings
        .iter()
        .find(|f| f.kind == FindingKind::Exploding)
        .unwrap();
    // Critical beyond the square of the threshold; the probes past 100x the first's named.
    assert!(f.evidence.contains("variance"), "{}", f.evidence);
    assert_eq!(f.severity, Severity::Critical);
    assert_eq!(f.layers.first().map(String::as_str), Some("hidden.3"));
    assert!(f.layers.contains(&"hidden.11".to_owned()));
    // Kaiming's own scale is fine.
    let fine = preflight(&Mlp::new(12, 64, Style::ScaledRelu(1.0), 1), &x, &y);
    assert!(fine.is_healthy(), "{}", fine.report());
    Ok(())
}

#[test]
fn dead_and_saturated_units_at_init_are_named() -> TestResult {
    let (x, y) = batch();
    let mlp = Mlp::new(8, 32, Style::ScaledRelu(1.0), 2);
    // Layer 3's biases far below its pre-activations: every unit off on every sample.
    let data = mlp.map.data().lock().unwrap();
    data["layer.3.bias"].set(&Tensor::full(-50f32, 32, &Device::Cpu)?)?;
    drop(data);
    let pre = preflight(&mlp, &x, &y);
    let dead = pre
        .findings
        .iter()
        .find(|f| f.kind == FindingKind::DeadUnits)
        .expect("dead units");
    assert_eq!(dead.layers, ["hidden.3"]);
    assert_eq!(dead.peak, Some(1.0));
    assert!(dead.remedy.contains("LeakyRelu"));
    assert_eq!(pre.activations[3].inactive_fraction, Some(1.0));
    assert!(pre.activations[2].inactive_fraction.unwrap() < 0.2);
    // Nothing reaches the layers before it: the gradient vanishes there, exactly.
    assert_eq!(pre.verdict, Verdict::Vanishing);
    assert_eq!(pre.gradient_ratio, Some(0.0));

    let mlp = Mlp::new(6, 32, Style::Sigmoid, 3);
    let data = mlp.map.data().lock().unwrap();
    let w = data["layer.2.weight"].as_tensor() * 40.0;
    data["layer.2.weight"].set(&w?)?;
    drop(data);
    let pre = preflight(&mlp, &x, &y);
    let saturated = pre
        .findings
        .iter()
        .find(|f| f.kind == FindingKind::Saturation)
        .expect("saturation");
    assert_eq!(saturated.layers, ["hidden.2"], "{}", pre.report());
    Ok(())
}

#[test]
fn the_monitor_is_left_as_it_was() -> TestResult {
    let (x, y) = batch();
    let mlp = Mlp::new(4, 16, Style::ScaledRelu(1.0), 4);
    let mut monitor = mlp.preflight_monitor();
    let before = mlp.params().vars()[0].as_tensor().to_vec2::<f32>()?;
    let pre = monitor.preflight(
        || candle_nn::loss::cross_entropy(&mlp.forward(&x), &y),
        &PreflightConfig::default(),
    )?;
    assert_eq!(pre.step, 0);
    assert!(pre.loss.unwrap() > 0.0);
    assert_eq!(monitor.history().len(), 0);
    assert!(monitor.findings().is_empty());
    // The probes were enabled for the pass only.
    assert!(mlp.hidden_probes.iter().all(|p| !p.is_enabled()));
    assert_eq!(mlp.hidden_probes[0].stats().forwards, 1);
    // The weights are untouched and the first observation still has no update ratio.
    assert_eq!(mlp.params().vars()[0].as_tensor().to_vec2::<f32>()?, before);
    let grads = candle_nn::loss::cross_entropy(&mlp.forward(&x), &y)?.backward()?;
    let record = monitor.observe(0, &grads)?.unwrap();
    assert!(record.layers.iter().all(|l| l.update_ratio.is_none()));
    Ok(())
}

#[test]
fn probes_the_pass_does_not_reach_are_left_out() -> TestResult {
    let (x, y) = batch();
    let mlp = Mlp::new(4, 16, Style::Sigmoid, 8);
    let mut monitor = mlp.preflight_monitor();
    // An earlier forward gave every probe statistics.
    mlp.hidden_probes.iter().for_each(|p| p.set_enabled(true));
    candle_nn::loss::cross_entropy(&mlp.forward(&x), &y)?;
    mlp.hidden_probes.iter().for_each(|p| p.set_enabled(false));
    // A loss that never runs the network's forward reaches none of them.
    let w = mlp.params().vars()[0].clone();
    let pre = monitor.preflight(
        || w.as_tensor().sqr()?.sum_all(),
        &PreflightConfig::default(),
    )?;
    assert!(pre.activations.is_empty(), "{:?}", pre.activations);
    // The rest of the network gets no gradient from that loss: named as such, not vanishing.
    assert!(
        pre.findings
            .iter()
            .any(|f| f.kind == FindingKind::NoGradient)
    );
    Ok(())
}

#[test]
fn a_log_record_gives_the_same_preflight() -> TestResult {
    let (x, y) = batch();
    let mlp = Mlp::new(10, 32, Style::Sigmoid, 5);
    let mut monitor = mlp.preflight_monitor();
    mlp.hidden_probes.iter().for_each(|p| p.set_enabled(true));
    let loss = candle_nn::loss::cross_entropy(&mlp.forward(&x), &y)?;
    let grads = loss.backward()?;
    let ctx = grad_diagnostics::StepContext {
        loss: Some(&loss),
        ..Default::default()
    };
    let record = monitor.observe_with(0, &grads, ctx)?.unwrap().clone();
    let path = std::env::temp_dir().join(format!("gradkit-preflight-{}.jsonl", std::process::id()));
    let mut sink = JsonlSink::create(&path)?;
    sink.write(&record)?;
    drop(sink);
    let read = read_log(&path)?;
    let config = PreflightConfig::default();
    let live = Preflight::from_record(&record, &config)?;
    let logged = Preflight::from_record(&read.records[0], &config)?;
    assert_eq!(live, logged);
    assert_eq!(live.verdict, Verdict::Vanishing);
    // A Preflight survives JSON, non-finite values included.
    let json = serde_json::to_string(&live)?;
    assert_eq!(serde_json::from_str::<Preflight>(&json)?, live);
    let report = live.report();
    assert!(report.starts_with("preflight at step 0, loss "), "{report}");
    assert!(report.contains("VANISHING"));
    assert!(report.contains("hidden.9"));
    std::fs::remove_file(&path)?;
    Ok(())
}

#[test]
fn without_probes_the_gradient_profile_decides() -> TestResult {
    let (x, y) = batch();
    let mlp = Mlp::new(8, 32, Style::Sigmoid, 6);
    let mut monitor = mlp.monitor_without_probes();
    let pre = monitor.preflight(
        || candle_nn::loss::cross_entropy(&mlp.forward(&x), &y),
        &PreflightConfig::default(),
    )?;
    assert!(pre.activations.is_empty());
    assert_eq!(pre.variance_drift, None);
    assert_eq!(pre.verdict, Verdict::Vanishing);
    assert!(pre.report().contains("add Probes"));
    Ok(())
}

#[test]
fn bad_input_is_an_error_and_leaves_the_monitor_alone() -> TestResult {
    let (x, y) = batch();
    let mlp = Mlp::new(3, 8, Style::ScaledRelu(1.0), 7);
    let mut monitor = mlp.preflight_monitor();
    let config = PreflightConfig::default();
    let message = |r: grad_diagnostics::Result<Preflight>| r.unwrap_err().to_string();
    let failing = message(monitor.preflight(
        || Err(candle_core::Error::Msg("the data loader failed".into())),
        &config,
    ));
    assert!(failing.contains("the data loader failed"), "{failing}");
    let vector = message(monitor.preflight(|| Ok(mlp.forward(&x)), &config));
    assert!(
        vector.contains("loss") && vector.contains("scalar"),
        "{vector}"
    );
    let nan = message(monitor.preflight(|| Tensor::new(f32::NAN, &Device::Cpu), &config));
    assert!(nan.contains("preflight") && nan.contains("loss"), "{nan}");
    let int = message(monitor.preflight(|| Tensor::new(3u32, &Device::Cpu), &config));
    assert!(int.contains("loss") && int.contains("U32"), "{int}");
    for (bad, field) in [
        (
            PreflightConfig {
                gradient_ratio: 1.0,
                ..PreflightConfig::default()
            },
            "gradient_ratio",
        ),
        (
            PreflightConfig {
                variance_drift: f64::NAN,
                ..PreflightConfig::default()
            },
            "variance_drift",
        ),
        (
            PreflightConfig {
                dead_fraction: 1.5,
                ..PreflightConfig::default()
            },
            "dead_fraction",
        ),
        (
            PreflightConfig {
                saturation_fraction: -0.1,
                ..PreflightConfig::default()
            },
            "saturation_fraction",
        ),
    ] {
        let text = message(monitor.preflight(
            || candle_nn::loss::cross_entropy(&mlp.forward(&x), &y),
            &bad,
        ));
        assert!(text.contains(field), "{text}");
    }
    assert!(serde_json::from_str::<PreflightConfig>(r#"{"gradient_rato": 3}"#).is_err());
    // Nothing was kept and the probes are off again.
    assert_eq!(monitor.history().len(), 0);
    assert!(mlp.hidden_probes.iter().all(|p| !p.is_enabled()));
    // A model without parameters has no monitor to run a preflight on.
    let empty = GradMonitor::new(
        grad_core::NamedVars::new(Vec::<(String, candle_core::Var)>::new())?,
        Default::default(),
    );
    assert!(empty.unwrap_err().to_string().contains("parameter"));
    // An f64 loss works as well as an f32 one.
    let pre = monitor.preflight(
        || candle_nn::loss::cross_entropy(&mlp.forward(&x), &y)?.to_dtype(DType::F64),
        &config,
    )?;
    assert!(pre.loss.is_some());
    Ok(())
}
