//! Verdicts a user can trust: "no gradient" is not "vanishing", buffers are not parameters,
//! layers come in network order, detectors read the whole run, and the record says what the
//! clipping optimizer did.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{Optimizer, SGD, VarBuilder, VarMap};
use gradkit::core::NamedVars;
use gradkit::diagnostics::{
    DetectorConfig, FindingKind, GradMonitor, LayerStats, MonitorConfig, ParamStats, RunReport,
    Severity, StepRecord, detect,
};
use gradkit::layers::{LayerNormConfig, batch_norm, layer_norm};
use gradkit::regularize::{ClipPolicy, ClipRule, Clipped, ClippedConfig};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn x() -> Tensor {
    Tensor::arange(0f32, 64.0, &Device::Cpu)
        .unwrap()
        .reshape((8, 8))
        .unwrap()
        .affine(0.05, -1.0)
        .unwrap()
}

/// A model's forward pass.
type Forward = Box<dyn Fn(&Tensor) -> Tensor>;

/// Two linear layers, a layer norm, a linear head; the norm is candle-nn's (fast path, no
/// backward) or gradkit's.
fn layer_norm_model(gradkit_norm: bool) -> (VarMap, Forward) {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let l0 = candle_nn::linear(8, 8, vb.pp("l0")).unwrap();
    let l1 = candle_nn::linear(8, 8, vb.pp("l1")).unwrap();
    let norm: Box<dyn Module> = if gradkit_norm {
        Box::new(layer_norm(8, LayerNormConfig::default(), vb.pp("ln")).unwrap())
    } else {
        Box::new(
            candle_nn::layer_norm(8, candle_nn::LayerNormConfig::default(), vb.pp("ln")).unwrap(),
        )
    };
    let head = candle_nn::linear(8, 2, vb.pp("head")).unwrap();
    let forward = move |x: &Tensor| {
        let h = l1.forward(&l0.forward(x).unwrap().tanh().unwrap()).unwrap();
        head.forward(&norm.forward(&h).unwrap()).unwrap()
    };
    (map, Box::new(forward))
}

fn train(map: &VarMap, forward: &dyn Fn(&Tensor) -> Tensor, steps: u64) -> GradMonitor {
    let mut monitor = GradMonitor::from_var_map(map).unwrap();
    let mut sgd = SGD::new(map.all_vars(), 0.05).unwrap();
    for step in 0..steps {
        let loss = forward(&x()).sqr().unwrap().mean_all().unwrap();
        monitor.backward_step(step, &loss, &mut sgd).unwrap();
    }
    monitor
}

#[test]
fn a_fast_path_that_drops_gradients_is_no_gradient_not_vanishing() -> TestResult {
    let (map, forward) = layer_norm_model(false);
    let monitor = train(&map, &*forward, 5);
    let findings = monitor.findings();
    let f = findings
        .iter()
        .find(|f| f.kind == FindingKind::NoGradient)
        .unwrap_or_else(|| panic!("{findings:#?}"));
    assert_eq!(f.severity, Severity::Critical);
    assert_eq!(
        f.layers,
        [
            "l0.weight",
            "l0.bias",
            "l1.weight",
            "l1.bias",
            "ln.weight",
            "ln.bias"
        ]
    );
    assert_eq!(f.steps, [0, 4]);
    assert!(f.remedy.contains("layer_norm"), "{}", f.remedy);
    assert!(
        findings.iter().all(|f| f.kind != FindingKind::Vanishing),
        "{findings:#?}"
    );
    let last = monitor.last().unwrap();
    assert!(!last.params[0].has_grad && last.params[6].has_grad);
    let report = monitor.report();
    assert_eq!(report.layers[0].verdict, "no gradient");
    assert_eq!(report.layers[3].verdict, "ok");

    // The same model with gradkit's layer norm: every parameter gets its gradient.
    let (map, forward) = layer_norm_model(true);
    let findings = train(&map, &*forward, 5).findings();
    assert!(
        findings
            .iter()
            .all(|f| !matches!(f.kind, FindingKind::NoGradient | FindingKind::Vanishing)),
        "{findings:#?}"
    );
    Ok(())
}

#[test]
fn an_unused_parameter_is_named() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let fc = candle_nn::linear(8, 2, vb.pp("fc"))?;
    let _spare = vb.get((2, 2), "spare.weight")?;
    let forward = move |x: &Tensor| fc.forward(x).unwrap();
    let findings = train(&map, &forward, 2).findings();
    let f = findings
        .iter()
        .find(|f| f.kind == FindingKind::NoGradient)
        .unwrap();
    assert_eq!(f.layers, ["spare.weight"]);
    Ok(())
}

#[test]
fn buffers_are_never_parameters() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let conv1 = candle_nn::linear(8, 8, vb.pp("conv1"))?;
    let bn1 = batch_norm(8, Default::default(), vb.pp("bn1"))?;
    let conv2 = candle_nn::linear(8, 8, vb.pp("conv2"))?;
    let bn2 = batch_norm(8, Default::default(), vb.pp("bn2"))?;
    let fc = candle_nn::linear(8, 2, vb.pp("fc"))?;
    let params = NamedVars::from_var_map(&map);
    assert!(
        params
            .names()
            .all(|n| !n.contains("running") && !n.contains("num_batches"))
    );
    let buffers = NamedVars::buffers_of(&map);
    assert_eq!(buffers.len(), 6);

    let mut monitor = GradMonitor::from_var_map(&map)?;
    // Network order, not name order (bn1, bn2, conv1, ...).
    assert_eq!(monitor.layers(), ["conv1", "bn1", "conv2", "bn2", "fc"]);
    assert!(monitor.buffers().contains(&"bn2.running_var".to_owned()));
    let mut opt = Clipped::<SGD>::with_max_norm(&map, 0.05, 0.5)?;
    for step in 0..4 {
        let h = bn1.forward_t(&conv1.forward(&x())?, true)?;
        let h = bn2.forward_t(&conv2.forward(&h.relu()?)?, true)?;
        let loss = fc.forward(&h)?.sqr()?.mean_all()?;
        monitor.backward_step(step, &loss, &mut opt)?;
    }
    let last = monitor.last().unwrap();
    assert_eq!(last.params.len(), 10);
    assert!(last.params.iter().all(|p| p.has_grad));
    // The global norm the clipper measured is the parameters' norm, the monitor's too.
    let clip = last.clip.unwrap();
    assert!((clip.total_norm - last.global_grad_norm).abs() < 1e-5 * clip.total_norm);
    let findings = monitor.findings();
    assert!(
        findings.iter().all(|f| f.kind != FindingKind::NoGradient),
        "{findings:#?}"
    );
    let report = monitor.report();
    assert_eq!(report.buffers.len(), 6);
    assert!(report.summary_table().contains("buffers (not parameters)"));
    Ok(())
}

#[test]
fn a_misspelt_layer_order_entry_is_an_error() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    candle_nn::linear(4, 4, vb.pp("encoder"))?;
    let config = MonitorConfig {
        layer_order: Some(vec!["encodr".into()]),
        ..Default::default()
    };
    let err = GradMonitor::new(NamedVars::from_var_map(&map), config).unwrap_err();
    assert!(err.to_string().contains("encodr"), "{err}");
    Ok(())
}

#[test]
fn the_record_says_what_the_clipper_did() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let fc = candle_nn::linear(8, 2, vb.pp("fc"))?;
    let policy = ClipPolicy::single(ClipRule::max_norm(1e-3))?;
    let mut opt = Clipped::<SGD>::new(
        NamedVars::from_var_map(&map),
        0.01,
        ClippedConfig::new(policy),
    )?;
    let mut monitor = GradMonitor::from_var_map(&map)?;
    let loss = fc.forward(&x())?.sqr()?.mean_all()?;
    let record = monitor.backward_step(0, &loss, &mut opt).unwrap().unwrap();
    let clip = record.clip.unwrap();
    assert!(clip.clipped && !clip.skipped);
    assert_eq!(record.learning_rate, Some(0.01));
    assert_eq!(record.loss, Some(f64::from(loss.to_scalar::<f32>()?)));
    let bad = (fc.forward(&x())?.sum_all()? * f64::NAN)?;
    let record = monitor.backward_step(1, &bad, &mut opt).unwrap().unwrap();
    assert!(record.clip.unwrap().skipped);
    assert!(record.loss.unwrap().is_nan());
    let report = monitor.report();
    assert_eq!((report.clipped_steps, report.skipped_steps), (1, 1));
    // A loss that is not a scalar is an error, not a silent pick of one element.
    let grads = fc.forward(&x())?.sum_all()?.backward()?;
    let not_scalar = fc.forward(&x())?;
    let ctx = gradkit::diagnostics::StepContext {
        noise: None,
        loss: Some(&not_scalar),
        learning_rate: None,
    };
    assert!(monitor.observe_with(2, &grads, ctx).is_err());
    Ok(())
}

#[test]
fn value_clipping_counts_only_steps_it_changed() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let fc = candle_nn::linear(8, 2, vb.pp("fc"))?;
    let policy = ClipPolicy::single(ClipRule::Value { clip_value: 1e6 })?;
    let mut opt = Clipped::<SGD>::new(
        NamedVars::from_var_map(&map),
        0.0,
        ClippedConfig::new(policy),
    )?;
    let small = fc.forward(&x())?.mean_all()?;
    assert!(!opt.try_backward_step(&small)?.clipped);
    let large = (fc.forward(&x())?.sum_all()? * 1e9)?;
    assert!(opt.try_backward_step(&large)?.clipped);
    assert_eq!(opt.counters().clipped, 1);
    Ok(())
}

/// A synthetic record: global norm `g`, one layer `fc` with gradient norm `g`.
fn record(step: u64, g: f64) -> StepRecord {
    let non_finite = u64::from(!g.is_finite());
    StepRecord {
        step,
        loss: None,
        learning_rate: None,
        clip: None,
        global_grad_norm: g,
        clip_threshold: None,
        params: vec![ParamStats {
            name: "fc.weight".into(),
            layer: "fc".into(),
            numel: 4,
            has_grad: true,
            grad_norm: g,
            grad_max_abs: g,
            grad_mean: 0.0,
            grad_std: 0.0,
            zero_fraction: 0.0,
            nan_count: non_finite,
            inf_count: 0,
            weight_norm: 1.0,
            update_ratio: None,
        }],
        layers: vec![LayerStats {
            name: "fc".into(),
            depth: 0,
            has_grad: true,
            grad_norm: g,
            grad_max_abs: g,
            weight_norm: 1.0,
            update_ratio: None,
            non_finite,
            grad_histogram: Default::default(),
            update_histogram: None,
        }],
        probes: Vec::new(),
        noise: None,
    }
}

#[test]
fn an_explosion_before_a_nan_is_reported_from_its_first_step() -> TestResult {
    // 2.6 -> 9.2e4 -> 7.9e5 -> 2.1e6 -> 3.3e7 -> NaN from step 5 to the end at step 68.
    let mut records: Vec<StepRecord> = [2.6, 9.2e4, 7.9e5, 2.1e6, 3.3e7]
        .iter()
        .enumerate()
        .map(|(i, &g)| record(i as u64, g))
        .collect();
    records.extend((5..=68).map(|s| record(s, f64::NAN)));
    let findings = detect(&records, &DetectorConfig::default());
    let nf = findings
        .iter()
        .find(|f| f.kind == FindingKind::NonFinite)
        .unwrap();
    assert_eq!(nf.steps, [5, 68]);
    assert_eq!(nf.layers, ["fc.weight"]);
    assert!(nf.evidence.contains("first at step 5"), "{}", nf.evidence);
    let ex = findings
        .iter()
        .find(|f| f.kind == FindingKind::Exploding)
        .unwrap();
    assert_eq!(ex.steps[0], 1);
    assert_eq!(ex.severity, Severity::Critical);
    assert_eq!(ex.peak, Some(3.3e7));
    let report = RunReport::from_records(&records, &DetectorConfig::default());
    assert_ne!(report.layers[0].verdict, "ok");
    assert!(report.layers[0].verdict.contains("non-finite"));
    Ok(())
}

#[test]
fn three_observations_are_enough_to_see_growth() -> TestResult {
    let records: Vec<StepRecord> = [1.0, 1.2, 40.0]
        .iter()
        .enumerate()
        .map(|(i, &g)| record(i as u64, g))
        .collect();
    let findings = detect(&records, &DetectorConfig::default());
    let ex = findings
        .iter()
        .find(|f| f.kind == FindingKind::Exploding)
        .unwrap_or_else(|| panic!("{findings:#?}"));
    assert_eq!(ex.severity, Severity::Warning);
    assert_eq!(ex.steps, [2, 2]);
    Ok(())
}

#[test]
fn a_vanishing_episode_is_remembered_after_it_ends() -> TestResult {
    // Two layers; the first falls to 1e-9 of the second for steps 2..=6, then recovers.
    let records: Vec<StepRecord> = (0..20u64)
        .map(|s| {
            let low = if (2..=6).contains(&s) { 1e-9 } else { 0.5 };
            let mut r = record(s, 1.0);
            let mut first = r.layers[0].clone();
            first.name = "l0".into();
            first.grad_norm = low;
            let mut top = r.layers[0].clone();
            top.name = "l1".into();
            top.depth = 1;
            r.layers = vec![first, top];
            r
        })
        .collect();
    let findings = detect(&records, &DetectorConfig::default());
    let v = findings
        .iter()
        .find(|f| f.kind == FindingKind::Vanishing)
        .unwrap_or_else(|| panic!("{findings:#?}"));
    assert_eq!(v.steps, [2, 6]);
    assert_eq!(v.layers, ["l0"]);
    assert_eq!(v.peak, Some(1e-9));
    Ok(())
}

#[test]
fn an_all_nan_gradient_has_a_histogram_that_says_so() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let fc = candle_nn::linear(8, 2, vb.pp("fc"))?;
    let mut monitor = GradMonitor::from_var_map(&map)?;
    let loss = (fc.forward(&x())?.sum_all()? * f64::NAN)?;
    let grads = loss.backward()?;
    let record = monitor.observe(0, &grads).unwrap().unwrap();
    let h = &record.layers[0].grad_histogram;
    assert_eq!(h.nan, 18);
    assert_eq!(h.total(), 18);
    Ok(())
}

#[test]
fn a_nan_learning_rate_is_recorded_as_it_was() -> TestResult {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let fc = candle_nn::linear(8, 2, vb.pp("fc"))?;
    let mut monitor = GradMonitor::from_var_map(&map)?;
    let loss = fc.forward(&x())?.sqr()?.mean_all()?;
    let grads = loss.backward()?;
    let ctx = gradkit::diagnostics::StepContext {
        noise: None,
        loss: Some(&loss),
        learning_rate: Some(f64::NAN),
    };
    let record = monitor.observe_with(0, &grads, ctx).unwrap().unwrap();
    assert!(record.learning_rate.unwrap().is_nan());
    let line = serde_json::to_string(record)?;
    assert!(line.contains(r#""learning_rate":"nan""#), "{line}");
    Ok(())
}
