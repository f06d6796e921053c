//! Functional batch normalisation (`torch.nn.functional.batch_norm` without the buffer update,
//! which [`BatchNorm`](crate::BatchNorm) does).
//!
//! `y = (x - mean) / sqrt(var + eps) * weight + bias`, per channel `c = dim 1`, with either the
//! batch's own statistics (mean and biased variance over every dim but 1; the gradient flows
//! through them) or given running statistics (Ioffe & Szegedy 2015, "Batch Normalization").

use candle_core::{DType, Tensor};
use grad_core::cpu::Fused;
use grad_core::device::Path;

use crate::kernels::batch_norm::{BatchNormOp, ChannelStats, channel_stats};
use crate::{Error, Result, check};

const OP: &str = "batch_norm";

/// Which statistics [`batch_norm`] normalises with.
#[derive(Debug, Clone, Copy)]
pub enum BatchNormStats<'a> {
    /// The batch's own mean and biased variance (training, or no running statistics).
    Batch,
    /// Given running statistics (evaluation).
    Running {
        /// Per-channel mean, `[C]`.
        mean: &'a Tensor,
        /// Per-channel variance, `[C]`.
        var: &'a Tensor,
    },
}

/// The result of [`batch_norm`].
#[derive(Debug, Clone)]
pub struct BatchNormOutput {
    /// The normalised input, same shape and dtype.
    pub y: Tensor,
    /// With [`BatchNormStats::Batch`]: the batch's per-channel mean and biased variance, what a
    /// caller needs to update running statistics.
    pub batch_stats: Option<BatchMoments>,
}

/// A batch's per-channel moments, as `[C]` tensors on the input's device (f64 from the fused
/// kernel; the compute dtype, f32 for f16/bf16 inputs, from the composed path).
#[derive(Debug, Clone)]
pub struct BatchMoments {
    /// Mean per channel.
    pub mean: Tensor,
    /// Biased variance per channel (divided by `count`).
    pub var: Tensor,
    /// Values per channel: `N` times the product of the spatial dims.
    pub count: usize,
}

/// Batch normalisation of `x` (`[N, C]`, `[N, C, L]`, `[N, C, H, W]` or `[N, C, D, H, W]`).
///
/// On the CPU this runs fused kernels (statistics in one read, normalisation in one read and one
/// write, backward in two passes); other devices use [`batch_norm_composed`], which keeps
/// everything (the batch statistics included) on the device.
///
/// # Shapes
/// `x`: `[N, C, *]`; `weight`, `bias` and the running statistics: `[C]`, same dtype as `x`.
///
/// # Errors
/// [`Error::Core`] for a rank outside 2..=5, an empty input, a parameter of the wrong shape or
/// dtype, or `eps` not a positive finite number; [`Error::TooFewValuesPerChannel`] when batch
/// statistics would see one value per channel.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::layers::ops::{BatchNormStats, batch_norm};
/// let x = Tensor::new(&[[1f32, 10.0], [3.0, 30.0]], &Device::Cpu)?;
/// let out = batch_norm(&x, None, None, BatchNormStats::Batch, 1e-5)?;
/// let y = out.y.to_vec2::<f32>()?;
/// assert!((y[0][0] + 1.0).abs() < 1e-4 && (y[1][1] - 1.0).abs() < 1e-4);
/// assert_eq!(out.batch_stats.unwrap().mean.to_vec1::<f64>()?, [2.0, 20.0]);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn batch_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    stats: BatchNormStats<'_>,
    eps: f64,
) -> Result<BatchNormOutput> {
    let x = &grad_core::device::own_empty(x)?;
    let dims = validate(x, weight, bias, stats, eps)?;
    match Path::of(x.device()) {
        Path::Fused => fused(x, weight, bias, stats, eps, dims),
        Path::Composed => composed(x, weight, bias, stats, eps, dims),
    }
}

fn fused(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    stats: BatchNormStats<'_>,
    eps: f64,
    dims: (usize, usize, usize),
) -> Result<BatchNormOutput> {
    let (op, x, batch_stats) = fused_op(x, weight, bias, stats, eps, dims)?;
    let (w, b) = fused_params(weight, bias, &x)?;
    let y = x.apply_op3(&w, &b, Fused(op))?;
    Ok(BatchNormOutput { y, batch_stats })
}

/// The fused kernel for a validated call (the batch statistics taken when they are used), the
/// contiguous input it applies to, and the batch's moments.
pub(crate) fn fused_op(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    stats: BatchNormStats<'_>,
    eps: f64,
    (n, c, s): (usize, usize, usize),
) -> Result<(BatchNormOp, Tensor, Option<BatchMoments>)> {
    let x = x.contiguous()?;
    let (mean, var, batch_stats) = match stats {
        BatchNormStats::Batch => {
            let ChannelStats { mean, var } = host_stats(&x, n, c, s)?;
            let moments = BatchMoments {
                mean: Tensor::new(mean.as_slice(), x.device())?,
                var: Tensor::new(var.as_slice(), x.device())?,
                count: n * s,
            };
            (mean, var, Some(moments))
        }
        BatchNormStats::Running { mean, var } => (host_vec(mean)?, host_vec(var)?, None),
    };
    let op = BatchNormOp {
        n,
        c,
        s,
        invstd: var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect(),
        mean,
        batch_stats: batch_stats.is_some(),
        has_weight: weight.is_some(),
        has_bias: bias.is_some(),
    };
    Ok((op, x, batch_stats))
}

/// The weight and bias inputs of the fused kernel: the parameters, or ones and zeros.
pub(crate) fn fused_params(
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    x: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let c = x.dim(1)?;
    Ok((
        check::or_const(weight, 1.0, &[c], x)?,
        check::or_const(bias, 0.0, &[c], x)?,
    ))
}

/// [`batch_norm`] written with candle ops: the test oracle, and the path for devices without a
/// fused kernel. f16/bf16 inputs compute in f32.
///
/// # Errors
/// As [`batch_norm`].
pub fn batch_norm_composed(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    stats: BatchNormStats<'_>,
    eps: f64,
) -> Result<BatchNormOutput> {
    let x = &grad_core::device::own_empty(x)?;
    let dims = validate(x, weight, bias, stats, eps)?;
    composed(x, weight, bias, stats, eps, dims)
}

fn composed(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    stats: BatchNormStats<'_>,
    eps: f64,
    (n, c, s): (usize, usize, usize),
) -> Result<BatchNormOutput> {
    let dtype = x.dtype();
    let compute = grad_core::device::compute_dtype(dtype);
    let rank = x.rank();
    let mut bshape = vec![1; rank];
    bshape[1] = c;
    let reduce: Vec<usize> = (0..rank).filter(|&d| d != 1).collect();
    let xf = x.to_dtype(compute)?;
    let count = (n * s) as f64;
    let (mean, var, batch_stats) = match stats {
        BatchNormStats::Batch => {
            let mean = (xf.sum_keepdim(reduce.clone())? / count)?;
            let var = (xf.broadcast_sub(&mean)?.sqr()?.sum_keepdim(reduce)? / count)?;
            let moments = BatchMoments {
                mean: mean.flatten_all()?,
                var: var.flatten_all()?,
                count: n * s,
            };
            (mean, var, Some(moments))
        }
        BatchNormStats::Running { mean, var } => (
            mean.to_dtype(compute)?.reshape(bshape.as_slice())?,
            var.to_dtype(compute)?.reshape(bshape.as_slice())?,
            None,
        ),
    };
    let mut y = xf
        .broadcast_sub(&mean)?
        .broadcast_div(&(var + eps)?.sqrt()?)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(&w.to_dtype(compute)?.reshape(bshape.as_slice())?)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(compute)?.reshape(bshape.as_slice())?)?;
    }
    Ok(BatchNormOutput {
        y: y.to_dtype(dtype)?,
        batch_stats,
    })
}

/// Checks everything and returns `(N, C, S)`.
pub(crate) fn validate(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    stats: BatchNormStats<'_>,
    eps: f64,
) -> Result<(usize, usize, usize)> {
    grad_core::validate::positive("eps", eps)?;
    check::input(
        OP,
        x,
        2..=5,
        "2 to 5 ([N, C], [N, C, L], [N, C, H, W] or [N, C, D, H, W])",
    )?;
    let dims = x.dims();
    let (n, c) = (dims[0], dims[1]);
    let s: usize = dims[2..].iter().product();
    check::param(OP, "weight", weight, &[c], x)?;
    check::param(OP, "bias", bias, &[c], x)?;
    match stats {
        BatchNormStats::Batch => {
            if n * s <= 1 {
                return Err(Error::TooFewValuesPerChannel {
                    op: OP,
                    shape: dims.to_vec(),
                });
            }
        }
        BatchNormStats::Running { mean, var } => {
            check::param(OP, "running_mean", Some(mean), &[c], x)?;
            check::param(OP, "running_var", Some(var), &[c], x)?;
        }
    }
    Ok((n, c, s))
}

fn host_stats(x: &Tensor, n: usize, c: usize, s: usize) -> Result<ChannelStats> {
    struct Stats<'a> {
        x: &'a Tensor,
        n: usize,
        c: usize,
        s: usize,
    }
    impl grad_core::cpu::FloatFn for Stats<'_> {
        type Output = ChannelStats;
        fn call<T: grad_core::cpu::Float>(self) -> grad_core::Result<ChannelStats> {
            let (storage, layout) = self.x.storage_and_layout();
            let data = grad_core::cpu::storage_slice::<T>(&storage, layout)?;
            Ok(channel_stats(data, self.n, self.c, self.s))
        }
    }
    Ok(grad_core::cpu::dispatch(
        OP,
        x.dtype(),
        Stats { x, n, c, s },
    )?)
}

/// A small tensor's values as f64 on the host.
fn host_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}
