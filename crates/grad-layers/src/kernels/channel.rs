//! The fused CPU kernel of the elementwise ops with one learnt parameter per channel: PReLU
//! (the slope of the negative inputs) and the residual-branch scales (ReZero's scalar,
//! LayerScale's per-channel factor). One pass forward; one pass backward that also sums the
//! parameter's gradient per channel in f64, per block, the blocks combined in order.

use grad_core::cpu::{CHUNK, Float, Grad, Kernel, Real, Slots, fill, with_avx2};

/// An elementwise function of `x` and its channel's parameter `a`.
pub(crate) trait ChannelFn: Copy + Send + Sync {
    /// The op's name, in errors and in candle's graph.
    const NAME: &'static str;

    /// The output.
    fn forward<A: Real>(self, x: A, a: A) -> A;

    /// The input's gradient, and this element's share of the parameter's gradient.
    fn backward<A: Real>(self, x: A, g: A, a: A) -> (A, f64);
}

/// PReLU: `x` for `x > 0`, else `a x`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PRelu;

impl ChannelFn for PRelu {
    const NAME: &'static str = "gradkit-prelu";

    #[inline(always)]
    fn forward<A: Real>(self, x: A, a: A) -> A {
        if x > A::ZERO { x } else { a * x }
    }

    #[inline(always)]
    fn backward<A: Real>(self, x: A, g: A, a: A) -> (A, f64) {
        if x > A::ZERO {
            (g, 0.0)
        } else {
            (a * g, g.f64() * x.f64())
        }
    }
}

/// A residual branch's scale: `a x`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scale;

impl ChannelFn for Scale {
    const NAME: &'static str = "gradkit-channel-scale";

    #[inline(always)]
    fn forward<A: Real>(self, x: A, a: A) -> A {
        a * x
    }

    #[inline(always)]
    fn backward<A: Real>(self, x: A, g: A, a: A) -> (A, f64) {
        (a * g, g.f64() * x.f64())
    }
}

/// Where the channels of a contiguous input are. A parameter of one element serves every
/// element in both layouts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ChannelLayout {
    /// `[n, channels, spatial]`: channel of plane `p` is `p % channels`.
    First { channels: usize, spatial: usize },
    /// `[rows, channels]`: the channel is the innermost index.
    Last { channels: usize },
}

/// `F` over contiguous `x` laid out as `layout`, with parameter `a` (`[channels]` or `[1]`);
/// apply it as `grad_core::cpu::Fused(op)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChannelOp<F> {
    pub f: F,
    pub layout: ChannelLayout,
}

impl<F: ChannelFn> ChannelOp<F> {
    /// The elements of one work item: whole planes (first) or whole rows (last), about
    /// [`CHUNK`] of them; a shared parameter allows any split.
    fn span(&self, shared: bool) -> usize {
        let unit = match self.layout {
            _ if shared => 1,
            ChannelLayout::First { spatial, .. } => spatial.max(1),
            ChannelLayout::Last { channels } => channels.max(1),
        };
        (CHUNK / unit).max(1) * unit
    }

    /// Visits work item `t`'s elements (`len` of them, from `start`) a run at a time:
    /// `each(range, params)`, a run sharing one parameter or walking `a` alongside.
    #[inline(always)]
    fn runs<'a, T: Float>(
        &self,
        a: &'a [T],
        start: usize,
        len: usize,
        mut each: impl FnMut(std::ops::Range<usize>, Param<'a, T>),
    ) {
        match self.layout {
            _ if a.len() == 1 => each(start..start + len, Param::One(0, a[0].to_acc())),
            ChannelLayout::First { channels, spatial } => {
                for p in (start..start + len).step_by(spatial.max(1)) {
                    let k = (p / spatial) % channels;
                    each(p..p + spatial, Param::One(k, a[k].to_acc()));
                }
            }
            ChannelLayout::Last { channels } => {
                for r in (start..start + len).step_by(channels.max(1)) {
                    each(r..r + channels, Param::Each(a));
                }
            }
        }
    }
}

/// The parameters of a run of elements.
#[derive(Clone, Copy)]
enum Param<'a, T: Float> {
    /// One for the whole run: its index and value.
    One(usize, T::Acc),
    /// One per element.
    Each(&'a [T]),
}

impl<F: ChannelFn> Kernel<2> for ChannelOp<F> {
    fn name(&self) -> &'static str {
        F::NAME
    }

    fn forward<T: Float>(&self, [x, a]: [&[T]; 2]) -> grad_core::Result<Vec<T>> {
        let (f, span) = (self.f, self.span(a.len() == 1));
        let (y, _) = fill(x.len(), span, |t, out: &mut Slots<'_, T>| {
            let len = out.len();
            with_avx2(
                #[inline(always)]
                || {
                    self.runs(a, t * span, len, |r, p| {
                        let xs = x[r].iter().map(|x| x.to_acc());
                        match p {
                            Param::One(_, a) => {
                                out.extend(xs.map(|x| T::from_acc(f.forward(x, a))));
                            }
                            Param::Each(a) => out.extend(
                                xs.zip(a)
                                    .map(|(x, a)| T::from_acc(f.forward(x, a.to_acc()))),
                            ),
                        }
                    });
                },
            );
        });
        Ok(y)
    }

    fn backward<T: Float>(
        &self,
        [x, a]: [&[T]; 2],
        g: &[T],
    ) -> grad_core::Result<[Option<Grad<T>>; 2]> {
        let (f, span) = (self.f, self.span(a.len() == 1));
        let (dx, partials) = fill(x.len(), span, |t, out: &mut Slots<'_, T>| {
            let len = out.len();
            let mut ga = vec![0.0; a.len()];
            with_avx2(
                #[inline(always)]
                || {
                    self.runs(a, t * span, len, |r, p| {
                        let xg = x[r.clone()].iter().zip(&g[r]);
                        match p {
                            Param::One(k, a) => {
                                let mut run = 0.0;
                                out.extend(xg.map(|(x, g)| {
                                    let (dx, da) = f.backward(x.to_acc(), g.to_acc(), a);
                                    run += da;
                                    T::from_acc(dx)
                                }));
                                ga[k] += run;
                            }
                            Param::Each(a) => {
                                out.extend(xg.zip(a).zip(ga.iter_mut()).map(
                                    |(((x, g), a), ga)| {
                                        let (dx, da) =
                                            f.backward(x.to_acc(), g.to_acc(), a.to_acc());
                                        *ga += da;
                                        T::from_acc(dx)
                                    },
                                ));
                            }
                        }
                    });
                },
            );
            ga
        });
        let mut ga = vec![0.0; a.len()];
        for p in partials {
            ga.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        Ok([Some(Grad::Elem(dx)), Some(Grad::F64(ga))])
    }
}
