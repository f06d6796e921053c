//! The fused CPU kernel of PReLU: one pass forward; one pass backward that also sums the weight
//! gradient per channel in f64, per block of planes, the blocks combined in order.

use grad_core::cpu::{CHUNK, Float, Grad, Kernel, Real, fill, with_avx2};

/// PReLU on contiguous `x` seen as `[n, c, s]` with one slope per channel (or one for all when
/// `weight` has a single element); apply it as `grad_core::cpu::Fused(op)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PReluOp {
    pub channels: usize,
    pub spatial: usize,
}

impl PReluOp {
    /// The slope of plane `plane` (plane index `n * C + c`).
    #[inline(always)]
    fn slope<T: Float>(&self, w: &[T], plane: usize) -> T::Acc {
        if w.len() == 1 {
            w[0].to_acc()
        } else {
            w[plane % self.channels].to_acc()
        }
    }

    /// Planes per work item, and the elements they span.
    fn task(&self) -> (usize, usize) {
        let planes = (CHUNK / self.spatial).max(1);
        (planes, planes * self.spatial)
    }
}

impl Kernel<2> for PReluOp {
    fn name(&self) -> &'static str {
        "gradkit-prelu"
    }

    fn forward<T: Float>(&self, [x, w]: [&[T]; 2]) -> grad_core::Result<Vec<T>> {
        let s = self.spatial;
        let (planes_per_task, span) = self.task();
        let (y, _) = fill(x.len(), span, |t, out| {
            let xs = &x[t * span..t * span + out.len()];
            with_avx2(
                #[inline(always)]
                || {
                    for (i, xp) in xs.chunks(s).enumerate() {
                        let a = self.slope(w, t * planes_per_task + i);
                        out.extend(xp.iter().map(|x| {
                            let v = x.to_acc();
                            T::from_acc(if v > T::Acc::ZERO { v } else { a * v })
                        }));
                    }
                },
            );
        });
        Ok(y)
    }

    /// `grad_x`, and `grad_w` (summed over the elements with `x <= 0`) per slope.
    fn backward<T: Float>(
        &self,
        [x, w]: [&[T]; 2],
        g: &[T],
    ) -> grad_core::Result<[Option<Grad<T>>; 2]> {
        let s = self.spatial;
        let (planes_per_task, span) = self.task();
        let (dx, partials) = fill(x.len(), span, |t, out| {
            let range = t * span..t * span + out.len();
            let (xs, gs) = (&x[range.clone()], &g[range]);
            let mut gw = vec![0.0; w.len()];
            with_avx2(
                #[inline(always)]
                || {
                    for (i, (xp, gp)) in xs.chunks(s).zip(gs.chunks(s)).enumerate() {
                        let plane = t * planes_per_task + i;
                        let a = self.slope(w, plane);
                        let mut acc = 0.0;
                        out.extend(xp.iter().zip(gp).map(|(x, g)| {
                            let (xv, gv) = (x.to_acc(), g.to_acc());
                            let pos = xv > T::Acc::ZERO;
                            if !pos {
                                acc += gv.f64() * xv.f64();
                            }
                            T::from_acc(if pos { gv } else { a * gv })
                        }));
                        let k = if w.len() == 1 {
                            0
                        } else {
                            plane % self.channels
                        };
                        gw[k] += acc;
                    }
                },
            );
            gw
        });
        let mut gw = vec![0.0; w.len()];
        for p in partials {
            gw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        Ok([Some(Grad::Elem(dx)), Some(Grad::F64(gw))])
    }
}
