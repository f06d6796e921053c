//! The fused CPU kernel behind cross-entropy with label smoothing, on logits `[rows, C]`.
//!
//! Forward, per row (kept in cache): one pass over the logits for the maximum and the weighted
//! sums the loss needs, one computing `e_c = exp(x_c - max)` into a per-thread scratch row while
//! summing it, and — when the logits take part in autograd — one writing the row's gradient
//! `softmax - smoothed target` (weighted, not yet scaled by the upstream gradient) from the
//! scratch. One exponential per logit, numerically stable for logits of any magnitude. The
//! backward scales that saved gradient in place by the upstream gradient over the reduction's
//! denominator: one pass and no allocation. A second backward of the same graph finds the saved
//! gradient consumed and recomputes it from the logits.

use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};
use grad_core::cpu::sum_by;
use grad_core::cpu::{CHUNK, Slots, cpu_slice, fill_with};
use grad_core::cpu::{Float, FloatFn, Real, dispatch_op, dtype_of, with_avx2};
use rayon::prelude::*;

/// How losses are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reduce {
    Mean,
    Sum,
    None,
}

/// What the target tensor (argument 2) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TargetKind {
    /// One i64 class index per row (already checked to be in range or `ignore_index`).
    Indices { ignore_index: Option<i64> },
    /// A probability per logit, same dtype as the logits.
    Probabilities,
}

/// The op on logits `[rows, C]` (contiguous) and targets (contiguous).
#[derive(Debug)]
pub(crate) struct CrossEntropyOp {
    classes: usize,
    kind: TargetKind,
    weight: Option<Vec<f64>>,
    smoothing: f64,
    reduce: Reduce,
    keep_grad: bool,
    saved: Mutex<Option<Saved>>,
}

/// What the forward leaves for the backward.
#[derive(Debug)]
struct Saved {
    grad: CpuStorage,
    active: Vec<bool>,
    denominator: f64,
}

/// One row's per-row results.
#[derive(Debug, Clone, Copy, Default)]
struct RowLoss {
    loss: f64,
    /// The row's weight in a `mean` denominator (0 for an ignored row).
    weight: f64,
    active: bool,
}

impl CrossEntropyOp {
    pub(crate) fn new(
        classes: usize,
        kind: TargetKind,
        weight: Option<Vec<f64>>,
        smoothing: f64,
        reduce: Reduce,
        keep_grad: bool,
    ) -> Self {
        Self {
            classes,
            kind,
            weight,
            smoothing,
            reduce,
            keep_grad,
            saved: Mutex::new(None),
        }
    }

    fn take_saved(&self) -> Option<Saved> {
        self.saved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// One row: the loss, and (into `out`) the unscaled gradient when asked.
    #[inline(always)]
    fn row<T: Float>(
        &self,
        x: &[T],
        index: Option<i64>,
        probs: Option<&[T]>,
        out: Option<&mut Slots<'_, T>>,
        scratch: &mut Vec<T::Acc>,
    ) -> RowLoss {
        let c = self.classes;
        let eps = self.smoothing;
        let smooth = eps / c as f64;
        let weight = self.weight.as_deref();
        let target = match (self.kind, index) {
            (TargetKind::Indices { ignore_index }, Some(y)) if ignore_index == Some(y) => {
                if let Some(out) = out {
                    out.extend(std::iter::repeat_n(T::cast_f64(0.0), c));
                }
                return RowLoss::default();
            }
            (_, Some(y)) => usize::try_from(y).ok(),
            _ => None,
        };

        // Pass 1: the maximum, and the sums of the loss: sum w x (indices) or sum w t' and
        // sum w t' x (probabilities).
        let max = x.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.as_f64()));
        let (mut wx, mut wt, mut wtx) = (0.0, 0.0, 0.0);
        match (probs, weight) {
            (Some(t), _) => {
                for (k, (xv, tv)) in x.iter().zip(t).enumerate() {
                    let wk = weight.map_or(1.0, |w| w[k]);
                    let tk = wk * ((1.0 - eps) * tv.as_f64() + smooth);
                    wt += tk;
                    wtx += tk * xv.as_f64();
                }
            }
            (None, Some(w)) => wx = x.iter().zip(w).map(|(xv, wk)| wk * xv.as_f64()).sum(),
            (None, None) => wx = sum_by(x, |v| v),
        }
        // Pass 2: exp(x - max) into the scratch row (vectorised exp), summed in f64 lanes.
        scratch.clear();
        scratch.resize(c, T::Acc::ZERO);
        let m = T::Acc::of(max);
        for (e, v) in scratch.iter_mut().zip(x) {
            *e = (v.to_acc() - m).exp();
        }
        let mut lanes = [0f64; 8];
        let mut blocks = scratch.chunks_exact(8);
        for block in &mut blocks {
            for (l, e) in lanes.iter_mut().zip(block) {
                *l += e.f64();
            }
        }
        let sum: f64 =
            lanes.iter().sum::<f64>() + blocks.remainder().iter().map(|e| e.f64()).sum::<f64>();
        let lse = max + sum.ln();

        let (loss, row_weight) = match (target, probs) {
            (Some(y), _) => {
                let wy = weight.map_or(1.0, |w| w[y]);
                let wsum = weight.map_or(c as f64, |w| w.iter().sum());
                // Without smoothing the smoothing sum is left out: a -inf logit would make it
                // 0 * inf = NaN (PyTorch gives the finite loss).
                let smoothed = if eps > 0.0 {
                    smooth * (wsum * lse - wx)
                } else {
                    0.0
                };
                let loss = (1.0 - eps) * wy * (lse - x[y].as_f64()) + smoothed;
                (loss, wy)
            }
            (None, Some(_)) => (lse * wt - wtx, 1.0),
            (None, None) => (f64::NAN, 0.0),
        };

        // Pass 3: the gradient of this row's loss, from the cached exponentials.
        if let Some(out) = out {
            let start = out.written();
            let inv = 1.0 / sum;
            match (target, probs) {
                (Some(y), _) => {
                    let wy = weight.map_or(1.0, |w| w[y]);
                    let wsum = weight.map_or(c as f64, |w| w.iter().sum());
                    let a = T::Acc::of(inv * ((1.0 - eps) * wy + smooth * wsum));
                    let s = T::Acc::of(smooth);
                    match weight {
                        Some(w) => {
                            out.extend(
                                scratch
                                    .iter()
                                    .zip(w)
                                    .map(|(e, wk)| T::from_acc(*e * a - s * T::Acc::of(*wk))),
                            );
                        }
                        None => {
                            out.extend(scratch.iter().map(|e| T::from_acc(*e * a - s)));
                        }
                    }
                    // The target's own term, written over its slot.
                    let gy = scratch[y] * a - s * T::Acc::of(wy) - T::Acc::of((1.0 - eps) * wy);
                    out.filled_mut()[start + y] = T::from_acc(gy);
                }
                (None, Some(t)) => {
                    let a = T::Acc::of(inv * wt);
                    out.extend(scratch.iter().zip(t).enumerate().map(|(k, (e, tk))| {
                        let wk = weight.map_or(1.0, |w| w[k]);
                        let tprime = T::Acc::of(wk * ((1.0 - eps) * tk.as_f64() + smooth));
                        T::from_acc(*e * a - tprime)
                    }));
                }
                (None, None) => out.extend(std::iter::repeat_n(T::cast_f64(f64::NAN), c)),
            }
        }
        RowLoss {
            loss,
            weight: row_weight,
            active: true,
        }
    }

    fn forward<T: Float>(
        &self,
        x: &[T],
        indices: Option<&[i64]>,
        probs: Option<&[T]>,
    ) -> (Vec<RowLoss>, Option<Vec<T>>) {
        let c = self.classes;
        let rows = x.len() / c;
        let rows_per_task = (CHUNK / c).max(1);
        let run = |t: usize,
                   lb: &mut [RowLoss],
                   gb: Option<&mut Slots<'_, T>>,
                   scratch: &mut Vec<T::Acc>| {
            with_avx2(
                #[inline(always)]
                || {
                    let first = t * rows_per_task;
                    let mut gb = gb;
                    for (i, l) in lb.iter_mut().enumerate() {
                        let r = first + i;
                        let xr = &x[r * c..(r + 1) * c];
                        let idx = indices.map(|v| v[r]);
                        let pr = probs.map(|p| &p[r * c..(r + 1) * c]);
                        let out = gb.as_deref_mut();
                        *l = self.row(xr, idx, pr, out, scratch);
                    }
                },
            );
        };
        if self.keep_grad {
            // Each block of rows writes its gradient rows in order (`row` writes all C slots on
            // every path) and returns its losses.
            let (grad, blocks) =
                fill_with(x.len(), rows_per_task * c, Vec::new, |scratch, t, gb| {
                    let mut lb = vec![RowLoss::default(); gb.len() / c];
                    run(t, &mut lb, Some(gb), scratch);
                    lb
                });
            (blocks.concat(), Some(grad))
        } else {
            let mut losses = vec![RowLoss::default(); rows];
            losses
                .par_chunks_mut(rows_per_task)
                .enumerate()
                .for_each_init(Vec::new, |scratch, (t, lb)| run(t, lb, None, scratch));
            (losses, None)
        }
    }

    /// The reduction's denominator: the summed target weights (indices) or the row count
    /// (probabilities) for `mean`, else 1.
    fn denominator(&self, losses: &[RowLoss]) -> f64 {
        match self.reduce {
            Reduce::Mean => losses.iter().map(|l| l.weight).sum(),
            _ => 1.0,
        }
    }
}

struct Forward<'a> {
    op: &'a CrossEntropyOp,
    x: (&'a CpuStorage, &'a Layout),
    t: (&'a CpuStorage, &'a Layout),
}

impl FloatFn for Forward<'_> {
    type Output = (CpuStorage, Shape);

    fn call<T: Float>(self) -> grad_core::Result<(CpuStorage, Shape)> {
        let op = self.op;
        let x = cpu_slice::<T>(self.x.0, self.x.1)?;
        let (losses, grad) = match op.kind {
            TargetKind::Indices { .. } => {
                let idx = cpu_slice::<i64>(self.t.0, self.t.1)?;
                op.forward(x, Some(idx), None)
            }
            TargetKind::Probabilities => {
                let p = cpu_slice::<T>(self.t.0, self.t.1)?;
                op.forward(x, None, Some(p))
            }
        };
        let denominator = op.denominator(&losses);
        let active: Vec<bool> = losses.iter().map(|l| l.active).collect();
        let out = match op.reduce {
            Reduce::None => (
                T::to_cpu_storage_owned(losses.iter().map(|l| T::cast_f64(l.loss)).collect()),
                Shape::from(losses.len()),
            ),
            Reduce::Sum | Reduce::Mean => {
                let total: f64 = losses.iter().map(|l| l.loss).sum();
                (
                    T::to_cpu_storage_owned(vec![T::cast_f64(total / denominator)]),
                    Shape::from(()),
                )
            }
        };
        if let Some(grad) = grad {
            *op.saved.lock().unwrap_or_else(PoisonError::into_inner) = Some(Saved {
                grad: T::to_cpu_storage_owned(grad),
                active,
                denominator,
            });
        }
        Ok(out)
    }
}

/// Scales the saved gradient rows in place by the upstream factors.
struct Backward<'a> {
    op: &'a CrossEntropyOp,
    saved: Saved,
    /// One value for `mean`/`sum`, one per row for `none`.
    upstream: Vec<f64>,
    logits: &'a Tensor,
}

impl FloatFn for Backward<'_> {
    type Output = Tensor;

    fn call<T: Float>(self) -> grad_core::Result<Tensor> {
        let Self {
            op,
            saved,
            upstream,
            logits,
        } = self;
        let mut grad: Vec<T> = T::cpu_storage_data(saved.grad)?;
        let factor = |r: usize| -> f64 {
            if !saved.active[r] {
                // Ignored rows get exactly zero, even when the mean's denominator is zero.
                return 0.0;
            }
            if saved.denominator == 0.0 {
                // Every counted row has weight zero: PyTorch's 0/0 makes every gradient NaN.
                return f64::NAN;
            }
            let g = if op.reduce == Reduce::None {
                upstream[r]
            } else {
                upstream[0]
            };
            g / saved.denominator
        };
        grad.par_chunks_mut(op.classes)
            .enumerate()
            .for_each(|(r, row)| {
                let f = T::Acc::of(factor(r));
                for v in row.iter_mut() {
                    *v = T::from_acc(v.to_acc() * f);
                }
            });
        Ok(Tensor::from_vec(grad, logits.shape(), logits.device())?)
    }
}

impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "gradkit-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dtype = dtype_of(s1);
        dispatch_op(
            self.name(),
            dtype,
            Forward {
                op: self,
                x: (s1, l1),
                t: (s2, l2),
            },
        )
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = match self.take_saved() {
            Some(saved) => saved,
            None => {
                // A second backward of the same graph: the first one consumed (scaled in place)
                // what the forward saved, so run the forward kernel again to get it back.
                let (ls, ll) = logits.storage_and_layout();
                let (ts, tl) = targets.storage_and_layout();
                match (&*ls, &*ts) {
                    (Storage::Cpu(l), Storage::Cpu(t)) => {
                        self.cpu_fwd(l, ll, t, tl)?;
                    }
                    _ => candle_core::bail!("cross_entropy: the fused kernel runs on the CPU"),
                }
                self.take_saved().ok_or_else(|| {
                    candle_core::Error::Msg("cross_entropy: no gradient to recompute".into())
                })?
            }
        };
        let upstream = grad
            .to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let grad = dispatch_op(
            self.name(),
            logits.dtype(),
            Backward {
                op: self,
                saved,
                upstream,
                logits,
            },
        )?;
        Ok((Some(grad), None))
    }
}
