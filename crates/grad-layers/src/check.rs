//! Input checks shared by the normalisation ops.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// Checks that `x` is a non-empty float tensor of a rank in `ranks`.
pub(crate) fn input(
    op: &'static str,
    x: &Tensor,
    ranks: std::ops::RangeInclusive<usize>,
    expected: &'static str,
) -> Result<()> {
    grad_core::validate::ensure_float(op, "input", x.dtype())?;
    if !ranks.contains(&x.rank()) {
        return Err(Error::rank(op, "input", expected, x.rank()));
    }
    if x.elem_count() == 0 {
        return Err(Error::empty(op, "input"));
    }
    Ok(())
}

/// Checks an optional affine parameter (or statistic): shape `dims`, the input's dtype and
/// device.
pub(crate) fn param(
    op: &'static str,
    name: &str,
    t: Option<&Tensor>,
    dims: &[usize],
    x: &Tensor,
) -> Result<()> {
    let Some(t) = t else { return Ok(()) };
    if t.dims() != dims {
        return Err(Error::Core(grad_core::Error::shape_mismatch(
            op,
            name,
            format!("{dims:?}"),
            t.dims(),
        )));
    }
    if t.dtype() != x.dtype() {
        return Err(Error::Core(grad_core::Error::UnsupportedDType {
            op,
            arg: "parameter",
            dtype: t.dtype(),
            expected: "the input's dtype",
        }));
    }
    grad_core::ensure_same_device(op, x.device(), t.device())?;
    Ok(())
}

/// Returns `t`, or a constant tensor of `value` shaped `dims` like `x` when `t` is absent, made
/// contiguous for the fused kernels.
pub(crate) fn or_const(
    t: Option<&Tensor>,
    value: f64,
    dims: &[usize],
    x: &Tensor,
) -> Result<Tensor> {
    Ok(match t {
        Some(t) => t.contiguous()?,
        None => Tensor::full(value, dims, x.device())?.to_dtype(x.dtype())?,
    })
}

/// Runs a normalisation layer's op in the mixed-precision layout: an f16 or bf16 input with f32
/// parameters (or statistics) is computed in f32 and returned in its own dtype, gradients
/// flowing through both conversions; any other input runs as it is (and must match the
/// parameters' dtype).
pub(crate) fn in_param_precision(
    x: &Tensor,
    param_dtype: Option<DType>,
    op: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    match (x.dtype(), param_dtype) {
        (DType::F16 | DType::BF16, Some(DType::F32)) => {
            Ok(op(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?)
        }
        _ => op(x),
    }
}
