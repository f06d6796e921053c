//! The fused CPU kernel of a batch-norm block, `y = dropout(act(batch_norm(x)))`, on a contiguous
//! input seen as `[N, C, S]` (as in `batch_norm.rs`).
//!
//! - Forward: the batch statistics are taken first (`channel_stats`, one read); then one pass
//!   reads `x`, normalises, applies the activation and the dropout mask, and writes `y`. Neither
//!   the normalised values nor the activation's output are stored.
//! - Backward: nothing was kept but the statistics. Both passes recompute the normalised `z`
//!   from `x`, so the gradient at the norm's output, `gz = act'(z) * mask(g)`, is never stored
//!   either:
//!   1. one read of `g` and `x` for the per-channel sums `sum gz` and `sum gz (x - mean)`, per
//!      block of channels over every row (so the sums do not depend on the thread count). It
//!      regenerates the mask's words from the forward's stream position and packs them into keep
//!      bits (one bit per element, for the second pass: regenerating the words costs more than
//!      reading `x`);
//!   2. one read of `g`, `x` and the bits, writing `grad_x = A gz + B (x - mean) + D`, batch
//!      norm's constants.
//!
//! The separate layers' arithmetic is kept step for step (the same constants, the same rounding
//! to the element type for f32 and f64, the same order of the f64 sums), so the block equals
//! batch norm, the activation and dropout applied one after another.

use std::sync::atomic::{AtomicU32, Ordering};

use grad_core::cpu::{CHUNK, Float, Grad, Kernel, LANES, Real, fill_with, with_avx2};
use rayon::prelude::*;

use super::batch_norm::{BatchNormOp, block_width};
use super::dropout::DropoutOp;
use super::elementwise::Elementwise;

/// Batch norm (`norm`), then activation `f`, then the dropout `mask` when there is one; apply it
/// as `grad_core::cpu::Fused(op)` to `x`, `weight`, `bias`.
#[derive(Debug)]
pub(crate) struct BatchNormBlockOp<F> {
    pub norm: BatchNormOp,
    pub f: F,
    pub mask: Option<DropoutOp>,
}

/// The dropout mask as kernel constants: an element is kept when its word is below
/// `threshold`. Without dropout every word is 0 and the threshold 1.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Keep<A> {
    threshold: u64,
    scale: A,
    shift: A,
    drop: A,
}

impl<A: Real> Keep<A> {
    pub(crate) fn of(mask: Option<&DropoutOp>) -> Self {
        match mask {
            Some(m) => Self {
                threshold: m.threshold,
                scale: A::of(m.keep_scale),
                shift: A::of(m.keep_shift),
                drop: A::of(m.drop_value),
            },
            None => Self {
                threshold: 1,
                scale: A::ONE,
                shift: A::ZERO,
                drop: A::ZERO,
            },
        }
    }

    /// The forward's `(a, b)` of `a * value + b` for an element with mask word `word`.
    #[inline(always)]
    pub(crate) fn forward(self, word: u32) -> (A, A) {
        if u64::from(word) < self.threshold {
            (self.scale, self.shift)
        } else {
            (A::ZERO, self.drop)
        }
    }

    /// The backward's factor of the upstream gradient.
    #[inline(always)]
    pub(crate) fn backward(self, word: u32) -> A {
        if u64::from(word) < self.threshold {
            self.scale
        } else {
            A::ZERO
        }
    }
}

/// Where a pass takes the mask from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source<'a> {
    /// The mask stream (the forward, and the backward's first pass); `None` without dropout.
    Stream(Option<&'a DropoutOp>),
    /// The keep bits the backward's first pass packed (bit `e % 32` of word `e / 32` for
    /// element `e`).
    Bits(&'a [AtomicU32]),
}

/// A thread's scratch: one mask word per element of the current span, and per plane.
#[derive(Debug, Default)]
pub(crate) struct Words {
    elements: Vec<u32>,
    units: Vec<u32>,
}

impl Words {
    /// The words of elements `start .. start + len`: the stream's, all 0 without a mask, or from
    /// the bits 0 where kept and `u32::MAX` where dropped.
    pub(crate) fn of(&mut self, source: Source<'_>, start: usize, len: usize) -> &[u32] {
        self.elements.clear();
        match source {
            Source::Stream(Some(m)) => {
                m.element_words(start, len, &mut self.elements, &mut self.units);
            }
            Source::Stream(None) => self.elements.resize(len, 0),
            Source::Bits(bits) => {
                let mut e = start;
                while e < start + len {
                    let (first, end) = (e % 32, (32 - e % 32).min(start + len - e) + e % 32);
                    let word = bits[e / 32].load(Ordering::Relaxed);
                    // Kept: 0, dropped: u32::MAX.
                    self.elements
                        .extend((first..end).map(|i| (word >> i & 1).wrapping_sub(1)));
                    e += end - first;
                }
            }
        }
        &self.elements
    }
}

/// Sets the keep bits of elements `start .. start + words.len()` (kept: `word < threshold`). A
/// bit word wholly inside the span is this call's alone and is stored; the two at its ends may
/// be shared with a neighbouring span and are or-ed in.
fn pack(bits: &[AtomicU32], start: usize, words: &[u32], threshold: u64) {
    let mut e = start;
    let mut rest = words;
    while !rest.is_empty() {
        let (head, tail) = rest.split_at((32 - e % 32).min(rest.len()));
        let word = head.iter().enumerate().fold(0u32, |acc, (i, w)| {
            acc | u32::from(u64::from(*w) < threshold) << ((e + i) % 32)
        });
        if head.len() == 32 {
            bits[e / 32].store(word, Ordering::Relaxed);
        } else {
            bits[e / 32].fetch_or(word, Ordering::Relaxed);
        }
        e += head.len();
        rest = tail;
    }
}

/// `sum gz` and `sum gz (x - mean)` over one plane, `gz(g, x, word)` computed per element; the
/// lanes are those of [`grad_core::cpu::sum_by`], so the sums are batch norm's own.
#[inline(always)]
fn plane_sums<T: Float>(
    g: &[T],
    x: &[T],
    words: &[u32],
    mean: f64,
    gz: impl Fn(T::Acc, T::Acc, u32) -> T::Acc,
) -> (f64, f64) {
    let (mut sg, mut sgx) = ([0f64; LANES], [0f64; LANES]);
    let mut add = |lane: usize, gv: &T, xv: &T, w: u32| {
        let v = gz(gv.to_acc(), xv.to_acc(), w).f64();
        sg[lane] += v;
        sgx[lane] += v * (xv.as_f64() - mean);
    };
    let (gb, xb, wb) = (
        g.chunks_exact(LANES),
        x.chunks_exact(LANES),
        words.chunks_exact(LANES),
    );
    let tails = (gb.remainder(), xb.remainder(), wb.remainder());
    for ((gs, xs), ws) in gb.zip(xb).zip(wb) {
        for (lane, ((gv, xv), w)) in gs.iter().zip(xs).zip(ws).enumerate() {
            add(lane, gv, xv, *w);
        }
    }
    for (lane, ((gv, xv), w)) in tails.0.iter().zip(tails.1).zip(tails.2).enumerate() {
        add(lane, gv, xv, *w);
    }
    (sg.iter().sum(), sgx.iter().sum())
}

impl<F: Elementwise> BatchNormBlockOp<F> {
    /// Elements per work item of the element-wise passes: whole rows of `[N, C]` data, whole
    /// planes otherwise.
    fn task(&self) -> usize {
        let (c, s) = (self.norm.c, self.norm.s);
        let unit = if s == 1 { c } else { s };
        (CHUNK / unit).max(1) * unit
    }

    /// `out = elem(x, g, word, k)` element by element, `k` the element's channel constants and
    /// `word` its mask word, in parallel.
    fn map<T: Float, K: Copy + Sync>(
        &self,
        (x, g): (&[T], &[T]),
        source: Source<'_>,
        k: &[K],
        elem: impl Fn(T::Acc, T::Acc, u32, K) -> T::Acc + Sync + Send,
    ) -> Vec<T> {
        let (c, s, task) = (self.norm.c, self.norm.s, self.task());
        let (y, _) = fill_with(x.len(), task, Words::default, |words, t, out| {
            let start = t * task;
            let span = start..start + out.len();
            let ws = words.of(source, start, out.len());
            let (xs, gs) = (&x[span.clone()], &g[span]);
            with_avx2(
                #[inline(always)]
                || {
                    if s == 1 {
                        for ((xr, gr), wr) in xs.chunks(c).zip(gs.chunks(c)).zip(ws.chunks(c)) {
                            out.extend(xr.iter().zip(gr).zip(wr).zip(k).map(
                                |(((xv, gv), w), kc)| {
                                    T::from_acc(elem(xv.to_acc(), gv.to_acc(), *w, *kc))
                                },
                            ));
                        }
                    } else {
                        let planes = xs.chunks(s).zip(gs.chunks(s)).zip(ws.chunks(s));
                        for (i, ((xp, gp), wp)) in planes.enumerate() {
                            let kc = k[(start / s + i) % c];
                            out.extend(xp.iter().zip(gp).zip(wp).map(|((xv, gv), w)| {
                                T::from_acc(elem(xv.to_acc(), gv.to_acc(), *w, kc))
                            }));
                        }
                    }
                },
            );
        });
        y
    }

    /// Per-channel `sum gz` and `sum gz (x - mean)`, `fwd[ch] = [mean, scale, shift]`; with a
    /// mask, its keep bits are packed into `bits` on the way, for the second pass.
    fn sums<T: Float>(
        &self,
        g: &[T],
        x: &[T],
        fwd: &[[T::Acc; 3]],
        bits: &[AtomicU32],
    ) -> (Vec<f64>, Vec<f64>) {
        let (n, c, s) = (self.norm.n, self.norm.c, self.norm.s);
        let (f, keep, mask) = (
            self.f,
            Keep::<T::Acc>::of(self.mask.as_ref()),
            self.mask.as_ref(),
        );
        let gz = move |gv: T::Acc, xv: T::Acc, w: u32, [m, a, b]: [T::Acc; 3]| {
            gv * keep.backward(w) * f.derivative((xv - m) * a + b)
        };
        let bw = block_width(c, s);
        let blocks: Vec<(Vec<f64>, Vec<f64>)> = (0..c.div_ceil(bw))
            .into_par_iter()
            .map_init(Words::default, |words, blk| {
                let (c0, c1) = (blk * bw, ((blk + 1) * bw).min(c));
                let (mut sg, mut sgx) = (vec![0.0; c1 - c0], vec![0.0; c1 - c0]);
                let (means, consts) = (&self.norm.mean[c0..c1], &fwd[c0..c1]);
                for row in 0..n {
                    let span = (row * c + c0) * s..(row * c + c1) * s;
                    let ws = words.of(Source::Stream(mask), span.start, span.len());
                    if mask.is_some() {
                        pack(bits, span.start, ws, keep.threshold);
                    }
                    let (gs, xs) = (&g[span.clone()], &x[span]);
                    with_avx2(
                        #[inline(always)]
                        || {
                            if s == 1 {
                                let each = gs.iter().zip(xs).zip(ws).zip(consts).zip(means);
                                for ((a, b), ((((gv, xv), w), kc), mv)) in
                                    sg.iter_mut().zip(sgx.iter_mut()).zip(each)
                                {
                                    let v = gz(gv.to_acc(), xv.to_acc(), *w, *kc).f64();
                                    *a += v;
                                    *b += v * (xv.as_f64() - mv);
                                }
                            } else {
                                let planes = gs
                                    .chunks_exact(s)
                                    .zip(xs.chunks_exact(s))
                                    .zip(ws.chunks_exact(s));
                                for (k, ((gp, xp), wp)) in planes.enumerate() {
                                    let kc = consts[k];
                                    let (a, b) = plane_sums(gp, xp, wp, means[k], |gv, xv, w| {
                                        gz(gv, xv, w, kc)
                                    });
                                    sg[k] += a;
                                    sgx[k] += b;
                                }
                            }
                        },
                    );
                }
                (sg, sgx)
            })
            .collect();
        let (sg, sgx): (Vec<Vec<f64>>, Vec<Vec<f64>>) = blocks.into_iter().unzip();
        (sg.concat(), sgx.concat())
    }

    /// Per channel `[mean, invstd * weight, bias]`.
    fn forward_constants<T: Float>(&self, w: &[T], b: &[T]) -> Vec<[T::Acc; 3]> {
        let (mean, k) = self.norm.forward_constants(w, b);
        mean.into_iter()
            .zip(k)
            .map(|(m, k)| [m, k[0], k[1]])
            .collect()
    }
}

impl<F: Elementwise> Kernel<3> for BatchNormBlockOp<F> {
    fn name(&self) -> &'static str {
        "gradkit-batch-norm-block"
    }

    fn forward<T: Float>(&self, [x, w, b]: [&[T]; 3]) -> grad_core::Result<Vec<T>> {
        let (f, keep) = (self.f, Keep::<T::Acc>::of(self.mask.as_ref()));
        let k = self.forward_constants(w, b);
        let source = Source::Stream(self.mask.as_ref());
        Ok(self.map((x, x), source, &k, move |xv, _, word, [m, a, b]| {
            let (ka, kb) = keep.forward(word);
            f.value((xv - m) * a + b) * ka + kb
        }))
    }

    fn backward<T: Float>(
        &self,
        [x, w, b]: [&[T]; 3],
        g: &[T],
    ) -> grad_core::Result<[Option<Grad<T>>; 3]> {
        let (f, keep) = (self.f, Keep::<T::Acc>::of(self.mask.as_ref()));
        let norm = &self.norm;
        let fwd = self.forward_constants(w, b);
        // The mask is regenerated once, in the first pass, which keeps it as bits for the second.
        let words = if self.mask.is_some() {
            x.len().div_ceil(32)
        } else {
            0
        };
        let bits: Vec<AtomicU32> = (0..words).map(|_| AtomicU32::new(0)).collect();
        let (sum_g, sum_gx) = self.sums(g, x, &fwd, &bits);
        let bwd = norm.backward_constants(w, &sum_g, &sum_gx);
        let k: Vec<[T::Acc; 6]> = fwd
            .iter()
            .zip(&bwd)
            .map(|([m, a, b], [ka, kb, kd])| [*m, *a, *b, *ka, *kb, *kd])
            .collect();
        let source = match self.mask {
            Some(_) => Source::Bits(&bits),
            None => Source::Stream(None),
        };
        let dx = self.map(
            (x, g),
            source,
            &k,
            move |xv, gv, word, [m, a, b, ka, kb, kd]| {
                let gz = gv * keep.backward(word) * f.derivative((xv - m) * a + b);
                ka * gz + kb * (xv - m) + kd
            },
        );
        let [grad_w, grad_b] = norm.parameter_grads(sum_g, &sum_gx);
        Ok([Some(Grad::Elem(dx)), grad_w, grad_b])
    }
}
