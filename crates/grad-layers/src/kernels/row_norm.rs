//! The fused CPU kernel behind layer, group and RMS norm: each row of a contiguous input is
//! normalised on its own.
//!
//! - Layer norm: a row is one leading index; its `D` elements are the normalised dims; the
//!   affine weight and bias have one entry per element of the row.
//! - Group norm: a row is one `(sample, group)`: `C / G` channels of `S` spatial elements each,
//!   contiguous in `[N, C, S]`; weight and bias have one entry per channel.
//! - RMS norm: like layer norm without the mean (and without a bias).
//!
//! Forward, per row: one pass for the mean (skipped for RMS), one for the variance about it
//! (two-pass, so a large offset costs no precision), one writing the output — the row is read
//! from memory once and stays in cache for the other passes. The row's mean and `1/sqrt(var +
//! eps)` are kept in the op for the backward, which takes two passes per row: the sums
//! `a = sum g w` and `c = sum g w x_hat`, then
//! `grad_x = invstd (g w - a/D - x_hat c/D)` (`a` dropped for RMS). Weight and bias gradients
//! are summed per block of rows in f64 and the blocks combined in order, so results do not
//! depend on the thread count. The rows' means and biased variances stay readable through
//! [`RowNorm::moments`] (instance norm's running statistics, without a second pass).
//!
//! The fused blocks (`row_norm_block.rs`) reuse both row loops: the forward takes a hook run on
//! each row's output while it is in cache, and the backward takes the row's gradient at the
//! norm's output from an [`Upstream`] (the upstream gradient itself for the plain norm).

use std::sync::{Arc, OnceLock};

use grad_core::cpu::{CHUNK, Float, Grad, Kernel, Real, Slots, fill_with, with_avx2};
use grad_core::cpu::{Moments, sum_by, sum_by2, sum_by3};

/// How a row position maps to an affine parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AffineIndex {
    /// Position `j` of a row uses parameter `j` (layer and RMS norm).
    Element,
    /// Row `r` is group `r % groups`; position `j` is channel `group * per_group + j / spatial`
    /// (group norm).
    Channel {
        groups: usize,
        per_group: usize,
        spatial: usize,
    },
}

/// A row's statistics, kept from the forward for the backward.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RowStat {
    mean: f64,
    /// The biased variance (the mean square for RMS norm).
    var: f64,
    invstd: f64,
}

/// The forward's per-row statistics, shared with the op that computed them.
#[derive(Debug, Clone)]
pub(crate) struct RowMoments(Arc<OnceLock<Vec<RowStat>>>);

impl RowMoments {
    /// Each row's `(mean, biased variance)`, once the forward has run.
    pub(crate) fn get(&self) -> Option<impl Iterator<Item = (f64, f64)> + '_> {
        self.0.get().map(|v| v.iter().map(|s| (s.mean, s.var)))
    }
}

/// What a row is normalised by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Statistic {
    /// Its mean and variance: `(x - mean) / sqrt(var + eps)` (layer and group norm).
    Variance,
    /// Its mean square: `x / sqrt(mean(x^2) + eps)` (RMS norm).
    MeanSquare,
}

/// How a row norm is laid out, named field by field.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowNormSpec {
    /// The op's name in errors.
    pub name: &'static str,
    /// Elements per row.
    pub row_len: usize,
    pub statistic: Statistic,
    pub eps: f64,
    pub index: AffineIndex,
    /// Whether the weight input is a parameter (else a constant 1, given no gradient).
    pub weight_is_param: bool,
    /// Whether the bias input is a parameter (else a constant 0, given no gradient).
    pub bias_is_param: bool,
}

/// The op: `x` (rows x row_len, contiguous), `weight`, `bias` (ones/zeros when absent); apply
/// it as `grad_core::cpu::Fused(op)`.
#[derive(Debug)]
pub(crate) struct RowNorm {
    spec: RowNormSpec,
    /// Each row's statistics, kept by the forward for the backward.
    stats: Arc<OnceLock<Vec<RowStat>>>,
}

impl RowNorm {
    /// A row norm laid out as `spec` says.
    pub(crate) fn new(spec: RowNormSpec) -> Self {
        Self {
            spec,
            stats: Arc::default(),
        }
    }

    /// A handle on the rows' statistics, filled by the forward.
    pub(crate) fn moments(&self) -> RowMoments {
        RowMoments(Arc::clone(&self.stats))
    }

    fn center(&self) -> bool {
        self.spec.statistic == Statistic::Variance
    }

    /// A row's statistics.
    #[inline(always)]
    fn row_stat<T: Float>(&self, x: &[T]) -> RowStat {
        let n = x.len() as f64;
        let (mean, var) = if self.center() {
            let first = sum_by(x, |v| v) / n;
            let dev = sum_by(x, |v| v - first);
            let sq = sum_by(x, |v| (v - first) * (v - first));
            let Moments { mean, m2, .. } = Moments::from_shifted(first, dev, sq, n);
            (mean, m2 / n)
        } else {
            (0.0, sum_by(x, |v| v * v) / n)
        };
        let invstd = 1.0 / (var + self.spec.eps).sqrt();
        RowStat { mean, var, invstd }
    }

    /// Row `r`'s normalised, scaled and shifted values (the norm's output) into `y`.
    #[inline(always)]
    pub(crate) fn normalize<T: Float>(
        &self,
        r: usize,
        x: &[T],
        st: RowStat,
        (w, b): (&[T], &[T]),
        y: &mut impl Extend<T>,
    ) {
        let (m, s) = (T::Acc::of(st.mean), T::Acc::of(st.invstd));
        match self.spec.index {
            AffineIndex::Element => {
                y.extend(x.iter().zip(w).zip(b).map(|((xj, wj), bj)| {
                    T::from_acc((xj.to_acc() - m) * s * wj.to_acc() + bj.to_acc())
                }));
            }
            AffineIndex::Channel {
                groups,
                per_group,
                spatial,
            } => {
                let first = (r % groups) * per_group;
                for k in 0..per_group {
                    let (wc, bc) = (w[first + k].to_acc() * s, b[first + k].to_acc());
                    let seg = k * spatial..(k + 1) * spatial;
                    y.extend(
                        x[seg]
                            .iter()
                            .map(|xj| T::from_acc((xj.to_acc() - m) * wc + bc)),
                    );
                }
            }
        }
    }

    /// Writes the row's input gradient and adds its weight/bias gradients into `gw`/`gb`.
    #[inline(always)]
    #[allow(
        clippy::too_many_arguments,
        reason = "one row's slices and accumulators"
    )]
    fn row_backward<T: Float>(
        &self,
        r: usize,
        x: &[T],
        g: &[T],
        w: &[T],
        st: RowStat,
        dx: &mut Slots<'_, T>,
        gw: &mut [f64],
        gb: &mut [f64],
    ) {
        let n = x.len() as f64;
        let RowStat { mean, invstd, .. } = st;
        let (m, s) = (T::Acc::of(mean), T::Acc::of(invstd));
        match self.spec.index {
            AffineIndex::Element => {
                // a = sum g w, c = sum g w x_hat.
                let a = sum_by2(g, w, |gv, wv| gv * wv);
                let c = sum_by3(g, w, x, |gv, wv, xv| gv * wv * (xv - mean)) * invstd;
                let (ka, kc) = (
                    T::Acc::of(if self.center() { a / n } else { 0.0 }),
                    T::Acc::of(c / n),
                );
                dx.extend(g.iter().zip(w).zip(x).map(|((gj, wj), xj)| {
                    let xhat = (xj.to_acc() - m) * s;
                    T::from_acc(s * (gj.to_acc() * wj.to_acc() - ka - xhat * kc))
                }));
                for (((gwj, gbj), gj), xj) in gw.iter_mut().zip(gb.iter_mut()).zip(g).zip(x) {
                    let gv = gj.as_f64();
                    *gwj += gv * (xj.as_f64() - mean) * invstd;
                    *gbj += gv;
                }
            }
            AffineIndex::Channel {
                groups,
                per_group,
                spatial,
            } => {
                let first = (r % groups) * per_group;
                let (mut a, mut c) = (0.0, 0.0);
                for k in 0..per_group {
                    let seg = k * spatial..(k + 1) * spatial;
                    let gsum = sum_by(&g[seg.clone()], |v| v);
                    let gx = sum_by2(&g[seg.clone()], &x[seg], |gv, xv| gv * (xv - mean)) * invstd;
                    let wc = w[first + k].as_f64();
                    a += wc * gsum;
                    c += wc * gx;
                    gw[first + k] += gx;
                    gb[first + k] += gsum;
                }
                let (ka, kc) = (
                    T::Acc::of(if self.center() { a / n } else { 0.0 }),
                    T::Acc::of(c / n),
                );
                for k in 0..per_group {
                    let wc = w[first + k].to_acc();
                    let seg = k * spatial..(k + 1) * spatial;
                    dx.extend(g[seg.clone()].iter().zip(&x[seg]).map(|(gj, xj)| {
                        let xhat = (xj.to_acc() - m) * s;
                        T::from_acc(s * (gj.to_acc() * wc - ka - xhat * kc))
                    }));
                }
            }
        }
    }

    /// The output and each row's statistics; `post(scratch, r, y)` runs on each row's output
    /// once written, while it is in cache (a fused block's activation and dropout).
    pub(crate) fn forward_rows<T: Float, S: Send>(
        &self,
        [x, w, b]: [&[T]; 3],
        init: impl Fn() -> S + Sync + Send,
        post: impl Fn(&mut S, usize, &mut [T]) + Sync + Send,
    ) -> (Vec<T>, Vec<RowStat>) {
        let d = self.spec.row_len;
        fill_with(x.len(), d, init, |scratch, r, yr| {
            let xr = &x[r * d..r * d + yr.len()];
            with_avx2(
                #[inline(always)]
                || {
                    let st = self.row_stat(xr);
                    self.normalize(r, xr, st, (w, b), yr);
                    post(scratch, r, yr.filled_mut());
                    st
                },
            )
        })
    }

    /// The input gradient and the f64 weight and bias gradients, row `r`'s gradient at the norm's
    /// output given by `upstream` from that row of `g`.
    pub(crate) fn backward_rows<T: Float, U: Upstream<T>>(
        &self,
        [x, g, w]: [&[T]; 3],
        stats: &[RowStat],
        upstream: &U,
    ) -> (Vec<T>, Vec<f64>, Vec<f64>) {
        let d = self.spec.row_len;
        let wlen = w.len();
        let rows_per_block = (CHUNK / d).max(1);
        let (dx, partials) = fill_with(
            x.len(),
            rows_per_block * d,
            U::Scratch::default,
            |scratch, blk, dxb| {
                let (mut gw, mut gb) = (vec![0.0; wlen], vec![0.0; wlen]);
                for i in 0..dxb.len() / d {
                    let r = blk * rows_per_block + i;
                    let span = r * d..(r + 1) * d;
                    let xr = &x[span.clone()];
                    with_avx2(
                        #[inline(always)]
                        || {
                            let gr = upstream.row(scratch, r, xr, &g[span.clone()], stats[r]);
                            self.row_backward(r, xr, gr, w, stats[r], dxb, &mut gw, &mut gb);
                        },
                    );
                }
                (gw, gb)
            },
        );
        let (mut gw, mut gb) = (vec![0.0; wlen], vec![0.0; wlen]);
        for (pw, pb) in partials {
            gw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            gb.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        (dx, gw, gb)
    }

    /// Keeps the rows' statistics for the backward and the moments' readers.
    pub(crate) fn keep(&self, stats: Vec<RowStat>) {
        // A second forward through the same op cannot happen (candle runs each op once).
        let _ = self.stats.set(stats);
    }

    /// The statistics the forward kept.
    pub(crate) fn kept(&self) -> candle_core::Result<&[RowStat]> {
        self.stats.get().map(Vec::as_slice).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: backward before forward", self.spec.name))
        })
    }

    /// The gradients of the weight and bias inputs that are parameters.
    pub(crate) fn parameter_grads<T>(&self, gw: Vec<f64>, gb: Vec<f64>) -> [Option<Grad<T>>; 2] {
        [
            self.spec.weight_is_param.then_some(Grad::F64(gw)),
            self.spec.bias_is_param.then_some(Grad::F64(gb)),
        ]
    }

    /// Elements per row.
    pub(crate) fn row_len(&self) -> usize {
        self.spec.row_len
    }
}

/// Where a row's gradient at the norm's output comes from, in the backward.
pub(crate) trait Upstream<T>: Sync {
    /// A thread's scratch space.
    type Scratch: Default + Send;
    /// Row `r`'s gradient at the norm's output, from its input `x`, its upstream gradient `g`
    /// and its statistics.
    fn row<'a>(
        &self,
        scratch: &'a mut Self::Scratch,
        r: usize,
        x: &[T],
        g: &'a [T],
        st: RowStat,
    ) -> &'a [T];
}

/// The norm on its own: the upstream gradient is the gradient at its output.
#[derive(Debug)]
struct Given;

impl<T: Sync> Upstream<T> for Given {
    type Scratch = ();

    #[inline(always)]
    fn row<'a>(&self, (): &'a mut (), _: usize, _: &[T], g: &'a [T], _: RowStat) -> &'a [T] {
        g
    }
}

impl Kernel<3> for RowNorm {
    fn name(&self) -> &'static str {
        self.spec.name
    }

    fn forward<T: Float>(&self, xwb: [&[T]; 3]) -> grad_core::Result<Vec<T>> {
        let (y, stats) = self.forward_rows(xwb, || (), |(), _, _| {});
        self.keep(stats);
        Ok(y)
    }

    fn backward<T: Float>(
        &self,
        [x, w, _]: [&[T]; 3],
        g: &[T],
    ) -> grad_core::Result<[Option<Grad<T>>; 3]> {
        let (dx, gw, gb) = self.backward_rows([x, g, w], self.kept()?, &Given);
        let [gw, gb] = self.parameter_grads(gw, gb);
        Ok([Some(Grad::Elem(dx)), gw, gb])
    }
}
