//! Layer normalisation with PyTorch's semantics (Ba, Kiros & Hinton 2016).
//!
//! Normalises over the trailing `normalized_shape` dims of each input with the biased variance:
//! `y = (x - mean) / sqrt(var + eps) * weight + bias`. Independent of the batch, so it behaves the
//! same in training and evaluation and with a batch of one.

use candle_core::{Module, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Configuration of [`LayerNorm`]: the arguments of PyTorch's `nn.LayerNorm`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerNormConfig {
    /// Added to the variance before the square root. Default: 1e-5.
    pub eps: f64,
    /// Which affine parameters to learn, shaped like `normalized_shape` (PyTorch's
    /// `elementwise_affine` and `bias`). Default: [`Affine::WeightAndBias`].
    pub affine: Affine,
}

/// The learnt affine parameters of a [`LayerNorm`]: PyTorch's `elementwise_affine` and `bias`
/// arguments as their three valid combinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Affine {
    /// No parameters (`elementwise_affine=False`): `y` is the normalised input.
    None,
    /// A `weight` initialised to 1 (`bias=False`).
    Weight,
    /// A `weight` initialised to 1 and a `bias` initialised to 0 (PyTorch's default).
    #[default]
    WeightAndBias,
}

impl Default for LayerNormConfig {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            affine: Affine::WeightAndBias,
        }
    }
}

/// Layer normalisation over the trailing dims; a candle [`Module`] whose gradients reach the
/// input, the weight and the bias (unlike candle-nn 0.11.1's fused `LayerNorm`, whose backward
/// drops them: candle issues #2168, #3011, #3752).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    normalized_shape: Vec<usize>,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

/// Builds a [`LayerNorm`] over `normalized_shape`, parameters from or created in `vb` (candle-nn's
/// names `weight` and `bias`).
///
/// # Errors
/// [`Error::Core`] for `eps` not positive and finite, an empty `normalized_shape`, or stored
/// parameters of the wrong shape.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let ln = gradkit::layers::layer_norm(16, Default::default(), vb.pp("ln"))?;
/// let y = ln.forward(&Tensor::randn(0f32, 3.0, (4, 16), &Device::Cpu)?)?;
/// assert_eq!(y.dims(), [4, 16]);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn layer_norm(
    normalized_shape: impl Into<Shape>,
    config: LayerNormConfig,
    vb: VarBuilder,
) -> Result<LayerNorm> {
    grad_core::validate::positive("eps", config.eps)?;
    let normalized_shape = normalized_shape.into().dims().to_vec();
    if normalized_shape.is_empty() || normalized_shape.contains(&0) {
        return Err(Error::Core(grad_core::Error::shape_mismatch(
            "LayerNorm",
            "normalized_shape",
            "at least one dim, none of size 0",
            &normalized_shape,
        )));
    }
    let param =
        |name, value| vb.get_with_hints(normalized_shape.as_slice(), name, Init::Const(value));
    let (weight, bias) = match config.affine {
        Affine::None => (None, None),
        Affine::Weight => (Some(param("weight", 1.0)?), None),
        Affine::WeightAndBias => (Some(param("weight", 1.0)?), Some(param("bias", 0.0)?)),
    };
    Ok(LayerNorm {
        normalized_shape,
        weight,
        bias,
        eps: config.eps,
    })
}

impl LayerNorm {
    /// The forward pass with gradkit's error type; [`Module::forward`] wraps it.
    ///
    /// An f16 or bf16 input with f32 parameters (the usual mixed-precision layout) is computed
    /// in f32 and returned in the input's dtype, gradients flowing back through both casts.
    ///
    /// # Shapes
    /// `x`: `[*, normalized_shape]` (the trailing dims equal the layer's `normalized_shape`); the
    /// output has the input's shape and dtype.
    ///
    /// # Errors
    /// As [`ops::layer_norm`](crate::ops::layer_norm()).
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor> {
        let param_dtype = self.weight.as_ref().map(Tensor::dtype);
        crate::check::in_param_precision(x, param_dtype, |x| {
            crate::ops::layer_norm(
                x,
                &self.normalized_shape,
                self.weight.as_ref(),
                self.bias.as_ref(),
                self.eps,
            )
        })
    }

    /// The trailing dims it normalises over.
    pub fn normalized_shape(&self) -> &[usize] {
        &self.normalized_shape
    }

    /// The `eps` added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The weight, when affine.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// The bias, when present.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.try_forward(xs).map_err(candle_core::Error::from)
    }
}
