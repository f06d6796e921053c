//! Gradient clipping and label-smoothed cross-entropy against candle.
//!
//! - `clip_grad_norm/resnet50`: L2 clipping of ResNet-50-shaped f32 gradients whose norm is
//!   above the threshold. `candle` is a candle user's version: per-tensor `sqr().sum_all()`,
//!   then `g * coefficient` per gradient (new tensors). `bandwidth` is the traffic clipping
//!   cannot avoid as plain parallel passes: a sum over every gradient, then an in-place scale.
//! - `cross_entropy_ls_fwdbwd/NxC`: forward and backward of the mean cross-entropy with label
//!   smoothing 0.1. `candle` composes `candle_nn::ops::log_softmax`, a gather and means (candle
//!   has no label smoothing).
//!
//! `composed` (where present) is gradkit's composed path, what CUDA and Metal tensors run, timed
//! here on the CPU (`grad_core::device::with_path(Path::Composed, ..)`): what a GPU user's path
//! costs in passes.

#![allow(clippy::expect_used, reason = "a bench with broken data should stop")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{BatchSize, Criterion, criterion_group};
use grad_core::device::{Path, with_path};
use grad_core::{NormType, Philox};
use grad_regularize::{
    CrossEntropyConfig, NonFiniteNorm, clip_grad_norm, cross_entropy, cross_entropy_composed,
};
use rayon::prelude::*;

fn bandwidth(data: &mut [Vec<f32>], factor: f32) -> f32 {
    let sum: f32 = data
        .par_iter()
        .flat_map(|v| v.par_chunks(32 * 1024))
        .map(|c| {
            let mut lanes = [0f32; 16];
            for b in c.chunks_exact(16) {
                for (l, x) in lanes.iter_mut().zip(b) {
                    *l += x * x;
                }
            }
            lanes.iter().sum::<f32>()
        })
        .sum();
    data.par_iter_mut()
        .flat_map(|v| v.par_chunks_mut(32 * 1024))
        .for_each(|c| c.iter_mut().for_each(|x| *x *= factor));
    sum
}

fn clip_bench(c: &mut Criterion) {
    let grads = common::resnet50_grads(1e-2);
    let max_norm = 1.0; // the norm of these gradients is about 50
    let mut host: Vec<Vec<f32>> = grads
        .iter()
        .map(|g| {
            g.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("host copy")
        })
        .collect();
    let mut group = c.benchmark_group("clip_grad_norm/resnet50");
    group.sample_size(20);
    group.bench_function("gradkit", |b| {
        b.iter_batched_ref(
            || {
                grads
                    .iter()
                    .map(|g| g.copy().expect("copy"))
                    .collect::<Vec<_>>()
            },
            |gs| clip_grad_norm(gs, max_norm, NormType::L2, NonFiniteNorm::Scale).expect("clip"),
            BatchSize::LargeInput,
        )
    });
    // What a CUDA or Metal user runs, here on the CPU: norms by candle reductions (one
    // read-back), a new tensor per gradient.
    group.bench_function("composed", |b| {
        b.iter_batched_ref(
            || {
                grads
                    .iter()
                    .map(|g| g.copy().expect("copy"))
                    .collect::<Vec<_>>()
            },
            |gs| {
                with_path(Path::Composed, || {
                    clip_grad_norm(gs, max_norm, NormType::L2, NonFiniteNorm::Scale).expect("clip")
                })
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("candle", |b| {
        b.iter(|| common::candle_clip(&grads, max_norm).expect("clip"))
    });
    group.bench_function("bandwidth", |b| b.iter(|| bandwidth(&mut host, 0.999_999)));
    group.finish();
}

fn candle_ls_ce(logits: &Tensor, targets: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let lp = candle_nn::ops::log_softmax(logits, 1)?;
    let nll = lp.gather(&targets.unsqueeze(1)?, 1)?.neg()?.mean_all()?;
    let smooth = lp.mean(1)?.neg()?.mean_all()?;
    (nll * (1.0 - eps))? + (smooth * eps)?
}

fn cross_entropy_bench(c: &mut Criterion) {
    for (n, classes) in [(4096usize, 1000usize), (512, 32000)] {
        let dev = Device::Cpu;
        let mut rng = Philox::new(5);
        let logits = Var::from_tensor(
            &rng.normal((n, classes), 0.0, 3.0, DType::F32, &dev)
                .expect("logits"),
        )
        .expect("var");
        let t: Vec<u32> = (0..n).map(|i| (i * 7919 % classes) as u32).collect();
        let targets = Tensor::from_vec(t, n, &dev).expect("targets");
        let opts = CrossEntropyConfig {
            label_smoothing: 0.1,
            ..Default::default()
        };
        let mut group = c.benchmark_group(format!("cross_entropy_ls_fwdbwd/{n}x{classes}"));
        group.sample_size(10);
        group.bench_function("gradkit", |b| {
            b.iter(|| {
                let loss = cross_entropy(logits.as_tensor(), &targets, &opts).expect("loss");
                std::hint::black_box(loss.backward().expect("backward"));
            })
        });
        group.bench_function("composed", |b| {
            b.iter(|| {
                let loss =
                    cross_entropy_composed(logits.as_tensor(), &targets, &opts).expect("loss");
                std::hint::black_box(loss.backward().expect("backward"));
            })
        });
        group.bench_function("candle", |b| {
            b.iter(|| {
                let loss = candle_ls_ce(logits.as_tensor(), &targets, 0.1).expect("loss");
                std::hint::black_box(loss.backward().expect("backward"));
            })
        });
        group.finish();
    }
}

criterion_group!(benches, clip_bench, cross_entropy_bench);
tuned_main!(benches);
