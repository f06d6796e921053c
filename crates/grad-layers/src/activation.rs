//! Activations as one serialisable enum, so a model can swap them by configuration.
//!
//! Each follows PyTorch's formula and its derivative convention at the kink: the test is
//! `x > 0`, so at exactly 0 the derivative takes the left branch (Leaky ReLU: the slope; ELU:
//! `alpha`; SELU: `scale * alpha`; ReLU: 0). GELU (Hendrycks & Gimpel 2016) is smooth (0.5 at 0).
//! ELU: Clevert et al. 2016; SELU: Klambauer et al. 2017; Leaky ReLU: Maas et al. 2013.
//!
//! f64 computes with the standard library's functions. f32, f16 and bf16 compute in f32 with
//! grad-core's branch-free `exp`, `expm1`, `tanh` and `erf` (relative error at most 2e-6, see
//! `grad_core::float::tanh_f32` and its neighbours), which vectorise where a libm call per
//! element does not.

use candle_core::{Module, Tensor};
use grad_core::float::Real;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

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
/// use grad_layers::Activation;
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
}

impl Activation {
    /// Leaky ReLU with PyTorch's default slope 0.01.
    pub fn leaky_relu() -> Self {
        Self::LeakyRelu {
            negative_slope: 0.01,
        }
    }

    /// Checks the parameters: a finite slope, a finite `alpha >= 0`.
    ///
    /// # Errors
    /// [`Error::Core`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::LeakyRelu { negative_slope } if !negative_slope.is_finite() => {
                Err(grad_core::Error::InvalidHyperParameter {
                    name: "negative_slope",
                    value: negative_slope,
                    allowed: "a finite number",
                }
                .into())
            }
            Self::Elu { alpha } => Ok(grad_core::validate::non_negative("alpha", alpha)?),
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
        if x > R::ZERO { R::ONE } else { R::ZERO }
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
        R::ONE / (R::ONE + (-x).exp())
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let s = R::ONE / (R::ONE + (-x).exp());
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
        }
    };
}
pub(crate) use with_elementwise;

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.try_forward(xs).map_err(Error::into_candle)
    }
}
