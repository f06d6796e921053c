//! What one observation records: per parameter, per layer, per probe, and globally.
//!
//! These are the lines of a JSON Lines log ([`JsonlSink`](crate::JsonlSink)) and the input of
//! the detectors, reports and plots, so a log read back reproduces every verdict.

use serde::{Deserialize, Serialize};

use crate::histogram::Histogram;

/// serde's default for the presence flags of logs written before they existed.
fn present() -> bool {
    true
}

/// JSON has no NaN or infinity; these fields are written as the strings `"nan"`, `"inf"` and
/// `"-inf"` when non-finite (the convention of gradkit's conformance files), so the steps where
/// things go wrong survive in a log.
pub(crate) mod float {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Number(f64),
        Text(String),
    }

    pub(crate) fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_nan() {
            s.serialize_str("nan")
        } else if v.is_infinite() {
            s.serialize_str(if *v > 0.0 { "inf" } else { "-inf" })
        } else {
            s.serialize_f64(*v)
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Number(v) => Ok(v),
            Repr::Text(t) => match t.as_str() {
                "nan" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                other => Err(serde::de::Error::custom(format!("not a number: {other:?}"))),
            },
        }
    }

    /// The same for `Option<f64>` (`null` is `None`).
    pub(crate) mod opt {
        use serde::{Deserialize, Deserializer, Serializer};

        pub(crate) fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => super::serialize(v, s),
                None => s.serialize_none(),
            }
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<f64>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(with = "super")] f64);
            Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
        }
    }
}

/// Gradient (and weight) statistics of one parameter at one observed step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamStats {
    /// The parameter's name.
    pub name: String,
    /// The layer it belongs to.
    pub layer: String,
    /// Number of elements.
    pub numel: usize,
    /// Whether the parameter received a gradient at all. `false` means it is absent from the
    /// `GradStore` (a cut graph, a `detach`, an unused parameter), not an all-zero gradient; the
    /// gradient statistics are then 0.
    #[serde(default = "present")]
    pub has_grad: bool,
    /// L2 norm of the gradient.
    #[serde(with = "float")]
    pub grad_norm: f64,
    /// Largest absolute gradient element.
    #[serde(with = "float")]
    pub grad_max_abs: f64,
    /// Mean of the gradient's elements.
    #[serde(with = "float")]
    pub grad_mean: f64,
    /// Standard deviation (population) of the gradient's elements.
    #[serde(with = "float")]
    pub grad_std: f64,
    /// Fraction of gradient elements exactly zero.
    #[serde(with = "float")]
    pub zero_fraction: f64,
    /// NaN gradient elements.
    pub nan_count: u64,
    /// Infinite gradient elements.
    pub inf_count: u64,
    /// L2 norm of the parameter.
    #[serde(with = "float")]
    pub weight_norm: f64,
    /// Norm of the change of the parameter since the previous observation over its norm (`None`
    /// at the first observation).
    #[serde(with = "float::opt")]
    pub update_ratio: Option<f64>,
}

/// A layer's statistics: its parameters' combined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    /// The layer's name.
    pub name: String,
    /// Its position in network order (0 = closest to the input).
    pub depth: usize,
    /// Whether any of its parameters received a gradient.
    #[serde(default = "present")]
    pub has_grad: bool,
    /// L2 norm of all its parameters' gradients together.
    #[serde(with = "float")]
    pub grad_norm: f64,
    /// Largest absolute gradient element.
    #[serde(with = "float")]
    pub grad_max_abs: f64,
    /// L2 norm of all its parameters together.
    #[serde(with = "float")]
    pub weight_norm: f64,
    /// Norm of the change of its parameters over their norm.
    #[serde(with = "float::opt")]
    pub update_ratio: Option<f64>,
    /// NaN and infinite gradient elements.
    pub non_finite: u64,
    /// The magnitudes `|g|` of every gradient element of the layer.
    #[serde(default)]
    pub grad_histogram: Histogram,
    /// The element-wise update ratios `|w_t - w_prev| / |w_t|` of the sampled weight elements
    /// (`None` at the first observation).
    #[serde(default)]
    pub update_histogram: Option<Histogram>,
}

/// What a clipping optimizer did at the observed step (`grad_regularize::Clipped`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClipRecord {
    /// The global L2 norm of the gradients before clipping.
    #[serde(with = "float")]
    pub total_norm: f64,
    /// Whether clipping changed a gradient.
    pub clipped: bool,
    /// Whether the step was skipped for non-finite gradients.
    pub skipped: bool,
}

impl From<grad_core::step::StepOutcome> for ClipRecord {
    fn from(o: grad_core::step::StepOutcome) -> Self {
        Self {
            total_norm: o.total_norm,
            clipped: o.clipped,
            skipped: o.skipped,
        }
    }
}

/// What an activation probe kind means for saturation and dead units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProbeKind {
    /// After a ReLU-family activation: units never positive over the window are dead.
    Relu,
    /// After tanh: `|y| > 0.99` is saturated.
    Tanh,
    /// After a sigmoid: `y < 0.01` or `y > 0.99` is saturated.
    Sigmoid,
    /// Any other point: moments and the gradient only.
    Linear,
}

/// An activation probe's statistics at one observed step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeStats {
    /// The probe's name (usually the layer it follows).
    pub name: String,
    /// What it follows.
    pub kind: ProbeKind,
    /// Units (dim 1 of the activation; every element for rank 1).
    pub units: usize,
    /// Mean of the last activation seen.
    #[serde(with = "float")]
    pub mean: f64,
    /// Standard deviation of the last activation seen.
    #[serde(with = "float")]
    pub std: f64,
    /// Fraction of the last activation's elements at or below zero.
    #[serde(with = "float")]
    pub nonpositive_fraction: f64,
    /// Fraction of units not positive once over the last `window` forward passes (`None` until
    /// a window has passed).
    #[serde(with = "float::opt")]
    pub dead_fraction: Option<f64>,
    /// Fraction of units not positive on any sample of the last forward pass: dead on that
    /// batch (ReLU kind after a forward; `None` otherwise, and in logs written before the field
    /// existed).
    #[serde(default, with = "float::opt")]
    pub inactive_fraction: Option<f64>,
    /// Fraction of the last activation's elements saturated (`None` for ReLU and linear kinds).
    #[serde(with = "float::opt")]
    pub saturated_fraction: Option<f64>,
    /// L2 norm of the gradient that last arrived at the probe in a backward pass.
    #[serde(with = "float::opt")]
    pub grad_norm: Option<f64>,
    /// Forward passes seen.
    pub forwards: u64,
}

/// Everything observed at one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The training step.
    pub step: u64,
    /// The loss at this step, when the monitor was given it (`backward_step` takes it from the
    /// loss tensor).
    #[serde(default, with = "float::opt")]
    pub loss: Option<f64>,
    /// The learning rate in force, when given (`backward_step` takes it from the optimizer).
    #[serde(default, with = "float::opt")]
    pub learning_rate: Option<f64>,
    /// What a clipping optimizer did at this step, when one ran (`backward_step` picks it up
    /// from `grad_regularize::Clipped`; see [`grad_core::step`]).
    #[serde(default)]
    pub clip: Option<ClipRecord>,
    /// L2 norm of every parameter's gradient together.
    #[serde(with = "float")]
    pub global_grad_norm: f64,
    /// The clipping threshold in force, if the caller set one (drawn on the plots).
    #[serde(with = "float::opt")]
    pub clip_threshold: Option<f64>,
    /// Per parameter, in network order.
    pub params: Vec<ParamStats>,
    /// Per layer, in network order.
    pub layers: Vec<LayerStats>,
    /// Per probe, in the order they were added.
    pub probes: Vec<ProbeStats>,
    /// The gradient noise of this step, when it was estimated from micro-batch gradients
    /// ([`GradMonitor::gradient_noise`](crate::GradMonitor::gradient_noise)).
    #[serde(default)]
    pub noise: Option<NoiseRecord>,
}

/// A step's gradient noise, estimated from the gradients of `k` micro-batches of `b` samples
/// each (McCandlish et al. 2018, Appendix A). `gradient_sq` and `trace` are unbiased; their
/// ratio is not, so average them over steps before dividing when a steadier number is wanted
/// (the detectors do).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoiseRecord {
    /// `k`, the micro-batches (at least 2).
    pub micro_batches: usize,
    /// `b`, the samples in each micro-batch.
    pub micro_batch_size: usize,
    /// The estimate of `|G|²`, the squared norm of the expected gradient (can come out
    /// negative when the noise dominates).
    #[serde(with = "float")]
    pub gradient_sq: f64,
    /// The estimate of `tr(Σ)`, the trace of the per-sample gradients' covariance.
    #[serde(with = "float")]
    pub trace: f64,
    /// `B_simple = tr(Σ) / |G|²`: about the batch size beyond which larger batches stop
    /// paying (infinite when the estimate of `|G|²` is not positive).
    #[serde(with = "float")]
    pub simple_noise_scale: f64,
    /// Per layer that received gradients, in network order.
    pub layers: Vec<LayerNoise>,
}

/// One layer's share of a [`NoiseRecord`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerNoise {
    /// The layer.
    pub name: String,
    /// The estimate of the layer's `|G|²`.
    #[serde(with = "float")]
    pub gradient_sq: f64,
    /// The estimate of the layer's `tr(Σ)`.
    #[serde(with = "float")]
    pub trace: f64,
    /// The gradient signal-to-noise ratio: `max(|G|², 0)` over a micro-batch gradient's noise
    /// `tr(Σ) / b` (the mean² over the variance across micro-batches, summed over the layer's
    /// elements, with the mean²'s bias removed): 0 when the noise explains all of it.
    #[serde(with = "float")]
    pub snr: f64,
}

impl StepRecord {
    /// The first parameter (in network order) whose gradient holds a NaN or infinity.
    pub fn first_non_finite(&self) -> Option<&ParamStats> {
        self.params.iter().find(|p| p.nan_count + p.inf_count > 0)
    }
}
