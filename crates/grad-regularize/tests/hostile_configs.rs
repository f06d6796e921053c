//! grad-regularize's configurations at and past their bounds, as a table: at the bound the
//! remedy builds and runs on a real gradient with a finite result; past it the error names
//! the argument.

#![allow(clippy::panic, reason = "a test fails by panicking")]

use candle_core::{Device, Tensor, Var};
use grad_core::{NamedVars, NormType};
use grad_regularize::{
    AgcConfig, ClipPolicy, ClipRule, CrossEntropyConfig, LossScaler, LossScalerConfig,
    NonFiniteNorm, adaptive_clip, cross_entropy,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn norm(max_norm: f64, norm_type: NormType) -> ClipRule {
    ClipRule::Norm {
        max_norm,
        norm_type,
        non_finite: NonFiniteNorm::Scale,
    }
}

/// Builds the row's remedy and runs it once on a small real problem; the result's values.
fn run(row: &str) -> Result<Vec<f64>, grad_regularize::Error> {
    let dev = Device::Cpu;
    let w = Var::new(&[[3f32, -4.0], [0.5, 2.0]], &dev)?;
    let params = NamedVars::new([("fc.weight", w.clone())])?;
    let grads = || -> Result<grad_core::NamedGrads, grad_regularize::Error> {
        let loss = (w.as_tensor().sqr()?.sum_all()? * 100.0)?;
        Ok(params.grads(&loss.backward()?)?)
    };
    let clip = |rule: ClipRule| -> Result<Vec<f64>, grad_regularize::Error> {
        let policy = ClipPolicy::single(rule)?;
        let mut g = grads()?;
        policy.apply(&mut g, None)?;
        Ok(grad_testkit::values(&g.tensors()[0])?)
    };
    let ls = LossScalerConfig::default;
    let scaler = |cfg: LossScalerConfig| -> Result<Vec<f64>, grad_regularize::Error> {
        let s = LossScaler::new(cfg)?;
        Ok(vec![f64::from(s.state().scale)])
    };
    let ce = |cfg: CrossEntropyConfig| -> Result<Vec<f64>, grad_regularize::Error> {
        let logits = Tensor::new(&[[1f32, -2.0, 0.5], [0.0, 3.0, -1.0]], &dev)?;
        let y = Tensor::new(&[2i64, 1], &dev)?;
        Ok(grad_testkit::values(&cross_entropy(&logits, &y, &cfg)?)?)
    };
    let agc = |clip_factor: f64, eps: f64| -> Result<Vec<f64>, grad_regularize::Error> {
        let mut g = grads()?;
        let cfg = AgcConfig {
            clip_factor,
            eps,
            ..AgcConfig::default()
        };
        adaptive_clip(&mut g, &cfg)?;
        Ok(grad_testkit::values(&g.tensors()[0])?)
    };
    match row {
        "norm max_norm MIN_POSITIVE" => clip(norm(f64::MIN_POSITIVE, NormType::L2)),
        "norm max_norm f64::MAX" => clip(norm(f64::MAX, NormType::L2)),
        "norm p = 0.5" => clip(norm(1.0, NormType::from_p(0.5)?)),
        "norm inf-norm" => clip(norm(1.0, NormType::Inf)),
        "norm max_norm 0" => clip(norm(0.0, NormType::L2)),
        "norm max_norm NaN" => clip(norm(f64::NAN, NormType::L2)),
        "norm max_norm inf" => clip(norm(f64::INFINITY, NormType::L2)),
        "norm p = 0" => clip(norm(1.0, NormType::from_p(0.0)?)),
        "value clip_value tiny" => clip(ClipRule::Value { clip_value: 5e-324 }),
        "value clip_value -1" => clip(ClipRule::Value { clip_value: -1.0 }),
        "value clip_value NaN" => clip(ClipRule::Value {
            clip_value: f64::NAN,
        }),
        "scaler init_scale 1e38" => scaler(LossScalerConfig {
            init_scale: 1e38,
            ..ls()
        }),
        "scaler init_scale 1e-45" => scaler(LossScalerConfig {
            init_scale: 1e-45,
            ..ls()
        }),
        "scaler growth_interval u32::MAX" => scaler(LossScalerConfig {
            growth_interval: u32::MAX,
            ..ls()
        }),
        "scaler init_scale 1e39" => scaler(LossScalerConfig {
            init_scale: 1e39,
            ..ls()
        }),
        "scaler init_scale 1e-46" => scaler(LossScalerConfig {
            init_scale: 1e-46,
            ..ls()
        }),
        "scaler growth_factor 1" => scaler(LossScalerConfig {
            growth_factor: 1.0,
            ..ls()
        }),
        "scaler backoff_factor 1" => scaler(LossScalerConfig {
            backoff_factor: 1.0,
            ..ls()
        }),
        "scaler backoff_factor 0" => scaler(LossScalerConfig {
            backoff_factor: 0.0,
            ..ls()
        }),
        "scaler growth_interval 0" => scaler(LossScalerConfig {
            growth_interval: 0,
            ..ls()
        }),
        "ce smoothing 0" => ce(CrossEntropyConfig::default()),
        "ce smoothing 1" => ce(CrossEntropyConfig {
            label_smoothing: 1.0,
            ..Default::default()
        }),
        "ce no ignore_index" => ce(CrossEntropyConfig {
            ignore_index: None,
            ..Default::default()
        }),
        "ce ignore_index i64::MIN" => ce(CrossEntropyConfig {
            ignore_index: Some(i64::MIN),
            ..Default::default()
        }),
        "ce smoothing -0.1" => ce(CrossEntropyConfig {
            label_smoothing: -0.1,
            ..Default::default()
        }),
        "ce smoothing 1.5" => ce(CrossEntropyConfig {
            label_smoothing: 1.5,
            ..Default::default()
        }),
        "ce smoothing NaN" => ce(CrossEntropyConfig {
            label_smoothing: f64::NAN,
            ..Default::default()
        }),
        "agc clip_factor tiny" => agc(1e-300, 1e-3),
        "agc eps 0" => agc(0.01, 0.0),
        "agc clip_factor 0" => agc(0.0, 1e-3),
        "agc clip_factor NaN" => agc(f64::NAN, 1e-3),
        "agc eps -1" => agc(0.01, -1.0),
        other => panic!("no such row: {other}"),
    }
}

#[test]
fn regularize_configs_at_and_past_their_bounds() -> TestResult {
    // (row, None for a finite result or the argument the error names)
    let table: [(&str, Option<&str>); 32] = [
        ("norm max_norm MIN_POSITIVE", None),
        ("norm max_norm f64::MAX", None),
        ("norm p = 0.5", None),
        ("norm inf-norm", None),
        ("norm max_norm 0", Some("max_norm")),
        ("norm max_norm NaN", Some("max_norm")),
        ("norm max_norm inf", Some("max_norm")),
        ("norm p = 0", Some("norm_type")),
        ("value clip_value tiny", None),
        ("value clip_value -1", Some("clip_value")),
        ("value clip_value NaN", Some("clip_value")),
        ("scaler init_scale 1e38", None),
        ("scaler init_scale 1e-45", None),
        ("scaler growth_interval u32::MAX", None),
        ("scaler init_scale 1e39", Some("init_scale")),
        ("scaler init_scale 1e-46", Some("init_scale")),
        ("scaler growth_factor 1", Some("growth_factor")),
        ("scaler backoff_factor 1", Some("backoff_factor")),
        ("scaler backoff_factor 0", Some("backoff_factor")),
        ("scaler growth_interval 0", Some("growth_interval")),
        ("ce smoothing 0", None),
        ("ce smoothing 1", None),
        ("ce no ignore_index", None),
        ("ce ignore_index i64::MIN", None),
        ("ce smoothing -0.1", Some("label_smoothing")),
        ("ce smoothing 1.5", Some("label_smoothing")),
        ("ce smoothing NaN", Some("label_smoothing")),
        ("agc clip_factor tiny", None),
        ("agc eps 0", Some("eps")),
        ("agc clip_factor 0", Some("clip_factor")),
        ("agc clip_factor NaN", Some("clip_factor")),
        ("agc eps -1", Some("eps")),
    ];
    for (row, named) in table {
        grad_testkit::judge_row(row, run(row), named)?;
    }
    Ok(())
}
