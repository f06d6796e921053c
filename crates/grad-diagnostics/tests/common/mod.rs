//! A small MLP harness on the digits data for the detector tests.

#![allow(dead_code, reason = "each test file uses part of the harness")]

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{Optimizer, SGD, VarBuilder, VarMap};
use grad_core::NamedVars;
use grad_diagnostics::{GradMonitor, MonitorConfig, Probe, ProbeKind};

/// How the hidden layers are built.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Style {
    /// Sigmoid, candle's default init.
    Sigmoid,
    /// ReLU with every weight multiplied by `scale` after init.
    ScaledRelu(f64),
    /// Linear -> BatchNorm -> LeakyReLU with Kaiming init.
    Remedied,
    /// Linear -> LeakyReLU with Kaiming init for its slope, no normalisation.
    KaimingLeaky,
}

/// Leaky ReLU's slope (PyTorch's default).
const SLOPE: f64 = 0.01;

pub struct Mlp {
    pub map: VarMap,
    layers: Vec<candle_nn::Linear>,
    norms: Vec<Option<grad_layers_shim::Bn>>,
    style: Style,
    pub probe: Probe,
    /// A probe after every hidden activation (`hidden.{i}`), disabled until a monitor that
    /// enables them ([`GradMonitor::preflight`]) runs.
    pub hidden_probes: Vec<Probe>,
}

/// gradkit's BatchNorm lives in grad-layers, which grad-diagnostics must not depend on even in
/// tests; candle-nn's batch norm is enough for a healthy baseline here.
pub mod grad_layers_shim {
    pub type Bn = candle_nn::BatchNorm;
}

impl Mlp {
    pub fn new(depth: usize, width: usize, style: Style, seed: u64) -> Self {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let mut layers = Vec::new();
        let mut norms = Vec::new();
        let mut rng = grad_core::Philox::new(seed);
        for i in 0..=depth {
            let (fan_in, fan_out) = (
                if i == 0 { 64 } else { width },
                if i == depth { 10 } else { width },
            );
            let l = candle_nn::linear(fan_in, fan_out, vb.pp(format!("layer.{i}"))).unwrap();
            let std = match style {
                Style::Sigmoid => 1.0 / (fan_in as f64).sqrt(),
                Style::ScaledRelu(s) => s * (2.0 / fan_in as f64).sqrt(),
                Style::Remedied => (2.0 / fan_in as f64).sqrt(),
                Style::KaimingLeaky => (2.0 / (1.0 + SLOPE * SLOPE) / fan_in as f64).sqrt(),
            };
            let w = rng
                .normal((fan_out, fan_in), 0.0, std, DType::F32, &Device::Cpu)
                .unwrap();
            // PyTorch's default bias range, drawn from the seeded stream (candle-nn's own
            // initialisation is not seeded, which made these runs differ from one to the next).
            let bound = 1.0 / (fan_in as f64).sqrt();
            let b = rng
                .uniform(fan_out, -bound, bound, DType::F32, &Device::Cpu)
                .unwrap();
            let data = map.data().lock().unwrap();
            data[&format!("layer.{i}.weight")].set(&w).unwrap();
            data[&format!("layer.{i}.bias")].set(&b).unwrap();
            drop(data);
            norms.push((style == Style::Remedied && i < depth).then(|| {
                candle_nn::batch_norm(
                    width,
                    candle_nn::BatchNormConfig::default(),
                    vb.pp(format!("bn.{i}")),
                )
                .unwrap()
            }));
            layers.push(l);
        }
        let kind = match style {
            Style::Sigmoid => ProbeKind::Sigmoid,
            _ => ProbeKind::Relu,
        };
        // A leaky unit is never dead: its probes record moments and gradients only.
        let hidden_kind = match style {
            Style::Remedied | Style::KaimingLeaky => ProbeKind::Linear,
            _ => kind,
        };
        let hidden_probes = (0..depth)
            .map(|i| {
                let p = Probe::new(format!("hidden.{i}"), hidden_kind, 4);
                p.set_enabled(false);
                p
            })
            .collect();
        Self {
            map,
            layers,
            norms,
            style,
            probe: Probe::new("layer.1.act", kind, 4),
            hidden_probes,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.clone();
        let last = self.layers.len() - 1;
        for (i, (l, bn)) in self.layers.iter().zip(&self.norms).enumerate() {
            h = l.forward(&h).unwrap();
            if i == last {
                break;
            }
            if let Some(bn) = bn {
                h = bn.forward_t(&h, true).unwrap();
            }
            h = match self.style {
                Style::Sigmoid => candle_nn::ops::sigmoid(&h).unwrap(),
                Style::ScaledRelu(_) => h.relu().unwrap(),
                Style::Remedied | Style::KaimingLeaky => {
                    candle_nn::ops::leaky_relu(&h, SLOPE).unwrap()
                }
            };
            h = self.hidden_probes[i].forward(&h).unwrap();
            if i == 1 {
                h = self.probe.forward(&h).unwrap();
            }
        }
        h
    }

    /// Only the trainable weights and biases (candle-nn's batch norm keeps running statistics
    /// as variables too).
    pub fn params(&self) -> NamedVars {
        NamedVars::from_var_map(&self.map)
            .filter(|n| n.starts_with("layer.") || n.ends_with("weight") || n.ends_with("bias"))
            .filter(|n| !n.contains("running"))
    }

    /// Trains `steps` SGD steps on digits batches, observing every step.
    pub fn train(&self, steps: u64, lr: f64, monitor: &mut GradMonitor) {
        let data = grad_testkit::digits::load(&grad_testkit::digits::default_path(), &Device::Cpu)
            .unwrap();
        let mut sgd = SGD::new(self.params().vars().to_vec(), lr).unwrap();
        let n = data.train.images.dim(0).unwrap();
        for step in 0..steps {
            let start = (step as usize * 128) % (n - 128);
            let x = data.train.images.narrow(0, start, 128).unwrap();
            let y = data.train.labels.narrow(0, start, 128).unwrap();
            let loss = candle_nn::loss::cross_entropy(&self.forward(&x), &y).unwrap();
            let grads = loss.backward().unwrap();
            monitor.observe(step, &grads).unwrap();
            sgd.step(&grads).unwrap();
        }
    }

    /// A monitor with every hidden probe, in network order.
    pub fn preflight_monitor(&self) -> GradMonitor {
        let mut m = GradMonitor::new(self.params(), MonitorConfig::default()).unwrap();
        for p in &self.hidden_probes {
            m.add_probe(p);
        }
        m
    }

    /// A monitor with no probe at all.
    pub fn monitor_without_probes(&self) -> GradMonitor {
        GradMonitor::new(self.params(), MonitorConfig::default()).unwrap()
    }

    pub fn monitor(&self) -> GradMonitor {
        let mut m = GradMonitor::new(self.params(), MonitorConfig::default()).unwrap();
        m.add_probe(&self.probe);
        m
    }
}
