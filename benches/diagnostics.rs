//! `monitor_overhead/mlp10x512`: the cost of watching a training step. `train_step` is forward,
//! backward and an SGD step of a 10-layer width-512 ReLU MLP on a batch of 256 (f32);
//! `train_step_observed` is the same with three activation probes in the network and
//! `GradMonitor::observe` after every backward. Target: at most 5% slower. criterion times the
//! two one after the other, so drift on a shared machine enters the ratio; `monitor_paired`
//! alternates them step by step.
//!
//! `sharpness/demo_mlp16x64`: [`sharpness`] with 10 power iterations on the vanishing demo's
//! network (16 sigmoid layers of width 64 on a digits batch of 32, f32); `floor` is one
//! forward and backward of the same loss, so the ratio is the cost in training steps.

#![allow(clippy::expect_used, reason = "a bench with broken data should stop")]

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::mlp::Mlp;
use criterion::{Criterion, criterion_group};
use grad_core::NamedVars;
use grad_diagnostics::{SharpnessConfig, sharpness};

/// The demo's set-up (1): 16 sigmoid layers of width 64 and a 10-way head, with a digits batch
/// of 32 and its cross-entropy.
struct DemoMlp {
    params: NamedVars,
    layers: Vec<candle_nn::Linear>,
    x: Tensor,
    y: Tensor,
}

impl DemoMlp {
    fn new() -> Self {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let layers = (0..=16)
            .map(|i| {
                let fan_out = if i == 16 { 10 } else { 64 };
                candle_nn::linear(64, fan_out, vb.pp(format!("layer.{i}"))).expect("linear")
            })
            .collect();
        let data = grad_testkit::digits::load(&grad_testkit::digits::default_path(), &Device::Cpu)
            .expect("digits");
        Self {
            params: NamedVars::from_var_map(&map),
            layers,
            x: data.train.images.narrow(0, 0, 32).expect("batch"),
            y: data.train.labels.narrow(0, 0, 32).expect("labels"),
        }
    }

    fn loss(&self) -> candle_core::Result<Tensor> {
        let mut h = self.x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = candle_nn::ops::sigmoid(&h)?;
            }
        }
        candle_nn::loss::cross_entropy(&h, &self.y)
    }
}

fn bench(c: &mut Criterion) {
    let mut net = Mlp::new();
    let mut group = c.benchmark_group("monitor_overhead/mlp10x512");
    group.sample_size(30);
    group.bench_function("train_step", |b| b.iter(|| net.step(false)));
    group.bench_function("train_step_observed", |b| b.iter(|| net.step(true)));
    group.finish();

    let demo = DemoMlp::new();
    let config = SharpnessConfig {
        iterations: 10,
        tolerance: 0.0,
        ..Default::default()
    };
    let mut group = c.benchmark_group("sharpness/demo_mlp16x64");
    group.sample_size(20);
    group.bench_function("gradkit", |b| {
        b.iter(|| sharpness(&demo.params, || demo.loss(), &config).expect("sharpness"))
    });
    group.bench_function("floor", |b| {
        b.iter(|| demo.loss().and_then(|l| l.backward()).expect("step"))
    });
    group.finish();
}

criterion_group!(benches, bench);
tuned_main!(benches);
