//! Reading a tensor's elements for comparison.

use candle_core::{DType, Tensor};

/// Every element of `t`, converted to f64, in row-major order whatever its shape and layout.
///
/// # Errors
/// candle's error for a dtype that does not convert to f64.
pub fn values(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// The gradients of `sum(y * upstream)` with respect to each of `wrt` (`None` where no gradient
/// reached it): what `y.backward(upstream)` leaves in `.grad` in PyTorch.
///
/// # Errors
/// candle's error when the product or the backward pass fails.
pub fn grads_of(
    y: &Tensor,
    upstream: &Tensor,
    wrt: &[&Tensor],
) -> candle_core::Result<Vec<Option<Tensor>>> {
    let loss = (y * upstream.to_dtype(y.dtype())?)?.sum_all()?;
    let store = loss.backward()?;
    Ok(wrt.iter().map(|t| store.get(t).cloned()).collect())
}
