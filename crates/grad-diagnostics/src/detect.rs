//! Detectors: which failure the network has, where, and what to do about it.
//!
//! [`Detectors`] reads observations one at a time, in order, and keeps a small running state per
//! detector (never the history), so a verdict covers the whole run however long it is and a
//! bounded monitor history does not forget an early failure. Each [`Finding`] names the layers
//! involved, when the condition first held and last held, its peak value, the evidence and a
//! remedy in terms of gradkit's API. [`detect`] runs them over a slice of records. Every
//! threshold is a field of [`DetectorConfig`] (serde-serialisable); the defaults and where they
//! come from:
//!
//! - **No gradient**: a parameter absent from the `GradStore` (not an all-zero gradient: a graph
//!   cut by a fast path without a backward, such as candle-nn's fused `LayerNorm`, `RmsNorm` and
//!   `softmax_last_dim`; a `detach`; an unused parameter). Critical; such layers are left out
//!   of the vanishing test, whose zeros they would otherwise fake.
//!
//! - **Vanishing** (Hochreiter 1991; Glorot & Bengio 2010): a layer's gradient norm below
//!   `vanishing_norm` = 1e-7 (about where f32 training of typical layer sizes stops moving
//!   weights), or the first layer's gradient norm below `vanishing_ratio` = 1e-4 times the
//!   last's (among the layers that have a gradient), for `patience` = 3 consecutive
//!   observations.
//! - **Exploding** (Pascanu, Mikolov & Bengio 2013): the global norm above `exploding_norm` = 1e6,
//!   or grown `growth_factor` = 10x over both the (lower) median of the up to `growth_window` = 5
//!   previous finite observations and the run's median (a spike out of a quiet patch to a few
//!   times the usual level, common late in training with small batches, is not an explosion).
//! - **Non-finite**: any NaN/Inf gradient, named by the first step it appeared and the first
//!   parameter in network order that carried it.
//! - **Dead units** (Maas et al. 2013; Lu et al. 2019): a probed ReLU layer with more than
//!   `dead_fraction` = 0.95 of its units not positive once over the probe's window.
//! - **Saturation** (Glorot & Bengio 2010): a probed sigmoid/tanh layer with more than
//!   `saturation_fraction` = 0.5 of its outputs saturated.
//! - **Update ratio** (Karpathy's rule of thumb, CS231n: about 1e-3): a layer whose median
//!   update-to-weight ratio over the last `patience` observations lies outside
//!   `update_ratio_band` = [1e-5, 1e-1], two decades either side, `patience` times in a row.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::noise::NoiseFindings;
use crate::record::{ProbeKind, StepRecord};
use crate::{Remedy, Result};

/// What an explosion calls for.
const EXPLODING: &[Remedy] = &[
    Remedy::ClipGlobalNorm,
    Remedy::LowerLearningRate,
    Remedy::BatchNorm,
    Remedy::LayerNorm,
];

/// What vanishing gradients call for.
pub(crate) const VANISHING: &[Remedy] = &[
    Remedy::BatchNorm,
    Remedy::LeakyReluWithKaiming,
    Remedy::Lsuv,
];

/// What a signal growing with depth at initialisation calls for: an initialisation of the
/// right scale, or normalisation that resets it.
pub(crate) const EXPLODING_AT_INIT: &[Remedy] =
    &[Remedy::Lsuv, Remedy::XavierWithGain, Remedy::BatchNorm];

/// What dead ReLU units call for.
pub(crate) const DEAD_UNITS: &[Remedy] = &[
    Remedy::LeakyReluWithKaiming,
    Remedy::Prelu,
    Remedy::LowerLearningRate,
    Remedy::Reinit,
];

/// What saturated sigmoid/tanh units call for.
pub(crate) const SATURATION: &[Remedy] =
    &[Remedy::BatchNorm, Remedy::LayerNorm, Remedy::XavierWithGain];

/// Detector thresholds; the defaults are documented in the module.
///
/// Read with serde, missing fields take their defaults and an unknown field is an error, so a
/// JSON file can set only the thresholds it changes (`{"patience": 5}`); [`validate`](Self::validate)
/// (which [`GradMonitor::new`](crate::GradMonitor::new) runs) checks the values.
///
/// ```
/// use gradkit::diagnostics::DetectorConfig;
/// let cfg: DetectorConfig = serde_json::from_str(r#"{"patience": 5}"#)?;
/// assert_eq!(cfg.patience, 5);
/// assert_eq!(cfg.growth_window, DetectorConfig::default().growth_window);
/// assert!(serde_json::from_str::<DetectorConfig>(r#"{"patiense": 5}"#).is_err());
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectorConfig {
    /// Absolute gradient-norm floor of a layer. Default: 1e-7.
    pub vanishing_norm: f64,
    /// First-to-last layer gradient-norm ratio floor. Default: 1e-4.
    pub vanishing_ratio: f64,
    /// Consecutive observations a vanishing or update-ratio condition must hold. Default: 3.
    pub patience: usize,
    /// Global gradient-norm ceiling. Default: 1e6.
    pub exploding_norm: f64,
    /// Growth of the global norm that counts as exploding, over the recent window and over the
    /// run's median. Default: 10.
    pub growth_factor: f64,
    /// Previous observations whose median the growth is measured against. Default: 5.
    pub growth_window: usize,
    /// Fraction of a ReLU layer's units dead over the window that is flagged. Default: 0.95.
    pub dead_fraction: f64,
    /// Fraction of a sigmoid/tanh layer's outputs saturated that is flagged. Default: 0.5.
    pub saturation_fraction: f64,
    /// Healthy range of a layer's update-to-weight ratio. Default: `[1e-5, 1e-1]`.
    pub update_ratio_band: [f64; 2],
    /// How far the run's simple noise scale (the mean `tr(Σ)` over the mean `|G|²`, after at
    /// least `patience` noise observations) must exceed the batch size (`k·b`) to be flagged;
    /// above 1. Default: 10.
    pub noise_scale_ratio: f64,
    /// The gradient signal-to-noise ratio below which a layer is flagged when most of at least
    /// `patience` noise observations fall below it; positive. Default: 0.1.
    pub low_snr: f64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            vanishing_norm: 1e-7,
            vanishing_ratio: 1e-4,
            patience: 3,
            exploding_norm: 1e6,
            growth_factor: 10.0,
            growth_window: 5,
            dead_fraction: 0.95,
            saturation_fraction: 0.5,
            update_ratio_band: [1e-5, 1e-1],
            noise_scale_ratio: 10.0,
            low_snr: 0.1,
        }
    }
}

impl DetectorConfig {
    /// Checks that thresholds are positive and ordered.
    ///
    /// # Errors
    /// [`Error::Core`](crate::Error::Core) naming the field.
    pub fn validate(&self) -> Result<()> {
        use grad_core::validate::{at_least_one, greater_than_one, positive, unit_interval};
        positive("vanishing_norm", self.vanishing_norm)?;
        positive("vanishing_ratio", self.vanishing_ratio)?;
        at_least_one("patience", self.patience)?;
        positive("exploding_norm", self.exploding_norm)?;
        greater_than_one("growth_factor", self.growth_factor)?;
        at_least_one("growth_window", self.growth_window)?;
        unit_interval("dead_fraction", self.dead_fraction)?;
        unit_interval("saturation_fraction", self.saturation_fraction)?;
        let [lo, hi] = self.update_ratio_band;
        positive("update_ratio_band", lo)?;
        grad_core::validate::finite_ordered(("update_ratio_band", lo), ("update_ratio_band", hi))?;
        greater_than_one("noise_scale_ratio", self.noise_scale_ratio)?;
        positive("low_snr", self.low_snr)?;
        Ok(())
    }
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Severity {
    /// Worth a look.
    Info,
    /// Training is likely impaired.
    Warning,
    /// Training is broken.
    Critical,
}

/// Which failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FindingKind {
    /// Parameters that receive no gradient at all.
    NoGradient,
    /// Gradients too small to move the early layers.
    Vanishing,
    /// Gradients too large or growing fast.
    Exploding,
    /// NaN or infinite gradients.
    NonFinite,
    /// ReLU units that never activate.
    DeadUnits,
    /// Sigmoid/tanh units pinned at their bounds.
    Saturation,
    /// Updates far too small or too large for the weights.
    UpdateRatio,
    /// The loss's top Hessian eigenvalue is above the learning rate's limit `2 / lr`
    /// ([`sharpness`](crate::sharpness)).
    CurvatureLimit,
    /// The batch is far below the simple noise scale: larger batches would help.
    NoiseScale,
    /// Layers whose gradient signal-to-noise ratio stays far below 1.
    LowSignalToNoise,
}

/// A detector's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// Which failure.
    pub kind: FindingKind,
    /// How bad.
    pub severity: Severity,
    /// The layers (or probes, or parameters) involved, in network order.
    pub layers: Vec<String>,
    /// The evidence, in words with the numbers.
    pub evidence: String,
    /// The first and last observed steps at which the condition held.
    pub steps: [u64; 2],
    /// The condition's extreme value over those steps (the largest norm, the smallest ratio,
    /// the largest fraction), where one applies.
    #[serde(default, with = "crate::record::float::opt")]
    pub peak: Option<f64>,
    /// What to do, in order of preference.
    #[serde(default)]
    pub remedies: Vec<Remedy>,
    /// The remedies in words, with the gradkit items that do them
    /// ([`Remedy::render_all`]).
    pub remedy: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{:?}] {:?} in {} (steps {}-{}): {}. Remedy: {}",
            self.severity,
            self.kind,
            if self.layers.is_empty() {
                "the whole model".to_owned()
            } else {
                self.layers.join(", ")
            },
            self.steps[0],
            self.steps[1],
            self.evidence,
            self.remedy
        )
    }
}

/// Runs every detector over `records` (oldest first).
///
/// ```
/// use gradkit::diagnostics::{DetectorConfig, detect};
/// assert!(detect(&[], &DetectorConfig::default()).is_empty());
/// ```
pub fn detect<'a>(
    records: impl IntoIterator<Item = &'a StepRecord>,
    config: &DetectorConfig,
) -> Vec<Finding> {
    let mut d = Detectors::new(config.clone());
    for r in records {
        d.observe(r);
    }
    d.findings()
}

/// The detectors' running state: fed each observation once, in order.
#[derive(Debug, Clone)]
pub struct Detectors {
    config: DetectorConfig,
    last_step: Option<u64>,
    no_gradient: NoGradient,
    non_finite: Option<NonFinite>,
    exploding: Exploding,
    vanishing: Vanishing,
    probes: Vec<ProbeEpisode>,
    ratios: UpdateRatios,
    noise: NoiseFindings,
}

impl Detectors {
    /// Fresh state for `config`.
    pub fn new(config: DetectorConfig) -> Self {
        Self {
            config,
            last_step: None,
            no_gradient: NoGradient::default(),
            non_finite: None,
            exploding: Exploding::default(),
            vanishing: Vanishing::default(),
            probes: Vec::new(),
            ratios: UpdateRatios::default(),
            noise: NoiseFindings::default(),
        }
    }

    /// Takes one observation (the next step).
    pub fn observe(&mut self, r: &StepRecord) {
        self.last_step = Some(r.step);
        self.no_gradient.observe(r);
        if self.non_finite.is_none() {
            self.non_finite = r.first_non_finite().map(|p| NonFinite {
                step: r.step,
                param: p.name.clone(),
                nan: p.nan_count,
                inf: p.inf_count,
                last: r.step,
                observations: 0,
            });
        }
        if let Some(nf) = self.non_finite.as_mut()
            && r.first_non_finite().is_some()
        {
            nf.last = r.step;
            nf.observations += 1;
        }
        self.exploding.observe(r, &self.config);
        self.vanishing.observe(r, &self.config);
        for p in &r.probes {
            let held = match (p.kind, p.dead_fraction, p.saturated_fraction) {
                (ProbeKind::Relu, Some(dead), _) if dead > self.config.dead_fraction => {
                    Some((FindingKind::DeadUnits, dead))
                }
                (ProbeKind::Tanh | ProbeKind::Sigmoid, _, Some(sat))
                    if sat > self.config.saturation_fraction =>
                {
                    Some((FindingKind::Saturation, sat))
                }
                _ => None,
            };
            let Some((kind, value)) = held else { continue };
            match self
                .probes
                .iter_mut()
                .find(|e| e.name == p.name && e.kind == kind)
            {
                Some(e) => {
                    e.last = r.step;
                    if value > e.peak {
                        e.peak = value;
                        e.detail = probe_detail(p);
                    }
                }
                None => self.probes.push(ProbeEpisode {
                    name: p.name.clone(),
                    kind,
                    first: r.step,
                    last: r.step,
                    peak: value,
                    detail: probe_detail(p),
                }),
            }
        }
        self.ratios.observe(r, &self.config);
        if let Some(noise) = &r.noise {
            self.noise.observe(r.step, noise, &self.config);
        }
    }

    /// What the detectors found so far.
    pub fn findings(&self) -> Vec<Finding> {
        let mut out = Vec::new();
        let Some(last) = self.last_step else {
            return out;
        };
        self.no_gradient.finding(last, &mut out);
        if let Some(nf) = &self.non_finite {
            out.push(Finding {
                kind: FindingKind::NonFinite,
                severity: Severity::Critical,
                layers: vec![nf.param.clone()],
                evidence: format!(
                    "first at step {}: {} NaN and {} infinite gradient elements in {} (the first parameter in network order with any); non-finite gradients in {} observation(s), the last at step {}",
                    nf.step, nf.nan, nf.inf, nf.param, nf.observations, nf.last
                ),
                steps: [nf.step, nf.last],
                peak: None,
                remedies: vec![Remedy::SkipNonFinite, Remedy::LossScaling],
                remedy: Remedy::render_all(&[Remedy::SkipNonFinite, Remedy::LossScaling]),
            });
        }
        self.exploding.finding(&mut out);
        self.vanishing.finding(&self.config, &mut out);
        for e in &self.probes {
            let (evidence, remedy) = match e.kind {
                FindingKind::DeadUnits => (
                    format!(
                        "up to {:.1}% of the units not positive once over the probe's window ({})",
                        e.peak * 100.0,
                        e.detail
                    ),
                    DEAD_UNITS,
                ),
                _ => (
                    format!(
                        "up to {:.1}% of the outputs saturated ({})",
                        e.peak * 100.0,
                        e.detail
                    ),
                    SATURATION,
                ),
            };
            out.push(Finding {
                kind: e.kind,
                severity: Severity::Warning,
                layers: vec![e.name.clone()],
                evidence,
                steps: [e.first, e.last],
                peak: Some(e.peak),
                remedies: remedy.to_vec(),
                remedy: Remedy::render_all(remedy),
            });
        }
        self.ratios.finding(&self.config, &mut out);
        self.noise.finding(&self.config, &mut out);
        out
    }

    /// The configuration.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }
}

fn probe_detail(p: &crate::record::ProbeStats) -> String {
    format!(
        "{} units, mean {:.3}, std {:.3}, {} forwards",
        p.units, p.mean, p.std, p.forwards
    )
}

/// Parameters without a gradient at the latest observation, with the step their absence began.
#[derive(Debug, Clone, Default)]
struct NoGradient {
    /// `(name, first step of the current absence)`, in network order.
    missing: Vec<(String, u64)>,
}

impl NoGradient {
    fn observe(&mut self, r: &StepRecord) {
        let previous = std::mem::take(&mut self.missing);
        self.missing = r
            .params
            .iter()
            .filter(|p| !p.has_grad)
            .map(|p| {
                let since = previous
                    .iter()
                    .find(|(n, _)| *n == p.name)
                    .map_or(r.step, |(_, s)| *s);
                (p.name.clone(), since)
            })
            .collect();
    }

    fn finding(&self, last: u64, out: &mut Vec<Finding>) {
        let Some(since) = self.missing.iter().map(|(_, s)| *s).min() else {
            return;
        };
        out.push(Finding {
            kind: FindingKind::NoGradient,
            severity: Severity::Critical,
            layers: self.missing.iter().map(|(n, _)| n.clone()).collect(),
            evidence: format!(
                "{} parameter(s) received no gradient at all (absent from the GradStore, not zero) since step {since}: the graph does not reach them",
                self.missing.len()
            ),
            steps: [since, last],
            peak: None,
            remedies: vec![Remedy::GradientKeepingOps],
            remedy: Remedy::GradientKeepingOps.render(),
        });
    }
}

#[derive(Debug, Clone)]
struct NonFinite {
    step: u64,
    param: String,
    nan: u64,
    inf: u64,
    last: u64,
    observations: u64,
}

/// The lower median (of an even count, the smaller middle value).
fn lower_median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[(v.len() - 1) / 2]
    }
}

/// A bounded, evenly thinned sample of a series: keeps every `stride`-th value and doubles the
/// stride (dropping every other kept value) when full.
#[derive(Debug, Clone, Default)]
struct Thinned {
    values: Vec<f64>,
    stride: u64,
    seen: u64,
}

impl Thinned {
    const CAPACITY: usize = 2048;

    fn push(&mut self, v: f64) {
        let stride = self.stride.max(1);
        if self.seen.is_multiple_of(stride) {
            self.values.push(v);
            if self.values.len() == Self::CAPACITY {
                self.values = self.values.iter().step_by(2).copied().collect();
                self.stride = stride * 2;
            }
        }
        self.seen += 1;
    }

    fn median(&self) -> f64 {
        lower_median(&mut self.values.clone())
    }
}

/// Explosions: the first step one held, the peak, the layers carrying it.
#[derive(Debug, Clone, Default)]
struct Exploding {
    /// The last `growth_window` finite global norms.
    window: VecDeque<f64>,
    /// The run's finite global norms, thinned.
    run: Thinned,
    first: Option<u64>,
    last: u64,
    severity: Option<Severity>,
    /// `(norm, step, baseline, the three largest layers in network order)` at the peak.
    peak: Option<(f64, u64, f64, Vec<String>)>,
}

impl Exploding {
    fn observe(&mut self, r: &StepRecord, c: &DetectorConfig) {
        let v = r.global_grad_norm;
        if !v.is_finite() {
            return;
        }
        let baseline = lower_median(
            &mut self
                .window
                .iter()
                .copied()
                .filter(|x| *x > 0.0)
                .collect::<Vec<_>>(),
        );
        self.run.push(v);
        let grew = baseline.is_finite() && v > c.growth_factor * baseline;
        // The run's median (a sort of the thinned sample) only for a candidate: a spike out of
        // a quiet patch back to a few times the usual level is not an explosion.
        let severity = if v > c.exploding_norm {
            Some(Severity::Critical)
        } else if grew && v > c.growth_factor * self.run.median() {
            Some(Severity::Warning)
        } else {
            None
        };
        self.window.push_back(v);
        if self.window.len() > c.growth_window {
            self.window.pop_front();
        }
        let Some(severity) = severity else { return };
        self.first.get_or_insert(r.step);
        self.last = r.step;
        self.severity = self.severity.max(Some(severity));
        if self.peak.as_ref().is_none_or(|p| v > p.0) {
            let mut layers: Vec<(f64, usize, &str)> = r
                .layers
                .iter()
                .map(|l| (l.grad_norm, l.depth, l.name.as_str()))
                .collect();
            layers.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut top: Vec<(usize, String)> = layers
                .iter()
                .take(3)
                .map(|(_, d, n)| (*d, (*n).to_owned()))
                .collect();
            top.sort_by_key(|(d, _)| *d);
            let baseline = if baseline.is_finite() {
                baseline
            } else {
                self.run.median()
            };
            self.peak = Some((
                v,
                r.step,
                baseline,
                top.into_iter().map(|(_, n)| n).collect(),
            ));
        }
    }

    fn finding(&self, out: &mut Vec<Finding>) {
        let (Some(first), Some(severity), Some((peak, at, baseline, layers))) =
            (self.first, self.severity, &self.peak)
        else {
            return;
        };
        let median = self.run.median();
        out.push(Finding {
            kind: FindingKind::Exploding,
            severity,
            layers: layers.clone(),
            evidence: format!(
                "global gradient norm first exploded at step {first}; peak {peak:.3e} at step {at}, {:.1}x the median of the observations before it ({baseline:.3e}); the run's median is {median:.3e}",
                peak / baseline
            ),
            steps: [first, self.last],
            peak: Some(*peak),
            remedies: EXPLODING.to_vec(),
            remedy: Remedy::render_all(EXPLODING),
        });
    }
}

/// Vanishing gradients: streaks of `patience` observations in which early layers fall below the
/// floors.
#[derive(Debug, Clone, Default)]
struct Vanishing {
    /// Consecutive observations (so far) in which each layer, by depth, was below a floor.
    layer_streak: Vec<usize>,
    /// Consecutive observations in which the first-to-last ratio was below its floor, and the
    /// step that streak began.
    ratio_streak: (usize, u64),
    /// The first step of a streak that reached `patience`, and the last step it held.
    first: Option<u64>,
    last: u64,
    /// Layers (by depth, name) flagged in any such streak.
    layers: Vec<(usize, String)>,
    /// The smallest first-to-last ratio seen while flagged, with the norms behind it.
    worst: Option<(f64, String, f64, String, f64)>,
    /// The first step each current layer streak began.
    layer_start: Vec<u64>,
}

impl Vanishing {
    fn observe(&mut self, r: &StepRecord, c: &DetectorConfig) {
        // Only layers that received a gradient: an absent one is NoGradient's, not vanishing.
        let live: Vec<&crate::record::LayerStats> =
            r.layers.iter().filter(|l| l.has_grad).collect();
        let n = r.layers.len();
        self.layer_streak.resize(n, 0);
        self.layer_start.resize(n, r.step);
        let (Some(first), Some(top)) = (live.first(), live.last()) else {
            self.layer_streak.iter_mut().for_each(|s| *s = 0);
            self.ratio_streak = (0, r.step);
            return;
        };
        let mut flagged_now = Vec::new();
        for l in &r.layers {
            let d = l.depth.min(n.saturating_sub(1));
            let below = l.has_grad
                && (l.grad_norm < c.vanishing_norm
                    || (l.depth < top.depth && l.grad_norm < c.vanishing_ratio * top.grad_norm));
            if below {
                if self.layer_streak[d] == 0 {
                    self.layer_start[d] = r.step;
                }
                self.layer_streak[d] += 1;
                if self.layer_streak[d] >= c.patience {
                    flagged_now.push((d, l.name.clone(), self.layer_start[d]));
                }
            } else {
                self.layer_streak[d] = 0;
            }
        }
        let ratio = first.grad_norm / top.grad_norm;
        let ratio_holds = live.len() > 1 && top.grad_norm > 0.0 && ratio < c.vanishing_ratio;
        if ratio_holds {
            if self.ratio_streak.0 == 0 {
                self.ratio_streak.1 = r.step;
            }
            self.ratio_streak.0 += 1;
        } else {
            self.ratio_streak.0 = 0;
        }
        let ratio_flagged = self.ratio_streak.0 >= c.patience;
        if flagged_now.is_empty() && !ratio_flagged {
            return;
        }
        let start = flagged_now
            .iter()
            .map(|(_, _, s)| *s)
            .chain(ratio_flagged.then_some(self.ratio_streak.1))
            .min()
            .unwrap_or(r.step);
        self.first = Some(self.first.map_or(start, |f| f.min(start)));
        self.last = r.step;
        if flagged_now.is_empty() {
            flagged_now.push((first.depth, first.name.clone(), start));
        }
        for (d, name, _) in flagged_now {
            if !self.layers.iter().any(|(_, n)| *n == name) {
                self.layers.push((d, name));
            }
        }
        self.layers.sort_by_key(|(d, _)| *d);
        if ratio.is_finite() && self.worst.as_ref().is_none_or(|w| ratio < w.0) {
            self.worst = Some((
                ratio,
                first.name.clone(),
                first.grad_norm,
                top.name.clone(),
                top.grad_norm,
            ));
        }
    }

    fn finding(&self, c: &DetectorConfig, out: &mut Vec<Finding>) {
        let Some(first) = self.first else { return };
        let layers: Vec<String> = self.layers.iter().map(|(_, n)| n.clone()).collect();
        let evidence = match &self.worst {
            Some((ratio, low, low_norm, high, high_norm)) => format!(
                "gradient norm of {low} down to {low_norm:.3e}, {ratio:.1e} times that of {high} ({high_norm:.3e}); {} layer(s) below {:.0e} of the last or {:.0e} absolute for {} or more observations",
                layers.len(),
                c.vanishing_ratio,
                c.vanishing_norm,
                c.patience
            ),
            None => format!(
                "{} layer(s) below {:.0e} absolute for {} or more observations",
                layers.len(),
                c.vanishing_norm,
                c.patience
            ),
        };
        out.push(Finding {
            kind: FindingKind::Vanishing,
            severity: Severity::Warning,
            evidence,
            steps: [first, self.last],
            peak: self.worst.as_ref().map(|w| w.0),
            remedies: VANISHING.to_vec(),
            remedy: Remedy::render_all(VANISHING),
            layers,
        });
    }
}

/// Dead or saturated units behind one probe.
#[derive(Debug, Clone)]
struct ProbeEpisode {
    name: String,
    kind: FindingKind,
    first: u64,
    last: u64,
    peak: f64,
    detail: String,
}

/// Update ratios out of band: per layer, the median over the last `patience` observations,
/// out of band `patience` times in a row (a transient at the start of training is not a
/// finding).
#[derive(Debug, Clone, Default)]
struct UpdateRatios {
    /// Per layer depth, the last `patience` finite ratios.
    recent: Vec<VecDeque<f64>>,
    /// Per layer depth, how many consecutive medians were out of band (signed: too small < 0).
    streak: Vec<i64>,
    /// Per layer name: (too small?, first step, last step, extreme median).
    episodes: Vec<(String, usize, bool, u64, u64, f64)>,
}

impl UpdateRatios {
    fn observe(&mut self, r: &StepRecord, c: &DetectorConfig) {
        let [lo, hi] = c.update_ratio_band;
        self.recent.resize(r.layers.len(), VecDeque::new());
        self.streak.resize(r.layers.len(), 0);
        for (d, layer) in r.layers.iter().enumerate() {
            let window = &mut self.recent[d];
            match layer.update_ratio.filter(|v| v.is_finite()) {
                Some(v) => window.push_back(v),
                None => continue,
            }
            if window.len() > c.patience {
                window.pop_front();
            }
            if window.len() < c.patience {
                continue;
            }
            let m = lower_median(&mut window.iter().copied().collect::<Vec<_>>());
            let small = m < lo;
            let streak = &mut self.streak[d];
            *streak = match (small, m > hi) {
                (true, _) => (*streak).min(0) - 1,
                (_, true) => (*streak).max(0) + 1,
                _ => 0,
            };
            if streak.unsigned_abs() < c.patience as u64 {
                continue;
            }
            let first = r.step;
            match self
                .episodes
                .iter_mut()
                .find(|e| e.0 == layer.name && e.2 == small)
            {
                Some(e) => {
                    e.4 = r.step;
                    if (small && m < e.5) || (!small && m > e.5) {
                        e.5 = m;
                    }
                }
                None => self
                    .episodes
                    .push((layer.name.clone(), d, small, first, r.step, m)),
            }
        }
    }

    fn finding(&self, c: &DetectorConfig, out: &mut Vec<Finding>) {
        let [lo, hi] = c.update_ratio_band;
        for (small, too, remedy) in [
            (true, "small", &[Remedy::RaiseLearningRate][..]),
            (
                false,
                "large",
                &[Remedy::LowerLearningRate, Remedy::ClipGlobalNorm][..],
            ),
        ] {
            let mut list: Vec<&(String, usize, bool, u64, u64, f64)> =
                self.episodes.iter().filter(|e| e.2 == small).collect();
            if list.is_empty() {
                continue;
            }
            list.sort_by_key(|e| e.1);
            let first = list.iter().map(|e| e.3).min().unwrap_or(0);
            let last = list.iter().map(|e| e.4).max().unwrap_or(0);
            let extreme =
                list.iter()
                    .map(|e| e.5)
                    .fold(if small { f64::INFINITY } else { 0.0 }, |a, b| {
                        if small { a.min(b) } else { a.max(b) }
                    });
            out.push(Finding {
                kind: FindingKind::UpdateRatio,
                severity: Severity::Info,
                evidence: format!(
                    "median update-to-weight ratio over {} observations too {too} (outside [{lo:.0e}, {hi:.0e}]): {}",
                    c.patience,
                    list.iter()
                        .map(|e| format!("{} {:.1e}", e.0, e.5))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                layers: list.iter().map(|e| e.0.clone()).collect(),
                steps: [first, last],
                peak: Some(extreme),
                remedies: remedy.to_vec(),
                remedy: Remedy::render_all(remedy),
            });
        }
    }
}
