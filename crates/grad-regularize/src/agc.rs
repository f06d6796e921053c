//! Adaptive gradient clipping (Brock, De, Smith & Simonyan 2021, "High-Performance Large-Scale
//! Image Recognition Without Normalization", the NFNet paper), as timm implements it.
//!
//! Each unit of a parameter (a dim-0 slice: one output neuron of `[out, in]`, one filter of
//! `[out, in, kh, kw]`; the whole tensor for rank 0 or 1) has its gradient clipped relative to
//! its weight: with `max = clip_factor * max(||w_unit||, eps)`, a unit whose gradient norm
//! reaches `max` is scaled to norm `max` (`g * max / max(||g_unit||, 1e-6)`). `eps` keeps
//! zero-initialised parameters (biases) trainable. NFNets leave the final classifier unclipped:
//! pass its names in [`AgcConfig::exclude`].

use candle_core::Tensor;
use grad_core::device::{Path, read_back_scalar};
use grad_core::{NamedGrads, scale_rows_in_place, unit_norm_tensor, unit_norms};
use serde::{Deserialize, Serialize};

use crate::Result;

/// Settings of [`adaptive_clip`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgcConfig {
    /// The largest allowed ratio of gradient norm to weight norm per unit. Default: 0.01 (the
    /// paper's value for batch size 4096; 0.02–0.16 for smaller batches).
    pub clip_factor: f64,
    /// The smallest weight norm used, so zero-initialised units can move. Default: 1e-3.
    pub eps: f64,
    /// Parameters left unclipped, by exact name (the final classifier, in the paper).
    /// Default: none.
    pub exclude: Vec<String>,
}

impl Default for AgcConfig {
    fn default() -> Self {
        Self {
            clip_factor: 0.01,
            eps: 1e-3,
            exclude: Vec::new(),
        }
    }
}

impl AgcConfig {
    /// Checks `clip_factor` and `eps` are positive and finite.
    ///
    /// # Errors
    /// [`Error::Core`](crate::Error::Core) naming the field.
    pub fn validate(&self) -> Result<()> {
        grad_core::validate::positive("clip_factor", self.clip_factor)?;
        Ok(grad_core::validate::positive("eps", self.eps)?)
    }
}

/// Applies adaptive gradient clipping to every gradient of `grads` (except the excluded names),
/// in place, using each variable's current value. Returns the number of units clipped.
///
/// # Errors
/// [`Error::Core`](crate::Error::Core) for an invalid config or non-float tensors.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use gradkit::core::NamedVars;
/// use gradkit::regularize::{AgcConfig, adaptive_clip};
/// let w = Var::new(&[[1f32, 0.0], [0.0, 1.0]], &Device::Cpu)?;
/// let params = NamedVars::new([("w", w.clone())])?;
/// let store = w.affine(100.0, 0.0)?.sum_all()?.backward()?; // gradient 100 everywhere
/// let mut grads = params.grads(&store)?;
/// let clipped = adaptive_clip(&mut grads, &AgcConfig { clip_factor: 0.1, ..Default::default() })?;
/// assert_eq!(clipped, 2);
/// let g = grads.get("w").unwrap().to_vec2::<f32>()?;
/// assert!((g[0][0] - 0.1 / 2f32.sqrt()).abs() < 1e-6); // each row now has norm 0.1
/// # Ok::<(), gradkit::regularize::Error>(())
/// ```
pub fn adaptive_clip(grads: &mut NamedGrads, config: &AgcConfig) -> Result<usize> {
    config.validate()?;
    let mut clipped = 0;
    // The composed path's clip counts stay on the device until the end: one read-back.
    let mut counts: Vec<Tensor> = Vec::new();
    for entry in grads.iter_mut() {
        if config.exclude.iter().any(|n| n == entry.name()) {
            continue;
        }
        let w = entry.var().as_tensor().clone();
        let Some(g) = entry.grad_mut() else { continue };
        match Path::of(g.device()) {
            Path::Fused => clipped += clip_fused(&w, g, config)?,
            Path::Composed => counts.push(clip_composed(&w, g, config)?),
        }
    }
    if !counts.is_empty() {
        let total = read_back_scalar(&Tensor::stack(&counts, 0)?.sum_all()?)?;
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "an exact count"
        )]
        let total = total as usize;
        clipped += total;
    }
    Ok(clipped)
}

/// The unit-wise scale: 1 below the limit, `max / max(||g||, 1e-6)` at or above it.
fn factor(weight_norm: f64, grad_norm: f64, config: &AgcConfig) -> f64 {
    let max = weight_norm.max(config.eps) * config.clip_factor;
    if grad_norm < max {
        1.0
    } else {
        max / grad_norm.max(1e-6)
    }
}

fn clip_fused(w: &Tensor, g: &mut Tensor, config: &AgcConfig) -> Result<usize> {
    let weight_norms = unit_norms(w)?;
    let grad_norms = unit_norms(g)?;
    let factors: Vec<f64> = weight_norms
        .iter()
        .zip(&grad_norms)
        .map(|(&wn, &gn)| factor(wn, gn, config))
        .collect();
    let n = factors.iter().filter(|f| **f != 1.0).count();
    if n > 0 {
        scale_rows_in_place(g, &factors)?;
    }
    Ok(n)
}

/// [`factor`] with candle ops on the gradient's device; returns the number of clipped units
/// as a rank-0 tensor there.
fn clip_composed(w: &Tensor, g: &mut Tensor, config: &AgcConfig) -> Result<Tensor> {
    let (wn, gn) = (unit_norm_tensor(w)?, unit_norm_tensor(g)?);
    let max = wn.maximum(config.eps)?.affine(config.clip_factor, 0.0)?;
    let scaled = max.div(&gn.maximum(1e-6)?)?;
    let factors = gn.lt(&max)?.where_cond(&scaled.ones_like()?, &scaled)?;
    let count = factors.ne(1.0)?.to_dtype(factors.dtype())?.sum_all()?;
    // One factor per dim-0 slice ([units, 1, ..]); a rank-0 or rank-1 gradient is one unit.
    let shape: Vec<usize> = match g.rank() {
        0 => Vec::new(),
        1 => vec![1],
        r => std::iter::once(factors.elem_count())
            .chain(vec![1; r - 1])
            .collect(),
    };
    *g = g.broadcast_mul(&factors.reshape(shape)?.to_dtype(g.dtype())?)?;
    Ok(count)
}
