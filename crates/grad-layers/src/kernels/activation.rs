//! The fused CPU kernel of the element-wise activations, instantiated per activation function
//! ([`Elementwise`]: the math is in `elementwise.rs`, the enum-to-function mapping in
//! `ops/activation.rs`).
//!
//! Forward: one read of `x`, one write of `y`. Backward: one read each of `grad_y` and `x`, one
//! write of `grad_x = grad_y * f'(x)`, with PyTorch's derivative at the kink.

use grad_core::cpu::{Float, Grad, Kernel, par_map, par_zip_map};

use super::elementwise::Elementwise;

/// `y = f(x)`; apply it as `grad_core::cpu::Fused(ActivationOp(f))`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ActivationOp<F>(pub F);

impl<F: Elementwise> Kernel<1> for ActivationOp<F> {
    fn name(&self) -> &'static str {
        "gradkit-activation"
    }

    fn forward<T: Float>(&self, [x]: [&[T]; 1]) -> grad_core::Result<Vec<T>> {
        let f = self.0;
        Ok(par_map(x, move |v| f.value(v)))
    }

    fn backward<T: Float>(
        &self,
        [x]: [&[T]; 1],
        g: &[T],
    ) -> grad_core::Result<[Option<Grad<T>>; 1]> {
        let f = self.0;
        let dx = par_zip_map(g, x, move |g, x| g * f.derivative(x));
        Ok([Some(Grad::Elem(dx))])
    }
}
