//! The fused CPU kernel behind batch norm, on a contiguous input seen as `[N, C, S]` (`S` the
//! product of the spatial dims, 1 for `[N, C]`).
//!
//! - [`channel_stats`]: per-channel mean and biased variance in one read of the input. Work is
//!   split by blocks of channels; each block walks the batch in groups of rows small enough to
//!   stay in cache, takes the group's mean and the squared deviations about it (two passes over
//!   cached data), and merges groups with Chan et al.'s update — stable for inputs with a large
//!   offset, and independent of the thread count.
//! - [`BatchNormOp`] forward: `y = (x - mean) * (invstd * w) + b`, one read and one write.
//! - backward: one read of `grad_y` and `x` for the per-channel sums `sum g` and
//!   `sum g (x - mean)`, then one pass writing
//!   `grad_x = A g + B (x - mean) + D` with per-channel constants (the full batch-statistics
//!   gradient in training, `A g` with running statistics).

use grad_core::cpu::{CHUNK, Float, Grad, Kernel, Real, fill, with_avx2};
use grad_core::cpu::{Moments, sum_by};
use rayon::prelude::*;

/// Elements a group of rows may span so that a block's data stays in L1/L2 between passes.
const GROUP_ELEMENTS: usize = 16 * 1024;

/// Channels per work item: enough that each row contributes 64 contiguous elements.
pub(crate) fn block_width(c: usize, s: usize) -> usize {
    64usize.div_ceil(s).clamp(1, c.max(1))
}

/// Per-channel statistics of a batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChannelStats {
    /// Mean per channel.
    pub mean: Vec<f64>,
    /// Biased variance per channel (divided by the count).
    pub var: Vec<f64>,
}

/// Per-channel mean and biased variance of contiguous `[n, c, s]` data.
pub(crate) fn channel_stats<T: Float>(x: &[T], n: usize, c: usize, s: usize) -> ChannelStats {
    let bw = block_width(c, s);
    let group_rows = (GROUP_ELEMENTS / (bw * s)).max(1);
    let blocks: Vec<Vec<Moments>> = (0..c.div_ceil(bw))
        .into_par_iter()
        .map(|blk| {
            with_avx2(
                #[inline(always)]
                || {
                    let (c0, c1) = (blk * bw, ((blk + 1) * bw).min(c));
                    let mut acc = vec![Moments::default(); c1 - c0];
                    let mut sums = vec![0.0; c1 - c0];
                    let mut m2 = vec![0.0; c1 - c0];
                    let mut dev = vec![0.0; c1 - c0];
                    for n0 in (0..n).step_by(group_rows) {
                        let rows = n0..(n0 + group_rows).min(n);
                        let count = (rows.len() * s) as f64;
                        sums.fill(0.0);
                        for row in rows.clone() {
                            let seg = &x[(row * c + c0) * s..(row * c + c1) * s];
                            add_segment_sums(seg, s, &mut sums, |v, _| v);
                        }
                        let means: Vec<f64> = sums.iter().map(|v| v / count).collect();
                        // Second pass over the cached group: squared deviations, plus the
                        // deviations themselves, which correct the rounding of the first mean
                        // (the corrected two-pass algorithm of Chan, Golub & LeVeque).
                        m2.fill(0.0);
                        dev.fill(0.0);
                        for row in rows {
                            let seg = &x[(row * c + c0) * s..(row * c + c1) * s];
                            add_segment_sums(seg, s, &mut dev, |v, ch| v - means[ch]);
                            add_segment_sums(seg, s, &mut m2, |v, ch| {
                                (v - means[ch]) * (v - means[ch])
                            });
                        }
                        for (k, a) in acc.iter_mut().enumerate() {
                            a.merge(Moments::from_shifted(means[k], dev[k], m2[k], count));
                        }
                    }
                    acc
                },
            )
        })
        .collect();
    let moments: Vec<Moments> = blocks.into_iter().flatten().collect();
    ChannelStats {
        mean: moments.iter().map(|m| m.mean).collect(),
        var: moments.iter().map(|m| m.m2 / m.count).collect(),
    }
}

/// Adds `f(x, channel)` over each channel's part of a row segment to `acc[channel]`.
#[inline(always)]
fn add_segment_sums<T: Float>(seg: &[T], s: usize, acc: &mut [f64], f: impl Fn(f64, usize) -> f64) {
    if s == 1 {
        for (ch, (a, v)) in acc.iter_mut().zip(seg).enumerate() {
            *a += f(v.as_f64(), ch);
        }
    } else {
        for (ch, (a, plane)) in acc.iter_mut().zip(seg.chunks_exact(s)).enumerate() {
            *a += sum_by(plane, |v| f(v, ch));
        }
    }
}

/// Per-channel `sum g` and `sum g (x - mean)` of contiguous `[n, c, s]` data.
fn channel_grad_sums<T: Float>(
    g: &[T],
    x: &[T],
    n: usize,
    c: usize,
    s: usize,
    mean: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let bw = block_width(c, s);
    let blocks: Vec<(Vec<f64>, Vec<f64>)> = (0..c.div_ceil(bw))
        .into_par_iter()
        .map(|blk| {
            with_avx2(
                #[inline(always)]
                || {
                    let (c0, c1) = (blk * bw, ((blk + 1) * bw).min(c));
                    let mut sg = vec![0.0; c1 - c0];
                    let mut sgx = vec![0.0; c1 - c0];
                    let m = &mean[c0..c1];
                    for row in 0..n {
                        let span = (row * c + c0) * s..(row * c + c1) * s;
                        let (gs, xs) = (&g[span.clone()], &x[span]);
                        if s == 1 {
                            for ((((a, b), gv), xv), mv) in
                                sg.iter_mut().zip(sgx.iter_mut()).zip(gs).zip(xs).zip(m)
                            {
                                let gv = gv.as_f64();
                                *a += gv;
                                *b += gv * (xv.as_f64() - mv);
                            }
                        } else {
                            for (k, (gp, xp)) in
                                gs.chunks_exact(s).zip(xs.chunks_exact(s)).enumerate()
                            {
                                sg[k] += sum_by(gp, |v| v);
                                sgx[k] +=
                                    grad_core::cpu::sum_by2(gp, xp, |gv, xv| gv * (xv - m[k]));
                            }
                        }
                    }
                    (sg, sgx)
                },
            )
        })
        .collect();
    let (sg, sgx): (Vec<Vec<f64>>, Vec<Vec<f64>>) = blocks.into_iter().unzip();
    (sg.concat(), sgx.concat())
}

/// Writes `out = f(a, b, channel constants)` over `[n, c, s]` data, in parallel.
///
/// `k` holds three per-channel constants (already in the arithmetic type); `f(a, b, mean, k)`.
#[inline(always)]
fn channel_map<T: Float>(
    a: &[T],
    b: &[T],
    c: usize,
    s: usize,
    mean: &[T::Acc],
    k: &[[T::Acc; 3]],
    f: impl Fn(T::Acc, T::Acc, T::Acc, [T::Acc; 3]) -> T::Acc + Sync,
) -> Vec<T> {
    // The inputs' elements behind output chunk `t` of `task`-element chunks.
    let inputs = |t: usize, len: usize, task: usize| {
        let span = t * task..t * task + len;
        (&a[span.clone()], &b[span])
    };
    if s == 1 {
        let task = (CHUNK / c).max(1) * c;
        fill(a.len(), task, |t, out| {
            let (ab, bb) = inputs(t, out.len(), task);
            with_avx2(
                #[inline(always)]
                || {
                    for (arow, brow) in ab.chunks(c).zip(bb.chunks(c)) {
                        out.extend(arow.iter().zip(brow).zip(mean).zip(k).map(
                            |(((av, bv), m), kc)| T::from_acc(f(av.to_acc(), bv.to_acc(), *m, *kc)),
                        ));
                    }
                },
            );
        })
        .0
    } else {
        let planes_per_task = (CHUNK / s).max(1);
        fill(a.len(), planes_per_task * s, |t, out| {
            let (ab, bb) = inputs(t, out.len(), planes_per_task * s);
            with_avx2(
                #[inline(always)]
                || {
                    for (i, (ap, bp)) in ab.chunks(s).zip(bb.chunks(s)).enumerate() {
                        let ch = (t * planes_per_task + i) % c;
                        let (m, kc) = (mean[ch], k[ch]);
                        out.extend(
                            ap.iter()
                                .zip(bp)
                                .map(|(av, bv)| T::from_acc(f(av.to_acc(), bv.to_acc(), m, kc))),
                        );
                    }
                },
            );
        })
        .0
    }
}

/// The batch-norm op on `x` (contiguous `[n, c, s]`), `weight`, `bias` (ones/zeros when absent).
#[derive(Debug)]
pub(crate) struct BatchNormOp {
    pub n: usize,
    pub c: usize,
    pub s: usize,
    /// The statistics normalised with: the batch's, or the running ones.
    pub mean: Vec<f64>,
    pub invstd: Vec<f64>,
    /// Whether `mean`/`invstd` are the batch's own (the backward then flows through them).
    pub batch_stats: bool,
    pub has_weight: bool,
    pub has_bias: bool,
}

impl BatchNormOp {
    /// The forward's per-channel mean and `[invstd * weight, bias, 0]`, in `T`'s arithmetic type.
    pub(crate) fn forward_constants<T: Float>(
        &self,
        w: &[T],
        b: &[T],
    ) -> (Vec<T::Acc>, Vec<[T::Acc; 3]>) {
        let k = (0..self.c)
            .map(|ch| {
                let scale = self.invstd[ch] * w[ch].as_f64();
                [T::Acc::of(scale), T::Acc::of(b[ch].as_f64()), T::Acc::ZERO]
            })
            .collect();
        (self.means::<T>(), k)
    }

    /// The mean per channel in `T`'s arithmetic type.
    pub(crate) fn means<T: Float>(&self) -> Vec<T::Acc> {
        self.mean.iter().map(|&m| T::Acc::of(m)).collect()
    }

    /// The backward's per-channel `[A, B, D]` of `grad_x = A g + B (x - mean) + D`, from the
    /// sums `sum g` and `sum g (x - mean)` of the gradient at the norm's output.
    pub(crate) fn backward_constants<T: Float>(
        &self,
        w: &[T],
        sum_g: &[f64],
        sum_gx: &[f64],
    ) -> Vec<[T::Acc; 3]> {
        let count = (self.n * self.s) as f64;
        (0..self.c)
            .map(|ch| {
                let (wc, s) = (w[ch].as_f64(), self.invstd[ch]);
                let a = wc * s;
                let (b, d) = if self.batch_stats {
                    (-wc * s * s * sum_gx[ch] * s / count, -a * sum_g[ch] / count)
                } else {
                    (0.0, 0.0)
                };
                [T::Acc::of(a), T::Acc::of(b), T::Acc::of(d)]
            })
            .collect()
    }

    /// The weight's and bias's gradients (where they are parameters) from the same sums.
    pub(crate) fn parameter_grads<T: Float>(
        &self,
        sum_g: Vec<f64>,
        sum_gx: &[f64],
    ) -> [Option<Grad<T>>; 2] {
        let grad_w = self.has_weight.then(|| {
            Grad::F64(
                sum_gx
                    .iter()
                    .zip(&self.invstd)
                    .map(|(a, s)| a * s)
                    .collect(),
            )
        });
        [grad_w, self.has_bias.then_some(Grad::F64(sum_g))]
    }
}

impl Kernel<3> for BatchNormOp {
    fn name(&self) -> &'static str {
        "gradkit-batch-norm"
    }

    fn forward<T: Float>(&self, [x, w, b]: [&[T]; 3]) -> grad_core::Result<Vec<T>> {
        let (mean, k) = self.forward_constants(w, b);
        Ok(channel_map(
            x,
            x,
            self.c,
            self.s,
            &mean,
            &k,
            |xv, _, m, k| (xv - m) * k[0] + k[1],
        ))
    }

    fn backward<T: Float>(
        &self,
        [x, w, _]: [&[T]; 3],
        g: &[T],
    ) -> grad_core::Result<[Option<Grad<T>>; 3]> {
        let (sum_g, sum_gx) = channel_grad_sums(g, x, self.n, self.c, self.s, &self.mean);
        let k = self.backward_constants(w, &sum_g, &sum_gx);
        let dx = channel_map(
            g,
            x,
            self.c,
            self.s,
            &self.means::<T>(),
            &k,
            |gv, xv, m, k| k[0] * gv + k[1] * (xv - m) + k[2],
        );
        let [grad_w, grad_b] = self.parameter_grads(sum_g, &sum_gx);
        Ok([Some(Grad::Elem(dx)), grad_w, grad_b])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_exact_for_a_large_offset() {
        // Values 1e4 + {-1, 0, 1, 2} per channel: mean 1e4 + 0.5, variance 1.25.
        let (n, c, s) = (2, 3, 2);
        let x: Vec<f64> = (0..n * c * s)
            .map(|i| {
                let (row, pos) = (i / (c * s), i % s);
                1e4 + (row * 2 + pos) as f64 - 1.0
            })
            .collect();
        let st = channel_stats(&x, n, c, s);
        for ch in 0..c {
            assert_eq!(st.mean[ch], 1e4 + 0.5);
            assert_eq!(st.var[ch], 1.25);
        }
    }
}
