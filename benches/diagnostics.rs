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
//!
//! `preflight/demo_mlp16x64`: `GradMonitor::preflight` on the same network with the demo's three
//! sigmoid probes (layers 0, 8 and 15): one forward and backward, every layer's gradient norm
//! and the probes' statistics. `candle` is what a candle user writes for the same numbers
//! (keep the three activations, backward, then each gradient's squared sum and each
//! activation's mean and variance as candle ops, read back); `floor` is the plain forward and
//! backward.
//!
//! `gradient_noise/resnet50_k4`: `GradMonitor::gradient_noise` over 4 micro-batch gradient
//! stores of ResNet-50's shapes (4 × 25.6M f32 values in 161 tensors each); `candle` is the
//! same statistics as candle ops (each gradient's squared sum and the squared sum of their
//! total, per parameter, read back once); `bandwidth` is one plain read of the same bytes
//! (target: at most 1.3x it).

#![allow(clippy::expect_used, reason = "a bench with broken data should stop")]

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::mlp::Mlp;
use criterion::{Criterion, criterion_group};
use grad_core::NamedVars;
use grad_diagnostics::{
    GradMonitor, MonitorConfig, PreflightConfig, Probe, ProbeKind, SharpnessConfig, sharpness,
};

/// The demo's set-up (1): 16 sigmoid layers of width 64 and a 10-way head, with a digits batch
/// of 32 and its cross-entropy; probes after hidden layers 0, 8 and 15, disabled until a
/// preflight enables them.
struct DemoMlp {
    params: NamedVars,
    layers: Vec<candle_nn::Linear>,
    probes: Vec<(usize, Probe)>,
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
        let probes = [0, 8, 15]
            .into_iter()
            .map(|i| {
                let p = Probe::new(format!("layer.{i}.act"), ProbeKind::Sigmoid, 20);
                p.set_enabled(false);
                (i, p)
            })
            .collect();
        Self {
            params: NamedVars::from_var_map(&map),
            layers,
            probes,
            x: data.train.images.narrow(0, 0, 32).expect("batch"),
            y: data.train.labels.narrow(0, 0, 32).expect("labels"),
        }
    }

    fn loss(&self) -> candle_core::Result<Tensor> {
        self.loss_keeping(&mut Vec::new())
    }

    /// The loss, pushing the probed activations onto `kept`.
    fn loss_keeping(&self, kept: &mut Vec<Tensor>) -> candle_core::Result<Tensor> {
        let mut h = self.x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = candle_nn::ops::sigmoid(&h)?;
            }
            if let Some((_, p)) = self.probes.iter().find(|(at, _)| *at == i) {
                h = p.forward(&h)?;
                kept.push(h.clone());
            }
        }
        candle_nn::loss::cross_entropy(&h, &self.y)
    }

    /// The preflight's numbers with candle ops: each gradient's squared sum and each kept
    /// activation's mean and variance, read back as one vector.
    fn candle_preflight(&self) -> candle_core::Result<Vec<f32>> {
        let mut kept = Vec::new();
        let grads = self.loss_keeping(&mut kept)?.backward()?;
        let mut parts = Vec::new();
        for v in self.params.vars() {
            if let Some(g) = grads.get(v.as_tensor()) {
                parts.push(g.sqr()?.sum_all()?.reshape(1)?);
            }
        }
        for a in &kept {
            let mean = a.mean_all()?;
            parts.push(mean.reshape(1)?);
            parts.push(a.broadcast_sub(&mean)?.sqr()?.mean_all()?.reshape(1)?);
        }
        Tensor::cat(&parts, 0)?.to_vec1()
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

    let mut monitor =
        GradMonitor::new(demo.params.clone(), MonitorConfig::default()).expect("monitor");
    for (_, p) in &demo.probes {
        monitor.add_probe(p);
    }
    let preflight = PreflightConfig::default();
    let mut group = c.benchmark_group("preflight/demo_mlp16x64");
    group.sample_size(30);
    group.bench_function("gradkit", |b| {
        b.iter(|| {
            monitor
                .preflight(|| demo.loss(), &preflight)
                .expect("preflight")
        })
    });
    group.bench_function("candle", |b| {
        b.iter(|| demo.candle_preflight().expect("candle preflight"))
    });
    group.bench_function("floor", |b| {
        b.iter(|| demo.loss().and_then(|l| l.backward()).expect("step"))
    });
    group.finish();

    let base = common::resnet50_grads(1e-2);
    let vars: Vec<Var> = base
        .iter()
        .map(|g| Var::zeros(g.shape(), DType::F32, &Device::Cpu).expect("var"))
        .collect();
    let monitor = GradMonitor::new(
        NamedVars::new(
            vars.iter()
                .enumerate()
                .map(|(i, v)| (format!("layer.{i}.weight"), v.clone())),
        )
        .expect("names"),
        MonitorConfig::default(),
    )
    .expect("monitor");
    let micro: Vec<Vec<Tensor>> = (0..4)
        .map(|i| {
            base.iter()
                .map(|g| {
                    g.affine(1.0 + 0.1 * f64::from(i), 1e-3 * f64::from(i))
                        .expect("grad")
                })
                .collect()
        })
        .collect();
    let stores: Vec<GradStore> = micro
        .iter()
        .map(|gs| {
            let mut store = GradStore::default();
            for (v, g) in vars.iter().zip(gs) {
                store.insert(v.as_tensor(), g.clone());
            }
            store
        })
        .collect();
    let host: Vec<Vec<f32>> = micro
        .iter()
        .flatten()
        .map(|g| {
            g.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("f32 data")
        })
        .collect();
    let mut group = c.benchmark_group("gradient_noise/resnet50_k4");
    group.sample_size(20);
    group.bench_function("gradkit", |b| {
        b.iter(|| monitor.gradient_noise(&stores, 32).expect("noise"))
    });
    group.bench_function("candle", |b| {
        b.iter(|| candle_noise_sums(&vars, &stores).expect("sums"))
    });
    group.bench_function("bandwidth", |b| b.iter(|| common::plain_sum(&host)));
    group.finish();
}

/// Per parameter, each micro-batch gradient's squared sum and the squared sum of their total,
/// as a candle user writes it, read back as one tensor.
fn candle_noise_sums(vars: &[Var], stores: &[GradStore]) -> candle_core::Result<Vec<f32>> {
    let mut parts = Vec::new();
    for v in vars {
        let gs: Vec<&Tensor> = stores.iter().filter_map(|s| s.get(v.as_tensor())).collect();
        let mut total = gs[0].clone();
        for g in &gs[1..] {
            total = (total + *g)?;
            parts.push(g.sqr()?.sum_all()?);
        }
        parts.push(gs[0].sqr()?.sum_all()?);
        parts.push(total.sqr()?.sum_all()?);
    }
    Tensor::stack(&parts, 0)?.to_vec1()
}

criterion_group!(benches, bench);
tuned_main!(benches);
