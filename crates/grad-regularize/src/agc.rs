//! Adaptive gradient clipping (Brock, De, Smith & Simonyan 2021, "High-Performance Large-Scale
//! Image Recognition Without Normalization", the NFNet paper), as timm implements it.
//!
//! Each unit of a parameter (a dim-0 slice: one output neuron of `[out, in]`, one filter of
//! `[out, in, kh, kw]`; the whole tensor for rank 0 or 1) has its gradient clipped relative to
//! its weight: with `max = clip_factor * max(||w_unit||, eps)`, a unit whose gradient norm
//! reaches `max` is scaled to norm `max` (`g * max / max(||g_unit||, 1e-6)`). `eps` keeps
//! zero-initialised parameters (biases) trainable. NFNets leave the final classifier unclipped:
//! pass its names in [`AgcConfig::exclude`].

use grad_core::{NamedGrads, scale_rows_in_place, unit_norms};
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
/// use grad_core::NamedVars;
/// use grad_regularize::{AgcConfig, adaptive_clip};
/// let w = Var::new(&[[1f32, 0.0], [0.0, 1.0]], &Device::Cpu)?;
/// let params = NamedVars::new([("w", w.clone())])?;
/// let store = w.affine(100.0, 0.0)?.sum_all()?.backward()?; // gradient 100 everywhere
/// let mut grads = params.grads(&store)?;
/// let clipped = adaptive_clip(&mut grads, &AgcConfig { clip_factor: 0.1, ..Default::default() })?;
/// assert_eq!(clipped, 2);
/// let g = grads.get("w").unwrap().to_vec2::<f32>()?;
/// assert!((g[0][0] - 0.1 / 2f32.sqrt()).abs() < 1e-6); // each row now has norm 0.1
/// # Ok::<(), grad_regularize::Error>(())
/// ```
pub fn adaptive_clip(grads: &mut NamedGrads, config: &AgcConfig) -> Result<usize> {
    config.validate()?;
    let mut clipped = 0;
    for entry in grads.iter_mut() {
        if config.exclude.iter().any(|n| n == entry.name()) {
            continue;
        }
        let weight_norms = unit_norms(entry.var().as_tensor())?;
        let Some(g) = entry.grad_mut() else { continue };
        let grad_norms = unit_norms(g)?;
        let factors: Vec<f64> = weight_norms
            .iter()
            .zip(&grad_norms)
            .map(|(&w, &gn)| {
                let max = w.max(config.eps) * config.clip_factor;
                if gn < max { 1.0 } else { max / gn.max(1e-6) }
            })
            .collect();
        let n = factors.iter().filter(|f| **f != 1.0).count();
        if n > 0 {
            scale_rows_in_place(g, &factors)?;
            clipped += n;
        }
    }
    Ok(clipped)
}
