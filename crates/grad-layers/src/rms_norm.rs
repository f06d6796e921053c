//! RMS normalisation with PyTorch's semantics (Zhang & Sennrich 2019).
//!
//! `y = x / sqrt(mean(x^2) + eps) * weight` over the trailing `normalized_shape` dims: layer norm
//! without the mean and the bias. `eps = None` uses the input dtype's machine epsilon, as
//! PyTorch's `eps=None`.

use candle_core::{Module, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Configuration of [`RmsNorm`]: the arguments of PyTorch's `nn.RMSNorm`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RmsNormConfig {
    /// Added to the mean square; `None` is the input dtype's machine epsilon
    /// ([`ops::default_rms_eps`](crate::ops::default_rms_eps)). Default: `None`.
    pub eps: Option<f64>,
    /// Learn a `weight` (initialised to 1). Default: true.
    pub elementwise_affine: bool,
}

impl Default for RmsNormConfig {
    /// PyTorch's defaults: `eps=None`, `elementwise_affine=True`.
    fn default() -> Self {
        Self {
            eps: None,
            elementwise_affine: true,
        }
    }
}

/// RMS normalisation over the trailing dims; a candle [`Module`] whose gradients reach the input
/// and the weight (unlike candle-nn 0.11.1's fused `RmsNorm`).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    normalized_shape: Vec<usize>,
    weight: Option<Tensor>,
    eps: Option<f64>,
}

/// Builds an [`RmsNorm`] over `normalized_shape`, its `weight` from or created in `vb`.
///
/// # Errors
/// [`Error::Core`] for an `eps` that is given but not positive and finite, an empty
/// `normalized_shape`, or a stored weight of the wrong shape.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use gradkit::layers::{RmsNormConfig, rms_norm};
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let cfg = RmsNormConfig { eps: Some(1e-6), elementwise_affine: true };
/// let norm = rms_norm(8, cfg, vb.pp("norm"))?;
/// let y = norm.forward(&Tensor::ones((2, 8), DType::F32, &Device::Cpu)?)?;
/// assert!((y.to_vec2::<f32>()?[0][0] - 1.0).abs() < 1e-5);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn rms_norm(
    normalized_shape: impl Into<Shape>,
    config: RmsNormConfig,
    vb: VarBuilder,
) -> Result<RmsNorm> {
    if let Some(eps) = config.eps {
        grad_core::validate::positive("eps", eps)?;
    }
    let normalized_shape = normalized_shape.into().dims().to_vec();
    if normalized_shape.is_empty() || normalized_shape.contains(&0) {
        return Err(Error::Core(grad_core::Error::shape_mismatch(
            "RmsNorm",
            "normalized_shape",
            "at least one dim, none of size 0",
            &normalized_shape,
        )));
    }
    let weight = config
        .elementwise_affine
        .then(|| vb.get_with_hints(normalized_shape.as_slice(), "weight", Init::Const(1.0)))
        .transpose()?;
    Ok(RmsNorm {
        normalized_shape,
        weight,
        eps: config.eps,
    })
}

impl RmsNorm {
    /// The forward pass with gradkit's error type; [`Module::forward`] wraps it.
    ///
    /// An f16 or bf16 input with f32 parameters (the usual mixed-precision layout) is computed
    /// in f32 and returned in the input's dtype, gradients flowing back through both casts.
    ///
    /// # Shapes
    /// `x`: `[*, normalized_shape]`; the output has the input's shape and dtype.
    ///
    /// # Errors
    /// As [`ops::rms_norm`](crate::ops::rms_norm()).
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor> {
        // eps = None is the *input's* machine epsilon, also when it is computed in f32.
        let eps = Some(self.eps.unwrap_or(crate::ops::default_rms_eps(x.dtype())));
        let param_dtype = self.weight.as_ref().map(Tensor::dtype);
        crate::check::in_param_precision(x, param_dtype, |x| {
            crate::ops::rms_norm(x, &self.normalized_shape, self.weight.as_ref(), eps)
        })
    }

    /// The weight, when affine.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.try_forward(xs).map_err(candle_core::Error::from)
    }
}
