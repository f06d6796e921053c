//! The seam between a weight reparameterisation and the layer it wraps: [`Reweight`], a candle
//! layer rebuilt around a computed weight on every forward, implemented for candle-nn's
//! `Linear` and `Conv2d`, and their construction under a chosen weight name with candle-nn's
//! initialisation.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Init, Linear, VarBuilder};

use crate::Result;

/// A candle layer whose weight a reparameterisation computes: it can be rebuilt around
/// another weight of the same shape. Implemented for `candle_nn::Linear` and
/// `candle_nn::Conv2d`.
pub trait Reweight: Module + Clone + Send + Sync {
    /// The layer's weight.
    fn weight(&self) -> &Tensor;
    /// The same layer (bias, config) around `weight`.
    fn with_weight(&self, weight: Tensor) -> Self;
}

impl Reweight for Linear {
    fn weight(&self) -> &Tensor {
        Linear::weight(self)
    }
    fn with_weight(&self, weight: Tensor) -> Self {
        Linear::new(weight, self.bias().cloned())
    }
}

impl Reweight for Conv2d {
    fn weight(&self) -> &Tensor {
        Conv2d::weight(self)
    }
    fn with_weight(&self, weight: Tensor) -> Self {
        Conv2d::new(weight, self.bias().cloned(), *self.config())
    }
}

/// PyTorch's default bias, `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, as candle-nn draws it.
fn bias(n: usize, fan_in: usize, vb: &VarBuilder) -> Result<Tensor> {
    #[allow(clippy::cast_precision_loss, reason = "fans are far below 2^52")]
    let bound = 1.0 / (fan_in as f64).sqrt();
    Ok(vb.get_with_hints(
        n,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?)
}

/// `candle_nn::linear` (or `linear_no_bias`) with its weight stored under `weight_name`.
pub(crate) fn linear(
    in_dim: usize,
    out_dim: usize,
    with_bias: bool,
    weight_name: &str,
    vb: &VarBuilder,
) -> Result<Linear> {
    let w = vb.get_with_hints(
        (out_dim, in_dim),
        weight_name,
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    let b = with_bias.then(|| bias(out_dim, in_dim, vb)).transpose()?;
    Ok(Linear::new(w, b))
}

/// `candle_nn::conv2d` (or `conv2d_no_bias`) with its weight stored under `weight_name`.
pub(crate) fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    conv: Conv2dConfig,
    with_bias: bool,
    weight_name: &str,
    vb: &VarBuilder,
) -> Result<Conv2d> {
    let groups = conv.groups.max(1);
    let w = vb.get_with_hints(
        (out_channels, in_channels / groups, kernel_size, kernel_size),
        weight_name,
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    let b = with_bias
        .then(|| bias(out_channels, in_channels, vb))
        .transpose()?;
    Ok(Conv2d::new(w, b, conv))
}
