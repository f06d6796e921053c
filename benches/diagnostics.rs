//! `monitor_overhead/mlp10x512`: the cost of watching a training step. `train_step` is forward,
//! backward and an SGD step of a 10-layer width-512 ReLU MLP on a batch of 256 (f32);
//! `train_step_observed` is the same with three activation probes in the network and
//! `GradMonitor::observe` after every backward. Target: at most 5% slower.

#![allow(clippy::expect_used, reason = "a bench with broken data should stop")]

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Optimizer, SGD, VarBuilder, VarMap};
use criterion::{Criterion, criterion_group, criterion_main};
use grad_core::{NamedVars, Philox};
use grad_diagnostics::{GradMonitor, MonitorConfig, Probe, ProbeKind};

struct Net {
    layers: Vec<candle_nn::Linear>,
    probes: Vec<(usize, Probe)>,
}

impl Net {
    fn forward(&self, x: &Tensor, probed: bool) -> Tensor {
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h).expect("linear");
            if i + 1 < self.layers.len() {
                h = h.relu().expect("relu");
            }
            if probed {
                if let Some((_, p)) = self.probes.iter().find(|(at, _)| *at == i) {
                    h = p.forward(&h).expect("probe");
                }
            }
        }
        h
    }
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
    let layers = (0..10)
        .map(|i| candle_nn::linear(512, 512, vb.pp(format!("layer.{i}"))).expect("linear"))
        .collect();
    let probes = [2usize, 5, 8]
        .into_iter()
        .map(|i| (i, Probe::new(format!("layer.{i}.act"), ProbeKind::Relu, 10)))
        .collect();
    let net = Net { layers, probes };
    let params = NamedVars::from_var_map(&map);
    let mut sgd = SGD::new(params.vars().to_vec(), 1e-3).expect("sgd");
    let mut monitor = GradMonitor::new(params, MonitorConfig::default()).expect("monitor");
    for (_, p) in &net.probes {
        monitor.add_probe(p);
    }
    let mut rng = Philox::new(1);
    let x = rng
        .normal((256, 512), 0.0, 1.0, DType::F32, &dev)
        .expect("x");
    let y = rng
        .normal((256, 512), 0.0, 1.0, DType::F32, &dev)
        .expect("y");

    let mut group = c.benchmark_group("monitor_overhead/mlp10x512");
    group.sample_size(30);
    group.bench_function("train_step", |b| {
        b.iter(|| {
            let loss = candle_nn::loss::mse(&net.forward(&x, false), &y).expect("loss");
            let grads = loss.backward().expect("backward");
            sgd.step(&grads).expect("step");
        })
    });
    let mut step = 0u64;
    group.bench_function("train_step_observed", |b| {
        b.iter(|| {
            let loss = candle_nn::loss::mse(&net.forward(&x, true), &y).expect("loss");
            let grads = loss.backward().expect("backward");
            monitor.observe(step, &grads).expect("observe");
            step += 1;
            sgd.step(&grads).expect("step");
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
