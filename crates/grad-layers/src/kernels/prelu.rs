//! The fused CPU kernel of PReLU: one pass forward; one pass backward that also sums the weight
//! gradient per channel in f64, per block of planes, the blocks combined in order.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use grad_core::cpu::{
    CHUNK, Float, FloatFn, Real, UninitVec, cpu_slice, dispatch_op, dtype_of, storage_slice,
    with_avx2,
};
use rayon::prelude::*;

/// PReLU on contiguous `x` seen as `[n, c, s]` with one slope per channel (or one for all when
/// `weight` has a single element).
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

    fn forward<T: Float>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let s = self.spatial;
        let planes_per_task = (CHUNK / s).max(1);
        let mut out = UninitVec::new(x.len());
        out.as_uninit_mut()
            .par_chunks_mut(planes_per_task * s)
            .zip(x.par_chunks(planes_per_task * s))
            .enumerate()
            .for_each(|(t, (o, xs))| {
                with_avx2(
                    #[inline(always)]
                    || {
                        for (i, (op, xp)) in o.chunks_mut(s).zip(xs.chunks(s)).enumerate() {
                            let a = self.slope(w, t * planes_per_task + i);
                            for (o, x) in op.iter_mut().zip(xp) {
                                let v = x.to_acc();
                                o.write(T::from_acc(if v > T::Acc::ZERO { v } else { a * v }));
                            }
                        }
                    },
                );
            });
        #[allow(unsafe_code, reason = "skipping the zero fill of a fresh output")]
        // SAFETY: planes of `s` elements tile both the input and the output chunks, and every
        // element of every plane is written.
        unsafe {
            out.assume_init()
        }
    }

    /// `grad_x`, and `grad_w` (summed over the elements with `x <= 0`) per slope.
    fn backward<T: Float>(&self, g: &[T], x: &[T], w: &[T]) -> (Vec<T>, Vec<f64>) {
        let s = self.spatial;
        let planes_per_task = (CHUNK / s).max(1);
        let mut out = UninitVec::new(x.len());
        let partials: Vec<Vec<f64>> = out
            .as_uninit_mut()
            .par_chunks_mut(planes_per_task * s)
            .zip(
                x.par_chunks(planes_per_task * s)
                    .zip(g.par_chunks(planes_per_task * s)),
            )
            .enumerate()
            .map(|(t, (o, (xs, gs)))| {
                let mut gw = vec![0.0; w.len()];
                with_avx2(
                    #[inline(always)]
                    || {
                        for (i, ((op, xp), gp)) in o
                            .chunks_mut(s)
                            .zip(xs.chunks(s))
                            .zip(gs.chunks(s))
                            .enumerate()
                        {
                            let plane = t * planes_per_task + i;
                            let a = self.slope(w, plane);
                            let mut acc = 0.0;
                            for ((o, x), g) in op.iter_mut().zip(xp).zip(gp) {
                                let (xv, gv) = (x.to_acc(), g.to_acc());
                                let pos = xv > T::Acc::ZERO;
                                o.write(T::from_acc(if pos { gv } else { a * gv }));
                                if !pos {
                                    acc += gv.f64() * xv.f64();
                                }
                            }
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
            })
            .collect();
        #[allow(unsafe_code, reason = "skipping the zero fill of a fresh output")]
        // SAFETY: as in `forward`, planes tile the chunks and every element is written.
        let dx = unsafe { out.assume_init() };
        let mut gw = vec![0.0; w.len()];
        for p in partials {
            gw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        (dx, gw)
    }
}

struct PReluForward<'a> {
    op: PReluOp,
    x: (&'a CpuStorage, &'a Layout),
    w: (&'a CpuStorage, &'a Layout),
}

impl FloatFn for PReluForward<'_> {
    type Output = CpuStorage;

    fn call<T: Float>(self) -> grad_core::Result<CpuStorage> {
        let x = cpu_slice::<T>(self.x.0, self.x.1)?;
        let w = cpu_slice::<T>(self.w.0, self.w.1)?;
        Ok(T::to_cpu_storage_owned(self.op.forward(x, w)))
    }
}

struct PReluBackward<'a> {
    op: PReluOp,
    g: &'a Tensor,
    x: &'a Tensor,
    w: &'a Tensor,
}

impl FloatFn for PReluBackward<'_> {
    type Output = (Tensor, Tensor);

    fn call<T: Float>(self) -> grad_core::Result<(Tensor, Tensor)> {
        let (gs, gl) = self.g.storage_and_layout();
        let (xs, xl) = self.x.storage_and_layout();
        let (ws, wl) = self.w.storage_and_layout();
        let g = storage_slice::<T>(&gs, gl)?;
        let x = storage_slice::<T>(&xs, xl)?;
        let w = storage_slice::<T>(&ws, wl)?;
        let (dx, gw) = self.op.backward(g, x, w);
        let dx = Tensor::from_vec(dx, self.x.shape(), self.x.device())?;
        let gw = Tensor::from_vec(gw, self.w.shape(), self.w.device())?.to_dtype(self.w.dtype())?;
        Ok((dx, gw))
    }
}

impl CustomOp2 for PReluOp {
    fn name(&self) -> &'static str {
        "gradkit-prelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let fwd = PReluForward {
            op: *self,
            x: (s1, l1),
            w: (s2, l2),
        };
        let out = dispatch_op(self.name(), dtype_of(s1), fwd)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let (dx, gw) = dispatch_op(
            self.name(),
            x.dtype(),
            PReluBackward {
                op: *self,
                g: &g,
                x,
                w,
            },
        )?;
        Ok((Some(dx), Some(gw)))
    }
}
