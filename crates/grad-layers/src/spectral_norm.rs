//! Spectral normalisation (Miyato et al. 2018) around candle-nn's `Linear` and `Conv2d`: the
//! weight is divided by its largest singular value, estimated by power iteration on the
//! buffers `weight_u` and `weight_v`, the parameter being `weight_orig` (PyTorch's names). The
//! iterations run in training only; `u` and `v` are constants for autograd.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, ModuleT, Tensor, Var};
use candle_nn::{Conv2d, Conv2dConfig, Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::ops::{SpectralNormStep, power_vector_lengths, spectral_norm as spectral_norm_fn};
use crate::reweight::{self, Reweight};

/// Configuration of [`SpectralNorm`]: PyTorch's
/// `spectral_norm(module, n_power_iterations=1, eps=1e-12, dim=0)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpectralNormConfig {
    /// Power iterations per training forward (at least 1). Default: 1.
    pub n_power_iterations: usize,
    /// The floor of a norm in the iteration's normalisation. Default: 1e-12.
    pub eps: f64,
    /// The weight's output dim. Default: 0.
    pub dim: isize,
    /// Whether the layer has a bias. Default: true.
    pub bias: bool,
    /// The seed of the initial `u` and `v`; `None` takes it from the layer's name
    /// ([`grad_core::rng::seed_of_name`]). Default: `None`.
    pub seed: Option<u64>,
}

impl Default for SpectralNormConfig {
    fn default() -> Self {
        Self {
            n_power_iterations: 1,
            eps: 1e-12,
            dim: 0,
            bias: true,
            seed: None,
        }
    }
}

/// A layer whose weight is spectrally normalised; a candle [`ModuleT`] (`train = true` runs
/// the power iterations and updates `weight_u`/`weight_v`). Gradients reach `weight_orig` and
/// the bias; `weight_u` and `weight_v` are buffers (never stepped, clipped or monitored, see
/// [`grad_core::NamedVars::from_var_map`]).
#[derive(Debug, Clone)]
pub struct SpectralNorm<L> {
    layer: L,
    u: Var,
    v: Var,
    step: SpectralNormStep,
    /// Held while `u` and `v` are read and updated by a training forward.
    update: Arc<Mutex<()>>,
}

/// A spectrally normalised `candle_nn::Linear` (`in_dim → out_dim`): parameter `weight_orig`
/// (candle-nn's initialisation) and `bias`, buffers `weight_u` and `weight_v`.
///
/// # Errors
/// [`Error::Core`](crate::Error::Core) for `n_power_iterations` of 0 or `eps` not positive;
/// [`Error::DimOutOfRange`](crate::Error::DimOutOfRange) for `dim`; candle's errors.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use gradkit::layers::spectral_norm_linear;
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let fc = spectral_norm_linear(8, 4, Default::default(), vb.pp("fc"))?;
/// let y = fc.forward_t(&Tensor::ones((2, 8), DType::F32, &Device::Cpu)?, true)?;
/// assert_eq!(y.dims(), [2, 4]);
/// // sigma, the estimate of weight_orig's largest singular value, divides the weight.
/// assert!(fc.sigma(false)?.to_scalar::<f32>()? > 0.0);
/// let params = gradkit::core::NamedVars::from_var_map(&map);
/// assert_eq!(params.names().collect::<Vec<_>>(), ["fc.weight_orig", "fc.bias"]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn spectral_norm_linear(
    in_dim: usize,
    out_dim: usize,
    config: SpectralNormConfig,
    vb: VarBuilder,
) -> Result<SpectralNorm<Linear>> {
    let layer = reweight::linear(in_dim, out_dim, config.bias, "weight_orig", &vb)?;
    SpectralNorm::around(layer, config, &vb)
}

/// A spectrally normalised `candle_nn::Conv2d`, as [`spectral_norm_linear`] (`weight_v` has
/// `in / groups * k * k` elements).
///
/// # Errors
/// As [`spectral_norm_linear`].
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let conv = gradkit::layers::spectral_norm_conv2d(3, 8, 3, Default::default(), Default::default(), vb.pp("c"))?;
/// assert_eq!(conv.weight_v().dims(), [27]);
/// let y = conv.forward_t(&Tensor::ones((1, 3, 5, 5), DType::F32, &Device::Cpu)?, true)?;
/// assert_eq!(y.dims(), [1, 8, 3, 3]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn spectral_norm_conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    conv: Conv2dConfig,
    config: SpectralNormConfig,
    vb: VarBuilder,
) -> Result<SpectralNorm<Conv2d>> {
    let layer = reweight::conv2d(
        in_channels,
        out_channels,
        kernel_size,
        conv,
        config.bias,
        "weight_orig",
        &vb,
    )?;
    SpectralNorm::around(layer, config, &vb)
}

/// Power iterations PyTorch runs on fresh `u` and `v` so the first estimate is good.
const INIT_ITERATIONS: usize = 15;

impl<L: Reweight> SpectralNorm<L> {
    /// Wraps `layer`, whose weight is `weight_orig`, adding the buffers `weight_u` and
    /// `weight_v` from `vb`; fresh ones are drawn from N(0, 1), normalised and refined by 15
    /// power iterations, as PyTorch does.
    fn around(layer: L, config: SpectralNormConfig, vb: &VarBuilder) -> Result<Self> {
        grad_core::validate::at_least_one("n_power_iterations", config.n_power_iterations)?;
        grad_core::validate::positive("eps", config.eps)?;
        let step = SpectralNormStep {
            n_power_iterations: config.n_power_iterations,
            eps: config.eps,
            dim: config.dim,
            training: true,
        };
        let w = layer.weight();
        let (rows, cols) = power_vector_lengths(w, step.dim)?;
        let fresh = !vb.contains_tensor("weight_u") || !vb.contains_tensor("weight_v");
        let u = Var::from_tensor(&vb.get_with_hints(rows, "weight_u", Init::Const(0.0))?)?;
        let v = Var::from_tensor(&vb.get_with_hints(cols, "weight_v", Init::Const(0.0))?)?;
        if fresh {
            let seed = config
                .seed
                .unwrap_or_else(|| grad_core::rng::seed_of_name(&vb.prefix()));
            let mut rng = grad_core::Philox::new(seed);
            let u0 = rng.normal(rows, 0.0, 1.0, DType::F64, w.device())?;
            let v0 = rng.normal(cols, 0.0, 1.0, DType::F64, w.device())?;
            let unit = |t: Tensor| -> Result<Tensor> {
                Ok(t.broadcast_div(&t.sqr()?.sum_all()?.sqrt()?.maximum(config.eps)?)?)
            };
            let init = SpectralNormStep {
                n_power_iterations: INIT_ITERATIONS,
                ..step
            };
            let out = spectral_norm_fn(&w.to_dtype(DType::F64)?, &unit(u0)?, &unit(v0)?, init)?;
            u.set(&out.u.to_dtype(u.dtype())?)?;
            v.set(&out.v.to_dtype(v.dtype())?)?;
        }
        Ok(Self {
            layer,
            u,
            v,
            step,
            update: Arc::new(Mutex::new(())),
        })
    }

    /// The forward pass with gradkit's error type; [`ModuleT::forward_t`] wraps it.
    ///
    /// # Shapes
    /// As the wrapped layer's.
    ///
    /// # Errors
    /// The wrapped layer's errors.
    pub fn try_forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let w = self.normalised(train)?.0;
        Ok(self.layer.with_weight(w).forward(x)?)
    }

    /// The normalised weight and sigma; in training, after the power iterations, which update
    /// the buffers.
    fn normalised(&self, train: bool) -> Result<(Tensor, Tensor)> {
        let _guard = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        let step = SpectralNormStep {
            training: train,
            ..self.step
        };
        let out = spectral_norm_fn(
            self.layer.weight(),
            self.u.as_tensor(),
            self.v.as_tensor(),
            step,
        )?;
        if train {
            self.u.set(&out.u)?;
            self.v.set(&out.v)?;
        }
        Ok((out.w, out.sigma))
    }

    /// The current estimate of the weight's largest singular value (`train` runs the
    /// iterations first, updating the buffers, as a training forward does).
    ///
    /// # Errors
    /// candle's errors.
    pub fn sigma(&self, train: bool) -> Result<Tensor> {
        Ok(self.normalised(train)?.1)
    }

    /// The parameter `weight_orig`.
    pub fn weight_orig(&self) -> &Tensor {
        self.layer.weight()
    }

    /// The buffer `weight_u`.
    pub fn weight_u(&self) -> &Tensor {
        self.u.as_tensor()
    }

    /// The buffer `weight_v`.
    pub fn weight_v(&self) -> &Tensor {
        self.v.as_tensor()
    }
}

impl<L: Reweight> ModuleT for SpectralNorm<L> {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.try_forward(xs, train)
            .map_err(candle_core::Error::from)
    }
}
