//! Instance normalisation with PyTorch's semantics (Ulyanov et al. 2016): `InstanceNorm1d/2d/3d`.
//!
//! Each sample's channels are normalised over their spatial positions with the instance's
//! mean and biased variance, then optionally scaled and shifted per channel. It is group
//! normalisation with one channel per group, and runs on group norm's fused kernel. With
//! `track_running_stats`, training also updates running statistics with the batch mean of the
//! per-instance means and of the per-instance **unbiased** variances (as PyTorch does), and
//! evaluation normalises with them (batch norm's evaluation kernel); without, instance
//! statistics are used in both modes. On the CPU the running update takes the per-instance
//! statistics the fused kernel computed; other devices compute them again with candle ops.

use candle_core::{ModuleT, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::ops::{BatchNormStats, batch_norm as batch_norm_fn, group_norm_with_moments};
use crate::running::Running;
use crate::{Error, Result};

/// Which of PyTorch's three instance norms: the number of spatial dims, which decides how an
/// input's rank is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum InstanceNormDims {
    /// `InstanceNorm1d`: `[N, C, L]`, or unbatched `[C, L]`.
    One,
    /// `InstanceNorm2d`: `[N, C, H, W]`, or unbatched `[C, H, W]`.
    #[default]
    Two,
    /// `InstanceNorm3d`: `[N, C, D, H, W]`, or unbatched `[C, D, H, W]`.
    Three,
}

/// Configuration of [`InstanceNorm`]: the arguments of PyTorch's `InstanceNorm1d/2d/3d`, with
/// its defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InstanceNormConfig {
    /// Which of the three (how many spatial dims). Default: [`InstanceNormDims::Two`].
    pub dims: InstanceNormDims,
    /// Added to the variance before the square root. Default: 1e-5.
    pub eps: f64,
    /// Weight of the newest batch in the running statistics; `None` for the cumulative moving
    /// average. Default: `Some(0.1)`.
    pub momentum: Option<f64>,
    /// Learn a per-channel `weight` (initialised to 1) and `bias` (0). Default: false.
    pub affine: bool,
    /// Keep `running_mean`/`running_var`/`num_batches_tracked` and normalise with them in
    /// evaluation. Default: false.
    pub track_running_stats: bool,
}

impl Default for InstanceNormConfig {
    fn default() -> Self {
        Self {
            dims: InstanceNormDims::Two,
            eps: 1e-5,
            momentum: Some(0.1),
            affine: false,
            track_running_stats: false,
        }
    }
}

/// Instance normalisation; a candle [`ModuleT`] (`train = true` uses instance statistics and
/// updates the running ones when tracked). Parameter and buffer names are candle-nn's and
/// PyTorch's: `weight`, `bias`, `running_mean`, `running_var`, `num_batches_tracked`.
#[derive(Debug, Clone)]
pub struct InstanceNorm {
    num_features: usize,
    config: InstanceNormConfig,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running: Option<Running>,
}

/// Builds an [`InstanceNorm`] over `num_features` channels, its parameters and buffers taken
/// from or created in `vb`.
///
/// # Errors
/// [`Error::Core`] for `eps` not positive and finite, a momentum outside `[0, 1]`,
/// `num_features` of 0, or stored parameters of the wrong shape.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use gradkit::layers::{InstanceNormConfig, instance_norm};
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let cfg = InstanceNormConfig { affine: true, track_running_stats: true, ..Default::default() };
/// let inorm = instance_norm(3, cfg, vb.pp("in"))?;
/// let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu)?;
/// assert_eq!(inorm.forward_t(&x, true)?.dims(), [2, 3, 8, 8]);
/// assert_eq!(inorm.num_batches_tracked()?, Some(1));
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn instance_norm(
    num_features: usize,
    config: InstanceNormConfig,
    vb: VarBuilder,
) -> Result<InstanceNorm> {
    grad_core::validate::positive("eps", config.eps)?;
    if let Some(m) = config.momentum {
        grad_core::validate::unit_interval("momentum", m)?;
    }
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
    Ok(InstanceNorm {
        num_features,
        config,
        weight,
        bias,
        running,
    })
}

impl InstanceNorm {
    /// The forward pass with gradkit's error type; [`ModuleT::forward_t`] wraps it.
    ///
    /// An f16 or bf16 input with f32 parameters is computed in f32 and returned in the input's
    /// dtype.
    ///
    /// # Shapes
    /// `x`: `[N, C, *spatial]` or unbatched `[C, *spatial]`, with as many spatial dims as
    /// [`InstanceNormDims`] says; the output has the input's shape and dtype. The running
    /// statistics are `[C]`.
    ///
    /// # Errors
    /// [`Error::Core`] for another rank, or (with `affine` or running statistics) a channel
    /// count that differs from the layer's; [`Error::TooFewValuesPerChannel`] for one spatial
    /// element when instance statistics are used (PyTorch's "expected more than 1 spatial
    /// element"); the norms' errors.
    pub fn try_forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (batched, unbatched, expected) = match self.config.dims {
            InstanceNormDims::One => (3, 2, "2 or 3 ([C, L] or [N, C, L])"),
            InstanceNormDims::Two => (4, 3, "3 or 4 ([C, H, W] or [N, C, H, W])"),
            InstanceNormDims::Three => (5, 4, "4 or 5 ([C, D, H, W] or [N, C, D, H, W])"),
        };
        let xb = match x.rank() {
            r if r == batched => x.clone(),
            r if r == unbatched => x.unsqueeze(0)?,
            r => return Err(Error::rank("instance_norm", "input", expected, r)),
        };
        let channels = xb.dim(1)?;
        if channels != self.num_features && (self.weight.is_some() || self.running.is_some()) {
            return Err(Error::Core(grad_core::Error::shape_mismatch(
                "InstanceNorm",
                "input",
                format!("[N, {}, *]", self.num_features),
                x.dims(),
            )));
        }
        let instance_stats = train || self.running.is_none();
        let spatial: usize = xb.dims()[2..].iter().product();
        if instance_stats && spatial == 1 {
            return Err(Error::TooFewValuesPerChannel {
                op: "instance_norm",
                shape: x.dims().to_vec(),
            });
        }
        let param_dtype = self
            .weight
            .as_ref()
            .map(Tensor::dtype)
            .or_else(|| self.running.as_ref().map(|r| r.mean().dtype()));
        let (w, b) = (self.weight.as_ref(), self.bias.as_ref());
        let y = crate::check::in_param_precision(&xb, param_dtype, |xb| {
            match (&self.running, instance_stats) {
                (Some(r), false) => {
                    let stats = BatchNormStats::Running {
                        mean: r.mean(),
                        var: r.var(),
                    };
                    Ok(batch_norm_fn(xb, w, b, stats, self.config.eps)?.y)
                }
                (running, _) => {
                    let (y, moments) =
                        group_norm_with_moments(xb, channels, w, b, self.config.eps)?;
                    if let (true, Some(r)) = (train, running) {
                        match moments {
                            Some(m) => self.update_running_from(r, &m, channels, spatial)?,
                            None => self.update_running(r, xb, spatial)?,
                        }
                    }
                    Ok(y)
                }
            }
        })?;
        Ok(if x.rank() == unbatched {
            y.squeeze(0)?
        } else {
            y
        })
    }

    /// Blends the batch mean of the fused kernel's per-instance `(mean, biased variance)` rows
    /// (`[N, C]` in row order) into `running`: no second pass over the input.
    fn update_running_from(
        &self,
        running: &Running,
        moments: &[(f64, f64)],
        channels: usize,
        spatial: usize,
    ) -> Result<()> {
        let (mut mean, mut var) = (vec![0.0; channels], vec![0.0; channels]);
        for (i, (m, v)) in moments.iter().enumerate() {
            mean[i % channels] += m;
            var[i % channels] += v;
        }
        #[allow(
            clippy::cast_precision_loss,
            reason = "element counts are far below 2^52"
        )]
        let (n, s) = ((moments.len() / channels) as f64, spatial as f64);
        let device = running.mean().device();
        let mean = Tensor::from_vec(mean, channels, device)?.affine(1.0 / n, 0.0)?;
        let var = Tensor::from_vec(var, channels, device)?;
        running.update(self.config.momentum, &mean, &var, s / (n * (s - 1.0)))
    }

    /// Blends the batch mean of the per-instance means and unbiased variances into `running`
    /// (candle ops on the input's device, no read-back): the composed path's update.
    fn update_running(&self, running: &Running, x: &Tensor, spatial: usize) -> Result<()> {
        let compute = grad_core::device::compute_dtype(x.dtype());
        let rows = x.detach().to_dtype(compute)?.flatten_from(2)?;
        let mean = rows.mean_keepdim(2)?;
        #[allow(
            clippy::cast_precision_loss,
            reason = "element counts are far below 2^52"
        )]
        let unbiased = rows
            .broadcast_sub(&mean)?
            .sqr()?
            .sum(2)?
            .affine(1.0 / (spatial as f64 - 1.0), 0.0)?;
        running.update(
            self.config.momentum,
            &mean.squeeze(2)?.mean(0)?,
            &unbiased.mean(0)?,
            1.0,
        )
    }

    /// The number of channels.
    pub fn num_features(&self) -> usize {
        self.num_features
    }

    /// The configuration.
    pub fn config(&self) -> &InstanceNormConfig {
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

    /// The number of training forwards seen, when tracked (read back from the device).
    ///
    /// # Errors
    /// A candle error from the read-back.
    pub fn num_batches_tracked(&self) -> Result<Option<i64>> {
        self.running
            .as_ref()
            .map(Running::num_batches_tracked)
            .transpose()
    }
}

impl ModuleT for InstanceNorm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.try_forward(xs, train)
            .map_err(candle_core::Error::from)
    }
}
