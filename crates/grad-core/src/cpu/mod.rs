//! The toolkit gradkit's fused CPU kernels are written with — not needed to *use* gradkit, only
//! to write a kernel for it.
//!
//! - the float element types and their arithmetic ([`Float`], [`Real`]): half precision
//!   computes in f32, and the f32 `exp`, `exp_m1`, `tanh` and `erf` are branch-free polynomials
//!   ([`exp_f32`] and friends) so element-wise kernels vectorise; [`dispatch`] runs a
//!   [`FloatFn`] for a tensor's dtype ([`dispatch_op`] for a custom op's storage), and [`with_avx2`] compiles a closure for AVX2 where the
//!   CPU has it;
//! - layouts ([`HostView`], [`Offsets`], [`cpu_slice`], [`storage_slice`]): a CPU storage read in
//!   logical order whatever its strides, borrowed when contiguous;
//! - parallel element-wise maps ([`par_map`], [`par_zip_map`], [`map_chunks`] with a
//!   [`ChunkFn`]) over [`CHUNK`]-sized work items, so results do not depend on the thread count;
//!   [`UninitVec`], a fresh output written once (with transparent huge pages on Linux);
//! - reductions ([`sum_by`], [`sum_by2`], [`max_abs`]) accumulated in f64 over [`LANES`]
//!   interleaved lanes, so the result depends only on the data, and [`Moments`], the mean and
//!   variance merged exactly across blocks.
//!
//! Everything here runs on CPU storage; the composed path of an op uses candle ops instead
//! (see [`device`](crate::device)).

mod float;
mod host;
mod moments;
mod reduce;

pub use float::{
    Float, FloatFn, Real, dispatch, dispatch_op, dtype_of, erf_f32, exp_f32, exp_m1_f32, tanh_f32,
    with_avx2,
};
pub use host::{
    CHUNK, ChunkFn, HostView, INLINE_MAX, Offsets, UninitVec, chunk_ranges, cpu_slice, map_chunks,
    par_map, par_zip_map, storage_slice,
};
pub use moments::Moments;
pub use reduce::{LANES, max_abs, sum_by, sum_by2};
