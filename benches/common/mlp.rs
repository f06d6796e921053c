//! The 10-layer width-512 ReLU MLP that `monitor_overhead` trains: one step plain, or with three
//! activation probes and `GradMonitor::observe`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Optimizer, SGD, VarBuilder, VarMap};
use grad_core::{NamedVars, Philox};
use grad_diagnostics::{GradMonitor, MonitorConfig, Probe, ProbeKind};

/// The network, its optimizer, its monitor and one batch of 256.
pub struct Mlp {
    layers: Vec<candle_nn::Linear>,
    probes: Vec<(usize, Probe)>,
    sgd: SGD,
    monitor: GradMonitor,
    x: Tensor,
    y: Tensor,
    step: u64,
}

impl Mlp {
    /// Ten `512 -> 512` layers, probes after layers 2, 5 and 8, SGD at 1e-3, f32.
    pub fn new() -> Self {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let layers = (0..10)
            .map(|i| candle_nn::linear(512, 512, vb.pp(format!("layer.{i}"))).expect("linear"))
            .collect();
        let probes: Vec<(usize, Probe)> = [2usize, 5, 8]
            .into_iter()
            .map(|i| (i, Probe::new(format!("layer.{i}.act"), ProbeKind::Relu, 10)))
            .collect();
        let params = NamedVars::from_var_map(&map);
        let sgd = SGD::new(params.vars().to_vec(), 1e-3).expect("sgd");
        let mut monitor = GradMonitor::new(params, MonitorConfig::default()).expect("monitor");
        for (_, p) in &probes {
            monitor.add_probe(p);
        }
        let mut rng = Philox::new(1);
        let mut batch = || {
            rng.normal((256, 512), 0.0, 1.0, DType::F32, &dev)
                .expect("batch")
        };
        let (x, y) = (batch(), batch());
        Self {
            layers,
            probes,
            sgd,
            monitor,
            x,
            y,
            step: 0,
        }
    }

    fn forward(&self, probed: bool) -> Tensor {
        let mut h = self.x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h).expect("linear");
            if i + 1 < self.layers.len() {
                h = h.relu().expect("relu");
            }
            if probed && let Some((_, p)) = self.probes.iter().find(|(at, _)| *at == i) {
                h = p.forward(&h).expect("probe");
            }
        }
        h
    }

    /// Forward, MSE, backward and the SGD step; `observed` adds the probes and `observe`.
    pub fn step(&mut self, observed: bool) {
        let loss = candle_nn::loss::mse(&self.forward(observed), &self.y).expect("loss");
        let grads = loss.backward().expect("backward");
        if observed {
            self.monitor.observe(self.step, &grads).expect("observe");
            self.step += 1;
        }
        self.sgd.step(&grads).expect("step");
    }
}
