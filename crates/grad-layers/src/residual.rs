//! Residual-branch scaling: each residual branch `f` of `x + f(x)` starts small, so a deep
//! residual network starts close to the identity and its gradients neither vanish nor explode
//! with depth.
//!
//! - [`ResidualScale`]: one learnable scalar `alpha`, initialised to 0 — ReZero (Bachlechner
//!   et al. 2020: `x + alpha f(x)`) and SkipInit (De & Smith 2020).
//! - [`LayerScale`]: one learnable factor per channel, initialised to 1e-5 (Touvron et al.
//!   2021, CaiT; timm's `LayerScale` and, channels first, `LayerScale2d`).

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A residual branch's learnable scalar gain; a candle [`Module`] that multiplies its input
/// (the branch's output) by `alpha`, fused on the CPU ([`crate::ops::channel_scale`]).
#[derive(Debug, Clone)]
pub struct ResidualScale {
    alpha: Tensor,
}

/// ReZero/SkipInit: a [`ResidualScale`] with parameter `alpha` (a scalar, `[]`) initialised to
/// `init` (0 in both papers).
///
/// # Errors
/// [`Error::Core`] for `init` not finite; candle's errors for a stored `alpha` of another shape.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let scale = gradkit::layers::rezero(0.0, vb.pp("block1"))?;
/// let (x, branch) = (Tensor::ones(4, DType::F32, &Device::Cpu)?, Tensor::full(3f32, 4, &Device::Cpu)?);
/// // At initialisation the block is the identity.
/// assert_eq!((&x + scale.forward(&branch)?)?.to_vec1::<f32>()?, [1.0; 4]);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn rezero(init: f64, vb: VarBuilder) -> Result<ResidualScale> {
    grad_core::validate::finite("init", init)?;
    let alpha = vb.get_with_hints((), "alpha", Init::Const(init))?;
    Ok(ResidualScale { alpha })
}

impl ResidualScale {
    /// The gain `alpha`.
    pub fn alpha(&self) -> &Tensor {
        &self.alpha
    }
}

impl Module for ResidualScale {
    /// # Shapes
    /// Any; the output has the input's shape.
    fn forward(&self, branch: &Tensor) -> candle_core::Result<Tensor> {
        let alpha = self.alpha.to_dtype(branch.dtype())?;
        Ok(crate::ops::channel_scale(
            branch,
            &alpha,
            ChannelAxis::Last,
        )?)
    }
}

/// Where [`LayerScale`]'s channels are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ChannelAxis {
    /// The last dim, `[N, L, C]` (transformers; timm's `LayerScale`).
    #[default]
    Last,
    /// Dim 1, `[N, C, *]` (convolutions; timm's `LayerScale2d`).
    First,
}

/// Configuration of [`LayerScale`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerScaleConfig {
    /// The initial value of every channel's factor. Default: 1e-5 (CaiT's, timm's default).
    pub init: f64,
    /// Where the channels are. Default: [`ChannelAxis::Last`].
    pub axis: ChannelAxis,
}

impl Default for LayerScaleConfig {
    fn default() -> Self {
        Self {
            init: 1e-5,
            axis: ChannelAxis::Last,
        }
    }
}

/// LayerScale: a learnable factor per channel (parameter `gamma`, timm's name) multiplying a
/// residual branch's output; a candle [`Module`], fused on the CPU
/// ([`crate::ops::channel_scale`]).
#[derive(Debug, Clone)]
pub struct LayerScale {
    gamma: Tensor,
    axis: ChannelAxis,
}

/// Builds a [`LayerScale`] over `channels`.
///
/// # Errors
/// [`Error::Core`] for `init` not finite or `channels` of 0.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use gradkit::layers::{LayerScaleConfig, layer_scale};
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let ls = layer_scale(8, LayerScaleConfig::default(), vb.pp("ls1"))?;
/// let y = ls.forward(&Tensor::ones((2, 5, 8), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(y.to_vec3::<f32>()?[1][4][7], 1e-5);
/// assert!(layer_scale(8, LayerScaleConfig { init: f64::NAN, ..Default::default() }, vb.pp("bad")).is_err());
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn layer_scale(
    channels: usize,
    config: LayerScaleConfig,
    vb: VarBuilder,
) -> Result<LayerScale> {
    grad_core::validate::finite("init", config.init)?;
    grad_core::validate::at_least_one("channels", channels)?;
    let gamma = vb.get_with_hints(channels, "gamma", Init::Const(config.init))?;
    Ok(LayerScale {
        gamma,
        axis: config.axis,
    })
}

impl LayerScale {
    /// The forward pass with gradkit's error type; [`Module::forward`] wraps it.
    ///
    /// # Shapes
    /// `x`: `[.., C]` for [`ChannelAxis::Last`], `[N, C, *]` for [`ChannelAxis::First`]; the
    /// output has the input's shape and dtype.
    ///
    /// # Errors
    /// [`Error::Core`] when the channel dim is not the layer's.
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.gamma.dim(0)?;
        let dim = match self.axis {
            ChannelAxis::Last => x.rank().checked_sub(1),
            ChannelAxis::First => (x.rank() >= 2).then_some(1),
        };
        if dim.and_then(|d| x.dims().get(d)) != Some(&c) {
            return Err(Error::Core(grad_core::Error::shape_mismatch(
                "LayerScale",
                "input",
                format!("{c} channels on the {:?} axis", self.axis),
                x.dims(),
            )));
        }
        let gamma = self.gamma.to_dtype(x.dtype())?;
        crate::ops::channel_scale(x, &gamma, self.axis)
    }

    /// The per-channel factors `gamma`.
    pub fn gamma(&self) -> &Tensor {
        &self.gamma
    }
}

impl Module for LayerScale {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.try_forward(xs).map_err(candle_core::Error::from)
    }
}
