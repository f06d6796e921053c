//! Batch normalisation with PyTorch's semantics (Ioffe & Szegedy 2015).
//!
//! Training normalises each channel with the batch's mean and biased variance and updates the
//! running statistics with the batch mean and the **unbiased** batch variance:
//! `running = (1 - f) running + f batch`, where `f = momentum`, or `1 / num_batches_tracked`
//! (the cumulative moving average) when `momentum` is `None`; `num_batches_tracked` counts every
//! training forward. Evaluation normalises with the running statistics. Without running
//! statistics (`track_running_stats = false`) batch statistics are used in both modes.

use candle_core::{DType, ModuleT, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::ops::{BatchMoments, BatchNormOutput, BatchNormStats, batch_norm as batch_norm_fn};
use crate::running::Running;
use crate::{Error, Result};

/// Configuration of [`BatchNorm`]: the arguments of PyTorch's `BatchNorm1d/2d/3d`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BatchNormConfig {
    /// Added to the variance before the square root. Default: 1e-5.
    pub eps: f64,
    /// Weight of the newest batch in the running statistics, in `[0, 1]`; `None` is the
    /// cumulative moving average over all batches. Default: `Some(0.1)`.
    pub momentum: Option<f64>,
    /// Learn a per-channel `weight` (initialised to 1) and `bias` (0). Default: true.
    pub affine: bool,
    /// Keep running statistics for evaluation. Default: true.
    pub track_running_stats: bool,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            track_running_stats: true,
        }
    }
}

impl BatchNormConfig {
    /// Checks `eps > 0` (finite) and `momentum` in `[0, 1]`.
    ///
    /// # Errors
    /// [`Error::Core`] with [`grad_core::Error::InvalidHyperParameter`] naming the field.
    pub fn validate(&self) -> Result<()> {
        grad_core::validate::positive("eps", self.eps)?;
        if let Some(m) = self.momentum {
            grad_core::validate::unit_interval("momentum", m)?;
        }
        Ok(())
    }
}

/// Batch normalisation over dim 1 of `[N, C]`, `[N, C, L]`, `[N, C, H, W]` or `[N, C, D, H, W]`
/// inputs; a candle [`ModuleT`] (`train = true` uses and updates batch statistics).
///
/// Parameters use candle-nn's names (`weight`, `bias`, `running_mean`, `running_var`) plus
/// PyTorch's `num_batches_tracked` (an i64 scalar), so a checkpoint saved from candle-nn's
/// `BatchNorm` loads unchanged (the counter starts at 0 when absent) and one saved from this
/// layer loads into candle-nn. On the CPU the forward and backward are fused kernels; other
/// devices use candle ops, and the running statistics are updated on the device either way (no
/// value is read back). Training forwards from several threads each update the statistics once
/// (a per-layer lock orders the updates).
#[derive(Debug, Clone)]
pub struct BatchNorm {
    num_features: usize,
    config: BatchNormConfig,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running: Option<Running>,
}

/// Builds a [`BatchNorm`] over `num_features` channels, its parameters taken from or created in
/// `vb`.
///
/// # Errors
/// [`Error::Core`] for an invalid config, `num_features` of 0, or stored parameters of the
/// wrong shape.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use gradkit::layers::{BatchNormConfig, batch_norm};
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let bn = batch_norm(3, BatchNormConfig::default(), vb.pp("bn"))?;
/// let x = Tensor::randn(0f32, 1.0, (8, 3, 4, 4), &Device::Cpu)?;
/// let y = bn.try_forward(&x, true)?;
/// assert_eq!(y.dims(), [8, 3, 4, 4]);
/// assert_eq!(bn.num_batches_tracked()?, Some(1));
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn batch_norm(
    num_features: usize,
    config: BatchNormConfig,
    vb: VarBuilder,
) -> Result<BatchNorm> {
    config.validate()?;
    grad_core::validate::at_least_one("num_features", num_features)?;
    let (weight, bias) = if config.affine {
        (
            Some(vb.get_with_hints(num_features, "weight", Init::Const(1.0))?),
            Some(vb.get_with_hints(num_features, "bias", Init::Const(0.0))?),
        )
    } else {
        (None, None)
    };
    let running = config
        .track_running_stats
        .then(|| Running::new(num_features, &vb))
        .transpose()?;
    Ok(BatchNorm {
        num_features,
        config,
        weight,
        bias,
        running,
    })
}

impl BatchNorm {
    /// The forward pass with gradkit's error type; [`ModuleT::forward_t`] wraps it.
    ///
    /// An f16 or bf16 input with f32 parameters (the usual mixed-precision layout) is computed
    /// in f32 and returned in the input's dtype, gradients flowing back through both casts.
    ///
    /// # Shapes
    /// `x`: `[N, C]`, `[N, C, L]`, `[N, C, H, W]` or `[N, C, D, H, W]` with `C` the layer's
    /// `num_features`; the output has the input's shape and dtype.
    ///
    /// # Errors
    /// As [`ops::batch_norm`](crate::ops::batch_norm()), plus a channel count that differs from
    /// the layer's.
    pub fn try_forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.check_channels(x)?;
        crate::check::in_param_precision(x, self.param_dtype(), |x| {
            let out = batch_norm_fn(
                x,
                self.weight.as_ref(),
                self.bias.as_ref(),
                self.stats(train),
                self.config.eps,
            )?;
            self.after_forward(train, &out)?;
            Ok(out.y)
        })
    }

    /// Checks that dim 1 of `x` is the layer's channel count (when `x` has a dim 1).
    pub(crate) fn check_channels(&self, x: &Tensor) -> Result<()> {
        if x.rank() >= 2 && x.dim(1)? != self.num_features {
            return Err(Error::Core(grad_core::Error::shape_mismatch(
                "BatchNorm",
                "input",
                format!("[N, {}, *]", self.num_features),
                x.dims(),
            )));
        }
        Ok(())
    }

    /// The statistics a forward in mode `train` normalises with.
    pub(crate) fn stats(&self, train: bool) -> BatchNormStats<'_> {
        match (&self.running, train) {
            (Some(r), false) => BatchNormStats::Running {
                mean: r.mean(),
                var: r.var(),
            },
            _ => BatchNormStats::Batch,
        }
    }

    /// The dtype of the parameters (or of the running statistics without them).
    pub(crate) fn param_dtype(&self) -> Option<DType> {
        self.weight
            .as_ref()
            .map(Tensor::dtype)
            .or_else(|| self.running.as_ref().map(|r| r.mean().dtype()))
    }

    /// Updates the running statistics after a training forward that produced `out`.
    pub(crate) fn after_forward(&self, train: bool, out: &BatchNormOutput) -> Result<()> {
        if let (true, Some(running), Some(batch)) = (train, &self.running, &out.batch_stats) {
            self.update_running(running, batch)?;
        }
        Ok(())
    }

    /// Blends the batch statistics into the running ones with tensor ops on their device (no
    /// read-back), under the layer's lock so that concurrent training forwards each count once.
    fn update_running(&self, running: &Running, batch: &BatchMoments) -> Result<()> {
        #[allow(
            clippy::cast_precision_loss,
            reason = "element counts are far below 2^52"
        )]
        let unbias = batch.count as f64 / (batch.count as f64 - 1.0);
        running.update(self.config.momentum, &batch.mean, &batch.var, unbias)
    }

    /// The number of channels.
    pub fn num_features(&self) -> usize {
        self.num_features
    }

    /// The configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// The per-channel weight, when affine.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// The per-channel bias, when affine.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The running mean, when tracked.
    pub fn running_mean(&self) -> Option<&Tensor> {
        self.running.as_ref().map(Running::mean)
    }

    /// The running variance, when tracked.
    pub fn running_var(&self) -> Option<&Tensor> {
        self.running.as_ref().map(Running::var)
    }

    /// How many training batches updated the running statistics, when tracked.
    ///
    /// # Errors
    /// A candle error if the counter cannot be read.
    pub fn num_batches_tracked(&self) -> Result<Option<i64>> {
        self.running
            .as_ref()
            .map(Running::num_batches_tracked)
            .transpose()
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.try_forward(xs, train)
            .map_err(candle_core::Error::from)
    }
}
