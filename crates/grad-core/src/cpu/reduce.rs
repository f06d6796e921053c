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
    sum_by3(a, b, b, |x, y, _| f(x, y))
}

/// `sum f(a_j, b_j, c_j)` over three slices of equal length (the shortest one bounds the sum).
///
/// ```
/// let g = [1.0f64, -1.0];
/// let w = [2.0f64, 2.0];
/// let x = [3.0f64, 5.0];
/// assert_eq!(gradkit::core::cpu::sum_by3(&g, &w, &x, |g, w, x| g * w * x), -4.0);
/// ```
#[inline(always)]
pub fn sum_by3<T: Float>(a: &[T], b: &[T], c: &[T], f: impl Fn(f64, f64, f64) -> f64) -> f64 {
    let mut lanes = [0f64; LANES];
    let mut blocks_a = a.chunks_exact(LANES);
    let mut blocks_b = b.chunks_exact(LANES);
    let mut blocks_c = c.chunks_exact(LANES);
    for ((ba, bb), bc) in (&mut blocks_a).zip(&mut blocks_b).zip(&mut blocks_c) {
        for (((lane, x), y), z) in lanes.iter_mut().zip(ba).zip(bb).zip(bc) {
            *lane += f(x.as_f64(), y.as_f64(), z.as_f64());
        }
    }
    let tails = blocks_a.remainder().iter().zip(blocks_b.remainder());
    for ((lane, (x, y)), z) in lanes.iter_mut().zip(tails).zip(blocks_c.remainder()) {
        *lane += f(x.as_f64(), y.as_f64(), z.as_f64());
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
