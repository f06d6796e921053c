//! The gradient monitor: per-parameter and per-layer statistics after each observed backward.
//!
//! `observe(step, &grads)` reads each gradient and each weight once (in parallel across
//! parameters) for the gradient's L2 norm, largest magnitude, mean, standard deviation, zero
//! fraction and NaN/Inf counts, and the weight's norm. The update-to-weight ratio
//! `||w_t - w_prev|| / ||w_t||` compares each weight with a fixed, evenly spaced sample of its
//! elements kept from the previous observation: exact for tensors up to
//! [`MonitorConfig::update_sample`] elements, an unbiased estimate (relative error about
//! `sqrt(2 / sample)`) for larger ones, so the monitor keeps `sample` floats per parameter instead
//! of a copy of the model. History lives in a ring buffer of bounded length; the detectors keep
//! running state of their own, so their verdicts cover the whole run.
//!
//! A record also carries, when known, the loss, the learning rate and what a clipping optimizer
//! did (`backward_step` collects all three), and per layer a histogram of `|g|` and one of the
//! sampled update ratios (see [`Histogram`](crate::Histogram)), computed in the same read as the
//! moments. A parameter the loss does not reach is recorded as having no gradient
//! (`ParamStats::has_grad`), never as a zero one.

use std::collections::VecDeque;

use candle_core::Tensor;
use candle_core::backprop::GradStore;
use candle_nn::{Optimizer, VarMap};
use grad_core::{NamedVars, VarOrder};
use serde::{Deserialize, Serialize};

use crate::detect::{DetectorConfig, Detectors, Finding};
use crate::histogram::Histogram;
use crate::preflight::{Preflight, PreflightConfig};
use crate::probe::Probe;
use crate::record::{LayerStats, NoiseRecord, ParamStats, StepRecord};
use crate::report::RunReport;
use crate::stats::{self, gather, gather_on_device};
use crate::stats::{Observation, Wanted};
use crate::{Error, Result};
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

/// Settings of [`GradMonitor`]. Read with serde, missing fields take their defaults and an
/// unknown field is an error; [`GradMonitor::new`] validates the values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorConfig {
    /// Observe every `every`-th step (steps divisible by it). Default: 1.
    pub every: u64,
    /// Observations kept in the history ring buffer. Default: 1000.
    pub history: usize,
    /// How parameters group into layers. Default: [`LayerGrouping::StripLast`].
    pub grouping: LayerGrouping,
    /// The layers in network order. `None` takes the parameters' order: the order the model
    /// created its variables for [`GradMonitor::from_var_map`] (network order for a model built
    /// layer by layer), the given order for [`NamedVars::new`]. Layers not listed follow in that
    /// order; an entry that names no layer is an error. Default: `None`.
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
    device_positions: Option<Tensor>,
    previous: Option<Sample>,
}

/// A weight's sampled values: on the host (fused path) or on its device (composed path).
#[derive(Debug)]
enum Sample {
    Host(Vec<f64>),
    Device(Tensor),
}

/// Watches a model's gradients step by step.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use gradkit::core::NamedVars;
/// use gradkit::diagnostics::{GradMonitor, MonitorConfig};
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
/// # Ok::<(), gradkit::diagnostics::Error>(())
/// ```
#[derive(Debug)]
pub struct GradMonitor {
    config: MonitorConfig,
    params: NamedVars,
    buffers: Vec<String>,
    layers: Vec<String>,
    tracked: Vec<Tracked>,
    probes: Vec<Probe>,
    history: VecDeque<StepRecord>,
    detectors: Detectors,
    clip_threshold: Option<f64>,
    warnings: Vec<String>,
}

/// What the training loop knows about a step beyond its gradients.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepContext<'a> {
    /// The loss (a scalar tensor), read in the same transfer as the statistics.
    pub loss: Option<&'a Tensor>,
    /// The learning rate in force.
    pub learning_rate: Option<f64>,
    /// The step's gradient noise ([`GradMonitor::gradient_noise`]), kept in the record.
    pub noise: Option<&'a NoiseRecord>,
}

impl GradMonitor {
    /// A monitor of `params` (usually [`NamedVars::from_var_map`]: the parameters, in the
    /// order the model created them).
    ///
    /// # Errors
    /// [`Error::Core`] for no parameters at all ([`grad_core::Error::EmptyInput`]: usually a
    /// monitor built before the model created its variables), `every` or `history` of 0,
    /// invalid detector thresholds, or a `layer_order` entry that names no layer
    /// ([`grad_core::Error::UnknownName`]).
    pub fn new(params: NamedVars, config: MonitorConfig) -> Result<Self> {
        if params.is_empty() {
            return Err(Error::Core(grad_core::Error::EmptyInput {
                op: "GradMonitor",
                what: "the parameter list",
            }));
        }
        grad_core::validate::at_least_one(
            "every",
            usize::try_from(config.every).unwrap_or(usize::MAX),
        )?;
        grad_core::validate::at_least_one("history", config.history)?;
        config.detectors.validate()?;
        // Layers in the order their first parameter appears.
        let mut layers: Vec<String> = Vec::new();
        for name in params.names() {
            let l = config.grouping.layer_of(name);
            if !layers.contains(&l) {
                layers.push(l);
            }
        }
        let given = config.layer_order.clone().unwrap_or_default();
        if let Some(unknown) = given.iter().find(|g| !layers.contains(g)) {
            return Err(Error::Core(grad_core::Error::UnknownName {
                name: format!(
                    "{unknown} (in layer_order; the layers are {})",
                    layers.join(", ")
                ),
            }));
        }
        let by_position = |n: &String| layers.iter().position(|l| l == n).unwrap_or(usize::MAX);
        let mut ordered: Vec<String> = given.clone();
        let mut rest: Vec<String> = layers
            .iter()
            .filter(|l| !given.contains(l))
            .cloned()
            .collect();
        rest.sort_by_key(by_position);
        ordered.extend(rest);
        let layers = ordered;
        let mut warnings = Vec::new();
        if params.order() == VarOrder::Name && config.layer_order.is_none() {
            warnings.push(
                "layers are in name order, not network order: the variables' creation order \
                 was not available; set MonitorConfig::layer_order"
                    .to_owned(),
            );
        }
        // Parameters in network order: by layer, then in their own order.
        let mut entries: Vec<(usize, usize, String, candle_core::Var)> = params
            .iter()
            .enumerate()
            .map(|(k, (n, v))| {
                let layer = layers
                    .iter()
                    .position(|l| *l == config.grouping.layer_of(n))
                    .unwrap_or(0);
                (layer, k, n.to_owned(), v.clone())
            })
            .collect();
        entries.sort_by_key(|e| (e.0, e.1));
        let tracked = entries
            .iter()
            .map(|(layer, _, _, v)| {
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
        let params = NamedVars::new(entries.into_iter().map(|(_, _, n, v)| (n, v)))?;
        Ok(Self {
            detectors: Detectors::new(config.detectors.clone()),
            config,
            params,
            buffers: Vec::new(),
            layers,
            tracked,
            probes: Vec::new(),
            history: VecDeque::new(),
            clip_threshold: None,
            warnings,
        })
    }

    /// A monitor of the parameters of `vars` (buffers such as batch norm's running statistics
    /// left out, and listed by [`buffers`](Self::buffers)) in the order the model created them,
    /// with the default settings: the one-line drop-in for a candle training loop.
    ///
    /// # Errors
    /// As [`GradMonitor::new`].
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use gradkit::diagnostics::GradMonitor;
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// let _conv = candle_nn::linear(4, 2, vb.pp("conv"))?;
    /// let _bn = candle_nn::batch_norm(2, candle_nn::BatchNormConfig::default(), vb.pp("bn"))?;
    /// let _fc = candle_nn::linear(2, 2, vb.pp("fc"))?;
    /// let monitor = GradMonitor::from_var_map(&varmap)?;
    /// assert_eq!(monitor.layers(), ["conv", "bn", "fc"]); // network order, not name order
    /// assert_eq!(monitor.buffers(), ["bn.running_mean", "bn.running_var"]);
    /// # Ok::<(), gradkit::diagnostics::Error>(())
    /// ```
    pub fn from_var_map(vars: &VarMap) -> Result<Self> {
        let mut monitor = Self::new(NamedVars::from_var_map(vars), MonitorConfig::default())?;
        monitor.buffers = NamedVars::buffers_of(vars)
            .names()
            .map(str::to_owned)
            .collect();
        Ok(monitor)
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
        self.observe_with(step, grads, StepContext::default())
    }

    /// [`observe`](Self::observe) with the loss and the learning rate, recorded with the
    /// gradients' statistics (the loss is read in the same transfer).
    ///
    /// # Errors
    /// As [`observe`](Self::observe); [`grad_core::Error::ShapeMismatch`] when the loss is not
    /// a one-element tensor, [`grad_core::Error::UnsupportedDType`] when it is not a float.
    ///
    /// ```
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use gradkit::diagnostics::{GradMonitor, StepContext};
    /// let map = VarMap::new();
    /// let fc = candle_nn::linear(4, 1, VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu))?;
    /// let mut monitor = GradMonitor::from_var_map(&map)?;
    /// let loss = fc.forward(&Tensor::ones((8, 4), DType::F32, &Device::Cpu)?)?.sqr()?.mean_all()?;
    /// let grads = loss.backward()?;
    /// let ctx = StepContext { loss: Some(&loss), learning_rate: Some(0.1), ..Default::default() };
    /// let record = monitor.observe_with(0, &grads, ctx)?.unwrap();
    /// assert_eq!(record.learning_rate, Some(0.1));
    /// assert_eq!(record.loss, Some(f64::from(loss.to_scalar::<f32>()?)));
    /// # Ok::<(), gradkit::diagnostics::Error>(())
    /// ```
    pub fn observe_with(
        &mut self,
        step: u64,
        grads: &GradStore,
        context: StepContext<'_>,
    ) -> Result<Option<&StepRecord>> {
        if !self.should_observe(step) {
            return Ok(None);
        }
        let record = self.measure(step, grads, context)?;
        self.detectors.observe(&record);
        if self.history.len() == self.config.history {
            self.history.pop_front();
        }
        self.history.push_back(record);
        Ok(self.history.back())
    }

    /// The record of `grads` at `step`, without keeping it (the update-ratio baseline moves on
    /// to the weights as they are now).
    fn measure(
        &mut self,
        step: u64,
        grads: &GradStore,
        context: StepContext<'_>,
    ) -> Result<StepRecord> {
        let loss = context
            .loss
            .map(|l| scalar_loss("GradMonitor", l))
            .transpose()?;
        let named = self.params.grads(grads)?;
        let weights: Vec<Tensor> = self
            .params
            .vars()
            .iter()
            .map(|v| v.as_tensor().clone())
            .collect();
        let present: Vec<Tensor> = named.iter().filter_map(|e| e.grad().cloned()).collect();
        let path = weights
            .first()
            .map_or(Path::Fused, |w| Path::of(w.device()));
        let extras: Vec<Tensor> = loss.into_iter().collect();
        let (observation, samples, updates) = match path {
            Path::Fused => self.read_fused(&present, &weights, &extras)?,
            Path::Composed => self.read_composed(&present, &weights, &extras)?,
        };
        let loss_value = context
            .loss
            .map(|_| observation.extras.first().copied().unwrap_or(f64::NAN));
        let record = self.assemble(step, &named, observation, samples, updates)?;
        let record = StepRecord {
            loss: loss_value,
            learning_rate: context.learning_rate,
            noise: context.noise.cloned(),
            ..record
        };
        Ok(record)
    }

    /// Preflight: one forward and backward at initialisation, before the first optimizer step.
    /// `forward` runs the model on a real batch and returns the loss (a scalar); the monitor
    /// takes the backward, reads every layer's gradient norm and every added probe's
    /// activation statistics (probes are enabled for the pass and then left as they were; the
    /// pass counts in their forward counts, and a probe it does not reach is left out), and
    /// [`Preflight::from_record`] says whether the signal vanishes or explodes with depth, which
    /// layers are affected, which units are dead or saturated, and what to do. The history, the
    /// detectors and the update-ratio baseline stay as they were; the forward itself runs as
    /// written (a batch norm in training mode updates its running statistics once, a dropout
    /// stream advances).
    ///
    /// # Errors
    /// An invalid `config`; the closure's error; a loss that is not a one-element float
    /// tensor, or is NaN or infinite (nothing can be read from the gradients of a non-finite
    /// loss): the crate's [`Error`]. The monitor is unchanged after an error.
    ///
    /// See [`Preflight`] for an example.
    pub fn preflight<F>(&mut self, forward: F, config: &PreflightConfig) -> Result<Preflight>
    where
        F: FnOnce() -> candle_core::Result<Tensor>,
    {
        config.validate()?;
        let enabled: Vec<bool> = self.probes.iter().map(Probe::is_enabled).collect();
        self.probes.iter().for_each(|p| p.set_enabled(true));
        let baseline: Vec<Option<Sample>> =
            self.tracked.iter_mut().map(|t| t.previous.take()).collect();
        let record = self.preflight_record(forward);
        for (t, previous) in self.tracked.iter_mut().zip(baseline) {
            t.previous = previous;
        }
        for (p, on) in self.probes.iter().zip(enabled) {
            p.set_enabled(on);
        }
        Preflight::from_record(&record?, config)
    }

    fn preflight_record<F>(&mut self, forward: F) -> Result<StepRecord>
    where
        F: FnOnce() -> candle_core::Result<Tensor>,
    {
        let before: std::collections::HashMap<String, u64> = self
            .probes
            .iter()
            .map(|p| (p.name().to_owned(), p.stats().forwards))
            .collect();
        let loss = forward()?;
        let context = StepContext {
            loss: Some(&loss),
            ..StepContext::default()
        };
        let value = scalar_loss("preflight", &loss)?.to_dtype(candle_core::DType::F64)?;
        if !value.to_scalar::<f64>()?.is_finite() {
            return Err(Error::Core(grad_core::Error::NonFinite {
                op: "preflight",
                what: "the loss at initialisation".into(),
                count: 1,
            }));
        }
        let grads = loss.sum_all()?.backward()?;
        let mut record = self.measure(0, &grads, context)?;
        // Only the probes this forward reached: another's statistics are from earlier passes.
        record
            .probes
            .retain(|p| before.get(&p.name).is_none_or(|&n| p.forwards > n));
        Ok(record)
    }

    /// One parallel pass over gradients and weights; update-ratio samples gathered on the host.
    fn read_fused(
        &self,
        present: &[Tensor],
        weights: &[Tensor],
        extras: &[Tensor],
    ) -> Result<(Observation, Vec<Sample>, Vec<Update>)> {
        let wanted = Wanted {
            tensors: present,
            others: weights,
            extras,
            ..Wanted::default()
        };
        let observation = stats::observe(wanted, Path::Fused)?;
        // The update-ratio samples: scattered reads, one task per parameter.
        let samples: Vec<Vec<f64>> = weights
            .iter()
            .zip(&self.tracked)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|(w, tracked)| gather(w, &tracked.positions))
            .collect::<Result<_>>()?;
        let updates = samples
            .iter()
            .zip(&self.tracked)
            .map(|(sample, tracked)| match &tracked.previous {
                Some(Sample::Host(prev)) => {
                    let mut histogram = Histogram::default();
                    let mut sum = 0.0;
                    for (a, b) in prev.iter().zip(sample) {
                        sum += (b - a) * (b - a);
                        histogram.add(element_ratio(b - a, *b));
                    }
                    Some((sum, histogram))
                }
                _ => None,
            })
            .collect();
        let samples = samples.into_iter().map(Sample::Host).collect();
        Ok((observation, samples, updates))
    }

    /// Candle reductions on the device, read back as one tensor; the samples stay there.
    fn read_composed(
        &mut self,
        present: &[Tensor],
        weights: &[Tensor],
        extras: &[Tensor],
    ) -> Result<(Observation, Vec<Sample>, Vec<Update>)> {
        let mut samples = Vec::with_capacity(weights.len());
        let mut sums = Vec::new();
        let mut ratios = Vec::new();
        for (w, tracked) in weights.iter().zip(&mut self.tracked) {
            let positions = match &tracked.device_positions {
                Some(p) => p.clone(),
                None => {
                    let idx: Vec<u32> = tracked
                        .positions
                        .iter()
                        .map(|&p| u32::try_from(p).unwrap_or(u32::MAX))
                        .collect();
                    let p = Tensor::from_vec(idx, tracked.positions.len(), w.device())?;
                    tracked.device_positions = Some(p.clone());
                    p
                }
            };
            let sample = gather_on_device(w, &positions)?;
            if let Some(Sample::Device(prev)) = &tracked.previous {
                let diff = (&sample - prev)?;
                sums.push(diff.sqr()?.sum_all()?);
                ratios.push(element_ratios(&diff, &sample)?);
            }
            samples.push(Sample::Device(sample));
        }
        let mut all_extras = extras.to_vec();
        all_extras.extend(sums);
        let wanted = Wanted {
            tensors: present,
            others: weights,
            ratios: &ratios,
            extras: &all_extras,
        };
        let mut observation = stats::observe(wanted, Path::Composed)?;
        let mut sums = observation.extras.split_off(extras.len()).into_iter();
        let mut histograms = std::mem::take(&mut observation.ratio_histograms).into_iter();
        let updates = self
            .tracked
            .iter()
            .map(|t| match t.previous {
                Some(Sample::Device(_)) => sums.next().zip(histograms.next()),
                _ => None,
            })
            .collect();
        Ok((observation, samples, updates))
    }

    /// Per-parameter and per-layer statistics from what was read.
    fn assemble(
        &mut self,
        step: u64,
        named: &grad_core::NamedGrads,
        observation: Observation,
        samples: Vec<Sample>,
        updates: Vec<Update>,
    ) -> Result<StepRecord> {
        let weight_norms = observation.norms;
        let mut grad_moments = observation.moments.into_iter();
        let mut grad_histograms = observation.histograms.into_iter();
        let layers = &self.layers;
        let mut layer_stats: Vec<LayerStats> = layers
            .iter()
            .enumerate()
            .map(|(depth, name)| LayerStats {
                name: name.clone(),
                depth,
                has_grad: false,
                grad_norm: 0.0,
                grad_max_abs: 0.0,
                weight_norm: 0.0,
                update_ratio: None,
                non_finite: 0,
                grad_histogram: Histogram::default(),
                update_histogram: None,
            })
            .collect();
        let mut layer_update: Vec<Option<(f64, Histogram)>> =
            vec![Some((0.0, Histogram::default())); layers.len()];
        let mut global_sq = 0.0f64;
        let mut records = Vec::with_capacity(named.len());
        let rows = named
            .iter()
            .zip(self.tracked.iter_mut())
            .zip(weight_norms)
            .zip(samples.into_iter().zip(updates));
        for (((entry, tracked), weight_norm), (sample, update)) in rows {
            let w = entry.var().as_tensor();
            let has_grad = entry.grad().is_some();
            let (g, histogram) = if has_grad {
                (
                    grad_moments.next().unwrap_or_default(),
                    grad_histograms.next().unwrap_or_default(),
                )
            } else {
                (stats::Moments::default(), Histogram::default())
            };
            // The update's squared norm, estimated from the sampled elements.
            let sampled = tracked.positions.len().max(1) as f64;
            let update_sq = update
                .as_ref()
                .map(|(d, _)| d * w.elem_count() as f64 / sampled);
            let stats = ParamStats {
                name: entry.name().to_owned(),
                layer: layers[tracked.layer].clone(),
                numel: w.elem_count(),
                has_grad,
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
            let l = &mut layer_stats[tracked.layer];
            l.has_grad |= has_grad;
            l.grad_norm += stats.grad_norm * stats.grad_norm;
            l.grad_max_abs = l.grad_max_abs.max(stats.grad_max_abs);
            l.weight_norm += stats.weight_norm * stats.weight_norm;
            l.non_finite += stats.nan_count + stats.inf_count;
            if stats.grad_max_abs.is_nan() {
                l.grad_max_abs = f64::NAN;
            }
            l.grad_histogram.merge(&histogram);
            let slot = &mut layer_update[tracked.layer];
            *slot = match (slot.take(), update_sq, update) {
                (Some((sum, mut h)), Some(u), Some((_, uh))) if !u.is_nan() => {
                    h.merge(&uh);
                    Some((sum + u, h))
                }
                _ => None,
            };
            global_sq += stats.grad_norm * stats.grad_norm;
            tracked.previous = Some(sample);
            records.push(stats);
        }
        for (l, u) in layer_stats.iter_mut().zip(layer_update) {
            l.grad_norm = l.grad_norm.sqrt();
            l.weight_norm = l.weight_norm.sqrt();
            if let Some((sum, h)) = u {
                l.update_ratio = Some(ratio(sum.sqrt(), l.weight_norm));
                l.update_histogram = Some(h);
            }
        }
        Ok(StepRecord {
            step,
            loss: None,
            learning_rate: None,
            clip: None,
            global_grad_norm: global_sq.sqrt(),
            clip_threshold: self.clip_threshold,
            params: records,
            layers: layer_stats,
            probes: self.probes.iter().map(Probe::stats).collect(),
            noise: None,
        })
    }

    /// Adds what a clipping optimizer did to the last record (when the loop ran the optimizer
    /// itself, after [`observe`](Self::observe)); [`backward_step`](Self::backward_step) does
    /// this on its own.
    pub fn annotate(&mut self, outcome: grad_core::step::StepOutcome) {
        if let Some(last) = self.history.back_mut() {
            last.clip = Some(outcome.into());
        }
    }

    /// `loss.backward()`, [`observe_with`](Self::observe_with) at `step` with the loss and the
    /// optimizer's learning rate, then `optimizer.step` — in place of candle's
    /// `optimizer.backward_step(&loss)`, so a training loop gains the monitor by changing one
    /// line. When the optimizer is a `grad_regularize::Clipped`, the record also says whether
    /// the step was clipped or skipped and the norm before clipping ([`grad_core::step`]).
    ///
    /// # Errors
    /// candle's backward or optimizer errors, and [`observe_with`](Self::observe_with)'s.
    ///
    /// ```
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use candle_nn::{Optimizer, SGD, VarBuilder, VarMap};
    /// use gradkit::diagnostics::GradMonitor;
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// let layer = candle_nn::linear(4, 1, vb.pp("fc"))?;
    /// let mut sgd = SGD::new(varmap.all_vars(), 0.1)?;
    /// let mut monitor = GradMonitor::from_var_map(&varmap)?;
    /// let loss = layer.forward(&Tensor::ones((8, 4), DType::F32, &Device::Cpu)?)?.sqr()?.mean_all()?;
    /// monitor.backward_step(0, &loss, &mut sgd)?;
    /// assert_eq!(monitor.history().len(), 1);
    /// assert_eq!(monitor.last().unwrap().learning_rate, Some(0.1));
    /// # Ok::<(), gradkit::diagnostics::Error>(())
    /// ```
    pub fn backward_step<O: Optimizer>(
        &mut self,
        step: u64,
        loss: &Tensor,
        optimizer: &mut O,
    ) -> Result<Option<&StepRecord>> {
        let grads = loss.backward()?;
        // Observed before the step: a clipping optimizer scales the gradients in place, and the
        // monitor reports them as the loss produced them.
        let observed = self.should_observe(step);
        if observed {
            let context = StepContext {
                loss: Some(loss),
                learning_rate: Some(optimizer.learning_rate()),
                noise: None,
            };
            self.observe_with(step, &grads, context)?;
        }
        grad_core::step::take();
        optimizer.step(&grads)?;
        if let Some(outcome) = grad_core::step::take()
            && observed
        {
            self.annotate(outcome);
        }
        Ok(if observed { self.history.back() } else { None })
    }

    /// The gradient noise of one step from the gradient stores of its `k ≥ 2` micro-batches
    /// of `micro_batch_size` samples each (gradient accumulation; no per-sample gradients).
    /// Pass the record to [`observe_with`](Self::observe_with) in [`StepContext::noise`] to
    /// keep it, plot it and let the detectors read it. Reads every micro-batch gradient once
    /// and writes nothing (fused on the CPU; candle reductions read back as one tensor
    /// elsewhere). Holding `k` stores costs `k` times the gradients' memory.
    ///
    /// # Errors
    /// Fewer than 2 stores, a `micro_batch_size` of 0, and a monitored parameter whose
    /// gradient is missing from some stores only, or differs from its variable in shape or
    /// dtype: the crate's [`Error`], naming the parameter and the micro-batch.
    ///
    /// ```
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use candle_nn::{Optimizer, SGD, VarBuilder, VarMap};
    /// use gradkit::diagnostics::{GradMonitor, StepContext};
    ///
    /// let map = VarMap::new();
    /// let fc = candle_nn::linear(8, 1, VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu))?;
    /// let mut sgd = SGD::new(map.all_vars(), 0.01)?;
    /// let mut monitor = GradMonitor::from_var_map(&map)?;
    /// let (x, y) = (Tensor::randn(0f32, 1.0, (64, 8), &Device::Cpu)?, Tensor::randn(0f32, 1.0, (64, 1), &Device::Cpu)?);
    /// let stores = (0..4)
    ///     .map(|i| {
    ///         let (xb, yb) = (x.narrow(0, 16 * i, 16)?, y.narrow(0, 16 * i, 16)?);
    ///         (fc.forward(&xb)? - yb)?.sqr()?.mean_all()?.backward()
    ///     })
    ///     .collect::<candle_core::Result<Vec<_>>>()?;
    /// let noise = monitor.gradient_noise(&stores, 16)?;
    /// println!("B_simple = {:.1} against a batch of 64", noise.simple_noise_scale);
    /// let grads = monitor.mean_gradients(&stores)?; // the step's gradient over all 64 rows
    /// monitor.observe_with(0, &grads, StepContext { noise: Some(&noise), ..Default::default() })?;
    /// sgd.step(&grads)?;
    /// assert_eq!(monitor.last().unwrap().noise.as_ref(), Some(&noise));
    /// # Ok::<(), gradkit::diagnostics::Error>(())
    /// ```
    pub fn gradient_noise(
        &self,
        stores: &[GradStore],
        micro_batch_size: usize,
    ) -> Result<NoiseRecord> {
        if micro_batch_size == 0 {
            return Err(Error::Core(grad_core::Error::InvalidHyperParameter {
                name: "micro_batch_size",
                value: 0.0,
                allowed: "at least 1",
            }));
        }
        let sums = crate::noise::sums(&self.micro_batch_gradients(stores)?)?;
        let layer_of: Vec<usize> = self.tracked.iter().map(|t| t.layer).collect();
        Ok(crate::noise::record(
            &sums,
            &layer_of,
            &self.layers,
            stores.len(),
            micro_batch_size,
        ))
    }

    /// The mean of the monitored parameters' gradients over the micro-batch stores, as one
    /// store for the optimizer's step and [`observe_with`](Self::observe_with): the gradient
    /// one backward over all the micro-batches' samples would give (for a loss that is a mean
    /// over samples). See [`gradient_noise`](Self::gradient_noise) for an example.
    ///
    /// # Errors
    /// As [`gradient_noise`](Self::gradient_noise), but for the micro-batch size.
    pub fn mean_gradients(&self, stores: &[GradStore]) -> Result<GradStore> {
        crate::noise::mean(&self.micro_batch_gradients(stores)?, self.params.vars())
    }

    fn micro_batch_gradients(&self, stores: &[GradStore]) -> Result<crate::noise::Gathered> {
        let names: Vec<&str> = self.params.names().collect();
        crate::noise::gather(&names, self.params.vars(), stores)
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

    /// The buffers of the `VarMap` the monitor was built from ([`from_var_map`](Self::from_var_map)):
    /// never monitored as parameters.
    pub fn buffers(&self) -> &[String] {
        &self.buffers
    }

    /// What the detectors found over the whole run so far (not only the kept history).
    pub fn findings(&self) -> Vec<Finding> {
        self.detectors.findings()
    }

    /// A report of the run: per-layer summary of the kept history, the findings over the whole
    /// run, the buffers and any warning about the layer order.
    pub fn report(&self) -> RunReport {
        let mut report = RunReport::from_parts(self.history.iter(), self.findings());
        report.buffers = self.buffers.clone();
        report.warnings = self.warnings.clone();
        report
    }

    /// The configuration.
    pub fn config(&self) -> &MonitorConfig {
        &self.config
    }
}

/// `loss` as a rank-0 tensor, checked to be a one-element float tensor.
fn scalar_loss(op: &'static str, loss: &Tensor) -> Result<Tensor> {
    grad_core::validate::ensure_float(op, "loss", loss.dtype())?;
    if loss.elem_count() != 1 {
        return Err(Error::Core(grad_core::Error::shape_mismatch(
            op,
            "loss",
            "a scalar (one element)",
            loss.dims(),
        )));
    }
    Ok(loss.flatten_all()?.reshape(())?)
}

/// A parameter's update since the last observation: the sampled squared difference and the
/// element-wise update-ratio histogram (`None` at the first observation).
type Update = Option<(f64, Histogram)>;

/// One element's update ratio `|d| / |w|`: 0 when it did not move, infinite when it moved
/// away from an exact zero.
fn element_ratio(d: f64, w: f64) -> f64 {
    if d == 0.0 { 0.0 } else { d.abs() / w.abs() }
}

/// [`element_ratio`] of tensors, on their device.
fn element_ratios(diff: &Tensor, w: &Tensor) -> Result<Tensor> {
    let r = diff.abs()?.div(&w.abs()?)?;
    Ok(diff.eq(0.0)?.where_cond(&diff.zeros_like()?, &r)?)
}

/// `a / b`, with 0/0 = 0 (an untouched zero parameter did not move).
fn ratio(a: f64, b: f64) -> f64 {
    if a == 0.0 { 0.0 } else { a / b }
}
