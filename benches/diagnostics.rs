//! `monitor_overhead/mlp10x512`: the cost of watching a training step. `train_step` is forward,
//! backward and an SGD step of a 10-layer width-512 ReLU MLP on a batch of 256 (f32);
//! `train_step_observed` is the same with three activation probes in the network and
//! `GradMonitor::observe` after every backward. Target: at most 5% slower. criterion times the
//! two one after the other, so drift on a shared machine enters the ratio; `monitor_paired`
//! alternates them step by step.

#![allow(clippy::expect_used, reason = "a bench with broken data should stop")]

mod common;

use common::mlp::Mlp;
use criterion::{Criterion, criterion_group};

fn bench(c: &mut Criterion) {
    let mut net = Mlp::new();
    let mut group = c.benchmark_group("monitor_overhead/mlp10x512");
    group.sample_size(30);
    group.bench_function("train_step", |b| b.iter(|| net.step(false)));
    group.bench_function("train_step_observed", |b| b.iter(|| net.step(true)));
    group.finish();
}

criterion_group!(benches, bench);
tuned_main!(benches);
