//! The fused CPU kernel of a layer- or group-norm block, `y = dropout(act(norm(x)))`, on the row
//! norm's rows (`row_norm.rs`: one leading index for layer norm, one `(sample, group)` for group
//! norm).
//!
//! A row is small enough to stay in cache, so the block is the row norm with a step added per
//! row while the row is there:
//! - forward: the row's statistics and its normalised values as the row norm writes them, then,
//!   in place, the activation and the dropout mask (its words drawn from the forward's stream
//!   position for the row's span). Only `y` and the rows' statistics are kept;
//! - backward: per row, the normalised values again, the mask's words again, and the gradient at
//!   the norm's output `gz = act'(z) * mask(g)` into a row of scratch, which the row norm's own
//!   row backward then reads in place of `g`.
//!
//! Each step rounds where the separate layers round, so the block equals layer or group norm,
//! the activation and dropout applied one after another, bit for bit in f32 and f64.

use grad_core::cpu::{Float, Grad, Kernel};

use super::dropout::DropoutOp;
use super::elementwise::Elementwise;
use super::norm_block::{Keep, Source, Words};
use super::row_norm::{RowNorm, RowStat, Upstream};

/// Row norm `norm`, then activation `f`, then the dropout `mask` when there is one; apply it as
/// `grad_core::cpu::Fused(op)` to `x`, `weight`, `bias` (ones and zeros where absent).
#[derive(Debug)]
pub(crate) struct RowNormBlockOp<F> {
    pub norm: RowNorm,
    pub f: F,
    pub mask: Option<DropoutOp>,
}

/// The backward's gradient at the norm's output, row by row.
struct Gz<'a, T: Float, F> {
    op: &'a RowNormBlockOp<F>,
    keep: Keep<T::Acc>,
    wb: (&'a [T], &'a [T]),
}

impl<T: Float, F: Elementwise> Upstream<T> for Gz<'_, T, F> {
    type Scratch = (Words, Vec<T>);

    #[inline(always)]
    fn row<'s>(
        &self,
        (words, z): &'s mut Self::Scratch,
        r: usize,
        x: &[T],
        g: &'s [T],
        st: RowStat,
    ) -> &'s [T] {
        let (f, keep) = (self.op.f, self.keep);
        z.clear();
        self.op.norm.normalize(r, x, st, self.wb, z);
        let ws = words.of(Source::Stream(self.op.mask.as_ref()), r * x.len(), x.len());
        for ((zv, gv), w) in z.iter_mut().zip(g).zip(ws) {
            *zv = T::from_acc(gv.to_acc() * keep.backward(*w) * f.derivative(zv.to_acc()));
        }
        z
    }
}

impl<F: Elementwise> Kernel<3> for RowNormBlockOp<F> {
    fn name(&self) -> &'static str {
        "gradkit-row-norm-block"
    }

    fn forward<T: Float>(&self, xwb: [&[T]; 3]) -> grad_core::Result<Vec<T>> {
        let (f, keep, mask) = (
            self.f,
            Keep::<T::Acc>::of(self.mask.as_ref()),
            self.mask.as_ref(),
        );
        let d = self.norm.row_len();
        let (y, stats) = self.norm.forward_rows(
            xwb,
            Words::default,
            #[inline(always)]
            |words, r, y| {
                let ws = words.of(Source::Stream(mask), r * d, y.len());
                for (v, w) in y.iter_mut().zip(ws) {
                    let (a, b) = keep.forward(*w);
                    *v = T::from_acc(f.value(v.to_acc()) * a + b);
                }
            },
        );
        self.norm.keep(stats);
        Ok(y)
    }

    fn backward<T: Float>(
        &self,
        [x, w, b]: [&[T]; 3],
        g: &[T],
    ) -> grad_core::Result<[Option<Grad<T>>; 3]> {
        let gz = Gz {
            op: self,
            keep: Keep::of(self.mask.as_ref()),
            wb: (w, b),
        };
        let (dx, gw, gb) = self.norm.backward_rows([x, g, w], self.norm.kept()?, &gz);
        let [gw, gb] = self.norm.parameter_grads(gw, gb);
        Ok([Some(Grad::Elem(dx)), gw, gb])
    }
}
