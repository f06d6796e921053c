//! Group normalisation with PyTorch's semantics (Wu & He 2018).
//!
//! The channels of `[N, C, *]` are split into `num_groups` contiguous groups, each normalised per
//! sample over its channels and spatial positions, then scaled and shifted per channel.
//! Independent of the batch size: the usual replacement for batch norm with small batches.

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Configuration of [`GroupNorm`]: the arguments of PyTorch's `nn.GroupNorm`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GroupNormConfig {
    /// Added to the variance before the square root. Default: 1e-5.
    pub eps: f64,
    /// Learn a per-channel `weight` (initialised to 1) and `bias` (0). Default: true.
    pub affine: bool,
}

impl Default for GroupNormConfig {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            affine: true,
        }
    }
}

/// Group normalisation; a candle [`Module`] whose gradients reach the input, weight and bias.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    num_groups: usize,
    num_channels: usize,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

/// Builds a [`GroupNorm`] of `num_channels` channels in `num_groups` groups.
///
/// # Errors
/// [`Error::IndivisibleGroups`] when `num_channels % num_groups != 0` (or either is 0);
/// [`Error::Core`] for `eps` not positive and finite or stored parameters of the wrong shape.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let gn = gradkit::layers::group_norm(4, 16, Default::default(), vb.pp("gn"))?;
/// let y = gn.forward(&Tensor::randn(0f32, 1.0, (2, 16, 5, 5), &Device::Cpu)?)?;
/// assert_eq!(y.dims(), [2, 16, 5, 5]);
/// assert!(gradkit::layers::group_norm(5, 16, Default::default(), vb.pp("bad")).is_err());
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn group_norm(
    num_groups: usize,
    num_channels: usize,
    config: GroupNormConfig,
    vb: VarBuilder,
) -> Result<GroupNorm> {
    grad_core::validate::positive("eps", config.eps)?;
    if num_groups == 0 || num_channels == 0 || !num_channels.is_multiple_of(num_groups) {
        return Err(Error::IndivisibleGroups {
            channels: num_channels,
            groups: num_groups,
        });
    }
    let (weight, bias) = if config.affine {
        (
            Some(vb.get_with_hints(num_channels, "weight", Init::Const(1.0))?),
            Some(vb.get_with_hints(num_channels, "bias", Init::Const(0.0))?),
        )
    } else {
        (None, None)
    };
    Ok(GroupNorm {
        num_groups,
        num_channels,
        weight,
        bias,
        eps: config.eps,
    })
}

impl GroupNorm {
    /// The forward pass with gradkit's error type; [`Module::forward`] wraps it.
    ///
    /// An f16 or bf16 input with f32 parameters (the usual mixed-precision layout) is computed
    /// in f32 and returned in the input's dtype, gradients flowing back through both casts.
    ///
    /// # Shapes
    /// `x`: `[N, C, *]` with `C` the layer's `num_channels`; the output has the input's shape and
    /// dtype.
    ///
    /// # Errors
    /// As [`ops::group_norm`](crate::ops::group_norm()), plus a channel count that differs from
    /// the layer's.
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor> {
        self.check_channels(x)?;
        let param_dtype = self.weight.as_ref().map(Tensor::dtype);
        crate::check::in_param_precision(x, param_dtype, |x| {
            crate::ops::group_norm(
                x,
                self.num_groups,
                self.weight.as_ref(),
                self.bias.as_ref(),
                self.eps,
            )
        })
    }

    /// An error unless `x` (of rank 2 or more) has the layer's channel count in dim 1.
    pub(crate) fn check_channels(&self, x: &Tensor) -> Result<()> {
        if x.rank() >= 2 && x.dim(1)? != self.num_channels {
            return Err(Error::Core(grad_core::Error::shape_mismatch(
                "GroupNorm",
                "input",
                format!("[N, {}, *]", self.num_channels),
                x.dims(),
            )));
        }
        Ok(())
    }

    /// The number of groups.
    pub fn num_groups(&self) -> usize {
        self.num_groups
    }

    /// The number of channels.
    pub fn num_channels(&self) -> usize {
        self.num_channels
    }

    /// The `eps` added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The per-channel weight, when affine.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// The per-channel bias, when affine.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.try_forward(xs).map_err(candle_core::Error::from)
    }
}
