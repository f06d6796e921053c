//! Composed pieces shared by the row-wise normalisers' oracles.

use candle_core::Tensor;

use crate::Result;

/// Normalises each row of `x` (`[rows, D]`): `(x - mean) / sqrt(var + eps)` when `center`,
/// else `x / sqrt(mean(x^2) + eps)`.
pub(crate) fn normalize_rows_composed(x: &Tensor, center: bool, eps: f64) -> Result<Tensor> {
    let d = x.dim(1)? as f64;
    let xc = if center {
        x.broadcast_sub(&(x.sum_keepdim(1)? / d)?)?
    } else {
        x.clone()
    };
    let var = (xc.sqr()?.sum_keepdim(1)? / d)?;
    Ok(xc.broadcast_div(&(var + eps)?.sqrt()?)?)
}
