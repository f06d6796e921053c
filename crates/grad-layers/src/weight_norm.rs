//! Weight normalisation (Salimans & Kingma 2016) around candle-nn's `Linear` and `Conv2d`:
//! the weight is `g * v / ||v||`, recomputed from the parameters `weight_g` and `weight_v`
//! (PyTorch's names) on every forward, so the direction and the length of each output unit's
//! weight are learned apart.

use candle_core::{Module, Tensor, Var};
use candle_nn::{Conv2d, Conv2dConfig, Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::ops::{norm_except_dim, weight_norm as weight_norm_fn};
use crate::reweight::{self, Reweight};

/// Configuration of [`WeightNorm`]: PyTorch's `weight_norm(module, name="weight", dim=0)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WeightNormConfig {
    /// The dim kept apart by the norm (one `g` per index of it); `None` for one norm over the
    /// whole weight. Negative counts from the end, and -1 means the whole weight as in
    /// PyTorch. Default: `Some(0)`, one per output unit.
    pub dim: Option<isize>,
    /// Whether the layer has a bias. Default: true.
    pub bias: bool,
}

impl Default for WeightNormConfig {
    fn default() -> Self {
        Self {
            dim: Some(0),
            bias: true,
        }
    }
}

/// A layer whose weight is weight-normalised; a candle [`Module`] whose gradients reach
/// `weight_g`, `weight_v` and the bias.
#[derive(Debug, Clone)]
pub struct WeightNorm<L> {
    layer: L,
    g: Tensor,
    dim: Option<isize>,
}

/// A weight-normalised `candle_nn::Linear` (`in_dim → out_dim`): parameters `weight_v`
/// (`[out, in]`, candle-nn's initialisation), `weight_g` (initialised to `||weight_v||`) and
/// `bias`.
///
/// # Errors
/// [`Error::DimOutOfRange`](crate::Error::DimOutOfRange) for `dim` outside the weight's rank;
/// candle's errors.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use gradkit::layers::weight_norm_linear;
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let fc = weight_norm_linear(4, 3, Default::default(), vb.pp("fc"))?;
/// assert_eq!(fc.forward(&Tensor::ones((2, 4), DType::F32, &Device::Cpu)?)?.dims(), [2, 3]);
/// assert_eq!(fc.weight_g().dims(), [3, 1]);
/// assert!(map.data().lock().unwrap().contains_key("fc.weight_v"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn weight_norm_linear(
    in_dim: usize,
    out_dim: usize,
    config: WeightNormConfig,
    vb: VarBuilder,
) -> Result<WeightNorm<Linear>> {
    let layer = reweight::linear(in_dim, out_dim, config.bias, "weight_v", &vb)?;
    WeightNorm::around(layer, config, &vb)
}

/// A weight-normalised `candle_nn::Conv2d`, as [`weight_norm_linear`] (`weight_g` is
/// `[out, 1, 1, 1]` with the default `dim`).
///
/// # Errors
/// As [`weight_norm_linear`].
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let conv = gradkit::layers::weight_norm_conv2d(3, 8, 3, Default::default(), Default::default(), vb.pp("c"))?;
/// assert_eq!(conv.weight_g().dims(), [8, 1, 1, 1]);
/// assert_eq!(conv.forward(&Tensor::ones((1, 3, 5, 5), DType::F32, &Device::Cpu)?)?.dims(), [1, 8, 3, 3]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn weight_norm_conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    conv: Conv2dConfig,
    config: WeightNormConfig,
    vb: VarBuilder,
) -> Result<WeightNorm<Conv2d>> {
    let layer = reweight::conv2d(
        in_channels,
        out_channels,
        kernel_size,
        conv,
        config.bias,
        "weight_v",
        &vb,
    )?;
    WeightNorm::around(layer, config, &vb)
}

impl<L: Reweight> WeightNorm<L> {
    /// Wraps `layer`, whose weight is `weight_v`, adding `weight_g` from `vb` (initialised to
    /// the norm of `weight_v` when `vb` does not hold it yet).
    fn around(layer: L, config: WeightNormConfig, vb: &VarBuilder) -> Result<Self> {
        let norm = norm_except_dim(layer.weight(), config.dim)?.detach();
        let fresh = !vb.contains_tensor("weight_g");
        let mut g = vb.get_with_hints(norm.shape(), "weight_g", Init::Const(1.0))?;
        if fresh {
            // A VarMap's tensor is its variable, which this writes in place; keep the
            // variable's tensor whatever the backend.
            let var = Var::from_tensor(&g)?;
            var.set(&norm.to_dtype(g.dtype())?)?;
            g = var.as_tensor().clone();
        }
        Ok(Self {
            layer,
            g,
            dim: config.dim,
        })
    }

    /// The forward pass with gradkit's error type; [`Module::forward`] wraps it.
    ///
    /// # Shapes
    /// As the wrapped layer's.
    ///
    /// # Errors
    /// The wrapped layer's errors, as [`Error::Candle`](crate::Error::Candle).
    pub fn try_forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.layer.with_weight(self.weight()?).forward(x)?)
    }

    /// The weight the layer uses now, `g * v / ||v||`.
    ///
    /// # Errors
    /// candle's errors.
    pub fn weight(&self) -> Result<Tensor> {
        weight_norm_fn(self.layer.weight(), &self.g, self.dim)
    }

    /// The direction parameter `weight_v`.
    pub fn weight_v(&self) -> &Tensor {
        self.layer.weight()
    }

    /// The length parameter `weight_g`.
    pub fn weight_g(&self) -> &Tensor {
        &self.g
    }
}

impl<L: Reweight> Module for WeightNorm<L> {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.try_forward(xs).map_err(candle_core::Error::from)
    }
}
