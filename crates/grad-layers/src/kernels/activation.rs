//! The fused CPU kernel of the element-wise activations, instantiated per activation function
//! ([`Elementwise`]: the math is in `elementwise.rs`, the enum-to-function mapping in
//! `ops/activation.rs`).
//!
//! Forward: one read of `x`, one write of `y`. Backward: one read each of `grad_y` and `x`, one
//! write of `grad_x = grad_y * f'(x)`, with PyTorch's derivative at the kink.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use grad_core::cpu::{Float, FloatFn, cpu_slice, dispatch_op, dtype_of, par_map, par_zip_map};

use super::elementwise::Elementwise;

/// `y = f(x)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ActivationOp<F>(pub F);

/// `grad_x = grad_y * f'(x)`, the backward of [`ActivationOp`].
#[derive(Debug, Clone, Copy)]
struct ActivationGrad<F>(F);

struct Forward<'a, F> {
    f: F,
    x: (&'a CpuStorage, &'a Layout),
}

impl<F: Elementwise> FloatFn for Forward<'_, F> {
    type Output = CpuStorage;

    fn call<T: Float>(self) -> grad_core::Result<CpuStorage> {
        let x = cpu_slice::<T>(self.x.0, self.x.1)?;
        let f = self.f;
        let y = par_map(x, move |v| f.value(v));
        Ok(T::to_cpu_storage_owned(y))
    }
}

struct Backward<'a, F> {
    f: F,
    g: (&'a CpuStorage, &'a Layout),
    x: (&'a CpuStorage, &'a Layout),
}

impl<F: Elementwise> FloatFn for Backward<'_, F> {
    type Output = CpuStorage;

    fn call<T: Float>(self) -> grad_core::Result<CpuStorage> {
        let g = cpu_slice::<T>(self.g.0, self.g.1)?;
        let x = cpu_slice::<T>(self.x.0, self.x.1)?;
        let f = self.f;
        let dx = par_zip_map(g, x, move |g, x| g * f.derivative(x));
        Ok(T::to_cpu_storage_owned(dx))
    }
}

impl<F: Elementwise> CustomOp1 for ActivationOp<F> {
    fn name(&self) -> &'static str {
        "gradkit-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = dispatch_op(
            self.name(),
            dtype_of(s),
            Forward {
                f: self.0,
                x: (s, l),
            },
        )?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?
                .apply_op2_no_bwd(x, &ActivationGrad(self.0))?,
        ))
    }
}

impl<F: Elementwise> CustomOp2 for ActivationGrad<F> {
    fn name(&self) -> &'static str {
        "gradkit-activation-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let bwd = Backward {
            f: self.0,
            g: (s1, l1),
            x: (s2, l2),
        };
        let out = dispatch_op(self.name(), dtype_of(s1), bwd)?;
        Ok((out, l1.shape().clone()))
    }
}
