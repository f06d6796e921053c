//! PReLU (He et al. 2015): Leaky ReLU with a learned slope, shared or one per channel.

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::Result;

/// Configuration of [`PRelu`]: PyTorch's `nn.PReLU(num_parameters, init)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PReluConfig {
    /// 1 (one slope shared by every channel) or the number of channels. Default: 1.
    pub num_parameters: usize,
    /// The initial slope. Default: 0.25.
    pub init: f64,
}

impl Default for PReluConfig {
    fn default() -> Self {
        Self {
            num_parameters: 1,
            init: 0.25,
        }
    }
}

/// PReLU with its slopes in the `VarBuilder` under `weight` (candle-nn's and PyTorch's name); a
/// candle [`Module`] whose backward reaches the input and the slopes.
#[derive(Debug, Clone)]
pub struct PRelu {
    weight: Tensor,
}

/// Builds a [`PRelu`].
///
/// # Errors
/// [`Error::Core`](crate::Error::Core) for `num_parameters` of 0, a non-finite `init`, or a stored weight of the
/// wrong shape.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use gradkit::layers::{PReluConfig, prelu};
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let act = prelu(PReluConfig { num_parameters: 3, ..Default::default() }, vb.pp("act"))?;
/// let y = act.forward(&Tensor::full(-4f32, (2, 3), &Device::Cpu)?)?;
/// assert_eq!(y.to_vec2::<f32>()?, [[-1.0; 3], [-1.0; 3]]);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn prelu(config: PReluConfig, vb: VarBuilder) -> Result<PRelu> {
    grad_core::validate::at_least_one("num_parameters", config.num_parameters)?;
    grad_core::validate::finite("init", config.init)?;
    let weight = vb.get_with_hints(config.num_parameters, "weight", Init::Const(config.init))?;
    Ok(PRelu { weight })
}

impl PRelu {
    /// The forward pass with gradkit's error type; [`Module::forward`] wraps it.
    ///
    /// # Shapes
    /// `x`: any rank; with one slope per channel, dim 1 is the channel dim and has
    /// `num_parameters` entries. The output has the input's shape and dtype.
    ///
    /// # Errors
    /// As [`ops::prelu`](crate::ops::prelu()).
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::prelu(x, &self.weight)
    }

    /// The slopes.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for PRelu {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.try_forward(xs).map_err(candle_core::Error::from)
    }
}
