//! # grad-regularize
//!
//! Remedies that act on gradients and targets, for candle, with PyTorch's semantics (checked
//! against PyTorch's own outputs in `conformance/`):
//!
//! - gradient clipping: [`clip_grad_norm`] (p = 1, 2, inf or any p > 0), [`clip_grad_value`],
//!   the two-step [`get_total_norm`] / [`clip_grads_with_norm`], and adaptive clipping
//!   ([`adaptive_clip`], NFNets), all in place on the CPU;
//! - per-group policies ([`ClipPolicy`]) and [`Clipped`], which wraps any candle `Optimizer` to
//!   clip, skip non-finite steps and report what it did;
//! - [`cross_entropy`] with label smoothing, class weights, `ignore_index` and probability
//!   targets, as a fused, numerically stable CPU kernel;
//! - [`LossScaler`], dynamic loss scaling with `torch.amp.GradScaler`'s rules, for f16/bf16
//!   training where small gradients underflow to zero.
//!
//! Built on [`grad_core`]; never depends on the other gradkit crates.
//!
//! ```
//! use candle_core::{DType, Device, Tensor, Var};
//! use gradkit::core::{NamedVars, NormType};
//! use gradkit::regularize::{NonFiniteNorm, clip_grad_norm};
//!
//! let w = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
//! let x = Var::new(&[[1f32, 1.0]], &Device::Cpu)?; // an input: its gradient is never clipped
//! let store = x.matmul(w.as_tensor())?.sqr()?.sum_all()?.backward()?;
//! let mut grads = NamedVars::new([("w", w.clone())])?.grads(&store)?;
//! let outcome = grads.apply(|gs| clip_grad_norm(gs, 1.0, NormType::L2, NonFiniteNorm::Scale))?;
//! assert!(outcome.clipped());
//! # Ok::<(), gradkit::regularize::Error>(())
//! ```

mod agc;
mod centralize;
mod clip;
mod clipped;
mod cross_entropy;
mod error;
mod kernels;
mod loss_scaler;
mod policy;

pub use agc::{AgcConfig, adaptive_clip};
pub use centralize::centralize_gradients;
pub use clip::{
    ClipOutcome, NonFiniteNorm, clip_grad_norm, clip_grad_value, clip_grads_with_norm,
    get_total_norm,
};
pub use clipped::{ClipCounters, Clipped, ClippedConfig, ClippedOptimizerConfig, StepReport};
pub use cross_entropy::{
    CrossEntropyConfig, Reduction, cross_entropy, cross_entropy_composed, smooth_labels,
};
pub use error::{Error, Result};
pub use loss_scaler::{LossScaler, LossScalerConfig, LossScalerState};
pub use policy::{ClipPolicy, ClipRule, GroupOutcome, ParamGroup, Selector};

pub use grad_core;
