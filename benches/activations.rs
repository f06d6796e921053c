//! Element-wise layers on 16M f32 values: dropout, Leaky ReLU and GELU, forward alone and
//! forward + backward (`(y * upstream).sum_all()`), and the activations built on `exp`, `tanh`
//! or `erf` (ELU, SELU, GELU, sigmoid, tanh) forward alone, against what a candle user writes
//! today (`candle_nn::ops::dropout`, `candle_nn::ops::leaky_relu`, `Tensor::gelu_erf`,
//! `Tensor::elu`, `candle_nn::ops::sigmoid`, ...), and the residual-branch scales (LayerScale,
//! ReZero) against `broadcast_mul`.
//!
//! `bandwidth` is the forward's unavoidable traffic (read `x`, write `y`) as one parallel pass
//! over reused buffers; `floor` is candle's autograd cost for the loss alone (see norms.rs).
//!
//! `composed` (where present) is gradkit's composed path, what CUDA and Metal tensors run, timed
//! here on the CPU (`grad_core::device::with_path(Path::Composed, ..)`): what a GPU user's path
//! costs in passes.

#![allow(clippy::expect_used, reason = "a bench with broken data should stop")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::step::{floor, step};
use criterion::{Criterion, criterion_group};
use grad_core::Philox;
use grad_layers::ops::{self, DropoutKind};
use grad_layers::{Activation, ChannelAxis, GeluApproximation};
use rayon::prelude::*;

const N: usize = 16 * 1024 * 1024;

fn bandwidth(out: &mut [f32], x: &[f32]) {
    out.par_chunks_mut(32 * 1024)
        .zip(x.par_chunks(32 * 1024))
        .for_each(|(o, x)| {
            for (o, x) in o.iter_mut().zip(x) {
                *o = x * 2.0;
            }
        });
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let x = Var::from_tensor(
        &Philox::new(1)
            .normal(N, 0.0, 1.0, DType::F32, &dev)
            .expect("x"),
    )
    .expect("var");
    let up = Philox::new(2)
        .normal(N, 0.0, 1.0, DType::F32, &dev)
        .expect("upstream");
    let host: Vec<f32> = x.as_tensor().to_vec1::<f32>().expect("host x");
    let mut out = vec![0f32; N];
    let mut rng = Philox::new(3);
    let leaky = Activation::LeakyRelu {
        negative_slope: 0.01,
    };
    let gelu = Activation::Gelu {
        approximate: GeluApproximation::None,
    };

    let mut group = c.benchmark_group("dropout_train/16M");
    group.sample_size(10);
    group.bench_function("gradkit", |b| {
        b.iter(|| {
            ops::dropout(x.as_tensor(), 0.5, DropoutKind::Element, &mut rng).expect("dropout")
        })
    });
    group.bench_function("composed", |b| {
        b.iter(|| {
            ops::dropout_composed(x.as_tensor(), 0.5, DropoutKind::Element, &mut rng)
                .expect("dropout")
        })
    });
    group.bench_function("candle", |b| {
        b.iter(|| candle_nn::ops::dropout(x.as_tensor(), 0.5).expect("dropout"))
    });
    group.bench_function("bandwidth", |b| b.iter(|| bandwidth(&mut out, &host)));
    group.finish();

    let mut group = c.benchmark_group("dropout_train_fwdbwd/16M");
    group.sample_size(10);
    group.bench_function("gradkit", |b| {
        b.iter(|| {
            step(
                ops::dropout(x.as_tensor(), 0.5, DropoutKind::Element, &mut rng)
                    .map_err(candle_core::Error::wrap),
                &up,
            )
        })
    });
    group.bench_function("candle", |b| {
        b.iter(|| step(candle_nn::ops::dropout(x.as_tensor(), 0.5), &up))
    });
    group.bench_function("floor", |b| b.iter(|| floor(&x, &up)));
    group.finish();

    let mut group = c.benchmark_group("leaky_relu/16M");
    group.sample_size(10);
    group.bench_function("gradkit", |b| {
        b.iter(|| ops::activation(x.as_tensor(), leaky).expect("leaky"))
    });
    group.bench_function("candle", |b| {
        b.iter(|| candle_nn::ops::leaky_relu(x.as_tensor(), 0.01).expect("leaky"))
    });
    group.bench_function("bandwidth", |b| b.iter(|| bandwidth(&mut out, &host)));
    group.finish();

    // Every other activation, forward alone, against the candle composition a user writes.
    type CandleFn = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor>>;
    let softplus = |x: &Tensor| (x.exp()? + 1.0)?.log();
    let relu6_of = |x: &Tensor| x.clamp(0f32, 6f32);
    let forwards: [(&str, Activation, CandleFn); 16] = [
        (
            "elu/16M",
            Activation::Elu { alpha: 1.0 },
            Box::new(|x| x.elu(1.0)),
        ),
        (
            "selu/16M",
            Activation::Selu,
            Box::new(|x| x.elu(1.673_263_242_354_377_3)? * 1.050_700_987_355_480_5),
        ),
        ("gelu/16M", gelu, Box::new(Tensor::gelu_erf)),
        (
            "gelu_tanh/16M",
            Activation::Gelu {
                approximate: GeluApproximation::Tanh,
            },
            Box::new(Tensor::gelu),
        ),
        (
            "sigmoid/16M",
            Activation::Sigmoid,
            Box::new(candle_nn::ops::sigmoid),
        ),
        ("tanh/16M", Activation::Tanh, Box::new(Tensor::tanh)),
        ("relu6/16M", Activation::Relu6, Box::new(relu6_of)),
        ("silu/16M", Activation::Silu, Box::new(Tensor::silu)),
        (
            "mish/16M",
            Activation::Mish,
            Box::new(move |x| x * softplus(x)?.tanh()?),
        ),
        (
            "softplus/16M",
            Activation::Softplus {
                beta: 1.0,
                threshold: 20.0,
            },
            Box::new(softplus),
        ),
        (
            "hardswish/16M",
            Activation::Hardswish,
            Box::new(move |x| x * (relu6_of(&(x + 3.0)?)? / 6.0)?),
        ),
        (
            "hardsigmoid/16M",
            Activation::Hardsigmoid,
            Box::new(move |x| relu6_of(&(x + 3.0)?)? / 6.0),
        ),
        (
            "hardtanh/16M",
            Activation::Hardtanh {
                min_val: -1.0,
                max_val: 1.0,
            },
            Box::new(|x| x.clamp(-1f32, 1f32)),
        ),
        (
            "celu/16M",
            Activation::Celu { alpha: 1.0 },
            Box::new(|x| x.elu(1.0)),
        ),
        (
            "softsign/16M",
            Activation::Softsign,
            Box::new(|x| x / (x.abs()? + 1.0)?),
        ),
        (
            "log_sigmoid/16M",
            Activation::LogSigmoid,
            Box::new(|x| candle_nn::ops::sigmoid(x)?.log()),
        ),
    ];
    for (name, act, candle) in &forwards {
        let mut group = c.benchmark_group(*name);
        group.sample_size(10);
        group.bench_function("gradkit", |b| {
            b.iter(|| ops::activation(x.as_tensor(), *act).expect("activation"))
        });
        group.bench_function("candle", |b| {
            b.iter(|| candle(x.as_tensor()).expect("activation"))
        });
        group.bench_function("bandwidth", |b| b.iter(|| bandwidth(&mut out, &host)));
        group.finish();
    }

    let mut group = c.benchmark_group("leaky_relu_fwdbwd/16M");
    group.sample_size(10);
    group.bench_function("gradkit", |b| {
        b.iter(|| {
            step(
                ops::activation(x.as_tensor(), leaky).map_err(candle_core::Error::wrap),
                &up,
            )
        })
    });
    group.bench_function("candle", |b| {
        b.iter(|| step(candle_nn::ops::leaky_relu(x.as_tensor(), 0.01), &up))
    });
    group.bench_function("floor", |b| b.iter(|| floor(&x, &up)));
    group.finish();

    let mut group = c.benchmark_group("gelu_fwdbwd/16M");
    group.sample_size(10);
    group.bench_function("gradkit", |b| {
        b.iter(|| {
            step(
                ops::activation(x.as_tensor(), gelu).map_err(candle_core::Error::wrap),
                &up,
            )
        })
    });
    group.bench_function("candle", |b| b.iter(|| step(x.as_tensor().gelu_erf(), &up)));
    group.bench_function("floor", |b| b.iter(|| floor(&x, &up)));
    group.finish();

    residual_scales(c, &x, &host, &mut out);
    std::hint::black_box(Tensor::new(0f32, &dev).expect("keep"));
}

/// LayerScale (`[.., C]`, one factor per channel) and ReZero (one scalar) on a ViT-S block's
/// tokens, `[32, 196, 384]`: the forward on 16M values against the bandwidth bound, and the
/// training step against candle's `broadcast_mul`, whose backward takes a full-size product
/// for the factor's gradient before summing it.
fn residual_scales(c: &mut Criterion, x16m: &Var, host: &[f32], out: &mut [f32]) {
    let dev = Device::Cpu;
    let gamma = Var::from_tensor(&Tensor::full(1e-5f32, 1024, &dev).expect("gamma")).expect("var");
    let alpha = Var::from_tensor(&Tensor::new(0.5f32, &dev).expect("alpha")).expect("var");
    let rows = x16m.as_tensor().reshape((N / 1024, 1024)).expect("rows");
    let mut group = c.benchmark_group("layer_scale/16M");
    group.sample_size(10);
    group.bench_function("gradkit", |b| {
        b.iter(|| ops::channel_scale(&rows, gamma.as_tensor(), ChannelAxis::Last).expect("scale"))
    });
    group.bench_function("candle", |b| {
        b.iter(|| rows.broadcast_mul(gamma.as_tensor()).expect("scale"))
    });
    group.bench_function("bandwidth", |b| b.iter(|| bandwidth(out, host)));
    group.finish();

    let shape = (32, 196, 384);
    let x = Var::from_tensor(
        &Philox::new(4)
            .normal(shape, 0.0, 1.0, DType::F32, &dev)
            .expect("x"),
    )
    .expect("var");
    let up = Philox::new(5)
        .normal(shape, 0.0, 1.0, DType::F32, &dev)
        .expect("upstream");
    let gamma = Var::from_tensor(&Tensor::full(1e-5f32, 384, &dev).expect("gamma")).expect("var");
    let scales: [(&str, &Var, ChannelAxis); 2] = [
        ("layer_scale_fwdbwd/32x196x384", &gamma, ChannelAxis::Last),
        ("rezero_fwdbwd/32x196x384", &alpha, ChannelAxis::Last),
    ];
    for (name, scale, axis) in scales {
        let mut group = c.benchmark_group(name);
        group.sample_size(20);
        group.bench_function("gradkit", |b| {
            b.iter(|| {
                step(
                    ops::channel_scale(x.as_tensor(), scale.as_tensor(), axis)
                        .map_err(candle_core::Error::wrap),
                    &up,
                )
            })
        });
        group.bench_function("candle", |b| {
            b.iter(|| step(x.as_tensor().broadcast_mul(scale.as_tensor()), &up))
        });
        group.bench_function("floor", |b| b.iter(|| floor(&x, &up)));
        group.finish();
    }
}

criterion_group!(benches, bench);
tuned_main!(benches);
