//! Preflight: what the network's profile at initialisation predicts, before the first optimizer
//! step.
//!
//! One forward and backward on a real batch at initialisation already shows how the signal
//! travels through the depth (Glorot & Bengio 2010; Schoenholz et al. 2017, "Deep Information
//! Propagation"): when each layer scales the backward signal by a factor `χ` away from 1, the
//! first layer's gradient is about `χ^depth` of the last's, and when it scales the forward
//! signal, the activations' variance drifts the same way. A ratio of first-to-last gradient
//! norm of 1e-6 at step 0 says the early layers will not learn; no amount of training fixes an
//! initialisation whose gradient never reaches them. [`Preflight`] reads that profile from one
//! [`StepRecord`] (per layer the gradient norm, per [`Probe`](crate::Probe) the activation mean,
//! standard deviation, inactive and saturated fractions) and names the failure, the layers and
//! the remedy:
//!
//! - **vanishing** when the first layer's gradient norm is below `1 / gradient_ratio` of the
//!   last's, or the activations' variance falls by more than `variance_drift` from the first
//!   probe to the last; **exploding** the other way round;
//! - **dead units** when a ReLU probe's units are not positive on any sample of the batch,
//!   **saturation** when a sigmoid/tanh probe's outputs sit at their bounds;
//! - parameters without a gradient and non-finite gradients, as the run's detectors name them.
//!
//! [`GradMonitor::preflight`](crate::GradMonitor::preflight) runs the forward and backward;
//! [`Preflight::from_record`] reads a record already taken (the first of a JSON Lines log:
//! `gradscope preflight run.jsonl`).

use serde::{Deserialize, Serialize};

use crate::detect::{
    DetectorConfig, EXPLODING_AT_INIT, Finding, FindingKind, SATURATION, Severity, VANISHING,
    detect,
};
use crate::record::{ProbeKind, StepRecord, float};
use crate::{Remedy, Result};

/// What units dead before any step call for (no learning rate killed them).
const DEAD_AT_INIT: &[Remedy] = &[Remedy::LeakyReluWithKaiming, Remedy::Prelu, Remedy::Reinit];

/// Preflight thresholds, validated by [`PreflightConfig::validate`] (which every preflight runs
/// first). Read with serde like [`DetectorConfig`]: missing fields take their defaults, an
/// unknown one is an error.
///
/// ```
/// use gradkit::diagnostics::PreflightConfig;
/// let cfg: PreflightConfig = serde_json::from_str(r#"{"gradient_ratio": 1000}"#)?;
/// assert_eq!(cfg.gradient_ratio, 1000.0);
/// assert_eq!(cfg.variance_drift, PreflightConfig::default().variance_drift);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreflightConfig {
    /// How far the first layer's gradient norm may fall below (vanishing) or rise above
    /// (exploding) the last layer's; above 1. Default 1000: three decades, where a shared
    /// learning rate moves the first layer's weights a thousand times slower (or faster) than
    /// the last's. Measured on the digits MLP at depths 8 to 24: a default-initialised sigmoid
    /// net loses a factor of about 4 per layer (1e-5 at depth 8); a Kaiming-initialised leaky
    /// ReLU net stays within about a decade; with batch norm the gradient grows by about 1.1
    /// per layer towards the input (Yang et al. 2019, "A Mean Field Theory of Batch
    /// Normalization"), 1e2 at depth 24, and such nets train.
    pub gradient_ratio: f64,
    /// How far the activations' variance may drift from the first probe to the last before the
    /// forward signal counts as vanishing (shrinking) or exploding (growing); above 1. Default
    /// 100 (a factor of 10 in standard deviation).
    pub variance_drift: f64,
    /// The fraction of a ReLU probe's units not positive on any sample of the batch that is
    /// flagged as dead at initialisation; in `[0, 1]`. Default 0.5: a healthy initialisation
    /// leaves next to none dead on a batch.
    pub dead_fraction: f64,
    /// The fraction of a sigmoid/tanh probe's outputs saturated at initialisation that is
    /// flagged; in `[0, 1]`. Default 0.5.
    pub saturation_fraction: f64,
}

impl Default for PreflightConfig {
    fn default() -> Self {
        Self {
            gradient_ratio: 1000.0,
            variance_drift: 100.0,
            dead_fraction: 0.5,
            saturation_fraction: 0.5,
        }
    }
}

impl PreflightConfig {
    /// Checks every threshold, naming the first one out of range.
    ///
    /// # Errors
    /// [`Error::Core`](crate::Error::Core) naming the field and its value.
    ///
    /// ```
    /// use gradkit::diagnostics::PreflightConfig;
    /// assert!(PreflightConfig::default().validate().is_ok());
    /// let bad = PreflightConfig { gradient_ratio: 0.5, ..Default::default() };
    /// assert!(bad.validate().unwrap_err().to_string().contains("gradient_ratio"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        use grad_core::validate::{greater_than_one, unit_interval};
        greater_than_one("gradient_ratio", self.gradient_ratio)?;
        greater_than_one("variance_drift", self.variance_drift)?;
        unit_interval("dead_fraction", self.dead_fraction)?;
        unit_interval("saturation_fraction", self.saturation_fraction)?;
        Ok(())
    }
}

/// Where the signal is headed at initialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Verdict {
    /// Gradient norms and activation variances stay within the thresholds across the depth.
    Healthy,
    /// The signal shrinks with depth: the early layers' gradients (or the late layers'
    /// activations) are orders of magnitude smaller.
    Vanishing,
    /// The signal grows with depth.
    Exploding,
}

/// One layer at initialisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerProfile {
    /// The layer.
    pub name: String,
    /// Its position in network order (0 = closest to the input).
    pub depth: usize,
    /// L2 norm of its parameters' gradients (`None`: no parameter of it received one).
    #[serde(with = "float::opt")]
    pub grad_norm: Option<f64>,
    /// `grad_norm` over the last layer's (`None` without a gradient, or when the last layer's
    /// is 0).
    #[serde(with = "float::opt")]
    pub relative: Option<f64>,
    /// L2 norm of its parameters.
    #[serde(with = "float")]
    pub weight_norm: f64,
}

/// One probed activation at initialisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivationProfile {
    /// The probe.
    pub name: String,
    /// What it follows.
    pub kind: ProbeKind,
    /// Units (dim 1 of the activation).
    pub units: usize,
    /// The activation's mean.
    #[serde(with = "float")]
    pub mean: f64,
    /// The activation's standard deviation.
    #[serde(with = "float")]
    pub std: f64,
    /// The variance over the first probe's (`None` when the first probe's is 0).
    #[serde(with = "float::opt")]
    pub variance_ratio: Option<f64>,
    /// The fraction of units not positive on any sample of the batch (ReLU probes).
    #[serde(with = "float::opt")]
    pub inactive_fraction: Option<f64>,
    /// The fraction of outputs saturated (sigmoid and tanh probes).
    #[serde(with = "float::opt")]
    pub saturated_fraction: Option<f64>,
    /// L2 norm of the gradient arriving at the probe in the backward pass.
    #[serde(with = "float::opt")]
    pub grad_norm: Option<f64>,
}

/// The network's profile at initialisation and what it predicts.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use gradkit::diagnostics::{GradMonitor, PreflightConfig, Verdict};
///
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let mut net = candle_nn::seq();
/// for i in 0..12 {
///     net = net.add(candle_nn::linear(16, 16, vb.pp(format!("layer.{i}")))?).add(candle_nn::Activation::Sigmoid);
/// }
/// let mut monitor = GradMonitor::from_var_map(&map)?;
/// let x = Tensor::randn(0f32, 1.0, (32, 16), &Device::Cpu)?;
/// let pre = monitor.preflight(|| net.forward(&x)?.sqr()?.mean_all(), &PreflightConfig::default())?;
/// assert_eq!(pre.verdict, Verdict::Vanishing); // twelve sigmoids with candle's default init
/// assert!(pre.findings[0].layers.contains(&"layer.0".to_owned()));
/// println!("{}", pre.report());
/// # Ok::<(), gradkit::diagnostics::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preflight {
    /// The step of the record read (0 for [`GradMonitor::preflight`](crate::GradMonitor::preflight)).
    pub step: u64,
    /// The loss at initialisation, when the record carries it.
    #[serde(with = "float::opt")]
    pub loss: Option<f64>,
    /// Per layer, in network order.
    pub layers: Vec<LayerProfile>,
    /// Per probe that saw a forward pass, in the order the probes were added (add them in
    /// network order).
    pub activations: Vec<ActivationProfile>,
    /// The first layer's gradient norm over the last's, among the layers with a gradient
    /// (`None` with fewer than two such layers or a last norm of 0).
    #[serde(with = "float::opt")]
    pub gradient_ratio: Option<f64>,
    /// The geometric mean of the gradient's growth from one layer to the next towards the
    /// input, `gradient_ratio^(1/(layers - 1))`: Schoenholz et al.'s `χ`, below 1 vanishing.
    #[serde(with = "float::opt")]
    pub per_layer_factor: Option<f64>,
    /// The last probe's activation variance over the first's (`None` with fewer than two
    /// probes or a first variance of 0).
    #[serde(with = "float::opt")]
    pub variance_drift: Option<f64>,
    /// Where the signal is headed: the gradient profile's verdict when it fires, otherwise the
    /// activations'.
    pub verdict: Verdict,
    /// What was found, each naming its layers and remedies, at [`step`](Self::step).
    pub findings: Vec<Finding>,
}

impl Preflight {
    /// The preflight of `record`, taken at initialisation (before any optimizer step).
    ///
    /// # Errors
    /// An invalid `config` ([`PreflightConfig::validate`]).
    ///
    /// ```
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use gradkit::diagnostics::{GradMonitor, Preflight, PreflightConfig, Verdict};
    /// let map = VarMap::new();
    /// let fc = candle_nn::linear(8, 8, VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu))?;
    /// let mut monitor = GradMonitor::from_var_map(&map)?;
    /// let grads = fc.forward(&Tensor::ones((4, 8), DType::F32, &Device::Cpu)?)?.sum_all()?.backward()?;
    /// let record = monitor.observe(0, &grads)?.unwrap(); // the first step's record, before the optimizer's step
    /// let pre = Preflight::from_record(record, &PreflightConfig::default())?;
    /// assert_eq!(pre.verdict, Verdict::Healthy);
    /// # Ok::<(), gradkit::diagnostics::Error>(())
    /// ```
    pub fn from_record(record: &StepRecord, config: &PreflightConfig) -> Result<Self> {
        config.validate()?;
        // The last layer with a gradient, when that gradient is not 0: the reference.
        let last = record
            .layers
            .iter()
            .rev()
            .find(|l| l.has_grad)
            .map(|l| l.grad_norm)
            .filter(|&n| n != 0.0);
        let layers: Vec<LayerProfile> = record
            .layers
            .iter()
            .map(|l| {
                let grad_norm = l.has_grad.then_some(l.grad_norm);
                LayerProfile {
                    name: l.name.clone(),
                    depth: l.depth,
                    grad_norm,
                    relative: grad_norm.zip(last).map(|(g, last)| g / last),
                    weight_norm: l.weight_norm,
                }
            })
            .collect();
        let with_grad = layers.iter().filter(|l| l.grad_norm.is_some()).count();
        let gradient_ratio = (with_grad >= 2)
            .then(|| layers.iter().find_map(|l| l.relative))
            .flatten();
        #[allow(clippy::cast_precision_loss, reason = "layer counts are small")]
        let per_layer_factor = gradient_ratio.map(|r| r.powf(1.0 / (with_grad - 1) as f64));
        let reached: Vec<_> = record.probes.iter().filter(|p| p.forwards > 0).collect();
        let first_variance = reached.first().map(|p| p.std * p.std);
        let activations: Vec<ActivationProfile> = reached
            .iter()
            .map(|p| ActivationProfile {
                name: p.name.clone(),
                kind: p.kind,
                units: p.units,
                mean: p.mean,
                std: p.std,
                variance_ratio: first_variance
                    .filter(|&v| v != 0.0)
                    .map(|v| p.std * p.std / v),
                inactive_fraction: p.inactive_fraction,
                saturated_fraction: p.saturated_fraction,
                grad_norm: p.grad_norm,
            })
            .collect();
        let variance_drift = (activations.len() >= 2)
            .then(|| activations.last().and_then(|a| a.variance_ratio))
            .flatten();
        let mut pre = Self {
            step: record.step,
            loss: record.loss,
            layers,
            activations,
            gradient_ratio,
            per_layer_factor,
            variance_drift,
            verdict: Verdict::Healthy,
            findings: Vec::new(),
        };
        pre.judge(record, config);
        Ok(pre)
    }

    /// Whether nothing was found.
    pub fn is_healthy(&self) -> bool {
        self.findings.is_empty()
    }

    /// Fills the verdict and the findings.
    fn judge(&mut self, record: &StepRecord, config: &PreflightConfig) {
        // The run detectors' verdicts that need no history: parameters without a gradient and
        // non-finite gradients.
        self.findings = detect(std::iter::once(record), &DetectorConfig::default())
            .into_iter()
            .filter(|f| matches!(f.kind, FindingKind::NoGradient | FindingKind::NonFinite))
            .collect();
        let backward = self.gradient_signal(config);
        let forward = self.activation_signal(config);
        self.verdict = match (&backward, &forward) {
            (Some(b), _) => b.verdict,
            (None, Some(f)) => f.verdict,
            (None, None) => Verdict::Healthy,
        };
        // One finding per direction: the gradient's and the activations' evidence together.
        let mut signals: Vec<Signal> = Vec::new();
        for s in backward.into_iter().chain(forward) {
            match signals.iter_mut().find(|t| t.verdict == s.verdict) {
                Some(t) => {
                    t.evidence = format!("{}; {}", t.evidence, s.evidence);
                    t.critical |= s.critical;
                    t.layers.extend(s.layers);
                }
                None => signals.push(s),
            }
        }
        for s in signals {
            let (kind, remedies) = match s.verdict {
                Verdict::Exploding => (FindingKind::Exploding, EXPLODING_AT_INIT),
                _ => (FindingKind::Vanishing, VANISHING),
            };
            self.findings.push(Finding {
                kind,
                severity: if s.critical {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                layers: s.layers,
                evidence: s.evidence,
                steps: [self.step; 2],
                peak: s.peak,
                remedies: remedies.to_vec(),
                remedy: Remedy::render_all(remedies),
            });
        }
        self.unit_findings(config);
    }

    /// The backward signal: the first layer's gradient against the last's.
    fn gradient_signal(&self, config: &PreflightConfig) -> Option<Signal> {
        let ratio = self.gradient_ratio?;
        let limit = config.gradient_ratio;
        let verdict = beyond(ratio, limit)?;
        let named: Vec<String> = self
            .layers
            .iter()
            .filter(|l| l.relative.and_then(|r| beyond(r, limit)) == Some(verdict))
            .map(|l| l.name.clone())
            .collect();
        let counted = self.layers.iter().filter(|l| l.grad_norm.is_some()).count();
        let factor = self.per_layer_factor.unwrap_or(f64::NAN);
        let bound = if verdict == Verdict::Vanishing {
            format!("less than 1/{limit}")
        } else {
            format!("more than {limit}x")
        };
        Some(Signal {
            verdict,
            critical: beyond(ratio, limit * limit).is_some(),
            evidence: format!(
                "at initialisation the first layer's gradient norm is {ratio:.2e} of the last layer's (x{factor:.3} per layer over {counted} layers); {} layer(s) get {bound} the last layer's",
                named.len(),
            ),
            layers: named,
            peak: Some(ratio),
        })
    }

    /// The forward signal: the activations' variance from the first probe to the last.
    fn activation_signal(&self, config: &PreflightConfig) -> Option<Signal> {
        let drift = self.variance_drift?;
        let limit = config.variance_drift;
        let verdict = beyond(drift, limit)?;
        let named: Vec<String> = self
            .activations
            .iter()
            .filter(|a| a.variance_ratio.and_then(|r| beyond(r, limit)) == Some(verdict))
            .map(|a| a.name.clone())
            .collect();
        let (first, last) = (
            self.activations.first().map_or(f64::NAN, |a| a.std),
            self.activations.last().map_or(f64::NAN, |a| a.std),
        );
        Some(Signal {
            verdict,
            critical: beyond(drift, limit * limit).is_some(),
            evidence: format!(
                "the activations' variance changes x{drift:.2e} from the first probe to the last (std {first:.3e} to {last:.3e})"
            ),
            layers: named,
            peak: Some(drift),
        })
    }

    /// Dead and saturated units at initialisation.
    fn unit_findings(&mut self, config: &PreflightConfig) {
        let mut found = Vec::new();
        for a in &self.activations {
            let (kind, value, what, remedies) =
                match (a.kind, a.inactive_fraction, a.saturated_fraction) {
                    (ProbeKind::Relu, Some(f), _) if f > config.dead_fraction => (
                        FindingKind::DeadUnits,
                        f,
                        "of the units not positive on any sample of the batch",
                        DEAD_AT_INIT,
                    ),
                    (ProbeKind::Sigmoid | ProbeKind::Tanh, _, Some(f))
                        if f > config.saturation_fraction =>
                    {
                        (
                            FindingKind::Saturation,
                            f,
                            "of the outputs saturated",
                            SATURATION,
                        )
                    }
                    _ => continue,
                };
            found.push(Finding {
                kind,
                severity: Severity::Warning,
                layers: vec![a.name.clone()],
                evidence: format!(
                    "at initialisation {:.1}% {what} ({} units, mean {:.3}, std {:.3})",
                    value * 100.0,
                    a.units,
                    a.mean,
                    a.std
                ),
                steps: [self.step; 2],
                peak: Some(value),
                remedies: remedies.to_vec(),
                remedy: Remedy::render_all(remedies),
            });
        }
        self.findings.extend(found);
    }

    /// The report `gradscope preflight` prints: the verdict, the per-layer gradient profile,
    /// the activations and the findings.
    pub fn report(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let verdict = match self.verdict {
            Verdict::Healthy => "healthy signal",
            Verdict::Vanishing => "VANISHING signal",
            Verdict::Exploding => "EXPLODING signal",
        };
        let loss = self
            .loss
            .map_or_else(String::new, |l| format!(", loss {l:.4}"));
        let _ = writeln!(s, "preflight at step {}{loss}: {verdict}", self.step);
        match (self.gradient_ratio, self.per_layer_factor) {
            (Some(r), Some(f)) => {
                let _ = writeln!(
                    s,
                    "  gradient norm, first layer / last layer: {r:.2e} (x{f:.3} per layer)"
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "  gradient norm, first layer / last layer: - (fewer than two layers with a gradient)"
                );
            }
        }
        match self.variance_drift {
            Some(d) => {
                let _ = writeln!(
                    s,
                    "  activation variance, last probe / first probe: {d:.2e}"
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "  activation variance, last probe / first probe: - (add Probes after two or more activations)"
                );
            }
        }
        let width = self
            .layers
            .iter()
            .map(|l| l.name.len())
            .chain(self.activations.iter().map(|a| a.name.len()))
            .max()
            .unwrap_or(5)
            .max(5);
        let _ = writeln!(
            s,
            "\n  {:<width$}  {:>10}  {:>10}  {:>10}",
            "layer", "grad norm", "/ last", "weights"
        );
        for l in &self.layers {
            let _ = writeln!(
                s,
                "  {:<width$}  {:>10}  {:>10}  {:>10.3e}",
                l.name,
                opt(l.grad_norm),
                opt(l.relative),
                l.weight_norm
            );
        }
        if !self.activations.is_empty() {
            let _ = writeln!(
                s,
                "\n  {:<width$}  {:>8}  {:>10}  {:>10}  {:>10}  {:>8}  {:>9}  {:>10}",
                "probe", "kind", "mean", "std", "var/first", "inactive", "saturated", "grad in"
            );
            for a in &self.activations {
                let _ = writeln!(
                    s,
                    "  {:<width$}  {:>8}  {:>10.3e}  {:>10.3e}  {:>10}  {:>8}  {:>9}  {:>10}",
                    a.name,
                    format!("{:?}", a.kind).to_lowercase(),
                    a.mean,
                    a.std,
                    opt(a.variance_ratio),
                    percent(a.inactive_fraction),
                    percent(a.saturated_fraction),
                    opt(a.grad_norm)
                );
            }
        }
        if self.findings.is_empty() {
            let _ = writeln!(s, "\nno findings");
        } else {
            let _ = writeln!(s, "\nfindings:");
            for f in &self.findings {
                let _ = writeln!(s, "  {f}");
            }
        }
        s
    }
}

/// One direction's evidence, before it becomes a finding.
struct Signal {
    verdict: Verdict,
    critical: bool,
    evidence: String,
    layers: Vec<String>,
    peak: Option<f64>,
}

/// Which way a ratio that is 1 for a healthy signal lies beyond `limit` (below `1 / limit`:
/// vanishing, above `limit`: exploding), if it does.
fn beyond(ratio: f64, limit: f64) -> Option<Verdict> {
    if ratio < 1.0 / limit {
        Some(Verdict::Vanishing)
    } else if ratio > limit {
        Some(Verdict::Exploding)
    } else {
        None
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3e}"))
}

fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{:.1}%", v * 100.0))
}
