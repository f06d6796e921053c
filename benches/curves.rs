//! Cost curves: how gradkit's and candle's time grows with the work, one JSON line per point.
//!
//! `cargo bench --bench curves -- [--curve NAME] [--seconds S]` prints
//! `{"curve": .., "x": .., "function": "gradkit" | "candle", "ms": ..}` for every point of
//! every curve (or of the one named). `benches/pytorch/cost_curves.py` runs it curve by curve,
//! times PyTorch on the same points in between, and draws `docs/cost_*.svg`. Each time is the
//! median of ten samples after a warm-up, as `side_by_side.py` times PyTorch.
//!
//! - `bn_batch`: batch norm 2d training step (as `benches/norms.rs`), `[N, 64, 28, 28]`, N from
//!   1 to 256. gradkit's `BatchNorm` against candle-nn's.
//! - `bn_channels`: the same step on `[32, C, 28, 28]`, C from 8 to 512.
//! - `clip_tensors`: L2 clipping of 25.56 M gradient elements (ResNet-50's total) split into
//!   ResNet-50's 161 tensors, then into 500 to 10,000 equal ones: per-tensor overhead. gradkit's
//!   `clip_grad_norm` on fresh copies (made outside the timing) against the candle user's
//!   per-tensor `sqr().sum_all()` and `g * coefficient`.
//! - `monitor_params`: `GradMonitor::observe` on an 8-layer MLP's parameters (`[w, w]` weights
//!   and `[w]` biases, `w` 16 to 2048: 2.2 K to 33.6 M parameters). candle's by-hand version reads
//!   each gradient's squared sum and largest magnitude and each weight's squared sum in one
//!   transfer; the monitor also counts non-finite values, fills the histograms and samples the
//!   weights for the update ratio.

#![allow(clippy::expect_used, reason = "a bench with broken data should stop")]

mod common;

use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::step::step;
use grad_core::{NormType, Philox};
use grad_diagnostics::GradMonitor;
use grad_layers::BatchNormConfig;
use grad_regularize::{NonFiniteNorm, clip_grad_norm};

/// The median of ten samples of `run`'s time in ms (each sample runs it for a tenth of
/// `seconds`), after a warm-up; `setup` runs before each call, outside the timing.
fn time_ms<S>(seconds: f64, mut setup: impl FnMut() -> S, mut run: impl FnMut(S)) -> f64 {
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_secs_f64(seconds.min(1.0) / 2.0) {
        run(setup());
    }
    let mut samples: Vec<f64> = (0..10)
        .map(|_| {
            let (mut spent, mut calls) = (Duration::ZERO, 0u32);
            while spent < Duration::from_secs_f64(seconds / 10.0) {
                let input = setup();
                let start = Instant::now();
                run(input);
                spent += start.elapsed();
                calls += 1;
            }
            spent.as_secs_f64() * 1e3 / f64::from(calls)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    (samples[4] + samples[5]) / 2.0
}

fn print(curve: &str, x: usize, function: &str, ms: f64) {
    println!(r#"{{"curve": "{curve}", "x": {x}, "function": "{function}", "ms": {ms:.6}}}"#);
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Philox::new(seed)
        .normal(shape, 0.0, 1.0, DType::F32, &Device::Cpu)
        .expect("random data")
}

/// The batch norm 2d training step on `dims`, gradkit's and candle-nn's.
fn batch_norm_point(curve: &str, x: usize, dims: [usize; 4], seconds: f64) {
    let dev = Device::Cpu;
    let input = Var::from_tensor(&randn(&dims, 1)).expect("x");
    let upstream = randn(&dims, 2);
    let (ours_map, theirs_map) = (VarMap::new(), VarMap::new());
    let vb = |map: &VarMap| VarBuilder::from_varmap(map, DType::F32, &dev);
    let ours = grad_layers::batch_norm(dims[1], BatchNormConfig::default(), vb(&ours_map))
        .expect("gradkit batch norm");
    let theirs = candle_nn::batch_norm(
        dims[1],
        candle_nn::BatchNormConfig::default(),
        vb(&theirs_map),
    )
    .expect("candle-nn batch norm");
    let ms = time_ms(
        seconds,
        || (),
        |()| {
            step(ours.forward_t(input.as_tensor(), true), &upstream);
        },
    );
    print(curve, x, "gradkit", ms);
    let ms = time_ms(
        seconds,
        || (),
        |()| {
            step(theirs.forward_t(input.as_tensor(), true), &upstream);
        },
    );
    print(curve, x, "candle", ms);
}

/// ResNet-50's gradient elements as its 161 tensors (`parts` = 161) or `parts` equal ones.
fn clip_shapes(parts: usize) -> Vec<Vec<usize>> {
    let shapes = common::resnet50_shapes();
    if parts == shapes.len() {
        return shapes;
    }
    let total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    vec![vec![total / parts]; parts]
}

fn clip_point(parts: usize, seconds: f64) {
    let mut rng = Philox::new(2024);
    let grads: Vec<Tensor> = clip_shapes(parts)
        .iter()
        .map(|s| {
            rng.normal(s.as_slice(), 0.0, 1e-2, DType::F32, &Device::Cpu)
                .expect("a gradient")
        })
        .collect();
    let copies = || -> Vec<Tensor> { grads.iter().map(|g| g.copy().expect("copy")).collect() };
    let ms = time_ms(seconds, copies, |mut gs| {
        clip_grad_norm(&mut gs, 1.0, NormType::L2, NonFiniteNorm::Scale).expect("clip");
    });
    print("clip_tensors", parts, "gradkit", ms);
    let ms = time_ms(
        seconds,
        || (),
        |()| {
            std::hint::black_box(common::candle_clip(&grads, 1.0).expect("clip"));
        },
    );
    print("clip_tensors", parts, "candle", ms);
}

fn monitor_point(width: usize, seconds: f64) {
    let dev = Device::Cpu;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
    let mut grads = GradStore::default();
    let mut vars = Vec::new();
    for layer in 0..8u64 {
        for (name, shape) in [("weight", vec![width, width]), ("bias", vec![width])] {
            let v = vb
                .pp(format!("fc{layer}"))
                .get_with_hints(
                    shape.as_slice(),
                    name,
                    candle_nn::Init::Randn {
                        mean: 0.0,
                        stdev: 0.05,
                    },
                )
                .expect("parameter");
            grads.insert(&v, randn(&shape, layer * 2 + 7));
            vars.push(v);
        }
    }
    let params: usize = vars.iter().map(Tensor::elem_count).sum();
    let mut monitor = GradMonitor::from_var_map(&map).expect("monitor");
    let mut step = 0u64;
    let ms = time_ms(
        seconds,
        || (),
        |()| {
            monitor.observe(step, &grads).expect("observe");
            step += 1;
        },
    );
    print("monitor_params", params, "gradkit", ms);
    let by_hand = || -> candle_core::Result<Vec<f32>> {
        let mut parts = Vec::new();
        for v in &vars {
            if let Some(g) = grads.get(v) {
                parts.push(g.sqr()?.sum_all()?.reshape(1)?);
                parts.push(g.abs()?.flatten_all()?.max(0)?.reshape(1)?);
            }
            parts.push(v.sqr()?.sum_all()?.reshape(1)?);
        }
        Tensor::cat(&parts, 0)?.to_vec1()
    };
    let ms = time_ms(
        seconds,
        || (),
        |()| {
            std::hint::black_box(by_hand().expect("by hand"));
        },
    );
    print("monitor_params", params, "candle", ms);
}

fn main() {
    grad_core::tune_allocator();
    grad_core::tune_threads();
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let curve = value("--curve");
    let seconds: f64 = value("--seconds").map_or(2.0, |s| s.parse().expect("--seconds S"));
    let wants = |name: &str| curve.as_deref().is_none_or(|c| c == name);
    if wants("bn_batch") {
        for n in [1, 2, 4, 8, 16, 32, 64, 128, 256] {
            batch_norm_point("bn_batch", n, [n, 64, 28, 28], seconds);
        }
    }
    if wants("bn_channels") {
        for c in [8, 16, 32, 64, 128, 256, 512] {
            batch_norm_point("bn_channels", c, [32, c, 28, 28], seconds);
        }
    }
    if wants("clip_tensors") {
        for parts in [161, 500, 1000, 2000, 5000, 10_000] {
            clip_point(parts, seconds);
        }
    }
    if wants("monitor_params") {
        for width in [16, 32, 64, 128, 256, 512, 1024, 2048] {
            monitor_point(width, seconds);
        }
    }
}
