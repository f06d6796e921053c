//! Reading a tensor's elements for comparison.

use candle_core::{DType, Tensor};

/// Every element of `t`, converted to f64, in row-major order whatever its shape and layout.
///
/// # Errors
/// candle's error for a dtype that does not convert to f64.
pub fn values(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}
