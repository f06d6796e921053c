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
//! `grad_core::cpu::tanh_f32` and its neighbours), which vectorise where a libm call per
//! element does not.

use candle_core::{Module, Tensor};
use serde::{Deserialize, Serialize};

use crate::Result;

pub use crate::kernels::elementwise::{SELU_ALPHA, SELU_SCALE};

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
        use grad_core::validate::{
            finite, finite_nonzero, non_negative, not_nan, ordered, positive,
        };
        match *self {
            Self::LeakyRelu { negative_slope } => finite("negative_slope", negative_slope)?,
            Self::Elu { alpha } => non_negative("alpha", alpha)?,
            Self::Softplus { beta, threshold } => {
                positive("beta", beta)?;
                not_nan("threshold", threshold)?;
            }
            Self::Hardtanh { min_val, max_val } => {
                ordered(("min_val", min_val), ("max_val", max_val))?;
            }
            Self::Celu { alpha } => finite_nonzero("alpha", alpha)?,
            _ => {}
        }
        Ok(())
    }

    /// The forward pass with gradkit's error type; [`Module::forward`] wraps it.
    ///
    /// # Shapes
    /// Any shape; the output has the input's shape and dtype.
    ///
    /// # Errors
    /// As [`ops::activation`](crate::ops::activation()).
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::activation(x, *self)
    }
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.try_forward(xs).map_err(candle_core::Error::from)
    }
}
