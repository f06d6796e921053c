//! Gradient centralisation (Yong et al. 2020): before the optimizer step, each weight
//! gradient of rank ≥ 2 has its mean over every dim but the first removed, per output unit
//! (`g[i] -= mean(g[i])`), which constrains the weights to a hyperplane and smooths the loss
//! landscape. Biases and norm weights (rank 1) are left alone, as in the paper.
//!
//! With [`Clipped`](crate::Clipped) (`ClippedConfig::centralize`), gradients are centralised
//! first and clipped second, so the clipping threshold applies to the gradients the optimizer
//! steps with.

use grad_core::NamedGrads;

use crate::Result;

/// Centralises every present gradient of rank ≥ 2 in `grads`, in place on the CPU (one pass
/// over each gradient: [`grad_core::center_rows_in_place`]), with candle ops elsewhere. Returns
/// how many were centralised.
///
/// # Errors
/// [`Error::Core`](crate::Error::Core) for an integer gradient.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use gradkit::core::NamedVars;
/// use gradkit::regularize::centralize_gradients;
/// let w = Var::new(&[[1f32, 2.0], [3.0, 5.0]], &Device::Cpu)?;
/// let b = Var::new(&[1f32, 1.0], &Device::Cpu)?;
/// let params = NamedVars::new([("fc.weight", w.clone()), ("fc.bias", b.clone())])?;
/// let loss = (w.as_tensor().sqr()?.sum_all()? + b.as_tensor().sum_all()?)?;
/// let mut grads = params.grads(&loss.backward()?)?;
/// assert_eq!(centralize_gradients(&mut grads)?, 1);
/// assert_eq!(grads.get("fc.weight").unwrap().to_vec2::<f32>()?, [[-1.0, 1.0], [-2.0, 2.0]]);
/// assert_eq!(grads.get("fc.bias").unwrap().to_vec1::<f32>()?, [1.0, 1.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn centralize_gradients(grads: &mut NamedGrads) -> Result<usize> {
    let mut count = 0;
    for entry in grads.iter_mut() {
        if let Some(g) = entry.grad_mut().filter(|g| g.rank() >= 2) {
            grad_core::center_rows_in_place(g)?;
            count += 1;
        }
    }
    Ok(count)
}
