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
//! depend on the thread count.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use grad_core::cpu::{CHUNK, UninitVec, cpu_slice, storage_slice};
use grad_core::cpu::{Float, FloatFn, Real, dispatch_op, dtype_of, with_avx2};
use grad_core::cpu::{Moments, sum_by, sum_by2};

use rayon::prelude::*;

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
struct RowStat {
    mean: f64,
    invstd: f64,
}

/// The op: `x` (rows x row_len, contiguous), `weight`, `bias` (ones/zeros when absent).
#[derive(Debug)]
pub(crate) struct RowNorm {
    name: &'static str,
    row_len: usize,
    center: bool,
    eps: f64,
    index: AffineIndex,
    has_weight: bool,
    has_bias: bool,
    stats: OnceLock<Vec<RowStat>>,
}

impl RowNorm {
    /// A row norm over rows of `row_len` elements.
    pub(crate) fn new(
        name: &'static str,
        row_len: usize,
        center: bool,
        eps: f64,
        index: AffineIndex,
        has_weight: bool,
        has_bias: bool,
    ) -> Self {
        Self {
            name,
            row_len,
            center,
            eps,
            index,
            has_weight,
            has_bias,
            stats: OnceLock::new(),
        }
    }

    #[inline(always)]
    fn row_forward<T: Float>(
        &self,
        r: usize,
        x: &[T],
        y: &mut [MaybeUninit<T>],
        w: &[T],
        b: &[T],
    ) -> RowStat {
        let n = x.len() as f64;
        let (mean, var) = if self.center {
            let first = sum_by(x, |v| v) / n;
            let dev = sum_by(x, |v| v - first);
            let sq = sum_by(x, |v| (v - first) * (v - first));
            let Moments { mean, m2, .. } = Moments::from_shifted(first, dev, sq, n);
            (mean, m2 / n)
        } else {
            (0.0, sum_by(x, |v| v * v) / n)
        };
        let invstd = 1.0 / (var + self.eps).sqrt();
        let (m, s) = (T::Acc::of(mean), T::Acc::of(invstd));
        match self.index {
            AffineIndex::Element => {
                for (((yj, xj), wj), bj) in y.iter_mut().zip(x).zip(w).zip(b) {
                    yj.write(T::from_acc(
                        (xj.to_acc() - m) * s * wj.to_acc() + bj.to_acc(),
                    ));
                }
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
                    for (yj, xj) in y[seg.clone()].iter_mut().zip(&x[seg]) {
                        yj.write(T::from_acc((xj.to_acc() - m) * wc + bc));
                    }
                }
            }
        }
        RowStat { mean, invstd }
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
        dx: &mut [MaybeUninit<T>],
        gw: &mut [f64],
        gb: &mut [f64],
    ) {
        let n = x.len() as f64;
        let RowStat { mean, invstd } = st;
        let (m, s) = (T::Acc::of(mean), T::Acc::of(invstd));
        match self.index {
            AffineIndex::Element => {
                // a = sum g w, c = sum g w x_hat, in f64 lanes.
                let (mut a, mut c) = ([0f64; 8], [0f64; 8]);
                for (i, ((gj, wj), xj)) in g.iter().zip(w).zip(x).enumerate() {
                    let gwj = gj.as_f64() * wj.as_f64();
                    a[i % 8] += gwj;
                    c[i % 8] += gwj * (xj.as_f64() - mean);
                }
                let a: f64 = a.iter().sum();
                let c = c.iter().sum::<f64>() * invstd;
                let (ka, kc) = (
                    T::Acc::of(if self.center { a / n } else { 0.0 }),
                    T::Acc::of(c / n),
                );
                for (((dxj, gj), wj), xj) in dx.iter_mut().zip(g).zip(w).zip(x) {
                    let xhat = (xj.to_acc() - m) * s;
                    dxj.write(T::from_acc(
                        s * (gj.to_acc() * wj.to_acc() - ka - xhat * kc),
                    ));
                }
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
                    T::Acc::of(if self.center { a / n } else { 0.0 }),
                    T::Acc::of(c / n),
                );
                for k in 0..per_group {
                    let wc = w[first + k].to_acc();
                    let seg = k * spatial..(k + 1) * spatial;
                    for ((dxj, gj), xj) in
                        dx[seg.clone()].iter_mut().zip(&g[seg.clone()]).zip(&x[seg])
                    {
                        let xhat = (xj.to_acc() - m) * s;
                        dxj.write(T::from_acc(s * (gj.to_acc() * wc - ka - xhat * kc)));
                    }
                }
            }
        }
    }

    fn forward<T: Float>(&self, x: &[T], w: &[T], b: &[T]) -> (Vec<T>, Vec<RowStat>) {
        let d = self.row_len;
        let rows = x.len() / d;
        let mut y = UninitVec::new(x.len());
        let mut stats = vec![RowStat::default(); rows];
        y.as_uninit_mut()
            .par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .zip(stats.par_iter_mut())
            .enumerate()
            .for_each(|(r, ((yr, xr), st))| {
                *st = with_avx2(
                    #[inline(always)]
                    || self.row_forward(r, xr, yr, w, b),
                );
            });
        #[allow(unsafe_code, reason = "skipping the zero fill of a fresh output")]
        // SAFETY: the output rows zip with the input rows (same length); `row_forward` writes
        // every position of its row (element-wise, or segment by segment over all channels of
        // the group, which tile the row).
        let y = unsafe { y.assume_init() };
        (y, stats)
    }

    fn backward<T: Float>(
        &self,
        x: &[T],
        g: &[T],
        w: &[T],
        stats: &[RowStat],
    ) -> (Vec<T>, Vec<f64>, Vec<f64>) {
        let d = self.row_len;
        let wlen = w.len();
        let rows_per_block = (CHUNK / d).max(1);
        let mut dx = UninitVec::new(x.len());
        let partials: Vec<(Vec<f64>, Vec<f64>)> = dx
            .as_uninit_mut()
            .par_chunks_mut(rows_per_block * d)
            .enumerate()
            .map(|(blk, dxb)| {
                let (mut gw, mut gb) = (vec![0.0; wlen], vec![0.0; wlen]);
                for (i, dxr) in dxb.chunks_mut(d).enumerate() {
                    let r = blk * rows_per_block + i;
                    let span = r * d..(r + 1) * d;
                    with_avx2(
                        #[inline(always)]
                        || {
                            self.row_backward(
                                r,
                                &x[span.clone()],
                                &g[span.clone()],
                                w,
                                stats[r],
                                dxr,
                                &mut gw,
                                &mut gb,
                            );
                        },
                    );
                }
                (gw, gb)
            })
            .collect();
        #[allow(unsafe_code, reason = "skipping the zero fill of a fresh output")]
        // SAFETY: every block's rows are written in full by `row_backward`, as in `forward`.
        let dx = unsafe { dx.assume_init() };
        let (mut gw, mut gb) = (vec![0.0; wlen], vec![0.0; wlen]);
        for (pw, pb) in partials {
            gw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            gb.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        (dx, gw, gb)
    }
}

struct Forward<'a> {
    op: &'a RowNorm,
    x: (&'a CpuStorage, &'a Layout),
    w: (&'a CpuStorage, &'a Layout),
    b: (&'a CpuStorage, &'a Layout),
}

impl FloatFn for Forward<'_> {
    type Output = CpuStorage;

    fn call<T: Float>(self) -> grad_core::Result<CpuStorage> {
        let x = cpu_slice::<T>(self.x.0, self.x.1)?;
        let w = cpu_slice::<T>(self.w.0, self.w.1)?;
        let b = cpu_slice::<T>(self.b.0, self.b.1)?;
        let (y, stats) = self.op.forward(x, w, b);
        // A second forward through the same op cannot happen (candle runs each op once).
        let _ = self.op.stats.set(stats);
        Ok(T::to_cpu_storage_owned(y))
    }
}

impl CustomOp3 for RowNorm {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let fwd = Forward {
            op: self,
            x: (s1, l1),
            w: (s2, l2),
            b: (s3, l3),
        };
        let dtype = dtype_of(s1);
        let out = dispatch_op(self.name, dtype, fwd)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.get().ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: backward before forward", self.name))
        })?;
        let g = grad.contiguous()?;
        let (dx, gw, gb) = dispatch_op(
            self.name,
            x.dtype(),
            BackwardFn {
                op: self,
                x,
                g: &g,
                w,
                stats,
            },
        )?;
        let gw = self
            .has_weight
            .then(|| Tensor::from_vec(gw, w.shape(), w.device())?.to_dtype(w.dtype()))
            .transpose()?;
        let gb = self
            .has_bias
            .then(|| Tensor::from_vec(gb, w.shape(), w.device())?.to_dtype(w.dtype()))
            .transpose()?;
        Ok((Some(dx), gw, gb))
    }
}

struct BackwardFn<'a> {
    op: &'a RowNorm,
    x: &'a Tensor,
    g: &'a Tensor,
    w: &'a Tensor,
    stats: &'a [RowStat],
}

impl FloatFn for BackwardFn<'_> {
    type Output = (Tensor, Vec<f64>, Vec<f64>);

    fn call<T: Float>(self) -> grad_core::Result<Self::Output> {
        let (xs, xl) = self.x.storage_and_layout();
        let (gs, gl) = self.g.storage_and_layout();
        let (ws, wl) = self.w.storage_and_layout();
        let x = storage_slice::<T>(&xs, xl)?;
        let g = storage_slice::<T>(&gs, gl)?;
        let w = storage_slice::<T>(&ws, wl)?;
        let (dx, gw, gb) = self.op.backward(x, g, w, self.stats);
        let dx = Tensor::from_vec(dx, self.x.shape(), self.x.device())?;
        Ok((dx, gw, gb))
    }
}
