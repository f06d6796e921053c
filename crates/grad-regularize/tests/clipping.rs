//! Clipping invariants, policies, the optimizer wrapper in a training loop, and bad input.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, SGD, VarBuilder, VarMap};
use grad_core::strategies::{TensorSpec, Values, tensor};
use grad_core::{NamedVars, NormType, global_norm};
use grad_regularize::{
    ClipPolicy, ClipRule, Clipped, ClippedConfig, Error, NonFiniteNorm, ParamGroup, Selector,
    clip_grad_norm, clip_grad_value,
};
use proptest::prelude::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn vals(t: &Tensor) -> Vec<f64> {
    grad_testkit::values(t).unwrap()
}

fn grad_lists() -> impl Strategy<Value = Vec<Tensor>> {
    prop::collection::vec(
        tensor(TensorSpec {
            dtypes: vec![DType::F32, DType::F64],
            values: Values::Finite {
                lo: -50.0,
                hi: 50.0,
            },
            ..TensorSpec::default()
        }),
        1..5,
    )
}

fn norm_types() -> impl Strategy<Value = NormType> {
    prop_oneof![
        Just(NormType::L1),
        Just(NormType::L2),
        Just(NormType::Inf),
        (0.5f64..4.0).prop_map(NormType::P)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn clipped_norm_is_bounded_and_directions_kept(
        grads in grad_lists(),
        max_norm in 0.01f64..20.0,
        norm_type in norm_types(),
    ) {
        let before: Vec<Vec<f64>> = grads.iter().map(vals).collect();
        let before_norms: Vec<f64> = grads.iter().map(|g| global_norm(std::slice::from_ref(g), norm_type).unwrap()).collect();
        let mut clipped: Vec<Tensor> = grads.iter().map(|g| g.copy().unwrap()).collect();
        let outcome = clip_grad_norm(&mut clipped, max_norm, norm_type, NonFiniteNorm::Scale)?;
        let after = global_norm(&clipped, norm_type)?;
        prop_assert!(after <= max_norm * (1.0 + 1e-6), "{after} > {max_norm}");
        let c = outcome.coefficient;
        prop_assert!(c > 0.0 && c <= 1.0);
        for ((g, b), n) in clipped.iter().zip(&before).zip(&before_norms) {
            // Same direction: every element scaled by the same c (to the dtype's precision), and
            // no tensor's norm grows.
            let tol = if g.dtype() == DType::F32 { 1e-6 } else { 1e-12 };
            for (x, y) in vals(g).iter().zip(b) {
                prop_assert!((x - c * y).abs() <= tol * (1.0 + y.abs()));
            }
            let after_t = global_norm(std::slice::from_ref(g), norm_type)?;
            prop_assert!(after_t <= n * (1.0 + 1e-6));
        }
    }

    #[test]
    fn clipped_values_are_bounded(grads in grad_lists(), clip in 0.01f64..10.0) {
        let before: Vec<Vec<f64>> = grads.iter().map(vals).collect();
        let mut clipped: Vec<Tensor> = grads.iter().map(|g| g.copy().unwrap()).collect();
        clip_grad_value(&mut clipped, clip)?;
        for (g, b) in clipped.iter().zip(&before) {
            let c32 = if g.dtype() == DType::F32 { f64::from(clip as f32) } else { clip };
            for (x, y) in vals(g).iter().zip(b) {
                prop_assert!(x.abs() <= c32);
                prop_assert!(x.abs() <= y.abs(), "clipping never grows an element");
                if y.abs() <= clip { prop_assert_eq!(x, y); }
            }
        }
    }
}

fn mlp(map: &VarMap) -> candle_nn::Sequential {
    let vb = VarBuilder::from_varmap(map, DType::F32, &Device::Cpu);
    candle_nn::seq()
        .add(candle_nn::linear(4, 8, vb.pp("layer.0")).unwrap())
        .add(candle_nn::Activation::Relu)
        .add(candle_nn::linear(8, 1, vb.pp("layer.1")).unwrap())
}

#[test]
fn a_poisoned_batch_skips_exactly_its_step() -> TestResult {
    let map = VarMap::new();
    let net = mlp(&map);
    let params = NamedVars::from_var_map(&map);
    let policy = ClipPolicy::single(ClipRule::max_norm(1.0))?;
    let mut opt = Clipped::<SGD>::new(params.clone(), 0.05, ClippedConfig::new(policy))?;
    let snapshot =
        |p: &NamedVars| -> Vec<Vec<f64>> { p.vars().iter().map(|v| vals(v.as_tensor())).collect() };

    let mut rng = grad_core::Philox::new(3);
    for step in 0..6 {
        let mut x = rng.normal((16, 4), 0.0, 1.0, DType::F32, &Device::Cpu)?;
        if step == 3 {
            // One NaN in the batch poisons every gradient.
            let mut v = vals(&x);
            v[5] = f64::NAN;
            x = Tensor::from_vec(v, (16, 4), &Device::Cpu)?.to_dtype(DType::F32)?;
        }
        let y = rng.normal((16, 1), 0.0, 1.0, DType::F32, &Device::Cpu)?;
        let before = snapshot(&params);
        let loss = candle_nn::loss::mse(&net.forward(&x)?, &y)?;
        let report = opt.try_backward_step(&loss)?;
        let after = snapshot(&params);
        assert_eq!(report.skipped, step == 3, "step {step}");
        if step == 3 {
            assert_eq!(before, after, "the skipped step changed no parameter");
            assert!(report.non_finite > 0);
            assert!(
                report
                    .first_non_finite
                    .as_deref()
                    .is_some_and(|n| n.starts_with("layer.0"))
            );
        } else {
            assert_ne!(before, after);
        }
        assert!(after.iter().flatten().all(|v| v.is_finite()));
    }
    let c = opt.counters();
    assert_eq!((c.steps, c.skipped, c.consecutive_skips), (5, 1, 0));
    assert!(opt.last_total_norm().unwrap().is_finite());
    Ok(())
}

#[test]
fn too_many_consecutive_skips_is_an_error_and_counters_track_clipping() -> TestResult {
    let w = Var::new(&[1f32, 2.0], &Device::Cpu)?;
    let params = NamedVars::new([("w", w.clone())])?;
    let mut cfg = ClippedConfig::new(ClipPolicy::single(ClipRule::max_norm(0.5))?);
    cfg.max_consecutive_skips = Some(2);
    let mut opt = Clipped::<SGD>::new(params, 0.1, cfg)?;
    let report = opt.try_backward_step(&w.sqr()?.sum_all()?)?;
    assert!(report.clipped && opt.last_clipped());
    let nan_loss = (w.as_tensor() * f64::NAN)?.sum_all()?;
    assert!(opt.try_backward_step(&nan_loss)?.skipped);
    assert!(opt.try_backward_step(&nan_loss)?.skipped);
    match opt.try_backward_step(&nan_loss) {
        Err(Error::TooManySkippedSteps {
            skips: 3,
            limit: 2,
            parameter,
        }) => assert_eq!(parameter, "w"),
        other => panic!("expected TooManySkippedSteps, got {other:?}"),
    }
    let c = opt.counters();
    assert_eq!((c.clipped, c.skipped), (1, 3), "{c:?}");
    // The same error through candle's Optimizer trait stays typed.
    let store = nan_loss.backward()?;
    let err = Optimizer::step(&mut opt, &store).unwrap_err();
    assert!(
        matches!(
            grad_core::downcast::<Error>(&err),
            Some(Error::TooManySkippedSteps { skips: 4, .. })
        ),
        "{err}"
    );
    // Through candle's Optimizer trait too.
    let mut via_trait: Clipped<SGD> = Optimizer::new(
        vec![w.clone()],
        grad_regularize::ClippedOptimizerConfig {
            inner: 0.1,
            clip: ClippedConfig::new(ClipPolicy::single(ClipRule::Value { clip_value: 0.1 })?),
        },
    )?;
    let before = vals(w.as_tensor());
    via_trait.backward_step(&w.sqr()?.sum_all()?)?;
    let after = vals(w.as_tensor());
    for (a, b) in after.iter().zip(&before) {
        assert!(
            ((b - a) - 0.01).abs() < 1e-6,
            "each element moved by lr * clip_value"
        );
    }
    assert_eq!(via_trait.counters().clipped, 1, "the clamp counts");
    Ok(())
}

#[test]
fn groups_apply_their_own_rules_and_leave_the_rest() -> TestResult {
    let dev = Device::Cpu;
    let a = Var::new(&[30f32, 40.0], &dev)?;
    let b = Var::new(&[[3f32, 4.0], [0.0, 0.0]], &dev)?;
    let c = Var::new(&[100f32], &dev)?;
    let params = NamedVars::new([
        ("enc.a", a.clone()),
        ("enc.b", b.clone()),
        ("head.c", c.clone()),
    ])?;
    // b's gradient is 2b + 1 = [[7, 9], [1, 1]]: row 1 has a gradient but a zero weight.
    let loss = (a.sqr()?.sum_all()? + b.sqr()?.sum_all()? + b.sum_all()? + c.sum_all()?)?;
    let store = loss.backward()?;
    let mut grads = params.grads(&store)?;
    let policy = ClipPolicy::new(vec![
        ParamGroup {
            name: "b".into(),
            select: Selector::Names(vec!["enc.b".into()]),
            rule: ClipRule::Adaptive {
                clip_factor: 0.1,
                eps: 1e-3,
            },
        },
        ParamGroup {
            name: "enc".into(),
            select: Selector::Prefix("enc.".into()),
            rule: ClipRule::max_norm(1.0),
        },
        ParamGroup {
            name: "rest".into(),
            select: Selector::All,
            rule: ClipRule::Unclipped,
        },
    ])?;
    let report = policy.apply(&mut grads, None)?;
    assert_eq!(
        report.iter().map(|g| g.parameters).collect::<Vec<_>>(),
        [1, 1, 1]
    );
    // enc.a: norm 100 clipped to 1; head.c untouched; enc.b: unit-wise AGC.
    assert!(
        (global_norm(&[grads.get("enc.a").unwrap().clone()], NormType::L2).unwrap() - 1.0).abs()
            < 1e-5
    );
    assert_eq!(vals(grads.get("head.c").unwrap()), [1.0]);
    let gb = vals(grads.get("enc.b").unwrap());
    assert!(
        ((gb[0] * gb[0] + gb[1] * gb[1]).sqrt() - 0.5).abs() < 1e-5,
        "row 0: 0.1 * |w_row| = 0.5"
    );
    let row1 = (gb[2] * gb[2] + gb[3] * gb[3]).sqrt();
    assert!(
        (row1 - 1e-4).abs() < 1e-9,
        "row 1: zero weight, eps keeps it movable at 0.1 * 1e-3, got {row1}"
    );
    assert!(
        gb[2] > 0.0 && (gb[2] - gb[3]).abs() < 1e-12,
        "the direction is kept"
    );
    Ok(())
}

#[test]
fn bad_input_is_an_error() -> TestResult {
    let dev = Device::Cpu;
    let mut g = vec![Tensor::ones(3, DType::F32, &dev)?];
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(
            clip_grad_norm(&mut g, bad, NormType::L2, NonFiniteNorm::Scale).is_err(),
            "max_norm {bad}"
        );
        assert!(clip_grad_value(&mut g, bad).is_err(), "clip_value {bad}");
    }
    for p in [0.0, -2.0, f64::NAN] {
        assert!(
            clip_grad_norm(&mut g, 1.0, NormType::P(p), NonFiniteNorm::Scale).is_err(),
            "norm_type {p}"
        );
    }
    assert!(
        ClipPolicy::single(ClipRule::Adaptive {
            clip_factor: -1.0,
            eps: 1e-3
        })
        .is_err()
    );
    let mut inf = vec![Tensor::new(&[f32::INFINITY], &dev)?];
    let before = vals(&inf[0]);
    assert!(matches!(
        clip_grad_norm(&mut inf, 1.0, NormType::L2, NonFiniteNorm::Error),
        Err(Error::NonFiniteTotalNorm { .. })
    ));
    assert_eq!(
        vals(&inf[0]),
        before,
        "an error leaves the gradients untouched"
    );
    let mut ints = vec![Tensor::ones(3, DType::U32, &dev)?];
    assert!(clip_grad_norm(&mut ints, 1.0, NormType::L2, NonFiniteNorm::Scale).is_err());
    Ok(())
}

fn centred(t: &Tensor) -> Vec<f64> {
    let mut g = t.copy().unwrap();
    grad_core::center_rows_in_place(&mut g).unwrap();
    grad_testkit::values(&g).unwrap()
}

proptest! {
    /// The in-place centring equals the composed one, and every row then sums to ~0.
    #[test]
    fn centring_rows_fused_equals_composed(
        t in tensor(TensorSpec { values: Values::Finite { lo: -5.0, hi: 5.0 }, ..TensorSpec::default() }),
    ) {
        let fused = centred(&t);
        let composed = grad_core::device::with_path(grad_core::device::Path::Composed, || centred(&t));
        let tol = if t.dtype() == DType::F64 { 1e-12 } else { 2e-2 };
        for (a, b) in fused.iter().zip(&composed) {
            prop_assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{a} vs {b}");
        }
        if t.rank() >= 2 {
            let rows = t.dim(0)?;
            let len = fused.len() / rows;
            for r in fused.chunks(len.max(1)) {
                let s: f64 = r.iter().sum();
                prop_assert!(s.abs() <= 1e-6 + tol * len as f64 * 5.0, "row sums to {s}");
            }
        } else {
            prop_assert_eq!(fused, grad_testkit::values(&t)?);
        }
    }
}

#[test]
fn centring_keeps_a_nan_row_nan_and_rejects_integers() -> TestResult {
    let g = Tensor::new(&[[1f32, f32::NAN], [2.0, 4.0]], &Device::Cpu)?;
    let v = centred(&g);
    assert!(v[0].is_nan() && v[1].is_nan());
    assert_eq!(v[2..], [-1.0, 1.0]);
    let mut ints = Tensor::new(&[[1u32, 2], [3, 4]], &Device::Cpu)?;
    assert!(grad_core::center_rows_in_place(&mut ints).is_err());
    Ok(())
}

#[test]
fn clipped_centralises_then_clips_then_steps() -> TestResult {
    let w = Var::new(&[[1f64, 2.0, 6.0], [0.0, 3.0, -3.0]], &Device::Cpu)?;
    let params = NamedVars::new([("fc.weight", w.clone())])?;
    let config = ClippedConfig {
        centralize: true,
        ..ClippedConfig::new(ClipPolicy::single(ClipRule::max_norm(1.0))?)
    };
    let mut opt = Clipped::<SGD>::new(params, 1.0, config)?;
    let before = w.as_tensor().to_vec2::<f64>()?;
    // d/dw of sum(w^2 / 2) is w itself.
    let loss = (w.as_tensor().sqr()?.sum_all()? * 0.5)?;
    let report = opt.try_backward_step(&loss)?;
    assert!(report.clipped);
    // Expected: g = w; centred per row; then scaled to norm 1 (PyTorch's 1e-6 guard aside).
    let centred: Vec<Vec<f64>> = before
        .iter()
        .map(|r| {
            let m = r.iter().sum::<f64>() / 3.0;
            r.iter().map(|x| x - m).collect()
        })
        .collect();
    let norm = centred.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
    let after = w.as_tensor().to_vec2::<f64>()?;
    for ((a, b), c) in after
        .iter()
        .flatten()
        .zip(before.iter().flatten())
        .zip(centred.iter().flatten())
    {
        let want = b - c / (norm + 1e-6);
        assert!((a - want).abs() < 1e-12, "{a} vs {want}");
    }
    Ok(())
}
