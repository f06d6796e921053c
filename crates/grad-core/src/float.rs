//! The float element types gradkit's CPU kernels compute with, and dtype dispatch.
//!
//! Kernels are written once, generic over [`Float`], and dispatched on a tensor's dtype with
//! [`FloatMap`]. Half-precision types convert to `f32` for arithmetic (see STYLE: reductions
//! accumulate in f32 for f16/bf16), `f64` stays `f64`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, WithDType};
use half::{bf16, f16};

use crate::{Error, Result};

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A float dtype gradkit's CPU kernels support: `f16`, `bf16`, `f32` and `f64`.
///
/// Sealed: the set is exactly candle's float dtypes that hold numbers (the MX and f8 types do not
/// take part in training).
///
/// The conversions are defined here, always inlined, rather than taken from candle's
/// `WithDType::to_f64`: that one is not `#[inline]`, so across crates it is a function call per
/// element and stops the compiler from vectorising a kernel.
pub trait Float: WithDType + sealed::Sealed {
    /// Converts to `f32`, exactly for `f16`/`bf16`, rounding for `f64`.
    fn to_f32(self) -> f32;
    /// Converts from `f32`, rounding to nearest for `f16`/`bf16`.
    fn from_f32(v: f32) -> Self;
    /// Converts to `f64`, exactly.
    fn as_f64(self) -> f64;
    /// Converts from `f64`, rounding to nearest.
    fn cast_f64(v: f64) -> Self;
    /// The mutable element slice of a CPU storage of this dtype, `None` for another dtype.
    fn storage_slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! impl_float {
    ($ty:ty, $variant:ident, $to_f32:expr, $from_f32:expr, $as_f64:expr, $cast_f64:expr) => {
        impl Float for $ty {
            #[inline(always)]
            fn to_f32(self) -> f32 {
                $to_f32(self)
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                $from_f32(v)
            }
            #[inline(always)]
            fn as_f64(self) -> f64 {
                $as_f64(self)
            }
            #[inline(always)]
            fn cast_f64(v: f64) -> Self {
                $cast_f64(v)
            }
            fn storage_slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
                match storage {
                    CpuStorage::$variant(data) => Some(data.as_mut_slice()),
                    _ => None,
                }
            }
        }
    };
}

impl_float!(
    f16,
    F16,
    f16::to_f32,
    f16::from_f32,
    f16::to_f64,
    f16::from_f64
);
impl_float!(
    bf16,
    BF16,
    bf16::to_f32,
    bf16::from_f32,
    bf16::to_f64,
    bf16::from_f64
);
impl_float!(f32, F32, |v| v, |v| v, f64::from, f64_to_f32);
impl_float!(f64, F64, f64_to_f32, f64::from, |v| v, |v| v);

#[allow(
    clippy::cast_possible_truncation,
    reason = "rounding f64 to f32 is the point"
)]
#[inline(always)]
fn f64_to_f32(v: f64) -> f32 {
    v as f32
}

/// Whether candle's `dtype` is one of the float dtypes gradkit computes with.
pub fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

/// Checks that `dtype` is a supported float dtype.
///
/// # Errors
/// [`Error::UnsupportedDType`] naming `op` and `arg` otherwise.
///
/// ```
/// use candle_core::DType;
/// assert!(grad_core::float::ensure_float("demo", "x", DType::BF16).is_ok());
/// assert!(grad_core::float::ensure_float("demo", "x", DType::U32).is_err());
/// ```
pub fn ensure_float(op: &'static str, arg: &'static str, dtype: DType) -> Result<()> {
    if is_float(dtype) {
        Ok(())
    } else {
        Err(Error::UnsupportedDType {
            op,
            arg,
            dtype,
            expected: "a float dtype (f16, bf16, f32 or f64)",
        })
    }
}

/// A kernel generic over the element type, run on a CPU storage by [`map_float`].
pub trait FloatMap {
    /// What the kernel returns.
    type Output;
    /// Runs the kernel on `data` read through `layout`.
    ///
    /// # Errors
    /// Whatever the kernel reports.
    fn map<T: Float>(self, data: &[T], layout: &Layout) -> Result<Self::Output>;
}

/// Dispatches `kernel` on the dtype of a CPU storage.
///
/// # Errors
/// [`Error::UnsupportedDType`] for an integer or non-numeric dtype, else the kernel's error.
pub fn map_float<M: FloatMap>(
    op: &'static str,
    storage: &CpuStorage,
    layout: &Layout,
    kernel: M,
) -> Result<M::Output> {
    match storage {
        CpuStorage::F16(data) => kernel.map(data, layout),
        CpuStorage::BF16(data) => kernel.map(data, layout),
        CpuStorage::F32(data) => kernel.map(data, layout),
        CpuStorage::F64(data) => kernel.map(data, layout),
        other => Err(Error::UnsupportedDType {
            op,
            arg: "input",
            dtype: other.dtype(),
            expected: "a float dtype (f16, bf16, f32 or f64)",
        }),
    }
}
