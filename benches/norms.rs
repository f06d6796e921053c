//! The normalisation layers against candle: batch norm (2d training step and evaluation, 1d
//! training step), layer norm, group norm and RMS norm training steps (forward, then backward of
//! `(y * upstream).sum_all()` to the input and every parameter).
//!
//! `candle` is what a candle user writes today: candle-nn's `BatchNorm` and `GroupNorm`, and
//! candle-nn's composed `layer_norm_slow`/`rms_norm_slow` (its fused layer and RMS norms have no
//! backward). `bandwidth` is the memory traffic the step cannot avoid, as plain parallel passes
//! over reused buffers: evaluation reads `x` and writes `y`; the training step additionally
//! reads `grad_y` and `x` and writes `grad_x`.
//!
//! `floor` is the same training step with the norm replaced by candle's cheapest differentiable
//! op (`x.affine(1, 0)`): the cost of candle's autograd for `(y * upstream).sum_all()` (zero-filled
//! gradient accumulators, a broadcast add, two products), which every function pays. The norm's
//! own share of a step is its time minus `floor`.
//!
//! `fused_block/*` are a norm, an activation and dropout (batch norm and leaky ReLU, group norm
//! and SiLU, layer norm and GELU): gradkit's fused block (`gradkit`), gradkit's three layers in
//! sequence (`separate`) and candle-nn's three (`candle`).
//!
//! `composed` (where present) is gradkit's composed path, what CUDA and Metal tensors run, timed
//! here on the CPU (`grad_core::device::with_path(Path::Composed, ..)`): what a GPU user's path
//! costs in passes.

#![allow(clippy::expect_used, reason = "a bench with broken data should stop")]

mod common;

use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::step::{floor, step};
use criterion::{Criterion, criterion_group};
use grad_core::device::{Path, with_path};
use grad_layers::{
    Activation, BatchNormBlockConfig, BatchNormConfig, DropoutConfig, GroupNormBlockConfig,
    LayerNormBlockConfig, ops,
};
use rayon::prelude::*;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    grad_core::Philox::new(seed)
        .normal(shape, 0.0, 1.0, DType::F32, &Device::Cpu)
        .expect("random data")
}

/// One parallel pass `out[i] = f(a[i], b[i])` over reused buffers.
fn pass(out: &mut [f32], a: &[f32], b: &[f32]) {
    out.par_chunks_mut(32 * 1024)
        .zip(a.par_chunks(32 * 1024).zip(b.par_chunks(32 * 1024)))
        .for_each(|(o, (a, b))| {
            for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        });
}

fn batch_norm_benches(c: &mut Criterion) {
    let dev = Device::Cpu;
    for (name, dims, eval) in [
        (
            "batch_norm2d_train/32x64x56x56",
            vec![32, 64, 56, 56],
            false,
        ),
        ("batch_norm2d_eval/32x64x56x56", vec![32, 64, 56, 56], true),
        ("batch_norm1d_train/512x1024", vec![512, 1024], false),
    ] {
        let channels = dims[1];
        let x = Var::from_tensor(&randn(&dims, 1)).expect("x");
        let upstream = randn(&dims, 2);
        let ours_map = VarMap::new();
        let ours = grad_layers::batch_norm(
            channels,
            BatchNormConfig::default(),
            VarBuilder::from_varmap(&ours_map, DType::F32, &dev),
        )
        .expect("gradkit batch norm");
        let theirs_map = VarMap::new();
        let theirs = candle_nn::batch_norm(
            channels,
            candle_nn::BatchNormConfig::default(),
            VarBuilder::from_varmap(&theirs_map, DType::F32, &dev),
        )
        .expect("candle-nn batch norm");

        let mut group = c.benchmark_group(name);
        group.sample_size(10);
        if eval {
            group.bench_function("gradkit", |b| {
                b.iter(|| ours.forward_t(x.as_tensor(), false).expect("forward"))
            });
            group.bench_function("candle", |b| {
                b.iter(|| theirs.forward_t(x.as_tensor(), false).expect("forward"))
            });
        } else {
            group.bench_function("gradkit", |b| {
                b.iter(|| step(ours.forward_t(x.as_tensor(), true), &upstream))
            });
            // What a CUDA or Metal user runs, here on the CPU: candle ops for the statistics,
            // the normalisation and the running-statistics update.
            group.bench_function("composed", |b| {
                b.iter(|| {
                    with_path(Path::Composed, || {
                        step(ours.forward_t(x.as_tensor(), true), &upstream)
                    })
                })
            });
            group.bench_function("candle", |b| {
                b.iter(|| step(theirs.forward_t(x.as_tensor(), true), &upstream))
            });
            group.bench_function("floor", |b| b.iter(|| floor(&x, &upstream)));
        }
        if name.starts_with("batch_norm2d") {
            let xs = grad_testkit::values(x.as_tensor()).expect("host x");
            let xs: Vec<f32> = xs.into_iter().map(|v| v as f32).collect();
            let mut y = vec![0f32; xs.len()];
            let mut dx = vec![0f32; xs.len()];
            group.bench_function("bandwidth", |b| {
                b.iter(|| {
                    // Evaluation: read x, write y. Training adds: read g and x, write grad_x
                    // (statistics and weight gradients ride along in the fused passes).
                    pass(&mut y, &xs, &xs);
                    if !eval {
                        pass(&mut dx, &y, &xs);
                    }
                })
            });
        }
        group.finish();
    }
}

/// The three ways to run a block's training step, on an input.
type Forward<'a> = &'a dyn Fn(&Tensor) -> candle_core::Result<Tensor>;

/// One `fused_block` group: the fused block (`gradkit`), gradkit's three layers in sequence
/// (`separate`), candle-nn's three (`candle`), the `floor` and the `bandwidth` (the block's
/// unavoidable traffic, as for batch norm).
fn block_group(
    c: &mut Criterion,
    name: &str,
    dims: &[usize],
    [ours, separate, theirs]: [Forward<'_>; 3],
) {
    let x = Var::from_tensor(&randn(dims, 1)).expect("x");
    let upstream = randn(dims, 2);
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    for (function, forward) in [
        ("gradkit", ours),
        ("separate", separate),
        ("candle", theirs),
    ] {
        group.bench_function(function, |b| {
            b.iter(|| step(forward(x.as_tensor()), &upstream))
        });
    }
    group.bench_function("floor", |b| b.iter(|| floor(&x, &upstream)));
    let xs = grad_testkit::values(x.as_tensor()).expect("host x");
    let xs: Vec<f32> = xs.into_iter().map(|v| v as f32).collect();
    let (mut y, mut dx) = (vec![0f32; xs.len()], vec![0f32; xs.len()]);
    group.bench_function("bandwidth", |b| {
        b.iter(|| {
            pass(&mut y, &xs, &xs);
            pass(&mut dx, &y, &xs);
        })
    });
    group.finish();
}

/// Norm, activation and dropout training steps (`block_group`):
/// - `bn2d_leaky_dropout`: `BatchNorm2d -> LeakyReLU(0.01) -> Dropout(0.2)`;
/// - `gn_silu_dropout`: `GroupNorm(32, 256) -> SiLU -> Dropout(0.1)`;
/// - `ln_gelu_dropout`: `LayerNorm(1024) -> GELU -> Dropout(0.1)`, candle's norm its composed
///   `layer_norm_slow` (its fused one has no backward).
fn fused_block_benches(c: &mut Criterion) {
    let dev = Device::Cpu;
    let vb = |map: &VarMap| VarBuilder::from_varmap(map, DType::F32, &dev);
    let drop = |p| DropoutConfig {
        p,
        seed: Some(5),
        ..Default::default()
    };
    let maps: [VarMap; 3] = std::array::from_fn(|_| VarMap::new());
    {
        let (channels, slope, p) = (64, 0.01, 0.2);
        let act = Activation::LeakyRelu {
            negative_slope: slope,
        };
        let config = BatchNormBlockConfig {
            norm: BatchNormConfig::default(),
            activation: act,
            dropout: Some(drop(p)),
        };
        let block = grad_layers::batch_norm_block(channels, config, vb(&maps[0])).expect("block");
        let norm = grad_layers::batch_norm(channels, BatchNormConfig::default(), vb(&maps[1]))
            .expect("gradkit batch norm");
        let dropout = grad_layers::dropout(drop(p), vb(&maps[1]).pp("dropout")).expect("dropout");
        let theirs = candle_nn::batch_norm(
            channels,
            candle_nn::BatchNormConfig::default(),
            vb(&maps[2]),
        )
        .expect("candle-nn batch norm");
        block_group(
            c,
            "fused_block/bn2d_leaky_dropout/32x64x56x56",
            &[32, channels, 56, 56],
            [
                &|x| block.forward_t(x, true),
                &|x| {
                    norm.forward_t(x, true)
                        .and_then(|y| act.forward(&y))
                        .and_then(|y| dropout.forward_t(&y, true))
                },
                &|x| {
                    theirs
                        .forward_t(x, true)
                        .and_then(|y| candle_nn::ops::leaky_relu(&y, slope))
                        .and_then(|y| candle_nn::ops::dropout(&y, p as f32))
                },
            ],
        );
    }
    let maps: [VarMap; 3] = std::array::from_fn(|_| VarMap::new());
    {
        let (groups, channels, p) = (32, 256, 0.1);
        let config = GroupNormBlockConfig {
            activation: Activation::Silu,
            dropout: Some(drop(p)),
            ..Default::default()
        };
        let block =
            grad_layers::group_norm_block(groups, channels, config, vb(&maps[0])).expect("block");
        let norm = grad_layers::group_norm(groups, channels, config.norm, vb(&maps[1]))
            .expect("gradkit group norm");
        let dropout = grad_layers::dropout(drop(p), vb(&maps[1]).pp("dropout")).expect("dropout");
        let theirs = candle_nn::group_norm(groups, channels, 1e-5, vb(&maps[2]))
            .expect("candle-nn group norm");
        block_group(
            c,
            "fused_block/gn_silu_dropout/32x256x28x28",
            &[32, channels, 28, 28],
            [
                &|x| block.forward_t(x, true),
                &|x| {
                    Module::forward(&norm, x)
                        .and_then(|y| Activation::Silu.forward(&y))
                        .and_then(|y| dropout.forward_t(&y, true))
                },
                &|x| {
                    Module::forward(&theirs, x)
                        .and_then(|y| candle_nn::ops::silu(&y))
                        .and_then(|y| candle_nn::ops::dropout(&y, p as f32))
                },
            ],
        );
    }
    let maps: [VarMap; 3] = std::array::from_fn(|_| VarMap::new());
    {
        let (d, p) = (1024, 0.1);
        let config = LayerNormBlockConfig {
            dropout: Some(drop(p)),
            ..Default::default()
        };
        let gelu = config.activation;
        let block = grad_layers::layer_norm_block(d, config, vb(&maps[0])).expect("block");
        let norm = grad_layers::layer_norm(d, config.norm, vb(&maps[1])).expect("layer norm");
        let dropout = grad_layers::dropout(drop(p), vb(&maps[1]).pp("dropout")).expect("dropout");
        let w = Var::ones(d, DType::F32, &dev).expect("w");
        let b = Var::zeros(d, DType::F32, &dev).expect("b");
        block_group(
            c,
            "fused_block/ln_gelu_dropout/4096x1024",
            &[4096, d],
            [
                &|x| block.forward_t(x, true),
                &|x| {
                    Module::forward(&norm, x)
                        .and_then(|y| gelu.forward(&y))
                        .and_then(|y| dropout.forward_t(&y, true))
                },
                &|x| {
                    candle_nn::ops::layer_norm_slow(x, w.as_tensor(), b.as_tensor(), 1e-5)
                        .and_then(|y| y.gelu_erf())
                        .and_then(|y| candle_nn::ops::dropout(&y, p as f32))
                },
            ],
        );
    }
}

fn row_norm_benches(c: &mut Criterion) {
    let dev = Device::Cpu;
    {
        let x = Var::from_tensor(&randn(&[4096, 1024], 3)).expect("x");
        let w = Var::ones(1024, DType::F32, &dev).expect("w");
        let b = Var::zeros(1024, DType::F32, &dev).expect("b");
        let up = randn(&[4096, 1024], 4);
        let mut group = c.benchmark_group("layer_norm_train/4096x1024");
        group.sample_size(10);
        group.bench_function("gradkit", |bch| {
            bch.iter(|| {
                let y = ops::layer_norm(
                    x.as_tensor(),
                    &[1024],
                    Some(w.as_tensor()),
                    Some(b.as_tensor()),
                    1e-5,
                )
                .map_err(candle_core::Error::wrap);
                step(y, &up)
            })
        });
        group.bench_function("candle", |bch| {
            bch.iter(|| {
                step(
                    candle_nn::ops::layer_norm_slow(
                        x.as_tensor(),
                        w.as_tensor(),
                        b.as_tensor(),
                        1e-5,
                    ),
                    &up,
                )
            })
        });
        group.bench_function("floor", |bch| bch.iter(|| floor(&x, &up)));
        group.finish();
    }
    {
        let dims = [32, 256, 28, 28];
        let ours_map = VarMap::new();
        let ours = grad_layers::group_norm(
            32,
            256,
            Default::default(),
            VarBuilder::from_varmap(&ours_map, DType::F32, &dev),
        )
        .expect("gradkit group norm");
        grouped_norm_bench(c, "group_norm_train/32x256x28x28", &dims, 32, &|x| {
            Module::forward(&ours, x)
        });
    }
    {
        // Instance norm: group norm with one channel per group; candle users write candle-nn's
        // GroupNorm with C groups.
        let dims = [32, 64, 56, 56];
        let ours_map = VarMap::new();
        let cfg = grad_layers::InstanceNormConfig {
            affine: true,
            ..Default::default()
        };
        let ours = grad_layers::instance_norm(
            64,
            cfg,
            VarBuilder::from_varmap(&ours_map, DType::F32, &dev),
        )
        .expect("gradkit instance norm");
        grouped_norm_bench(c, "instance_norm_train/32x64x56x56", &dims, 64, &|x| {
            ours.forward_t(x, true)
        });
        // With running statistics (candle-nn has none): the fused kernel hands its moments to
        // the update, so tracking should cost about nothing over the step above.
        let tracked_map = VarMap::new();
        let tracked = grad_layers::instance_norm(
            64,
            grad_layers::InstanceNormConfig {
                affine: true,
                track_running_stats: true,
                ..Default::default()
            },
            VarBuilder::from_varmap(&tracked_map, DType::F32, &dev),
        )
        .expect("gradkit tracked instance norm");
        let x = Var::from_tensor(&randn(&dims, 5)).expect("x");
        let up = randn(&dims, 6);
        let mut group = c.benchmark_group("instance_norm_train_tracked/32x64x56x56");
        group.sample_size(10);
        group.bench_function("gradkit", |bch| {
            bch.iter(|| step(tracked.forward_t(x.as_tensor(), true), &up))
        });
        group.bench_function("floor", |bch| bch.iter(|| floor(&x, &up)));
        group.finish();
    }
    {
        let x = Var::from_tensor(&randn(&[4096, 4096], 7)).expect("x");
        let w = Var::ones(4096, DType::F32, &dev).expect("w");
        let up = randn(&[4096, 4096], 8);
        let mut group = c.benchmark_group("rms_norm_train/4096x4096");
        group.sample_size(10);
        group.bench_function("gradkit", |bch| {
            bch.iter(|| {
                let y = ops::rms_norm(x.as_tensor(), &[4096], Some(w.as_tensor()), Some(1e-6))
                    .map_err(candle_core::Error::wrap);
                step(y, &up)
            })
        });
        group.bench_function("candle", |bch| {
            bch.iter(|| {
                step(
                    candle_nn::ops::rms_norm_slow(x.as_tensor(), w.as_tensor(), 1e-6),
                    &up,
                )
            })
        });
        group.bench_function("floor", |bch| bch.iter(|| floor(&x, &up)));
        group.finish();
    }
}

/// One training step of `ours` on `dims` against candle-nn's `GroupNorm` with `groups`, and the
/// floor.
fn grouped_norm_bench(
    c: &mut Criterion,
    name: &str,
    dims: &[usize; 4],
    groups: usize,
    ours: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
) {
    let x = Var::from_tensor(&randn(dims, 5)).expect("x");
    let up = randn(dims, 6);
    let theirs_map = VarMap::new();
    let theirs = candle_nn::group_norm(
        groups,
        dims[1],
        1e-5,
        VarBuilder::from_varmap(&theirs_map, DType::F32, &Device::Cpu),
    )
    .expect("candle-nn group norm");
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    group.bench_function("gradkit", |bch| bch.iter(|| step(ours(x.as_tensor()), &up)));
    group.bench_function("candle", |bch| {
        bch.iter(|| step(Module::forward(&theirs, x.as_tensor()), &up))
    });
    group.bench_function("floor", |bch| bch.iter(|| floor(&x, &up)));
    group.finish();
}

criterion_group!(
    benches,
    batch_norm_benches,
    fused_block_benches,
    row_norm_benches
);
tuned_main!(benches);
