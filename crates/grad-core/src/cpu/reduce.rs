//! Vectorisable reductions of a contiguous slice, accumulated in f64.
//!
//! Element `j` goes to accumulator `j % LANES` and the lanes are added in order at the end, so
//! the result depends only on the slice, never on how a caller split the work around it. Sixteen
//! independent f64 sums let the compiler vectorise (four lanes per AVX2 register, two per SSE2
//! register) and hide the latency of the additions. Every function is `#[inline(always)]` so it
//! is compiled inside the caller's [`with_avx2`](crate::cpu::with_avx2) closure.

use crate::cpu::Float;

/// The number of interleaved accumulators.
pub const LANES: usize = 16;

/// `sum f(x_j)` over the slice, each element converted to f64 first (exactly).
///
/// ```
/// let xs = [1.0f32, 2.0, 3.0];
/// assert_eq!(gradkit::core::cpu::sum_by(&xs, |v| v * v), 14.0);
/// ```
#[inline(always)]
pub fn sum_by<T: Float>(xs: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0f64; LANES];
    let mut blocks = xs.chunks_exact(LANES);
    for block in &mut blocks {
        for (lane, x) in lanes.iter_mut().zip(block) {
            *lane += f(x.as_f64());
        }
    }
    for (lane, x) in lanes.iter_mut().zip(blocks.remainder()) {
        *lane += f(x.as_f64());
    }
    lanes.iter().sum()
}

/// `sum f(a_j, b_j)` over two slices of equal length (the shorter one bounds the sum).
///
/// ```
/// let g = [1.0f64, -1.0];
/// let x = [3.0f64, 5.0];
/// assert_eq!(gradkit::core::cpu::sum_by2(&g, &x, |g, x| g * x), -2.0);
/// ```
#[inline(always)]
pub fn sum_by2<T: Float>(a: &[T], b: &[T], f: impl Fn(f64, f64) -> f64) -> f64 {
    let mut lanes = [0f64; LANES];
    let mut blocks_a = a.chunks_exact(LANES);
    let mut blocks_b = b.chunks_exact(LANES);
    for (ba, bb) in (&mut blocks_a).zip(&mut blocks_b) {
        for ((lane, x), y) in lanes.iter_mut().zip(ba).zip(bb) {
            *lane += f(x.as_f64(), y.as_f64());
        }
    }
    for ((lane, x), y) in lanes
        .iter_mut()
        .zip(blocks_a.remainder())
        .zip(blocks_b.remainder())
    {
        *lane += f(x.as_f64(), y.as_f64());
    }
    lanes.iter().sum()
}

/// The largest `|x_j|` (0 for an empty slice; NaN elements are ignored).
///
/// ```
/// assert_eq!(gradkit::core::cpu::max_abs(&[1.0f32, -4.0, 2.0]), 4.0);
/// ```
#[inline(always)]
pub fn max_abs<T: Float>(xs: &[T]) -> f64 {
    let mut lanes = [0f64; LANES];
    let mut blocks = xs.chunks_exact(LANES);
    for block in &mut blocks {
        for (lane, x) in lanes.iter_mut().zip(block) {
            *lane = lane.max(x.as_f64().abs());
        }
    }
    for (lane, x) in lanes.iter_mut().zip(blocks.remainder()) {
        *lane = lane.max(x.as_f64().abs());
    }
    lanes.iter().copied().fold(0.0, f64::max)
}
