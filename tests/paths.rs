//! The fused CPU kernels and the composed paths (what CUDA and Metal tensors run) agree: outputs,
//! gradients and state (running statistics, dropout stream positions, clip counters, loss-scaler
//! state, monitor records), on random shapes and layouts. And a composed training step reads
//! back only the scalars ARCHITECTURE.md lists.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{Optimizer, SGD, VarBuilder, VarMap};
use gradkit::core::device::{Path, read_back_count, with_path};
use gradkit::core::strategies::{LayoutKind, Values, build_tensor, values};
use gradkit::core::{NamedVars, PhiloxState};
use gradkit::diagnostics::{GradMonitor, MonitorConfig, Probe, ProbeKind};
use gradkit::layers::ops::DropoutKind;
use gradkit::layers::{BatchNormConfig, DropoutConfig, batch_norm, dropout};
use gradkit::regularize::{
    Clipped, CrossEntropyConfig, LossScaler, LossScalerConfig, Reduction, cross_entropy,
};
use proptest::prelude::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn vals(t: &Tensor) -> Vec<f64> {
    grad_testkit::values(t).unwrap()
}

/// `|a - b| <= rtol (1 + max |b|)` element-wise (the vector's scale: the two paths round and
/// accumulate differently), NaN matching NaN and infinities matching exactly.
fn assert_close(a: &[f64], b: &[f64], rtol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b
        .iter()
        .filter(|v| v.is_finite())
        .fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let same = (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= rtol * scale;
        assert!(same, "{what}[{i}]: fused {x} vs composed {y}");
    }
}

fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F64 { 1e-9 } else { 1e-4 }
}

fn layout() -> impl Strategy<Value = LayoutKind> {
    prop::sample::select(vec![
        LayoutKind::Contiguous,
        LayoutKind::Transposed,
        LayoutKind::Narrowed,
    ])
}

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(vec![DType::F32, DType::F64])
}

/// Runs `f` on the fused path, then on the composed path.
fn both<R>(f: impl Fn() -> R) -> (R, R) {
    let fused = f();
    let composed = with_path(Path::Composed, &f);
    (fused, composed)
}

/// A BatchNorm layer's three training steps and one evaluation: outputs, gradients and
/// running statistics.
fn batch_norm_run(xs: &[Tensor], momentum: Option<f64>) -> Vec<Vec<f64>> {
    let x0 = &xs[0];
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, x0.dtype(), &Device::Cpu);
    let config = BatchNormConfig {
        momentum,
        ..Default::default()
    };
    let bn = batch_norm(x0.dim(1).unwrap(), config, vb).unwrap();
    let mut out = Vec::new();
    for x in xs {
        let v = Var::from_tensor(x).unwrap();
        let y = bn.forward_t(v.as_tensor(), true).unwrap();
        let grads = (y.sqr().unwrap().sum_all().unwrap() + y.sum_all().unwrap())
            .unwrap()
            .backward()
            .unwrap();
        out.push(vals(&y));
        out.push(vals(grads.get(v.as_tensor()).unwrap()));
        out.push(vals(grads.get(bn.weight().unwrap()).unwrap()));
    }
    out.push(vals(bn.running_mean().unwrap()));
    out.push(vals(bn.running_var().unwrap()));
    out.push(vec![bn.num_batches_tracked().unwrap().unwrap() as f64]);
    out.push(vals(&bn.forward_t(x0, false).unwrap()));
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn batch_norm_outputs_gradients_and_running_statistics_agree(
        n in 2usize..5,
        c in 1usize..5,
        spatial in prop::collection::vec(1usize..4, 0..3),
        dtype in dtype(),
        layout in layout(),
        cumulative in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let dims: Vec<usize> = [n, c].into_iter().chain(spatial).collect();
        let count: usize = dims.iter().product();
        let xs: Vec<Tensor> = (0..3u64)
            .map(|k| {
                let data: Vec<f64> = (0..count)
                    .map(|i| ((seed.wrapping_add(k * 7919 + i as u64) % 1000) as f64) / 97.0 - 5.0)
                    .collect();
                build_tensor(&dims, data, dtype, layout).unwrap()
            })
            .collect();
        let momentum = if cumulative { None } else { Some(0.1) };
        let (fused, composed) = both(|| batch_norm_run(&xs, momentum));
        // f64: the paths agree to rounding. f32: each path is compared with the f64
        // computation; a batch norm gradient divides by the per-channel deviation of a handful
        // of values, so f32 rounding (the composed path sums in f32) grows to about 1e-3 here.
        let (exact, rtol) = if dtype == DType::F64 {
            (composed.clone(), 1e-9)
        } else {
            let wide: Vec<Tensor> = xs.iter().map(|x| x.to_dtype(DType::F64).unwrap()).collect();
            (batch_norm_run(&wide, momentum), 1e-2)
        };
        for (k, ((a, b), e)) in fused.iter().zip(&composed).zip(&exact).enumerate() {
            assert_close(a, e, rtol, &format!("fused output {k}"));
            assert_close(b, e, rtol, &format!("composed output {k}"));
        }
    }

    #[test]
    fn dropout_masks_gradients_and_stream_positions_agree(
        dims in prop::collection::vec(1usize..6, 1..5),
        kind in prop::sample::select(vec![
            DropoutKind::Element,
            DropoutKind::Alpha,
            DropoutKind::Channel1d,
            DropoutKind::Channel2d,
            DropoutKind::FeatureAlpha,
        ]),
        p in prop::sample::select(vec![0.1, 0.5, 0.9, 1.0]),
        seed in any::<u64>(),
        near_segment_end in any::<bool>(),
        dtype in dtype(),
        layout in layout(),
        data in values(625, Values::WithSpecials { lo: -4.0, hi: 4.0 }),
    ) {
        let count: usize = dims.iter().product();
        let x = build_tensor(&dims, data[..count].to_vec(), dtype, layout)?;
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let layer = dropout(DropoutConfig { p, kind, seed: Some(seed) }, vb)?;
        let start = PhiloxState {
            seed,
            offset: if near_segment_end { (1u64 << 32) - 7 } else { 0 },
        };
        let run = || {
            layer.set_state(start);
            let v = Var::from_tensor(&x).unwrap();
            let y = match layer.try_forward(v.as_tensor(), true) {
                Ok(y) => y,
                // A rank the channel kind rejects: rejected on both paths.
                Err(e) => return Err(e.to_string()),
            };
            let g = (&y * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
            Ok((vals(&y), vals(g.get(v.as_tensor()).unwrap()), layer.state()))
        };
        let (fused, composed) = both(run);
        match (fused, composed) {
            (Ok((yf, gf, sf)), Ok((yc, gc, sc))) => {
                prop_assert_eq!(sf, sc);
                // One mask: the same elements kept, the same values up to rounding.
                assert_close(&yf, &yc, 1e-6, "dropout output");
                assert_close(&gf, &gc, 1e-6, "dropout gradient");
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (a, b) => panic!("the paths disagree on success: {:?} vs {:?}", a.is_ok(), b.is_ok()),
        }
    }

    #[test]
    fn cross_entropy_losses_and_gradients_agree(
        rows in 1usize..6,
        classes in 2usize..7,
        smoothing in prop::sample::select(vec![0.0, 0.1, 0.4]),
        reduction in prop::sample::select(vec![Reduction::Mean, Reduction::Sum, Reduction::None]),
        ignore_some in any::<bool>(),
        weighted in any::<bool>(),
        dtype in dtype(),
        layout in layout(),
        data in values(42, Values::Finite { lo: -20.0, hi: 20.0 }),
        targets in prop::collection::vec(0i64..7, 6),
    ) {
        let logits = build_tensor(&[rows, classes], data[..rows * classes].to_vec(), dtype, layout)?;
        let t: Vec<i64> = targets[..rows]
            .iter()
            .enumerate()
            .map(|(i, &y)| if ignore_some && i % 2 == 0 { -100 } else { y % classes as i64 })
            .collect();
        let t = Tensor::new(t.as_slice(), &Device::Cpu)?;
        let weight = weighted.then(|| {
            Tensor::arange(1.0, classes as f64 + 1.0, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
        });
        let options = CrossEntropyConfig { weight, reduction, label_smoothing: smoothing, ..Default::default() };
        let run = || {
            let v = Var::from_tensor(&logits).unwrap();
            let loss = cross_entropy(v.as_tensor(), &t, &options).unwrap();
            let g = (&loss * 1.5).unwrap().sum_all().unwrap().backward().unwrap();
            (vals(&loss), vals(g.get(v.as_tensor()).unwrap()))
        };
        let ((lf, gf), (lc, gc)) = both(run);
        assert_close(&lf, &lc, tolerance(dtype), "loss");
        assert_close(&gf, &gc, tolerance(dtype), "gradient");
    }

    #[test]
    fn clipping_and_loss_scaling_state_agree(
        scales in prop::collection::vec(prop::sample::select(vec![0.1, 3.0, 1e4, f64::INFINITY]), 1..6),
        dtype in dtype(),
    ) {
        // A step per scale: the gradients of `scale * sum(w^2)` (inf makes them non-finite).
        let run = || {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, dtype, &Device::Cpu);
            let w = vb.get_with_hints((3, 2), "w", candle_nn::Init::Const(0.5)).unwrap();
            let mut clipped = Clipped::<SGD>::with_max_norm(&map, 0.1, 1.0).unwrap();
            let mut reports = Vec::new();
            for &s in &scales {
                let loss = (w.sqr().unwrap().sum_all().unwrap() * s).unwrap();
                match clipped.try_backward_step(&loss) {
                    Ok(r) => reports.push((r.total_norm, r.skipped, r.clipped)),
                    Err(e) => reports.push((f64::NAN, true, e.to_string().is_empty())),
                }
            }
            let counters = clipped.counters();
            let mut scaler = LossScaler::new(LossScalerConfig { growth_interval: 2, ..Default::default() }).unwrap();
            let params = NamedVars::from_var_map(&map);
            let mut states = Vec::new();
            for &s in &scales {
                let loss = (w.sqr().unwrap().sum_all().unwrap() * s.min(1e30)).unwrap();
                let loss = if s.is_infinite() { (loss * f64::INFINITY).unwrap() } else { loss };
                let store = scaler.scale(&loss).unwrap().backward().unwrap();
                let mut sgd = SGD::new(map.all_vars(), 0.01).unwrap();
                let stepped = scaler.step(&mut sgd, &params.grads(&store).unwrap()).unwrap();
                scaler.update();
                states.push((scaler.state(), stepped));
            }
            (reports, counters, states, vals(&w))
        };
        let (fused, composed) = both(run);
        prop_assert_eq!(fused.1, composed.1);
        prop_assert_eq!(&fused.2, &composed.2);
        for (a, b) in fused.0.iter().zip(&composed.0) {
            prop_assert_eq!((a.1, a.2), (b.1, b.2));
            assert_close(&[a.0], &[b.0], tolerance(dtype), "total norm");
        }
        assert_close(&fused.3, &composed.3, tolerance(dtype), "weights after the steps");
    }
}

/// A three-layer MLP observed by a monitor and a probe for `steps` SGD steps.
fn monitored_training(steps: u64) -> Vec<Vec<f64>> {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F64, &Device::Cpu);
    let l1 = candle_nn::linear(6, 8, vb.pp("l1")).unwrap();
    let l2 = candle_nn::linear(8, 3, vb.pp("l2")).unwrap();
    // candle's initialisation is not seeded: give both runs the same weights.
    for (k, var) in NamedVars::from_var_map(&map).vars().iter().enumerate() {
        let n = var.elem_count();
        let w = Tensor::arange(0.0, n as f64, &Device::Cpu)
            .unwrap()
            .affine(0.37, k as f64)
            .unwrap()
            .sin()
            .unwrap()
            .affine(0.4, 0.0)
            .unwrap()
            .reshape(var.shape())
            .unwrap();
        var.set(&w).unwrap();
    }
    let probe = Probe::new("l1.out", ProbeKind::Relu, 2);
    let mut monitor =
        GradMonitor::new(NamedVars::from_var_map(&map), MonitorConfig::default()).unwrap();
    monitor.add_probe(&probe);
    let mut sgd = SGD::new(map.all_vars(), 0.05).unwrap();
    let x = Tensor::arange(0.0, 24.0, &Device::Cpu)
        .unwrap()
        .reshape((4, 6))
        .unwrap()
        .affine(0.1, -1.0)
        .unwrap();
    let mut out = Vec::new();
    for step in 0..steps {
        let h = probe
            .forward(&l1.forward(&x).unwrap().relu().unwrap())
            .unwrap();
        let loss = l2.forward(&h).unwrap().sqr().unwrap().mean_all().unwrap();
        let record = monitor
            .backward_step(step, &loss, &mut sgd)
            .unwrap()
            .unwrap();
        out.push(vec![record.global_grad_norm]);
        for p in &record.params {
            out.push(vec![
                p.grad_norm,
                p.grad_max_abs,
                p.grad_mean,
                p.grad_std,
                p.zero_fraction,
                p.weight_norm,
                p.update_ratio.unwrap_or(-1.0),
            ]);
        }
        for s in &record.probes {
            out.push(vec![
                s.mean,
                s.std,
                s.nonpositive_fraction,
                s.dead_fraction.unwrap_or(-1.0),
                s.grad_norm.unwrap_or(-1.0),
                s.forwards as f64,
            ]);
        }
    }
    out
}

#[test]
fn monitor_records_and_probe_statistics_agree() -> TestResult {
    let (fused, composed) = both(|| monitored_training(4));
    assert_eq!(fused.len(), composed.len());
    for (k, (a, b)) in fused.iter().zip(&composed).enumerate() {
        assert_close(a, b, 1e-9, &format!("record row {k}"));
    }
    Ok(())
}

/// The drop-in example's loop (an MLP, candle's loss, `Clipped` around SGD, a `GradMonitor`),
/// on the composed path: each step reads back exactly two small tensors, the clipper's norms
/// (whose finite flag decides the step) and the monitor's statistics.
#[test]
fn a_composed_training_step_reads_back_two_small_tensors() -> TestResult {
    with_path(Path::Composed, || {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let ln1 = candle_nn::linear(64, 100, vb.pp("ln1")).unwrap();
        let ln2 = candle_nn::linear(100, 10, vb.pp("ln2")).unwrap();
        let mut sgd = Clipped::<SGD>::with_max_norm(&map, 0.5, 1.0).unwrap();
        let mut monitor = GradMonitor::from_var_map(&map).unwrap();
        let x = Tensor::randn(0f32, 1.0, (32, 64), &Device::Cpu).unwrap();
        let labels: Vec<u32> = (0..32).map(|i| i % 10).collect();
        let labels = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        for step in 0..3 {
            let before = read_back_count();
            let logits = ln2
                .forward(&ln1.forward(&x).unwrap().relu().unwrap())
                .unwrap();
            let log_sm = candle_nn::ops::log_softmax(&logits, 1).unwrap();
            let loss = candle_nn::loss::nll(&log_sm, &labels).unwrap();
            monitor.backward_step(step, &loss, &mut sgd).unwrap();
            assert_eq!(read_back_count() - before, 2, "read-backs in step {step}");
        }
        assert_eq!(sgd.counters().steps, 3);
    });
    Ok(())
}

/// Broadcast (stride-0) and transposed inputs give the same results on both paths (a broadcast
/// gradient is copied before an in-place update instead of being refused).
#[test]
fn broadcast_and_strided_inputs_agree() -> TestResult {
    let row = Tensor::new(&[0.5f64, -1.5, 2.0, 0.0], &Device::Cpu)?;
    // Made afresh for each run: the in-place clip below writes into a strided view's storage.
    let broadcast = || row.broadcast_as((3, 4)).unwrap();
    let transposed = || {
        Tensor::arange(0.0, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((4, 3))
            .unwrap()
            .t()
            .unwrap()
    };
    let makers: [&dyn Fn() -> Tensor; 2] = [&broadcast, &transposed];
    for make in makers {
        let run = || {
            let input = &make();
            let mut out = Vec::new();
            let act =
                gradkit::layers::ops::activation(input, gradkit::layers::Activation::Silu).unwrap();
            out.push(vals(&act));
            out.push(vals(
                &gradkit::layers::ops::layer_norm(input, &[4], None, None, 1e-5).unwrap(),
            ));
            let bn = gradkit::layers::ops::batch_norm(
                input,
                None,
                None,
                gradkit::layers::ops::BatchNormStats::Batch,
                1e-5,
            )
            .unwrap();
            out.push(vals(&bn.y));
            let mut rng = gradkit::core::Philox::new(5);
            out.push(vals(
                &gradkit::layers::ops::dropout(input, 0.5, DropoutKind::Element, &mut rng).unwrap(),
            ));
            let targets = Tensor::new(&[1i64, 0, 3], &Device::Cpu).unwrap();
            out.push(vals(
                &cross_entropy(input, &targets, &CrossEntropyConfig::default()).unwrap(),
            ));
            let mut grads = vec![input.clone()];
            let clip = gradkit::regularize::clip_grad_norm(
                &mut grads,
                1.0,
                gradkit::core::NormType::L2,
                gradkit::regularize::NonFiniteNorm::Scale,
            )
            .unwrap();
            out.push(vec![clip.total_norm]);
            out.push(vals(&grads[0]));
            out
        };
        let (fused, composed) = both(run);
        for (k, (a, b)) in fused.iter().zip(&composed).enumerate() {
            assert_close(a, b, 1e-9, &format!("output {k}"));
        }
    }
    // The broadcast source itself is untouched by the in-place clip.
    assert_eq!(vals(&row), [0.5, -1.5, 2.0, 0.0]);
    Ok(())
}
