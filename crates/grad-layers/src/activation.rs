//! Activations as one serialisable enum, so a model can swap them by configuration.
//!
//! Each follows PyTorch's formula and its derivative convention at the kink: the test is
//! `x > 0`, so at exactly 0 the derivative takes the left branch (Leaky ReLU: the slope; ELU:
//! `alpha`; SELU: `scale * alpha`; ReLU: 0; CELU: 1). GELU (Hendrycks & Gimpel 2016) is smooth
//! (0.5 at 0). ELU: Clevert et al. 2016; SELU: Klambauer et al. 2017; Leaky ReLU: Maas et al.
//! 2013. The clamping family (ReLU6, hardtanh, hardsigmoid, hardswish) has derivative 0 at its
//! boundaries, except hardswish's 1 at +3; hardsigmoid's slope is PyTorch's float32 `1/6`.
//! Softplus, log-sigmoid, SiLU and Mish never overflow (at ±800 included).
//!
//! f64 computes with the standard library's functions. f32, f16 and bf16 compute in f32 with
//! grad-core's branch-free `exp`, `expm1`, `tanh` and `erf` (relative error at most 2e-6, see
//! `grad_core::float::tanh_f32` and its neighbours), which vectorise where a libm call per
//! element does not.

use candle_core::{Module, Tensor};
use grad_core::float::Real;
use serde::{Deserialize, Serialize};

use crate::Result;

/// SELU's `alpha`.
pub const SELU_ALPHA: f64 = 1.673_263_242_354_377_3;
/// SELU's `scale`.
pub const SELU_SCALE: f64 = 1.050_700_987_355_480_5;

/// Which GELU formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum GeluApproximation {
    /// `x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`, PyTorch's `approximate='none'`.
    #[default]
    None,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, PyTorch's `approximate='tanh'`.
    Tanh,
}

/// An element-wise activation; a candle [`Module`] with fused CPU forward and backward.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use gradkit::layers::Activation;
/// let act: Activation = serde_json::from_str(r#"{"LeakyRelu":{"negative_slope":0.1}}"#).unwrap();
/// let y = act.forward(&Tensor::new(&[-2f32, 3.0], &Device::Cpu)?)?;
/// assert_eq!(y.to_vec1::<f32>()?, [-0.2, 3.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Activation {
    /// `max(x, 0)` (NaN stays NaN).
    Relu,
    /// `x` for `x > 0`, else `negative_slope * x`.
    LeakyRelu {
        /// The slope for `x <= 0` (PyTorch's default 0.01). Any finite value.
        negative_slope: f64,
    },
    /// `x` for `x > 0`, else `alpha (exp(x) - 1)`.
    Elu {
        /// The saturation value for very negative `x` (negated); `alpha >= 0`. PyTorch: 1.0.
        alpha: f64,
    },
    /// `scale * elu(x, alpha)` with the fixed SELU constants.
    Selu,
    /// Gaussian error linear unit.
    Gelu {
        /// Exact (erf) or tanh approximation.
        approximate: GeluApproximation,
    },
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
    /// `tanh(x)`.
    Tanh,
    /// `min(max(x, 0), 6)` (`hardtanh(x, 0, 6)`); derivative 0 at both boundaries.
    Relu6,
    /// SiLU / swish, `x * sigmoid(x)` (Elfwing et al. 2018; Ramachandran et al. 2017).
    Silu,
    /// `x * tanh(softplus(x))` (Misra 2019).
    Mish,
    /// `ln(1 + exp(beta x)) / beta`, and exactly `x` where `beta x > threshold`.
    Softplus {
        /// The sharpness, `beta > 0` (finite). PyTorch: 1.0.
        beta: f64,
        /// Above this `beta x` the function is linear; any number but NaN. PyTorch: 20.0.
        threshold: f64,
    },
    /// `x * relu6(x + 3) / 6` (Howard et al. 2019); derivative 0 at -3 and 1 at 3.
    Hardswish,
    /// `relu6(x + 3) / 6`; derivative PyTorch's float32 `1/6` strictly inside (-3, 3), else 0.
    Hardsigmoid,
    /// `clamp(x, min_val, max_val)`; derivative 0 at both boundaries.
    Hardtanh {
        /// The lower bound (PyTorch: -1.0).
        min_val: f64,
        /// The upper bound, above `min_val` (PyTorch: 1.0).
        max_val: f64,
    },
    /// `max(0, x) + min(0, alpha (exp(x / alpha) - 1))` (Barron 2017); derivative 1 at 0.
    Celu {
        /// A finite, non-zero `alpha` (PyTorch: 1.0).
        alpha: f64,
    },
    /// `x / (1 + |x|)`.
    Softsign,
    /// `ln(sigmoid(x)) = min(x, 0) - ln(1 + exp(-|x|))`, without overflow.
    LogSigmoid,
}

impl Activation {
    /// Leaky ReLU with PyTorch's default slope 0.01.
    pub fn leaky_relu() -> Self {
        Self::LeakyRelu {
            negative_slope: 0.01,
        }
    }

    /// Checks the parameters: a finite slope; ELU's finite `alpha >= 0`; softplus' `beta > 0`
    /// and a threshold that is not NaN; hardtanh's `min_val < max_val`; CELU's finite, non-zero
    /// `alpha`.
    ///
    /// # Errors
    /// [`Error::Core`](crate::Error::Core) naming the parameter.
    ///
    /// ```
    /// use gradkit::layers::Activation;
    /// assert!(Activation::Softplus { beta: 0.0, threshold: 20.0 }.validate().is_err());
    /// assert!(Activation::Hardtanh { min_val: 1.0, max_val: 1.0 }.validate().is_err());
    /// assert!(Activation::Celu { alpha: 0.0 }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        let bad = |name, value, allowed| -> Result<()> {
            Err(grad_core::Error::InvalidHyperParameter {
                name,
                value,
                allowed,
            }
            .into())
        };
        match *self {
            Self::LeakyRelu { negative_slope } if !negative_slope.is_finite() => {
                bad("negative_slope", negative_slope, "a finite number")
            }
            Self::Elu { alpha } => Ok(grad_core::validate::non_negative("alpha", alpha)?),
            Self::Softplus { beta, threshold } => {
                grad_core::validate::positive("beta", beta)?;
                if threshold.is_nan() {
                    return bad("threshold", threshold, "a number (not NaN)");
                }
                Ok(())
            }
            Self::Hardtanh { min_val, max_val } => {
                if min_val.is_nan() {
                    return bad("min_val", min_val, "a number below max_val");
                }
                if max_val.is_nan() || max_val <= min_val {
                    return bad("max_val", max_val, "a number above min_val");
                }
                Ok(())
            }
            Self::Celu { alpha } if !(alpha.is_finite() && alpha != 0.0) => {
                bad("alpha", alpha, "a finite, non-zero number")
            }
            _ => Ok(()),
        }
    }

    /// The forward pass with gradkit's error type; [`Module::forward`] wraps it.
    ///
    /// # Errors
    /// As [`ops::activation`](crate::ops::activation()).
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::activation(x, *self)
    }
}

/// `sqrt(2 / pi)`, the tanh-GELU's inner scale.
const GELU_BETA: f64 = std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5;
/// The tanh-GELU's cubic coefficient.
const GELU_KAPPA: f64 = 0.044715;
/// `1 / sqrt(2 pi)`, the normal density's constant.
const GELU_PDF: f64 = std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2 * 0.5;

/// One activation as a monomorphic function pair, so kernels instantiate a loop per activation
/// with no `match` inside it (a per-element jump table costs about 2x).
pub(crate) trait Elementwise: Copy + Send + Sync {
    /// The activation of one value, in the kernel's arithmetic type.
    fn value<R: Real>(self, x: R) -> R;
    /// The derivative at one value, PyTorch's convention at the kink.
    fn derivative<R: Real>(self, x: R) -> R;
}

/// ReLU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReluFn;
/// Leaky ReLU with its slope.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeakyReluFn(pub f64);
/// ELU with its alpha.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EluFn(pub f64);
/// SELU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SeluFn;
/// GELU with erf.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GeluErfFn;
/// GELU with the tanh approximation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GeluTanhFn;
/// The logistic sigmoid.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SigmoidFn;
/// Hyperbolic tangent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TanhFn;

impl Elementwise for ReluFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        // `x <= 0` is false for NaN, which therefore passes through as in PyTorch.
        if x <= R::ZERO { R::ZERO } else { x }
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        // PyTorch's threshold_backward: 0 where x <= 0, so NaN passes the gradient on.
        if x <= R::ZERO { R::ZERO } else { R::ONE }
    }
}

impl Elementwise for LeakyReluFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        if x > R::ZERO { x } else { x * R::of(self.0) }
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        if x > R::ZERO { R::ONE } else { R::of(self.0) }
    }
}

impl Elementwise for EluFn {
    // Both sides computed, then one selected: a branch around the exponential would keep the
    // loop from vectorising.
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        let negative = R::of(self.0) * x.exp_m1();
        if x > R::ZERO { x } else { negative }
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let negative = R::of(self.0) * x.exp();
        if x > R::ZERO { R::ONE } else { negative }
    }
}

impl Elementwise for SeluFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        let s = R::of(SELU_SCALE);
        let negative = s * (R::of(SELU_ALPHA) * x.exp_m1());
        if x > R::ZERO { s * x } else { negative }
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let negative = R::of(SELU_SCALE * SELU_ALPHA) * x.exp();
        if x > R::ZERO {
            R::of(SELU_SCALE)
        } else {
            negative
        }
    }
}

impl Elementwise for GeluErfFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        x * R::of(0.5) * (R::ONE + (x * R::of(std::f64::consts::FRAC_1_SQRT_2)).erf())
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let cdf = R::of(0.5) * (R::ONE + (x * R::of(std::f64::consts::FRAC_1_SQRT_2)).erf());
        let pdf = (R::of(-0.5) * x * x).exp() * R::of(GELU_PDF);
        cdf + x * pdf
    }
}

impl Elementwise for GeluTanhFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        let inner = R::of(GELU_BETA) * (x + R::of(GELU_KAPPA) * x * x * x);
        R::of(0.5) * x * (R::ONE + inner.tanh())
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let x_sq = x * x;
        let t = (R::of(GELU_BETA) * (x + R::of(GELU_KAPPA) * x_sq * x)).tanh();
        let sech2 = R::ONE - t * t;
        // Saturated tanh: the second term vanishes (and x^2 may have overflowed).
        let right = if sech2 == R::ZERO {
            R::ZERO
        } else {
            R::of(0.5) * x * sech2 * R::of(GELU_BETA) * (R::ONE + R::of(3.0 * GELU_KAPPA) * x_sq)
        };
        R::of(0.5) * (R::ONE + t) + right
    }
}

impl Elementwise for SigmoidFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        logistic(x)
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let s = logistic(x);
        s * (R::ONE - s)
    }
}

impl Elementwise for TanhFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        x.tanh()
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let t = x.tanh();
        R::ONE - t * t
    }
}

/// `v` clamped into `[lo, hi]`, NaN passing through (C++'s `std::min(std::max(v, lo), hi)`,
/// which PyTorch's kernels use; Rust's `f64::max` would turn NaN into `lo`).
#[inline(always)]
fn clamp_keep_nan<R: Real>(v: R, lo: R, hi: R) -> R {
    if v < lo {
        lo
    } else if v > hi {
        hi
    } else {
        v
    }
}

/// The logistic function.
#[inline(always)]
fn logistic<R: Real>(x: R) -> R {
    R::ONE / (R::ONE + (-x).exp())
}

/// Hardtanh (and ReLU6, `HardtanhFn(0, 6)`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HardtanhFn(pub f64, pub f64);
/// SiLU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SiluFn;
/// Mish.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MishFn;
/// Softplus with `(beta, threshold)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SoftplusFn(pub f64, pub f64);
/// Hardswish.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HardswishFn;
/// Hardsigmoid.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HardsigmoidFn;
/// CELU with its alpha.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CeluFn(pub f64);
/// Softsign.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SoftsignFn;
/// Log-sigmoid.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogSigmoidFn;

/// PyTorch's hardsigmoid backward multiplies by the float32 constant `1.0f / 6.0f`, in every
/// dtype.
pub(crate) const HARDSIGMOID_SLOPE: f64 = (1.0f32 / 6.0f32) as f64;

impl Elementwise for HardtanhFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        clamp_keep_nan(x, R::of(self.0), R::of(self.1))
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        // PyTorch: 0 where x <= min or x >= max, so NaN passes the gradient on.
        if x <= R::of(self.0) || x >= R::of(self.1) {
            R::ZERO
        } else {
            R::ONE
        }
    }
}

impl Elementwise for SiluFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        x / (R::ONE + (-x).exp())
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let s = logistic(x);
        s * (R::ONE + x * (R::ONE - s))
    }
}

impl Elementwise for MishFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        x * x.exp().ln_1p().tanh()
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let t = x.exp().ln_1p().tanh();
        t + x * logistic(x) * (R::ONE - t * t)
    }
}

impl Elementwise for SoftplusFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        let bx = x * R::of(self.0);
        let smooth = bx.exp().ln_1p() / R::of(self.0);
        if bx > R::of(self.1) { x } else { smooth }
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let bx = x * R::of(self.0);
        let z = bx.exp();
        let smooth = z / (z + R::ONE);
        if bx > R::of(self.1) { R::ONE } else { smooth }
    }
}

impl Elementwise for HardswishFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        x * clamp_keep_nan(x + R::of(3.0), R::ZERO, R::of(6.0)) / R::of(6.0)
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        if x <= R::of(-3.0) {
            R::ZERO
        } else if x < R::of(3.0) {
            x / R::of(3.0) + R::of(0.5)
        } else {
            R::ONE
        }
    }
}

impl Elementwise for HardsigmoidFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        clamp_keep_nan(x + R::of(3.0), R::ZERO, R::of(6.0)) / R::of(6.0)
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        if x > R::of(-3.0) && x < R::of(3.0) {
            R::of(HARDSIGMOID_SLOPE)
        } else {
            R::ZERO
        }
    }
}

impl Elementwise for CeluFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        let negative = R::of(self.0) * (x * R::of(1.0 / self.0)).exp_m1();
        if x > R::ZERO { x } else { negative }
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let negative = (x * R::of(1.0 / self.0)).exp();
        if x > R::ZERO { R::ONE } else { negative }
    }
}

impl Elementwise for SoftsignFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        x / (R::ONE + x.abs())
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let d = R::ONE + x.abs();
        R::ONE / (d * d)
    }
}

impl Elementwise for LogSigmoidFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        let low = if x < R::ZERO { x } else { R::ZERO };
        low - (-x.abs()).exp().ln_1p()
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let z = (-x.abs()).exp();
        let q = z / (R::ONE + z);
        if x < R::ZERO { R::ONE - q } else { q }
    }
}

/// Runs `$body` with `$f` bound to the monomorphic function of activation `$act`.
macro_rules! with_elementwise {
    ($act:expr, |$f:ident| $body:expr) => {
        match $act {
            $crate::Activation::Relu => {
                let $f = $crate::activation::ReluFn;
                $body
            }
            $crate::Activation::LeakyRelu { negative_slope } => {
                let $f = $crate::activation::LeakyReluFn(negative_slope);
                $body
            }
            $crate::Activation::Elu { alpha } => {
                let $f = $crate::activation::EluFn(alpha);
                $body
            }
            $crate::Activation::Selu => {
                let $f = $crate::activation::SeluFn;
                $body
            }
            $crate::Activation::Gelu {
                approximate: $crate::GeluApproximation::None,
            } => {
                let $f = $crate::activation::GeluErfFn;
                $body
            }
            $crate::Activation::Gelu {
                approximate: $crate::GeluApproximation::Tanh,
            } => {
                let $f = $crate::activation::GeluTanhFn;
                $body
            }
            $crate::Activation::Sigmoid => {
                let $f = $crate::activation::SigmoidFn;
                $body
            }
            $crate::Activation::Tanh => {
                let $f = $crate::activation::TanhFn;
                $body
            }
            $crate::Activation::Relu6 => {
                let $f = $crate::activation::HardtanhFn(0.0, 6.0);
                $body
            }
            $crate::Activation::Silu => {
                let $f = $crate::activation::SiluFn;
                $body
            }
            $crate::Activation::Mish => {
                let $f = $crate::activation::MishFn;
                $body
            }
            $crate::Activation::Softplus { beta, threshold } => {
                let $f = $crate::activation::SoftplusFn(beta, threshold);
                $body
            }
            $crate::Activation::Hardswish => {
                let $f = $crate::activation::HardswishFn;
                $body
            }
            $crate::Activation::Hardsigmoid => {
                let $f = $crate::activation::HardsigmoidFn;
                $body
            }
            $crate::Activation::Hardtanh { min_val, max_val } => {
                let $f = $crate::activation::HardtanhFn(min_val, max_val);
                $body
            }
            $crate::Activation::Celu { alpha } => {
                let $f = $crate::activation::CeluFn(alpha);
                $body
            }
            $crate::Activation::Softsign => {
                let $f = $crate::activation::SoftsignFn;
                $body
            }
            $crate::Activation::LogSigmoid => {
                let $f = $crate::activation::LogSigmoidFn;
                $body
            }
        }
    };
}
pub(crate) use with_elementwise;

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.try_forward(xs).map_err(candle_core::Error::from)
    }
}
