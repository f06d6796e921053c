//! Functional layer normalisation (`torch.nn.functional.layer_norm`; Ba, Kiros & Hinton 2016).
//!
//! For every leading index, mean and biased variance over the trailing `normalized_shape` dims;
//! `y = (x - mean) / sqrt(var + eps) * weight + bias`, weight and bias shaped like
//! `normalized_shape`.

use candle_core::Tensor;
use grad_core::cpu::Fused;
use grad_core::device::{Path, compute_dtype};

use super::rows::normalize_rows_composed;
use crate::kernels::row_norm::{AffineIndex, RowNorm, RowNormSpec, Statistic};
use crate::{Error, Result, check};

const OP: &str = "layer_norm";

/// Layer normalisation over the trailing dims `normalized_shape` of `x`.
///
/// On the CPU a fused kernel (one read and one write of each row forward, two passes backward);
/// other devices use [`layer_norm_composed`]. Gradients flow to `x`, `weight` and `bias`.
///
/// # Shapes
/// `x`: `[*, normalized_shape]`; `weight`, `bias`: `normalized_shape`, same dtype as `x`.
///
/// # Errors
/// [`Error::Core`] when `normalized_shape` is empty or not the trailing dims of `x`, for a
/// parameter of the wrong shape or dtype, an empty input, or `eps` not positive and finite.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[1f64, 2.0, 3.0], [10.0, 10.0, 40.0]], &Device::Cpu)?;
/// let y = gradkit::layers::ops::layer_norm(&x, &[3], None, None, 1e-5)?;
/// let row = y.to_vec2::<f64>()?[0].clone();
/// assert!((row[0] + 1.2247).abs() < 1e-4 && row[1].abs() < 1e-12);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn layer_norm(
    x: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    let row_len = validate(x, normalized_shape, weight, bias, eps)?;
    if Path::of(x.device()) == Path::Composed {
        return composed(x, row_len, weight, bias, eps);
    }
    let (x, w, b, op) = fused_inputs(x, normalized_shape, weight, bias, eps)?;
    Ok(x.apply_op3(&w, &b, Fused(op))?)
}

/// The fused kernel's inputs for a checked call: `x` contiguous, the weight and bias (ones and
/// zeros where absent) and the row norm.
pub(super) fn fused_inputs(
    x: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor, RowNorm)> {
    let x = x.contiguous()?;
    let op = RowNorm::new(RowNormSpec {
        name: "gradkit-layer-norm",
        row_len: normalized_shape.iter().product(),
        statistic: Statistic::Variance,
        eps,
        index: AffineIndex::Element,
        weight_is_param: weight.is_some(),
        bias_is_param: bias.is_some(),
    });
    let w = check::or_const(weight, 1.0, normalized_shape, &x)?;
    let b = check::or_const(bias, 0.0, normalized_shape, &x)?;
    Ok((x, w, b, op))
}

/// [`layer_norm`] written with candle ops: the test oracle and the path for other devices.
///
/// # Errors
/// As [`layer_norm`].
pub fn layer_norm_composed(
    x: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    let row_len = validate(x, normalized_shape, weight, bias, eps)?;
    composed(x, row_len, weight, bias, eps)
}

fn composed(
    x: &Tensor,
    row_len: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let compute = compute_dtype(x.dtype());
    let rows = x.elem_count() / row_len;
    let mut y =
        normalize_rows_composed(&x.to_dtype(compute)?.reshape((rows, row_len))?, true, eps)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(&w.to_dtype(compute)?.reshape((1, row_len))?)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(compute)?.reshape((1, row_len))?)?;
    }
    Ok(y.reshape(x.shape())?.to_dtype(x.dtype())?)
}

/// Checks everything and returns the row length (the product of `normalized_shape`).
pub(super) fn validate(
    x: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<usize> {
    grad_core::validate::positive("eps", eps)?;
    check::input(OP, x, 1..=usize::MAX, "at least 1")?;
    let k = normalized_shape.len();
    if k == 0 || k > x.rank() || x.dims()[x.rank() - k..] != *normalized_shape {
        return Err(Error::Core(grad_core::Error::shape_mismatch(
            OP,
            "input",
            format!("[*, {normalized_shape:?}] (normalized_shape as the trailing dims)"),
            x.dims(),
        )));
    }
    check::param(OP, "weight", weight, normalized_shape, x)?;
    check::param(OP, "bias", bias, normalized_shape, x)?;
    Ok(normalized_shape.iter().product())
}
