//! Cross-entropy (fused equals composed, gradcheck, stability, candle agreement) and the loss
//! scaler (scale then unscale, checkpoints), plus bad input.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, Tensor, Var};
use grad_core::{GradcheckConfig, NamedVars, Philox, gradcheck};
use grad_regularize::{
    CrossEntropyConfig, Error, LossScaler, LossScalerConfig, LossScalerState, Reduction,
    cross_entropy, cross_entropy_composed, smooth_labels,
};
use grad_testkit::grads_of;
use proptest::prelude::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn vals(t: &Tensor) -> Vec<f64> {
    grad_testkit::values(t).unwrap()
}

#[derive(Debug, Clone)]
struct CeCase {
    dims: Vec<usize>,
    soft: bool,
    weighted: bool,
    ignore: bool,
    reduction: Reduction,
    eps: f64,
    seed: u64,
}

fn ce_cases() -> impl Strategy<Value = CeCase> {
    (
        prop::sample::select(vec![vec![6, 5], vec![3, 4, 2], vec![2, 3, 2, 2], vec![5]]),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec![Reduction::Mean, Reduction::Sum, Reduction::None]),
        prop::sample::select(vec![0.0, 0.1, 0.3, 1.0]),
        any::<u64>(),
    )
        .prop_map(
            |(dims, soft, weighted, ignore, reduction, eps, seed)| CeCase {
                dims,
                soft,
                weighted,
                ignore: ignore && !soft,
                reduction,
                eps,
                seed,
            },
        )
}

/// Logits, targets and options of a case, in `dtype`.
fn build(c: &CeCase, dtype: DType) -> (Tensor, Tensor, CrossEntropyConfig) {
    let dev = Device::Cpu;
    let mut rng = Philox::new(c.seed);
    let logits = rng
        .normal(c.dims.as_slice(), 0.0, 3.0, DType::F64, &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let class_dim = usize::from(c.dims.len() > 1);
    let classes = c.dims[class_dim];
    let targets = if c.soft {
        candle_nn::ops::softmax(
            &rng.normal(c.dims.as_slice(), 0.0, 1.0, DType::F64, &dev)
                .unwrap(),
            class_dim,
        )
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
    } else {
        let mut shape = c.dims.clone();
        shape.remove(class_dim);
        let n: usize = shape.iter().product();
        let u = vals(
            &rng.uniform(n, 0.0, classes as f64, DType::F64, &dev)
                .unwrap(),
        );
        let idx: Vec<i64> = u
            .iter()
            .enumerate()
            .map(|(i, v)| if c.ignore && i % 3 == 1 { 2 } else { *v as i64 })
            .collect();
        Tensor::from_vec(idx, shape, &dev).unwrap()
    };
    let weight = c.weighted.then(|| {
        Tensor::from_vec(
            (0..classes)
                .map(|k| 0.5 + k as f64 * 0.3)
                .collect::<Vec<_>>(),
            classes,
            &dev,
        )
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
    });
    let options = CrossEntropyConfig {
        weight,
        ignore_index: c.ignore.then_some(2),
        reduction: c.reduction,
        label_smoothing: c.eps,
    };
    (logits, targets, options)
}

fn loss_and_grad(
    fused: bool,
    logits: &Tensor,
    targets: &Tensor,
    o: &CrossEntropyConfig,
) -> (Vec<f64>, Vec<f64>) {
    let x = Var::from_tensor(logits).unwrap();
    let loss = if fused {
        cross_entropy(x.as_tensor(), targets, o)
    } else {
        cross_entropy_composed(x.as_tensor(), targets, o)
    }
    .unwrap();
    let up = Philox::new(99)
        .normal(loss.shape(), 0.0, 1.0, DType::F64, &Device::Cpu)
        .unwrap();
    let g = grads_of(&loss, &up, &[x.as_tensor()]).unwrap()[0]
        .clone()
        .unwrap();
    (vals(&loss), vals(&g))
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| (x.is_nan() && y.is_nan()) || (x - y).abs() <= tol * (1.0 + y.abs()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn fused_equals_composed(c in ce_cases()) {
        let (x, t, o) = build(&c, DType::F64);
        let (lf, gf) = loss_and_grad(true, &x, &t, &o);
        let (lc, gc) = loss_and_grad(false, &x, &t, &o);
        prop_assert!(close(&lf, &lc, 1e-12), "{c:?}: loss {lf:?} vs {lc:?}");
        prop_assert!(close(&gf, &gc, 1e-12), "{c:?}: grad");
    }

    #[test]
    fn single_precision_agrees_with_double(c in ce_cases()) {
        let (x, t, o) = build(&c, DType::F32);
        let (l32, g32) = loss_and_grad(true, &x, &t, &o);
        let x64 = x.to_dtype(DType::F64)?;
        let t64 = if c.soft { t.to_dtype(DType::F64)? } else { t.clone() };
        let o64 = CrossEntropyConfig { weight: o.weight.as_ref().map(|w| w.to_dtype(DType::F64).unwrap()), ..o.clone() };
        let (l64, g64) = loss_and_grad(true, &x64, &t64, &o64);
        prop_assert!(close(&l32, &l64, 1e-4));
        prop_assert!(close(&g32, &g64, 1e-4));
    }

    #[test]
    fn smoothed_targets_sum_to_one(n in 1usize..6, c in 2usize..9, eps in 0.0f64..=1.0, seed in any::<u64>()) {
        let t = candle_nn::ops::softmax(&Philox::new(seed).normal((n, c), 0.0, 1.0, DType::F64, &Device::Cpu)?, 1)?;
        let s = smooth_labels(&t, eps)?;
        for row in s.to_vec2::<f64>()? {
            prop_assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            prop_assert!(row.iter().all(|v| *v >= eps / c as f64 - 1e-15));
        }
    }
}

#[test]
fn gradcheck_with_every_option() -> TestResult {
    for (soft, weighted, ignore, reduction, eps) in [
        (false, false, false, Reduction::Mean, 0.1),
        (false, true, true, Reduction::Mean, 0.25),
        (false, true, false, Reduction::Sum, 0.0),
        (false, false, true, Reduction::None, 0.3),
        (true, true, false, Reduction::Mean, 0.1),
        (true, false, false, Reduction::None, 0.0),
    ] {
        let c = CeCase {
            dims: vec![4, 3, 2],
            soft,
            weighted,
            ignore,
            reduction,
            eps,
            seed: 7,
        };
        let (x, t, o) = build(&c, DType::F64);
        gradcheck(
            |a: &[Tensor]| cross_entropy(&a[0], &t, &o),
            &[x],
            &GradcheckConfig::default(),
        )
        .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
    Ok(())
}

#[test]
fn without_options_equals_candle_nn() -> TestResult {
    let mut rng = Philox::new(1);
    let logits = rng.normal((32, 10), 0.0, 2.0, DType::F32, &Device::Cpu)?;
    let targets = Tensor::from_vec(
        (0..32u32).map(|i| i * 7 % 10).collect::<Vec<_>>(),
        32,
        &Device::Cpu,
    )?;
    let ours = cross_entropy(&logits, &targets, &CrossEntropyConfig::default())?;
    let theirs = candle_nn::loss::cross_entropy(&logits, &targets)?;
    assert!((ours.to_scalar::<f32>()? - theirs.to_scalar::<f32>()?).abs() < 1e-6);
    Ok(())
}

#[test]
fn huge_logits_stay_finite() -> TestResult {
    let logits = Var::new(
        &[[1e4f32, -1e4, 0.0], [-3e4, 3e4, 1e4], [1e30, -1e30, 0.0]],
        &Device::Cpu,
    )?;
    let targets = Tensor::new(&[1i64, 1, 2], &Device::Cpu)?;
    let o = CrossEntropyConfig {
        label_smoothing: 0.1,
        ..Default::default()
    };
    let loss = cross_entropy(logits.as_tensor(), &targets, &o)?;
    assert!(loss.to_scalar::<f32>()?.is_finite());
    let g = grads_of(
        &loss,
        &Tensor::new(1f32, &Device::Cpu)?,
        &[logits.as_tensor()],
    )?[0]
        .clone()
        .unwrap();
    assert!(vals(&g).iter().all(|v| v.is_finite()));
    Ok(())
}

#[test]
fn scale_then_unscale_is_the_identity_and_state_round_trips() -> TestResult {
    let w = Var::new(&[0.3f32, -1.5, 2.25, 1e-6], &Device::Cpu)?;
    let params = NamedVars::new([("w", w.clone())])?;
    let mut scaler = LossScaler::new(LossScalerConfig::default())?;
    let plain = grads_of(
        &w.sqr()?.sum_all()?,
        &Tensor::new(1f32, &Device::Cpu)?,
        &[w.as_tensor()],
    )?[0]
        .clone()
        .unwrap();
    let store = scaler.scale(&w.sqr()?.sum_all()?)?.backward()?;
    let mut grads = params.grads(&store)?;
    assert!(!scaler.unscale(&mut grads)?);
    // Power-of-two scales make the round trip exact.
    assert_eq!(vals(grads.get("w").unwrap()), vals(&plain));
    scaler.update();
    let state = scaler.state();
    let json = serde_json::to_string(&state)?;
    let back: LossScalerState = serde_json::from_str(&json)?;
    let mut other = LossScaler::new(LossScalerConfig::default())?;
    other.load_state(back)?;
    assert_eq!(other.state(), state);
    Ok(())
}

#[test]
fn f16_gradients_underflow_without_scaling_and_survive_with_it() -> TestResult {
    // 1e-5 * 1e-3 = 1e-8 is below f16's smallest subnormal (6e-8): unscaled it is zero.
    let w = Var::from_tensor(&Tensor::new(&[1e-3f32; 4], &Device::Cpu)?.to_dtype(DType::F16)?)?;
    let loss = (w.as_tensor() * 1e-5)?.sqr()?.sum_all()?;
    let g = loss.backward().unwrap().get(w.as_tensor()).unwrap().clone();
    assert!(vals(&g).iter().all(|v| *v == 0.0));
    let params = NamedVars::new([("w", w.clone())])?;
    let mut scaler = LossScaler::new(LossScalerConfig {
        init_scale: 65536.0 * 16.0,
        ..Default::default()
    })?;
    let store = scaler.scale(&loss)?.backward()?;
    let mut grads = params.grads(&store)?;
    scaler.unscale(&mut grads)?;
    assert!(vals(grads.get("w").unwrap()).iter().all(|v| *v != 0.0));
    Ok(())
}

#[test]
fn bad_input_is_an_error() -> TestResult {
    let dev = Device::Cpu;
    let logits = Tensor::zeros((3, 4), DType::F32, &dev)?;
    let t = Tensor::new(&[0i64, 4, 1], &dev)?;
    assert!(matches!(
        cross_entropy(&logits, &t, &CrossEntropyConfig::default()),
        Err(Error::TargetOutOfRange {
            target: 4,
            position: 1,
            classes: 4
        })
    ));
    let t = Tensor::new(&[0i64, -1, 1], &dev)?;
    assert!(cross_entropy(&logits, &t, &CrossEntropyConfig::default()).is_err());
    let ok = Tensor::new(&[0i64, 1, 2], &dev)?;
    for eps in [-0.1, 1.5, f64::NAN] {
        let o = CrossEntropyConfig {
            label_smoothing: eps,
            ..Default::default()
        };
        assert!(cross_entropy(&logits, &ok, &o).is_err(), "eps {eps}");
    }
    let o = CrossEntropyConfig {
        weight: Some(Tensor::ones(3, DType::F32, &dev)?),
        ..Default::default()
    };
    assert!(
        cross_entropy(&logits, &ok, &o).is_err(),
        "weight of length 3 for 4 classes"
    );
    let soft = Tensor::zeros((3, 4), DType::F32, &dev)?;
    let o = CrossEntropyConfig {
        ignore_index: Some(0),
        ..Default::default()
    };
    assert!(matches!(
        cross_entropy(&logits, &soft, &o),
        Err(Error::IgnoreIndexWithProbabilities(0))
    ));
    assert!(
        cross_entropy(
            &logits,
            &Tensor::new(&[0i64, 1], &dev)?,
            &CrossEntropyConfig::default()
        )
        .is_err()
    );
    for (g, b) in [
        (1.0, 0.5),
        (0.5, 0.5),
        (2.0, 1.0),
        (2.0, 0.0),
        (f64::NAN, 0.5),
    ] {
        let cfg = LossScalerConfig {
            growth_factor: g,
            backoff_factor: b,
            ..Default::default()
        };
        assert!(LossScaler::new(cfg).is_err(), "growth {g}, backoff {b}");
    }
    assert!(
        LossScaler::new(LossScalerConfig {
            growth_interval: 0,
            ..Default::default()
        })
        .is_err()
    );
    assert!(
        LossScaler::new(LossScalerConfig {
            init_scale: 1e40,
            ..Default::default()
        })
        .is_err()
    );
    Ok(())
}

/// Issue 15, problem 6: a second `backward()` of a graph holding the fused cross-entropy gives
/// the same gradient again (the first one consumed what the forward saved).
#[test]
fn cross_entropy_backward_twice_gives_the_same_gradient() -> TestResult {
    let logits = Var::new(&[[0.5f64, -1.0, 2.0], [1.0, 0.0, -3.0]], &Device::Cpu)?;
    let targets = Tensor::new(&[2i64, 0], &Device::Cpu)?;
    let options = CrossEntropyConfig {
        label_smoothing: 0.1,
        ..Default::default()
    };
    let loss = cross_entropy(logits.as_tensor(), &targets, &options)?;
    let first = loss.backward()?;
    let second = loss.backward()?;
    let (a, b) = (
        vals(first.get(logits.as_tensor()).unwrap()),
        vals(second.get(logits.as_tensor()).unwrap()),
    );
    assert_eq!(a, b);
    let composed = cross_entropy_composed(logits.as_tensor(), &targets, &options)?;
    let c = vals(composed.backward()?.get(logits.as_tensor()).unwrap());
    for (x, y) in a.iter().zip(&c) {
        assert!((x - y).abs() < 1e-12, "{x} vs {y}");
    }
    Ok(())
}

/// Issue 15, problem 1: a masked (-inf) logit with no label smoothing gives PyTorch's finite
/// loss, 0.3133 for `[[0, -inf, 1]]` and target 2, on both paths; the masked class gets
/// gradient 0.
#[test]
fn a_masked_logit_without_smoothing_gives_a_finite_loss() -> TestResult {
    let logits = Var::new(&[[0f32, f32::NEG_INFINITY, 1.0]], &Device::Cpu)?;
    let targets = Tensor::new(&[2i64], &Device::Cpu)?;
    let options = CrossEntropyConfig::default();
    for f in [cross_entropy, cross_entropy_composed] {
        let loss = f(logits.as_tensor(), &targets, &options)?;
        let l = loss.to_scalar::<f32>()?;
        assert!((l - 0.313_261_7).abs() < 1e-6, "loss {l}");
        let g = vals(loss.backward().unwrap().get(logits.as_tensor()).unwrap());
        assert_eq!(g[1], 0.0);
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
    }
    Ok(())
}

#[test]
fn loss_scaler_step_twice_before_update_is_an_error() -> TestResult {
    use candle_nn::{Optimizer, SGD};
    let w = Var::new(&[1f32], &Device::Cpu)?;
    let params = NamedVars::new([("w", w.clone())])?;
    let mut sgd = SGD::new(vec![w.clone()], 0.1)?;
    let mut scaler = LossScaler::new(LossScalerConfig::default())?;
    let store = scaler.scale(&w.as_tensor().sum_all()?)?.backward()?;
    let grads = params.grads(&store)?;
    assert!(scaler.step(&mut sgd, &grads)?);
    let after_one = w.as_tensor().to_vec1::<f32>()?;
    assert_eq!(after_one, [0.9]);
    // PyTorch raises here; applying the still-scaled gradient would move w by 65536 * 0.1.
    assert!(matches!(
        scaler.step(&mut sgd, &grads),
        Err(Error::StepWithoutUpdate)
    ));
    assert_eq!(
        w.as_tensor().to_vec1::<f32>()?,
        after_one,
        "nothing applied"
    );
    scaler.update();
    let store = scaler.scale(&w.as_tensor().sum_all()?)?.backward()?;
    assert!(
        scaler.step(&mut sgd, &params.grads(&store)?)?,
        "after update() it steps again"
    );
    Ok(())
}

#[test]
fn loss_scaler_rejects_scales_f32_cannot_hold_and_foreign_trackers() -> TestResult {
    for init_scale in [1e-50, 1e39] {
        assert!(
            LossScaler::new(LossScalerConfig {
                init_scale,
                ..Default::default()
            })
            .is_err(),
            "{init_scale}"
        );
    }
    let mut scaler = LossScaler::new(LossScalerConfig::default())?;
    let mut state = scaler.state();
    state.growth_tracker = u32::MAX;
    assert!(
        scaler.load_state(state).is_err(),
        "a tracker past growth_interval"
    );
    Ok(())
}

#[test]
fn cross_entropy_of_non_contiguous_targets_equals_contiguous() -> TestResult {
    let logits = Tensor::new(
        &[
            [0.5f32, -1.0, 2.0],
            [1.0, 0.0, -0.5],
            [0.0, 3.0, 1.0],
            [2.0, 2.0, 0.0],
        ],
        &Device::Cpu,
    )?;
    let strided = Tensor::new(&[[0i64, 9], [1, 9], [2, 9], [0, 9]], &Device::Cpu)?
        .narrow(1, 0, 1)?
        .squeeze(1)?;
    assert!(!strided.is_contiguous());
    let cfg = CrossEntropyConfig::default();
    for targets in [
        strided.clone(),
        strided.to_dtype(DType::U8)?,
        strided.to_dtype(DType::U32)?,
    ] {
        let dense = targets.contiguous()?;
        for f in [cross_entropy, cross_entropy_composed] {
            let a = f(&logits, &targets, &cfg)?.to_scalar::<f32>()?;
            let b = f(&logits, &dense, &cfg)?.to_scalar::<f32>()?;
            assert_eq!(a, b, "{:?}", targets.dtype());
        }
    }
    Ok(())
}
