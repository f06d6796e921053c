//! Weight standardisation (Qiao et al. 2019) around candle-nn's `Conv2d`: the
//! weight is standardised per output unit on every forward, `(w - mean) / sqrt(var + eps)`,
//! as timm's `StdConv2d` does (with batch norm's biased variance); the parameter keeps its name,
//! `weight`. Paired with group norm it replaces batch norm for small batches (BiT, NFNets'
//! predecessors).

use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::ops::standardize_weight;
use crate::reweight::{self, Reweight};

/// Configuration of [`WeightStandardized`]: timm's `StdConv2d(eps=1e-6)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WeightStandardizationConfig {
    /// Added to each unit's weight variance. Default: 1e-6 (timm's).
    pub eps: f64,
    /// Whether the layer has a bias. Default: true.
    pub bias: bool,
}

impl Default for WeightStandardizationConfig {
    fn default() -> Self {
        Self {
            eps: 1e-6,
            bias: true,
        }
    }
}

/// A layer whose weight is standardised per output unit on every forward; a candle
/// [`Module`] whose gradients reach `weight` through the standardisation.
#[derive(Debug, Clone)]
pub struct WeightStandardized<L> {
    layer: L,
    eps: f64,
}

/// timm's `StdConv2d`: a weight-standardised `candle_nn::Conv2d` (parameters `weight`, candle-nn's
/// initialisation, and `bias`).
///
/// # Errors
/// [`Error::Core`](crate::Error::Core) for `eps` not positive and finite; candle's errors.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use gradkit::layers::std_conv2d;
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let conv = std_conv2d(3, 8, 3, Default::default(), Default::default(), vb.pp("conv"))?;
/// let y = conv.forward(&Tensor::ones((1, 3, 6, 6), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(y.dims(), [1, 8, 4, 4]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn std_conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    conv: Conv2dConfig,
    config: WeightStandardizationConfig,
    vb: VarBuilder,
) -> Result<WeightStandardized<Conv2d>> {
    grad_core::validate::positive("eps", config.eps)?;
    let layer = reweight::conv2d(
        in_channels,
        out_channels,
        kernel_size,
        conv,
        config.bias,
        "weight",
        &vb,
    )?;
    Ok(WeightStandardized {
        layer,
        eps: config.eps,
    })
}

impl<L: Reweight> WeightStandardized<L> {
    /// The forward pass with gradkit's error type; [`Module::forward`] wraps it.
    ///
    /// # Shapes
    /// As the wrapped layer's.
    ///
    /// # Errors
    /// The wrapped layer's errors.
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.layer.with_weight(self.weight()?).forward(x)?)
    }

    /// The standardised weight the layer uses now.
    ///
    /// # Errors
    /// candle's errors.
    pub fn weight(&self) -> Result<Tensor> {
        standardize_weight(self.layer.weight(), self.eps)
    }

    /// The parameter `weight`, as stored.
    pub fn raw_weight(&self) -> &Tensor {
        self.layer.weight()
    }
}

impl<L: Reweight> Module for WeightStandardized<L> {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.try_forward(xs).map_err(candle_core::Error::from)
    }
}
