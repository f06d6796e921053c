//! Dynamic loss scaling with `torch.amp.GradScaler`'s rules (Micikevicius et al. 2018, "Mixed
//! Precision Training").
//!
//! In f16 (and to a lesser degree bf16) small gradients underflow to zero: a vanishing gradient
//! caused by the number format. Scaling the loss by `S` before `backward()` scales every
//! gradient by `S`, lifting them into range; the optimizer then sees the gradients unscaled by
//! `1/S`. When a scaled gradient overflows (inf/NaN) the step is skipped and `S` backs off; after
//! `growth_interval` clean steps in a row `S` grows. The scale is an f32, and every update
//! multiplies in f64 and rounds to f32, so the sequence of scales is PyTorch's bit for bit.

use candle_core::Tensor;
use candle_core::backprop::GradStore;
use candle_nn::Optimizer;
use grad_core::{NamedGrads, unscale_all_in_place};
use serde::{Deserialize, Serialize};

use crate::Result;

/// Settings of [`LossScaler`], `GradScaler`'s constructor arguments.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScalerConfig {
    /// The first scale. Default: 65536 (2^16).
    pub init_scale: f64,
    /// Growth multiplier after `growth_interval` clean steps, > 1. Default: 2.
    pub growth_factor: f64,
    /// Back-off multiplier after an overflow, in (0, 1). Default: 0.5.
    pub backoff_factor: f64,
    /// Clean steps in a row before the scale grows, at least 1. Default: 2000.
    pub growth_interval: u32,
}

impl Default for LossScalerConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl LossScalerConfig {
    /// Checks every field (PyTorch asserts `growth_factor > 1` and `backoff_factor < 1`).
    ///
    /// # Errors
    /// [`Error::Core`](crate::Error::Core) naming the field.
    pub fn validate(&self) -> Result<()> {
        grad_core::validate::positive("init_scale", self.init_scale)?;
        let in_f32 = f32_round(self.init_scale);
        if !in_f32.is_finite() || in_f32 == 0.0 {
            return Err(grad_core::validate::invalid(
                "init_scale",
                self.init_scale,
                "a value finite and not zero in f32",
            )
            .into());
        }
        grad_core::validate::greater_than_one("growth_factor", self.growth_factor)?;
        grad_core::validate::open_unit_interval("backoff_factor", self.backoff_factor)?;
        grad_core::validate::at_least_one("growth_interval", self.growth_interval as usize)?;
        Ok(())
    }
}

/// A loss scaler's state, serialisable for checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScalerState {
    /// The current scale (an f32, as in PyTorch).
    pub scale: f32,
    /// Clean steps in a row since the last growth or back-off.
    pub growth_tracker: u32,
}

/// Dynamic loss scaling.
///
/// ```
/// use candle_core::{DType, Device, Var};
/// use candle_nn::{Optimizer, SGD};
/// use gradkit::core::NamedVars;
/// use gradkit::regularize::{LossScaler, LossScalerConfig};
/// let w = Var::new(&[1f32, 2.0], &Device::Cpu)?;
/// let params = NamedVars::new([("w", w.clone())])?;
/// let mut sgd = SGD::new(vec![w.clone()], 0.1)?;
/// let mut scaler = LossScaler::new(LossScalerConfig::default())?;
/// let loss = w.sqr()?.sum_all()?;
/// let store = scaler.scale(&loss)?.backward()?;       // gradients * 65536
/// let stepped = scaler.step(&mut sgd, &params.grads(&store)?)?; // unscale, check, step
/// scaler.update();
/// assert!(stepped);
/// assert_eq!(w.to_vec1::<f32>()?, [0.8, 1.6]);
/// # Ok::<(), gradkit::regularize::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct LossScaler {
    config: LossScalerConfig,
    state: LossScalerState,
    /// Whether the gradients of the current step were unscaled, and whether they overflowed.
    step: Option<bool>,
    /// Whether [`step`](LossScaler::step) ran since the last update.
    stepped: bool,
}

/// `v` rounded to the nearest f32.
#[allow(
    clippy::cast_possible_truncation,
    reason = "rounding to f32 is the point"
)]
fn f32_round(v: f64) -> f32 {
    v as f32
}

impl LossScaler {
    /// A scaler at `init_scale`.
    ///
    /// # Errors
    /// As [`LossScalerConfig::validate`].
    pub fn new(config: LossScalerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            state: LossScalerState {
                scale: f32_round(config.init_scale),
                growth_tracker: 0,
            },
            config,
            step: None,
            stepped: false,
        })
    }

    /// `loss * scale`, to call `backward()` on.
    ///
    /// # Errors
    /// candle's error for the product.
    pub fn scale(&self, loss: &Tensor) -> Result<Tensor> {
        Ok(loss.affine(f64::from(self.state.scale), 0.0)?)
    }

    /// Divides the gradients by the scale in place and checks them for NaN/Inf in the same
    /// pass (each gradient is read and written once). Returns whether any is non-finite. Call at
    /// most once per step (before clipping, say); [`step`](Self::step) calls it when needed.
    ///
    /// # Errors
    /// [`Error::Core`](crate::Error::Core) for a non-float gradient.
    pub fn unscale(&mut self, grads: &mut NamedGrads) -> Result<bool> {
        if let Some(found) = self.step {
            return Ok(found);
        }
        // PyTorch multiplies by the f32 reciprocal of the scale.
        let inv = f64::from(f32_round(1.0 / f64::from(self.state.scale)));
        let found = grads.apply(|gs| -> Result<bool> { Ok(unscale_all_in_place(gs, inv)?) })?;
        self.step = Some(found);
        Ok(found)
    }

    /// Unscales the gradients (unless [`unscale`](Self::unscale) already did) and steps the
    /// optimizer unless one was non-finite. Returns whether it stepped. Once per step: call
    /// [`update`](Self::update) before the next one.
    ///
    /// # Errors
    /// [`Error::StepWithoutUpdate`](crate::Error::StepWithoutUpdate) when `step` already ran since
    /// the last update (PyTorch raises the same: a second step would apply gradients still
    /// multiplied by the scale); as [`unscale`](Self::unscale), and the optimizer's error.
    pub fn step<O: Optimizer>(&mut self, optimizer: &mut O, grads: &NamedGrads) -> Result<bool> {
        if self.stepped {
            return Err(crate::Error::StepWithoutUpdate);
        }
        let mut grads = grads.clone();
        let found_inf = self.unscale(&mut grads)?;
        // Counted once the gradients are unscaled: a step that failed before that can be retried.
        self.stepped = true;
        if found_inf {
            return Ok(false);
        }
        let mut store = GradStore::default();
        grads.write_back(&mut store);
        optimizer.step(&store)?;
        Ok(true)
    }

    /// Updates the scale after a step, with `torch._amp_update_scale_`'s rules: back off after
    /// an overflow (and reset the tracker); after `growth_interval` clean steps grow, unless the
    /// grown scale would not be finite in f32 (the tracker resets either way). A step whose
    /// gradients were never unscaled counts as clean.
    pub fn update(&mut self) {
        let found_inf = self.step.take().unwrap_or(false);
        self.update_with(found_inf);
    }

    /// [`update`](Self::update) with the overflow flag given (for loops that check gradients
    /// themselves).
    pub fn update_with(&mut self, found_inf: bool) {
        self.step = None;
        self.stepped = false;
        let s = &mut self.state;
        if found_inf {
            s.scale = f32_round(f64::from(s.scale) * self.config.backoff_factor);
            s.growth_tracker = 0;
            return;
        }
        let successful = s.growth_tracker + 1;
        if successful == self.config.growth_interval {
            let grown = f32_round(f64::from(s.scale) * self.config.growth_factor);
            if grown.is_finite() {
                s.scale = grown;
            }
            s.growth_tracker = 0;
        } else {
            s.growth_tracker = successful;
        }
    }

    /// The current scale.
    pub fn scale_value(&self) -> f32 {
        self.state.scale
    }

    /// The state to save in a checkpoint.
    pub fn state(&self) -> LossScalerState {
        self.state
    }

    /// Restores a saved state.
    ///
    /// # Errors
    /// [`Error::Core`](crate::Error::Core) when the saved scale is not positive and finite, or
    /// its growth tracker is not below the configured `growth_interval`.
    pub fn load_state(&mut self, state: LossScalerState) -> Result<()> {
        grad_core::validate::positive("scale", f64::from(state.scale))?;
        if state.growth_tracker >= self.config.growth_interval {
            return Err(grad_core::validate::invalid(
                "growth_tracker",
                f64::from(state.growth_tracker),
                "below the configured growth_interval",
            )
            .into());
        }
        self.state = state;
        self.step = None;
        self.stepped = false;
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &LossScalerConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_refused_when_it_would_overflow_f32() {
        let mut s = LossScaler::new(LossScalerConfig {
            init_scale: f64::from(f32::MAX) / 1.5,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 1,
        })
        .unwrap();
        let before = s.scale_value();
        s.update_with(false);
        assert_eq!(s.scale_value(), before);
        assert_eq!(s.state().growth_tracker, 0);
    }
}
