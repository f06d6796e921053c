//! Functional RMS normalisation (`torch.nn.functional.rms_norm`; Zhang & Sennrich 2019).
//!
//! For every leading index, `y = x / sqrt(mean(x^2) + eps) * weight` over the trailing
//! `normalized_shape` dims: no mean subtraction, no bias.

use candle_core::{DType, Tensor};
use grad_core::cpu::Fused;
use grad_core::device::{Path, compute_dtype};

use super::layer_norm;
use super::rows::normalize_rows_composed;
use crate::Result;
use crate::check;
use crate::kernels::row_norm::{AffineIndex, RowNorm, RowNormSpec, Statistic};

/// The `eps` PyTorch uses for `eps=None`: the machine epsilon of the input's dtype, f32's for
/// f16 and bf16 (which compute in f32).
pub fn default_rms_eps(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        f64::EPSILON
    } else {
        f64::from(f32::EPSILON)
    }
}

/// RMS normalisation over the trailing dims `normalized_shape` of `x`. `eps = None` is
/// PyTorch's `eps=None` ([`default_rms_eps`]).
///
/// On the CPU a fused kernel; other devices use [`rms_norm_composed`]. Gradients flow to `x` and
/// `weight`.
///
/// # Shapes
/// `x`: `[*, normalized_shape]`; `weight`: `normalized_shape`, same dtype as `x`.
///
/// # Errors
/// As [`layer_norm`](super::layer_norm()).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[3f64, 4.0]], &Device::Cpu)?;
/// let y = gradkit::layers::ops::rms_norm(&x, &[2], None, Some(1e-12))?;
/// let v = y.to_vec2::<f64>()?;
/// let rms = (12.5f64).sqrt();
/// assert!((v[0][0] - 3.0 / rms).abs() < 1e-9);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn rms_norm(
    x: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    eps: Option<f64>,
) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    let eps = eps.unwrap_or_else(|| default_rms_eps(x.dtype()));
    let row_len = layer_norm::validate(x, normalized_shape, weight, None, eps)?;
    if Path::of(x.device()) == Path::Composed {
        return composed(x, row_len, weight, eps);
    }
    let x = x.contiguous()?;
    let op = RowNorm::new(RowNormSpec {
        name: "gradkit-rms-norm",
        row_len,
        statistic: Statistic::MeanSquare,
        eps,
        index: AffineIndex::Element,
        weight_is_param: weight.is_some(),
        bias_is_param: false,
    });
    let w = check::or_const(weight, 1.0, normalized_shape, &x)?;
    let b = check::or_const(None, 0.0, normalized_shape, &x)?;
    Ok(x.apply_op3(&w, &b, Fused(op))?)
}

/// [`rms_norm`] written with candle ops: the test oracle and the path for other devices.
///
/// # Errors
/// As [`rms_norm`].
pub fn rms_norm_composed(
    x: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    eps: Option<f64>,
) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    let eps = eps.unwrap_or_else(|| default_rms_eps(x.dtype()));
    let row_len = layer_norm::validate(x, normalized_shape, weight, None, eps)?;
    composed(x, row_len, weight, eps)
}

fn composed(x: &Tensor, row_len: usize, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let compute = compute_dtype(x.dtype());
    let rows = x.elem_count() / row_len;
    let mut y =
        normalize_rows_composed(&x.to_dtype(compute)?.reshape((rows, row_len))?, false, eps)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(&w.to_dtype(compute)?.reshape((1, row_len))?)?;
    }
    Ok(y.reshape(x.shape())?.to_dtype(x.dtype())?)
}
