//! A training step as the benches time it, and candle's autograd floor.

use candle_core::{Tensor, Var};

/// Forward result `y`, then `backward()` of `(y * upstream).sum_all()`.
pub fn step(y: candle_core::Result<Tensor>, upstream: &Tensor) {
    let loss = (y.expect("forward") * upstream)
        .and_then(|t| t.sum_all())
        .expect("loss");
    let grads = loss.backward().expect("backward");
    std::hint::black_box(grads);
}

/// The same step with the operation replaced by an identity (`x.affine(1, 0)`): the cost of
/// candle's autograd for the loss alone, which every function pays.
pub fn floor(x: &Var, upstream: &Tensor) {
    step(x.as_tensor().affine(1.0, 0.0), upstream);
}
