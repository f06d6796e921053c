//! Functional group normalisation (`torch.nn.functional.group_norm`; Wu & He 2018).
//!
//! The `C` channels of `x: [N, C, *]` are split into `G` contiguous groups; for each sample and
//! group, mean and biased variance are taken over the group's channels and all spatial
//! positions; `y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c]`.

use candle_core::Tensor;
use grad_core::cpu::Fused;
use grad_core::device::{Path, compute_dtype};

use super::rows::normalize_rows_composed;
use crate::kernels::row_norm::{AffineIndex, RowNorm, RowNormSpec, Statistic};
use crate::{Error, Result, check};

const OP: &str = "group_norm";

/// Group normalisation of `x` with `num_groups` groups.
///
/// On the CPU a fused kernel (each `(sample, group)` is one contiguous row); other devices use
/// [`group_norm_composed`]. Gradients flow to `x`, `weight` and `bias`.
///
/// # Shapes
/// `x`: `[N, C, *]` (rank at least 2); `weight`, `bias`: `[C]`, same dtype as `x`.
///
/// # Errors
/// [`Error::IndivisibleGroups`] when `C % num_groups != 0` (or `num_groups` is 0);
/// [`Error::Core`] for a rank below 2, an empty input, a parameter of the wrong shape or dtype,
/// or `eps` not positive and finite.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[1f64, 3.0, 10.0, 30.0]], &Device::Cpu)?;
/// let y = gradkit::layers::ops::group_norm(&x, 2, None, None, 1e-12)?;
/// let v = y.to_vec2::<f64>()?;
/// assert!((v[0][0] + 1.0).abs() < 1e-9 && (v[0][3] - 1.0).abs() < 1e-9);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn group_norm(
    x: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    Ok(group_norm_with_moments(x, num_groups, weight, bias, eps)?.0)
}

/// Each `(sample, group)` row's mean and biased variance, in row order; `None` where the
/// composed path ran.
pub(crate) type GroupMoments = Option<Vec<(f64, f64)>>;

/// [`group_norm`], and on the fused path its rows' [`GroupMoments`].
pub(crate) fn group_norm_with_moments(
    x: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, GroupMoments)> {
    let x = &grad_core::device::own_empty(x)?;
    let (per_group, spatial) = validate(x, num_groups, weight, bias, eps)?;
    if Path::of(x.device()) == Path::Composed {
        let y = composed(x, num_groups, (per_group, spatial), weight, bias, eps)?;
        return Ok((y, None));
    }
    let (x, w, b, op) = fused_inputs(x, num_groups, (per_group, spatial), weight, bias, eps)?;
    let moments = op.moments();
    let y = x.apply_op3(&w, &b, Fused(op))?;
    Ok((y, moments.get().map(Iterator::collect)))
}

/// The fused kernel's inputs for a checked call (`(per_group, spatial)` from [`validate`]): `x`
/// contiguous, the weight and bias (ones and zeros where absent) and the row norm.
pub(super) fn fused_inputs(
    x: &Tensor,
    num_groups: usize,
    (per_group, spatial): (usize, usize),
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor, RowNorm)> {
    let x = x.contiguous()?;
    let c = x.dim(1)?;
    let op = RowNorm::new(RowNormSpec {
        name: "gradkit-group-norm",
        row_len: per_group * spatial,
        statistic: Statistic::Variance,
        eps,
        index: AffineIndex::Channel {
            groups: num_groups,
            per_group,
            spatial,
        },
        weight_is_param: weight.is_some(),
        bias_is_param: bias.is_some(),
    });
    let w = check::or_const(weight, 1.0, &[c], &x)?;
    let b = check::or_const(bias, 0.0, &[c], &x)?;
    Ok((x, w, b, op))
}

/// [`group_norm`] written with candle ops: the test oracle and the path for other devices.
///
/// # Errors
/// As [`group_norm`].
pub fn group_norm_composed(
    x: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    let dims = validate(x, num_groups, weight, bias, eps)?;
    composed(x, num_groups, dims, weight, bias, eps)
}

fn composed(
    x: &Tensor,
    num_groups: usize,
    (per_group, spatial): (usize, usize),
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let compute = compute_dtype(x.dtype());
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    let rows = x
        .to_dtype(compute)?
        .reshape((n * num_groups, per_group * spatial))?;
    let mut y = normalize_rows_composed(&rows, true, eps)?.reshape((n, c, spatial))?;
    if let Some(w) = weight {
        y = y.broadcast_mul(&w.to_dtype(compute)?.reshape((1, c, 1))?)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(compute)?.reshape((1, c, 1))?)?;
    }
    Ok(y.reshape(x.shape())?.to_dtype(x.dtype())?)
}

/// Checks everything and returns `(channels per group, spatial size)`.
pub(super) fn validate(
    x: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<(usize, usize)> {
    grad_core::validate::positive("eps", eps)?;
    check::input(OP, x, 2..=usize::MAX, "at least 2 ([N, C, *])")?;
    let c = x.dim(1)?;
    if num_groups == 0 || !c.is_multiple_of(num_groups) {
        return Err(Error::IndivisibleGroups {
            channels: c,
            groups: num_groups,
        });
    }
    check::param(OP, "weight", weight, &[c], x)?;
    check::param(OP, "bias", bias, &[c], x)?;
    Ok((c / num_groups, x.dims()[2..].iter().product()))
}
