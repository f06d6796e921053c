//! The gradient monitor: per-parameter and per-layer statistics after each observed backward.
//!
//! `observe(step, &grads)` reads each gradient and each weight once (in parallel across
//! parameters) for the gradient's L2 norm, largest magnitude, mean, standard deviation, zero
//! fraction and NaN/Inf counts, and the weight's norm. The update-to-weight ratio
//! `||w_t - w_prev|| / ||w_t||` compares each weight with a fixed, evenly spaced sample of its
//! elements kept from the previous observation: exact for tensors up to
//! [`MonitorConfig::update_sample`] elements, an unbiased estimate (relative error about
//! `sqrt(2 / sample)`) for larger ones, so the monitor keeps `sample` floats per parameter instead
//! of a copy of the model. History lives in a ring buffer of bounded length.

use std::collections::VecDeque;

use candle_core::backprop::GradStore;
use candle_nn::{Optimizer, VarMap};
use grad_core::{NamedVars, natural_cmp};
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::detect::{DetectorConfig, Finding, detect};
use crate::probe::Probe;
use crate::record::{LayerStats, ParamStats, StepRecord};
use crate::report::RunReport;
use crate::stats::{self, gather, gather_on_device};
use grad_core::device::Path;
use rayon::prelude::*;

/// How parameter names map to layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum LayerGrouping {
    /// The name up to its last `.` (`encoder.layer.3.weight` -> `encoder.layer.3`).
    #[default]
    StripLast,
    /// The first `n` dot-separated components.
    Components(usize),
}

impl LayerGrouping {
    /// The layer of parameter `name`.
    pub fn layer_of(&self, name: &str) -> String {
        match self {
            Self::StripLast => name.rsplit_once('.').map_or(name, |(l, _)| l).to_owned(),
            Self::Components(n) => name
                .split('.')
                .take((*n).max(1))
                .collect::<Vec<_>>()
                .join("."),
        }
    }
}

/// Settings of [`GradMonitor`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorConfig {
    /// Observe every `every`-th step (steps divisible by it). Default: 1.
    pub every: u64,
    /// Observations kept in the history ring buffer. Default: 1000.
    pub history: usize,
    /// How parameters group into layers. Default: [`LayerGrouping::StripLast`].
    pub grouping: LayerGrouping,
    /// The layers in network order; `None` sorts layer names naturally (`layer.2` before
    /// `layer.10`). Layers not listed follow, naturally sorted. Default: `None`.
    pub layer_order: Option<Vec<String>>,
    /// Weight elements kept per parameter for update ratios. Default: 4096.
    pub update_sample: usize,
    /// The detectors' thresholds. Default: [`DetectorConfig::default`].
    pub detectors: DetectorConfig,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            every: 1,
            history: 1000,
            grouping: LayerGrouping::StripLast,
            layer_order: None,
            update_sample: 4096,
            detectors: DetectorConfig::default(),
        }
    }
}

/// A parameter as the monitor tracks it.
#[derive(Debug)]
struct Tracked {
    layer: usize,
    /// Flat positions sampled for the update ratio, and their values at the last observation.
    positions: Vec<usize>,
    /// The positions as a u32 tensor on the parameter's device (composed path, made once).
    device_positions: Option<candle_core::Tensor>,
    previous: Option<Sample>,
}

/// A weight's sampled values: on the host (fused path) or on its device (composed path).
#[derive(Debug)]
enum Sample {
    Host(Vec<f64>),
    Device(candle_core::Tensor),
}

/// Watches a model's gradients step by step.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use grad_core::NamedVars;
/// use grad_diagnostics::{GradMonitor, MonitorConfig};
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let net = candle_nn::seq()
///     .add(candle_nn::linear(4, 8, vb.pp("layer.0"))?)
///     .add(candle_nn::Activation::Relu)
///     .add(candle_nn::linear(8, 1, vb.pp("layer.1"))?);
/// let mut monitor = GradMonitor::new(NamedVars::from_var_map(&map), MonitorConfig::default())?;
/// let x = Tensor::ones((16, 4), DType::F32, &Device::Cpu)?;
/// let grads = net.forward(&x)?.sqr()?.mean_all()?.backward()?;
/// let record = monitor.observe(0, &grads)?.unwrap();
/// assert_eq!(record.layers.len(), 2);
/// assert!(record.global_grad_norm > 0.0);
/// # Ok::<(), grad_diagnostics::Error>(())
/// ```
#[derive(Debug)]
pub struct GradMonitor {
    config: MonitorConfig,
    params: NamedVars,
    layers: Vec<String>,
    tracked: Vec<Tracked>,
    probes: Vec<Probe>,
    history: VecDeque<StepRecord>,
    clip_threshold: Option<f64>,
}

impl GradMonitor {
    /// A monitor of `params` (usually [`NamedVars::from_var_map`]).
    ///
    /// # Errors
    /// [`Error::Core`](crate::Error::Core) for `every` or `history` of 0, or invalid detector
    /// thresholds.
    pub fn new(params: NamedVars, config: MonitorConfig) -> Result<Self> {
        grad_core::validate::at_least_one(
            "every",
            usize::try_from(config.every).unwrap_or(usize::MAX),
        )?;
        grad_core::validate::at_least_one("history", config.history)?;
        config.detectors.validate()?;
        let mut layers: Vec<String> = Vec::new();
        for name in params.names() {
            let l = config.grouping.layer_of(name);
            if !layers.contains(&l) {
                layers.push(l);
            }
        }
        let given = config.layer_order.clone().unwrap_or_default();
        layers.sort_by(|a, b| {
            let (pa, pb) = (
                given.iter().position(|g| g == a),
                given.iter().position(|g| g == b),
            );
            match (pa, pb) {
                (Some(x), Some(y)) => x.cmp(&y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => natural_cmp(a, b),
            }
        });
        // Parameters in network order: by layer, then naturally by name.
        let mut entries: Vec<(usize, String, candle_core::Var)> = params
            .iter()
            .map(|(n, v)| {
                let layer = layers
                    .iter()
                    .position(|l| *l == config.grouping.layer_of(n))
                    .unwrap_or(0);
                (layer, n.to_owned(), v.clone())
            })
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| natural_cmp(&a.1, &b.1)));
        let tracked = entries
            .iter()
            .map(|(layer, _, v)| {
                let n = v.elem_count();
                let m = n.min(config.update_sample.max(1));
                Tracked {
                    layer: *layer,
                    positions: (0..m).map(|j| j * n / m).collect(),
                    device_positions: None,
                    previous: None,
                }
            })
            .collect();
        let params = NamedVars::new(entries.into_iter().map(|(_, n, v)| (n, v)))?;
        Ok(Self {
            config,
            params,
            layers,
            tracked,
            probes: Vec::new(),
            history: VecDeque::new(),
            clip_threshold: None,
        })
    }

    /// A monitor of every floating-point variable of `vars` with the default settings: the
    /// one-line drop-in for a candle training loop.
    ///
    /// # Errors
    /// As [`GradMonitor::new`].
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use grad_diagnostics::GradMonitor;
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// let _layer = candle_nn::linear(4, 2, vb.pp("fc"))?;
    /// let monitor = GradMonitor::from_var_map(&varmap)?;
    /// assert_eq!(monitor.layers(), ["fc"]);
    /// # Ok::<(), grad_diagnostics::Error>(())
    /// ```
    pub fn from_var_map(vars: &VarMap) -> Result<Self> {
        Self::new(NamedVars::from_var_map(vars), MonitorConfig::default())
    }

    /// Adds an activation probe whose statistics join every observation.
    pub fn add_probe(&mut self, probe: &Probe) {
        self.probes.push(probe.clone());
    }

    /// Records a clipping threshold, drawn on the global-norm plot.
    pub fn set_clip_threshold(&mut self, threshold: Option<f64>) {
        self.clip_threshold = threshold;
    }

    /// Whether `step` is one this monitor observes.
    pub fn should_observe(&self, step: u64) -> bool {
        step.is_multiple_of(self.config.every)
    }

    /// Observes the gradients of `grads` at `step` (after `backward`, before the optimizer
    /// step). Returns `None` on steps the `every` setting skips.
    ///
    /// # Errors
    /// A candle error reading a tensor.
    pub fn observe(&mut self, step: u64, grads: &GradStore) -> Result<Option<&StepRecord>> {
        if !self.should_observe(step) {
            return Ok(None);
        }
        let named = self.params.grads(grads)?;
        // Every gradient's statistics and every weight's norm, from one pass over all the
        // tensors (fused), or one read-back of device reductions (composed).
        let weights: Vec<candle_core::Tensor> = self
            .params
            .vars()
            .iter()
            .map(|v| v.as_tensor().clone())
            .collect();
        let present: Vec<candle_core::Tensor> =
            named.iter().filter_map(|e| e.grad().cloned()).collect();
        let path = weights
            .first()
            .map_or(Path::Fused, |w| Path::of(w.device()));
        let (observation, samples, update_sums): (_, Vec<Sample>, Vec<Option<f64>>) = match path {
            Path::Fused => {
                let observation = stats::observe(&present, &weights, &[], path)?;
                // The update-ratio samples: scattered reads, one task per parameter.
                let samples: Vec<Vec<f64>> = weights
                    .iter()
                    .zip(&self.tracked)
                    .collect::<Vec<_>>()
                    .into_par_iter()
                    .map(|(w, tracked)| gather(w, &tracked.positions))
                    .collect::<Result<_>>()?;
                let sums = samples
                    .iter()
                    .zip(&self.tracked)
                    .map(|(sample, tracked)| match &tracked.previous {
                        Some(Sample::Host(prev)) => Some(
                            prev.iter()
                                .zip(sample)
                                .map(|(a, b)| (b - a) * (b - a))
                                .sum::<f64>(),
                        ),
                        _ => None,
                    })
                    .collect();
                let samples = samples.into_iter().map(Sample::Host).collect();
                (observation, samples, sums)
            }
            Path::Composed => {
                // The samples stay on the device; their squared differences join the read.
                let mut samples = Vec::with_capacity(weights.len());
                let mut extras = Vec::new();
                for (w, tracked) in weights.iter().zip(&mut self.tracked) {
                    let positions = match &tracked.device_positions {
                        Some(p) => p.clone(),
                        None => {
                            let idx: Vec<u32> = tracked
                                .positions
                                .iter()
                                .map(|&p| u32::try_from(p).unwrap_or(u32::MAX))
                                .collect();
                            let p = candle_core::Tensor::from_vec(
                                idx,
                                tracked.positions.len(),
                                w.device(),
                            )?;
                            tracked.device_positions = Some(p.clone());
                            p
                        }
                    };
                    let sample = gather_on_device(w, &positions)?;
                    if let Some(Sample::Device(prev)) = &tracked.previous {
                        extras.push((&sample - prev)?.sqr()?.sum_all()?);
                    }
                    samples.push(Sample::Device(sample));
                }
                let observation = stats::observe(&present, &weights, &extras, path)?;
                let mut sums = observation.extras.iter().copied();
                let sums = self
                    .tracked
                    .iter()
                    .map(|t| match t.previous {
                        Some(Sample::Device(_)) => sums.next(),
                        _ => None,
                    })
                    .collect();
                (observation, samples, sums)
            }
        };
        let weight_norms = observation.norms;
        let mut grad_moments = observation.moments.into_iter();
        let layers = &self.layers;
        let params: Vec<(ParamStats, Sample, f64)> = named
            .iter()
            .zip(&self.tracked)
            .zip(&weight_norms)
            .zip(samples.into_iter().zip(update_sums))
            .map(
                |(((entry, tracked), weight_norm), (sample, update_sum))| -> Result<_> {
                    let w = entry.var().as_tensor();
                    let weight_norm = *weight_norm;
                    let g = if entry.grad().is_some() {
                        grad_moments.next().unwrap_or_default()
                    } else {
                        stats::Moments::default()
                    };
                    // The update's squared norm, estimated from the sampled elements.
                    let sampled = tracked.positions.len().max(1) as f64;
                    let update_sq: Option<f64> =
                        update_sum.map(|d: f64| d * w.elem_count() as f64 / sampled);
                    let stats = ParamStats {
                        name: entry.name().to_owned(),
                        layer: layers[tracked.layer].clone(),
                        numel: w.elem_count(),
                        grad_norm: g.norm(),
                        grad_max_abs: g.max_abs,
                        grad_mean: g.mean,
                        grad_std: g.std(),
                        zero_fraction: g.zero_fraction(),
                        nan_count: g.nan,
                        inf_count: g.inf,
                        weight_norm,
                        update_ratio: update_sq.map(|u| ratio(u.sqrt(), weight_norm)),
                    };
                    Ok((stats, sample, update_sq.unwrap_or(f64::NAN)))
                },
            )
            .collect::<Result<Vec<_>>>()?;

        let mut layer_stats: Vec<LayerStats> = layers
            .iter()
            .enumerate()
            .map(|(depth, name)| LayerStats {
                name: name.clone(),
                depth,
                grad_norm: 0.0,
                grad_max_abs: 0.0,
                weight_norm: 0.0,
                update_ratio: None,
                non_finite: 0,
            })
            .collect();
        let mut update_sq = vec![Some(0.0); layers.len()];
        let mut global_sq = 0.0f64;
        let mut records = Vec::with_capacity(params.len());
        for ((stats, sample, upd), tracked) in params.into_iter().zip(self.tracked.iter_mut()) {
            let l = &mut layer_stats[tracked.layer];
            l.grad_norm += stats.grad_norm * stats.grad_norm;
            l.grad_max_abs = l.grad_max_abs.max(stats.grad_max_abs);
            l.weight_norm += stats.weight_norm * stats.weight_norm;
            l.non_finite += stats.nan_count + stats.inf_count;
            if stats.grad_max_abs.is_nan() {
                l.grad_max_abs = f64::NAN;
            }
            update_sq[tracked.layer] =
                update_sq[tracked.layer].and_then(|u| (!upd.is_nan()).then_some(u + upd));
            global_sq += stats.grad_norm * stats.grad_norm;
            tracked.previous = Some(sample);
            records.push(stats);
        }
        for (l, u) in layer_stats.iter_mut().zip(update_sq) {
            l.grad_norm = l.grad_norm.sqrt();
            l.weight_norm = l.weight_norm.sqrt();
            l.update_ratio = u.map(|u| ratio(u.sqrt(), l.weight_norm));
        }
        let record = StepRecord {
            step,
            global_grad_norm: global_sq.sqrt(),
            clip_threshold: self.clip_threshold,
            params: records,
            layers: layer_stats,
            probes: self.probes.iter().map(Probe::stats).collect(),
        };
        if self.history.len() == self.config.history {
            self.history.pop_front();
        }
        self.history.push_back(record);
        Ok(self.history.back())
    }

    /// `loss.backward()`, [`observe`](Self::observe) at `step`, then `optimizer.step` — in
    /// place of candle's `optimizer.backward_step(&loss)`, so a training loop gains the monitor
    /// by changing one line.
    ///
    /// # Errors
    /// candle's backward or optimizer errors, and [`observe`](Self::observe)'s.
    ///
    /// ```
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use candle_nn::{Optimizer, SGD, VarBuilder, VarMap};
    /// use grad_diagnostics::GradMonitor;
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// let layer = candle_nn::linear(4, 1, vb.pp("fc"))?;
    /// let mut sgd = SGD::new(varmap.all_vars(), 0.1)?;
    /// let mut monitor = GradMonitor::from_var_map(&varmap)?;
    /// let loss = layer.forward(&Tensor::ones((8, 4), DType::F32, &Device::Cpu)?)?.sqr()?.mean_all()?;
    /// monitor.backward_step(0, &loss, &mut sgd)?;
    /// assert_eq!(monitor.history().len(), 1);
    /// # Ok::<(), grad_diagnostics::Error>(())
    /// ```
    pub fn backward_step<O: Optimizer>(
        &mut self,
        step: u64,
        loss: &candle_core::Tensor,
        optimizer: &mut O,
    ) -> Result<Option<&StepRecord>> {
        let grads = loss.backward()?;
        // Observed before the step: a clipping optimizer scales the gradients in place, and the
        // monitor reports them as the loss produced them.
        let observed = self.should_observe(step);
        if observed {
            self.observe(step, &grads)?;
        }
        optimizer.step(&grads)?;
        Ok(if observed { self.history.back() } else { None })
    }

    /// The kept observations, oldest first (at most `history` of them).
    pub fn history(&self) -> impl ExactSizeIterator<Item = &StepRecord> {
        self.history.iter()
    }

    /// The last observation.
    pub fn last(&self) -> Option<&StepRecord> {
        self.history.back()
    }

    /// The layers in network order.
    pub fn layers(&self) -> &[String] {
        &self.layers
    }

    /// What the detectors find in the kept history.
    pub fn findings(&self) -> Vec<Finding> {
        let records: Vec<StepRecord> = self.history.iter().cloned().collect();
        detect(&records, &self.config.detectors)
    }

    /// A report of the kept history: per-layer summary and findings.
    pub fn report(&self) -> RunReport {
        let records: Vec<StepRecord> = self.history.iter().cloned().collect();
        RunReport::from_records(&records, &self.config.detectors)
    }

    /// The configuration.
    pub fn config(&self) -> &MonitorConfig {
        &self.config
    }
}

/// `a / b`, with 0/0 = 0 (an untouched zero parameter did not move).
fn ratio(a: f64, b: f64) -> f64 {
    if a == 0.0 { 0.0 } else { a / b }
}
