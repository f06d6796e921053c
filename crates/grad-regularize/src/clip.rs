//! Gradient clipping with PyTorch's exact formulas (`torch.nn.utils.clip_grad_norm_`,
//! `clip_grad_value_`, `get_total_norm`, `clip_grads_with_norm_`).
//!
//! Clipping the global norm (Pascanu, Mikolov & Bengio 2013) bounds the size of an update while
//! keeping its direction, the standard remedy for exploding gradients: every gradient is
//! multiplied by `min(max_norm / (total + 1e-6), 1)`, always (so a norm at the threshold is still
//! scaled by a hair below 1). The norm and the finiteness check come from one fused read
//! ([`grad_core::multi_norm`]) and the scaling is one in-place write per gradient
//! ([`grad_core::scale_in_place`]): no tensor is allocated on the CPU.
//!
//! The functions take the gradients as a mutable slice of tensors; use
//! [`NamedGrads::apply`](grad_core::NamedGrads::apply) to run them on a model's named
//! gradients, which never include the gradients of inputs or intermediate results.

use candle_core::Tensor;
use grad_core::{MultiNorm, NormType, clamp_all_in_place, multi_norm, scale_all_in_place};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `clip_grad_norm_`'s guard against division by zero.
const NORM_EPS: f64 = 1e-6;

/// What norm clipping does when the total norm is NaN or infinite: PyTorch's
/// `error_if_nonfinite` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum NonFiniteNorm {
    /// Scale anyway, as PyTorch does by default: a NaN total makes every gradient NaN and an
    /// infinite one scales them to zero (or NaN where they are infinite), so the non-finite step
    /// stays visible (`error_if_nonfinite=False`).
    #[default]
    Scale,
    /// Fail with [`Error::NonFiniteTotalNorm`] and leave the gradients untouched
    /// (`error_if_nonfinite=True`).
    Error,
}

impl NonFiniteNorm {
    /// `Ok` unless the policy is [`Error`](Self::Error) and `total_norm` is not finite.
    ///
    /// # Errors
    /// [`Error::NonFiniteTotalNorm`] naming the norm and its value.
    pub(crate) fn check(self, norm_type: NormType, total_norm: f64) -> Result<()> {
        if self == Self::Error && !total_norm.is_finite() {
            return Err(Error::NonFiniteTotalNorm {
                norm_type: norm_type.p(),
                total_norm,
            });
        }
        Ok(())
    }
}

/// The total `norm_type`-norm of the gradients (PyTorch's `get_total_norm`), with their
/// non-finite counts. An empty list has norm 0.
///
/// # Errors
/// [`Error::NonFiniteTotalNorm`] when the total is NaN or infinite and `non_finite` is
/// [`NonFiniteNorm::Error`]; [`Error::Core`] for an invalid norm type or a non-float gradient.
pub fn get_total_norm(
    grads: &[Tensor],
    norm_type: NormType,
    non_finite: NonFiniteNorm,
) -> Result<MultiNorm> {
    if grads.is_empty() {
        norm_type.validate()?;
        return Ok(MultiNorm {
            total: 0.0,
            per_tensor: Vec::new(),
        });
    }
    let norms = multi_norm(grads, norm_type)?;
    non_finite.check(norm_type, norms.total)?;
    Ok(norms)
}

/// Scales the gradients by `min(max_norm / (total_norm + 1e-6), 1)` in place (PyTorch's
/// `clip_grads_with_norm_`) and returns that coefficient.
///
/// # Errors
/// [`Error::Core`] for `max_norm` not positive and finite, or a negative `total_norm` (no norm
/// is; NaN and infinity pass, as in PyTorch).
pub fn clip_grads_with_norm(grads: &mut [Tensor], max_norm: f64, total_norm: f64) -> Result<f64> {
    grad_core::validate::positive("max_norm", max_norm)?;
    if total_norm < 0.0 {
        return Err(Error::Core(grad_core::validate::invalid(
            "total_norm",
            total_norm,
            "a norm: >= 0, or NaN/inf for a non-finite one",
        )));
    }
    let coefficient = (max_norm / (total_norm + NORM_EPS)).min(1.0);
    // `min` returns the other operand for NaN: a NaN total must poison every gradient, as in
    // PyTorch (NaN * x = NaN).
    let coefficient = if total_norm.is_nan() {
        f64::NAN
    } else {
        coefficient
    };
    if coefficient.is_nan() {
        // `scale_in_place` refuses a NaN factor; PyTorch multiplies by it.
        for g in grads.iter_mut() {
            *g = (g.zeros_like()? + f64::NAN)?;
        }
    } else {
        scale_all_in_place(grads, coefficient)?;
    }
    Ok(coefficient)
}

/// What [`clip_grad_norm`] found and did.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipOutcome {
    /// The total norm before clipping (PyTorch's return value).
    pub total_norm: f64,
    /// The coefficient every gradient was multiplied by (1 when the norm was below the threshold).
    pub coefficient: f64,
    /// Per-gradient norms and non-finite counts, from the same read.
    pub norms: MultiNorm,
}

impl ClipOutcome {
    /// Whether the gradients were scaled down (coefficient below 1).
    pub fn clipped(&self) -> bool {
        self.coefficient < 1.0
    }
}

/// Clips the global `norm_type`-norm of the gradients to `max_norm`, in place, as
/// `torch.nn.utils.clip_grad_norm_` does: one read for the norm and the finiteness check, one
/// in-place scaled write.
///
/// # Errors
/// [`Error::NonFiniteTotalNorm`] when the total norm is NaN or infinite and `non_finite` is
/// [`NonFiniteNorm::Error`] (the gradients are then left untouched); [`Error::Core`] for
/// `max_norm` not positive and finite, an invalid norm type or a non-float gradient.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::core::NormType;
/// use gradkit::regularize::{NonFiniteNorm, clip_grad_norm};
/// let mut grads = vec![Tensor::new(&[3f32, 4.0], &Device::Cpu)?];
/// let outcome = clip_grad_norm(&mut grads, 1.0, NormType::L2, NonFiniteNorm::Scale)?;
/// assert_eq!(outcome.total_norm, 5.0);
/// let g = grads[0].to_vec1::<f32>()?;
/// assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
/// # Ok::<(), gradkit::regularize::Error>(())
/// ```
pub fn clip_grad_norm(
    grads: &mut [Tensor],
    max_norm: f64,
    norm_type: NormType,
    non_finite: NonFiniteNorm,
) -> Result<ClipOutcome> {
    grad_core::validate::positive("max_norm", max_norm)?;
    let norms = get_total_norm(grads, norm_type, non_finite)?;
    let coefficient = clip_grads_with_norm(grads, max_norm, norms.total)?;
    Ok(ClipOutcome {
        total_norm: norms.total,
        coefficient,
        norms,
    })
}

/// Clamps every gradient element into `[-clip_value, clip_value]`, in place
/// (`torch.nn.utils.clip_grad_value_`): infinities become the bound, NaN stays NaN. Returns
/// whether any element was clamped.
///
/// # Errors
/// [`Error::Core`] for `clip_value` not positive and finite or a non-float gradient.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let mut grads = vec![Tensor::new(&[3f32, -0.1, f32::NEG_INFINITY], &Device::Cpu)?];
/// assert!(gradkit::regularize::clip_grad_value(&mut grads, 0.5)?);
/// assert_eq!(grads[0].to_vec1::<f32>()?, [0.5, -0.1, -0.5]);
/// assert!(!gradkit::regularize::clip_grad_value(&mut grads, 1.0)?); // nothing left to clamp
/// # Ok::<(), gradkit::regularize::Error>(())
/// ```
pub fn clip_grad_value(grads: &mut [Tensor], clip_value: f64) -> Result<bool> {
    grad_core::validate::positive("clip_value", clip_value)?;
    Ok(clamp_all_in_place(grads, -clip_value, clip_value)?)
}
