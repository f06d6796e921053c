//! The toolkit gradkit's fused CPU kernels are written with — not needed to *use* gradkit, only
//! to write a kernel for it.
//!
//! - the float element types and their arithmetic ([`Float`], [`Real`]): half precision
//!   computes in f32, and the f32 `exp`, `exp_m1`, `ln_1p`, `tanh` and `erf` are branch-free polynomials
//!   ([`exp_f32`] and friends) so element-wise kernels vectorise; [`dispatch`] runs a
//!   [`FloatFn`] for a tensor's dtype ([`dispatch_op`] for a custom op's storage), and
//!   [`with_avx2`] compiles a closure for AVX2 where the CPU has it;
//! - custom ops ([`Kernel`], [`Fused`], [`Grad`]): a kernel written once over float slices,
//!   generic over the element type, becomes candle's `CustomOp1/2/3` for every dtype;
//! - layouts ([`HostView`], [`Offsets`], [`cpu_slice`], [`storage_slice`]): a CPU storage read in
//!   logical order whatever its strides, borrowed when contiguous;
//! - parallel element-wise maps ([`par_map`], [`par_zip_map`], [`map_chunks`] with a
//!   [`ChunkFn`]) over [`CHUNK`]-sized work items, so results do not depend on the thread count;
//!   [`fill`] and [`fill_with`], a fresh output written once, chunk by chunk, through [`Slots`]
//!   that check every element was written (so kernels need no `unsafe`; transparent huge pages
//!   on Linux);
//! - reductions ([`sum_by`], [`sum_by2`], [`sum_by3`], [`max_abs`]) accumulated in f64 over [`LANES`]
//!   interleaved lanes, so the result depends only on the data, and [`Moments`], the mean and
//!   variance merged exactly across blocks.
//!
//! Everything here runs on CPU storage; the composed path of an op uses candle ops instead
//! (see [`device`](crate::device)).

mod fill;
mod float;
mod fused;
mod host;
mod moments;
mod reduce;

pub use fill::{Slots, fill, fill_with, par_map, par_zip_map};
pub use float::{
    Float, FloatFn, Real, dispatch, dispatch_op, dtype_of, erf_f32, exp_f32, exp_m1_f32, ln_1p_f32,
    tanh_f32, with_avx2,
};
pub use fused::{Fused, Grad, Kernel};
pub use host::{
    CHUNK, ChunkFn, HostView, INLINE_MAX, Offsets, chunk_ranges, cpu_slice, map_chunks,
    storage_slice,
};
pub use moments::Moments;
pub use reduce::{LANES, max_abs, sum_by, sum_by2, sum_by3};
