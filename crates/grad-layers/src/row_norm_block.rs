//! Layer norm or group norm, an activation and dropout as one layer: the patterns
//! `nn.Sequential(nn.LayerNorm(D), nn.GELU(), nn.Dropout(p))` and
//! `nn.Sequential(nn.GroupNorm(G, C), nn.SiLU(), nn.Dropout(p))`, with one fused forward and one
//! fused backward on the CPU ([`ops::layer_norm_block`](crate::ops::layer_norm_block()),
//! [`ops::group_norm_block`](crate::ops::group_norm_block())).
//!
//! Each block is exactly its three layers in sequence: the same parameters as a [`LayerNorm`] or
//! [`GroupNorm`] built under the same prefix, the same mask stream as a [`Dropout`] with the
//! same seed, the same outputs and gradients.

use candle_core::{ModuleT, Shape, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::norm_block::{BlockTail, validate_tail};
use crate::ops::{
    check_group_block, check_layer_block, group_norm_block as group_fn,
    layer_norm_block as layer_fn,
};
use crate::{
    Activation, Dropout, DropoutConfig, GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig,
    Result, group_norm, layer_norm,
};

/// Configuration of a [`LayerNormBlock`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerNormBlockConfig {
    /// The layer norm's configuration.
    pub norm: LayerNormConfig,
    /// The activation after it. Default: GELU (exact).
    pub activation: Activation,
    /// The dropout after the activation, if any. Default: none.
    pub dropout: Option<DropoutConfig>,
}

impl Default for LayerNormBlockConfig {
    fn default() -> Self {
        Self {
            norm: LayerNormConfig::default(),
            activation: Activation::Gelu {
                approximate: crate::GeluApproximation::None,
            },
            dropout: None,
        }
    }
}

impl LayerNormBlockConfig {
    /// Checks the norm's `eps`, the activation's parameters and the dropout's `p`.
    ///
    /// # Errors
    /// [`Error::Core`](crate::Error::Core) with
    /// [`grad_core::Error::InvalidHyperParameter`] naming the field.
    pub fn validate(&self) -> Result<()> {
        grad_core::validate::positive("eps", self.norm.eps)?;
        validate_tail(self.activation, self.dropout.as_ref())
    }
}

/// Configuration of a [`GroupNormBlock`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupNormBlockConfig {
    /// The group norm's configuration.
    pub norm: GroupNormConfig,
    /// The activation after it. Default: SiLU.
    pub activation: Activation,
    /// The dropout after the activation, if any. Default: none.
    pub dropout: Option<DropoutConfig>,
}

impl Default for GroupNormBlockConfig {
    fn default() -> Self {
        Self {
            norm: GroupNormConfig::default(),
            activation: Activation::Silu,
            dropout: None,
        }
    }
}

impl GroupNormBlockConfig {
    /// Checks the norm's `eps`, the activation's parameters and the dropout's `p`.
    ///
    /// # Errors
    /// [`Error::Core`](crate::Error::Core) with
    /// [`grad_core::Error::InvalidHyperParameter`] naming the field.
    pub fn validate(&self) -> Result<()> {
        grad_core::validate::positive("eps", self.norm.eps)?;
        validate_tail(self.activation, self.dropout.as_ref())
    }
}

/// Layer norm over the trailing dims, then an activation, then optional dropout; a candle
/// [`ModuleT`] (`train = true` drops; the norm is the same in training and evaluation).
///
/// Its parameters are a [`LayerNorm`]'s under the block's own prefix (`weight`, `bias`), so a
/// checkpoint of a `LayerNorm` at that prefix loads unchanged; its dropout stream is a
/// [`Dropout`]'s named `dropout` under the prefix (or seeded by [`DropoutConfig::seed`]).
#[derive(Debug)]
pub struct LayerNormBlock {
    norm: LayerNorm,
    tail: BlockTail,
}

/// Builds a [`LayerNormBlock`] over `normalized_shape`, its parameters taken from or created in
/// `vb`.
///
/// # Errors
/// [`Error::Core`](crate::Error::Core) for an invalid config, an empty `normalized_shape`, or
/// stored parameters of the wrong shape.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use gradkit::layers::{DropoutConfig, LayerNormBlockConfig, layer_norm_block};
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let config = LayerNormBlockConfig {
///     dropout: Some(DropoutConfig { p: 0.1, seed: Some(7), ..Default::default() }),
///     ..Default::default()
/// };
/// let block = layer_norm_block(64, config, vb.pp("block"))?;
/// let x = Tensor::randn(0f32, 1.0, (4, 10, 64), &Device::Cpu)?;
/// assert_eq!(block.try_forward(&x, true)?.dims(), [4, 10, 64]);
/// assert!(map.get((64,), "block.weight", candle_nn::Init::Const(0.0), DType::F32, &Device::Cpu).is_ok());
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn layer_norm_block(
    normalized_shape: impl Into<Shape>,
    config: LayerNormBlockConfig,
    vb: VarBuilder,
) -> Result<LayerNormBlock> {
    config.validate()?;
    Ok(LayerNormBlock {
        tail: BlockTail::new(config.activation, config.dropout, &vb)?,
        norm: layer_norm(normalized_shape, config.norm, vb)?,
    })
}

impl LayerNormBlock {
    /// The forward pass with gradkit's error type; [`ModuleT::forward_t`] wraps it.
    ///
    /// An f16 or bf16 input with f32 parameters is computed in f32 and returned in the input's
    /// dtype, as [`LayerNorm::try_forward`] does.
    ///
    /// # Shapes
    /// As [`LayerNorm::try_forward`], and the ranks the dropout's kind takes.
    ///
    /// # Errors
    /// As [`ops::layer_norm_block`](crate::ops::layer_norm_block()); a failing call draws no
    /// words.
    pub fn try_forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let norm = &self.norm;
        let param_dtype = norm.weight().map(Tensor::dtype);
        crate::check::in_param_precision(x, param_dtype, |x| {
            let (shape, w, b) = (norm.normalized_shape(), norm.weight(), norm.bias());
            let (eps, act) = (norm.eps(), self.tail.activation);
            check_layer_block(x, shape, w, b, eps, act)?;
            self.tail.run(x, train, |dropout| {
                layer_fn(x, shape, w, b, eps, act, dropout)
            })
        })
    }

    /// The layer norm: its parameters and configuration.
    pub fn norm(&self) -> &LayerNorm {
        &self.norm
    }

    /// The activation.
    pub fn activation(&self) -> Activation {
        self.tail.activation
    }

    /// The dropout layer, when there is one: its stream's `state`/`set_state`.
    pub fn dropout(&self) -> Option<&Dropout> {
        self.tail.dropout.as_ref()
    }
}

impl ModuleT for LayerNormBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.try_forward(xs, train)
            .map_err(candle_core::Error::from)
    }
}

/// Group norm over dim 1, then an activation, then optional dropout; a candle [`ModuleT`]
/// (`train = true` drops; the norm is the same in training and evaluation).
///
/// Its parameters are a [`GroupNorm`]'s under the block's own prefix (`weight`, `bias`), so a
/// checkpoint of a `GroupNorm` at that prefix loads unchanged; its dropout stream is a
/// [`Dropout`]'s named `dropout` under the prefix (or seeded by [`DropoutConfig::seed`]).
#[derive(Debug)]
pub struct GroupNormBlock {
    norm: GroupNorm,
    tail: BlockTail,
}

/// Builds a [`GroupNormBlock`] of `num_channels` channels in `num_groups` groups, its
/// parameters taken from or created in `vb`.
///
/// # Errors
/// [`Error::IndivisibleGroups`](crate::Error::IndivisibleGroups) when `num_channels %
/// num_groups != 0` (or either is 0); [`Error::Core`](crate::Error::Core) for an invalid config
/// or stored parameters of the wrong shape.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use gradkit::layers::ops::DropoutKind;
/// use gradkit::layers::{DropoutConfig, GroupNormBlockConfig, group_norm_block};
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let config = GroupNormBlockConfig {
///     dropout: Some(DropoutConfig { p: 0.1, kind: DropoutKind::Channel2d, seed: Some(7) }),
///     ..Default::default()
/// };
/// let block = group_norm_block(4, 16, config, vb.pp("block"))?;
/// let x = Tensor::randn(0f32, 1.0, (2, 16, 8, 8), &Device::Cpu)?;
/// assert_eq!(block.try_forward(&x, true)?.dims(), [2, 16, 8, 8]);
/// assert!(group_norm_block(5, 16, config, vb.pp("bad")).is_err());
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn group_norm_block(
    num_groups: usize,
    num_channels: usize,
    config: GroupNormBlockConfig,
    vb: VarBuilder,
) -> Result<GroupNormBlock> {
    config.validate()?;
    Ok(GroupNormBlock {
        tail: BlockTail::new(config.activation, config.dropout, &vb)?,
        norm: group_norm(num_groups, num_channels, config.norm, vb)?,
    })
}

impl GroupNormBlock {
    /// The forward pass with gradkit's error type; [`ModuleT::forward_t`] wraps it.
    ///
    /// An f16 or bf16 input with f32 parameters is computed in f32 and returned in the input's
    /// dtype, as [`GroupNorm::try_forward`] does.
    ///
    /// # Shapes
    /// As [`GroupNorm::try_forward`], and the ranks the dropout's kind takes.
    ///
    /// # Errors
    /// As [`ops::group_norm_block`](crate::ops::group_norm_block()), plus a channel count that
    /// differs from the layer's; a failing call draws no words.
    pub fn try_forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let norm = &self.norm;
        norm.check_channels(x)?;
        let param_dtype = norm.weight().map(Tensor::dtype);
        crate::check::in_param_precision(x, param_dtype, |x| {
            let (groups, w, b) = (norm.num_groups(), norm.weight(), norm.bias());
            let (eps, act) = (norm.eps(), self.tail.activation);
            check_group_block(x, groups, w, b, eps, act)?;
            self.tail.run(x, train, |dropout| {
                group_fn(x, groups, w, b, eps, act, dropout)
            })
        })
    }

    /// The group norm: its parameters and configuration.
    pub fn norm(&self) -> &GroupNorm {
        &self.norm
    }

    /// The activation.
    pub fn activation(&self) -> Activation {
        self.tail.activation
    }

    /// The dropout layer, when there is one: its stream's `state`/`set_state`.
    pub fn dropout(&self) -> Option<&Dropout> {
        self.tail.dropout.as_ref()
    }
}

impl ModuleT for GroupNormBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.try_forward(xs, train)
            .map_err(candle_core::Error::from)
    }
}
