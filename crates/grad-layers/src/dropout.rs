//! The dropout family as layers with their own seeded, resumable random stream.
//!
//! A layer built with a seed draws its masks from grad-core's mask stream ([`grad_core::mask`],
//! counter-based, keyed by Philox): the same seed gives the same masks run after run, whatever
//! the thread count and on every device (the CPU kernel and the composed path on CUDA or Metal
//! compute the same words); each training forward advances the stream by the words it used;
//! [`Dropout::state`] and [`Dropout::set_state`] save and restore the position, so a resumed run
//! draws exactly the masks it would have drawn. candle cannot seed its CPU generator at all
//! (candle issues #2651, #2216, #3297).
//!
//! Memory: the backward keeps no mask. It regenerates the mask from the `(seed, offset)` the
//! forward used, so a dropout layer costs no activation memory beyond its output.

use std::sync::{Mutex, PoisonError};

use candle_core::{ModuleT, Tensor};
use candle_nn::VarBuilder;
use grad_core::{Philox, PhiloxState};
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::ops::dropout_words;
use crate::ops::{DropoutKind, dropout as dropout_fn};

/// Configuration of a [`Dropout`] layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DropoutConfig {
    /// Probability of dropping an element (or channel), in `[0, 1]`. Default: 0.5.
    pub p: f64,
    /// Which member of the family. Default: [`DropoutKind::Element`].
    pub kind: DropoutKind,
    /// Seed of the layer's random stream; `None` derives it from the layer's name (the
    /// `VarBuilder` prefix it is built under), so layers with different names draw different
    /// masks and a rebuilt model draws the same ones. Default: `None`.
    pub seed: Option<u64>,
}

impl Default for DropoutConfig {
    fn default() -> Self {
        Self {
            p: 0.5,
            kind: DropoutKind::Element,
            seed: None,
        }
    }
}

/// A dropout layer (any [`DropoutKind`]); a candle [`ModuleT`]: identity in evaluation.
#[derive(Debug)]
pub struct Dropout {
    config: DropoutConfig,
    rng: Mutex<Philox>,
}

/// Builds a [`Dropout`] layer named by `vb`'s prefix. It has no parameters; the name seeds its
/// stream when `config.seed` is `None`.
///
/// # Errors
/// [`Error::Core`](crate::Error::Core) when `p` is outside `[0, 1]` or NaN.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::VarBuilder;
/// use gradkit::layers::{DropoutConfig, dropout};
/// let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
/// let layer = dropout(DropoutConfig { p: 0.5, seed: Some(42), ..Default::default() }, vb.pp("drop"))?;
/// let x = Tensor::ones((4, 8), DType::F32, &Device::Cpu)?;
/// let saved = layer.state();
/// let a = layer.forward_t(&x, true)?;
/// layer.set_state(saved); // rewind: the same mask again
/// let b = layer.forward_t(&x, true)?;
/// assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
/// assert_eq!(layer.forward_t(&x, false)?.to_vec2::<f32>()?, x.to_vec2::<f32>()?);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn dropout(config: DropoutConfig, vb: VarBuilder) -> Result<Dropout> {
    grad_core::validate::unit_interval("p", config.p)?;
    let seed = config
        .seed
        .unwrap_or_else(|| grad_core::rng::seed_of_name(&vb.prefix()));
    Ok(Dropout {
        rng: Mutex::new(Philox::new(seed)),
        config,
    })
}

impl Dropout {
    /// The forward pass with gradkit's error type; [`ModuleT::forward_t`] wraps it.
    ///
    /// # Shapes
    /// As [`ops::dropout`](crate::ops::dropout()) for the layer's kind.
    ///
    /// # Errors
    /// As [`ops::dropout`](crate::ops::dropout()).
    pub fn try_forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            return Ok(x.clone());
        }
        let (p, kind) = (self.config.p, self.config.kind);
        dropout_fn(x, p, kind, &mut self.reserve(x)?)
    }

    /// Reserves the words a training forward on `x` draws, under the lock, and returns a stream
    /// at the first of them: threads sharing a layer get disjoint ranges of the stream and do
    /// not wait for each other's kernels.
    pub(crate) fn reserve(&self, x: &Tensor) -> Result<Philox> {
        let words = dropout_words(x, self.config.p, self.config.kind)?;
        let at = self
            .rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reserve(words as u64);
        Ok(Philox::from_state(at))
    }

    /// The position of the layer's random stream: save it with a checkpoint.
    pub fn state(&self) -> PhiloxState {
        self.rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .state()
    }

    /// Moves the layer's random stream to a saved position.
    pub fn set_state(&self, state: PhiloxState) {
        self.rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_state(state);
    }

    /// The configuration.
    pub fn config(&self) -> &DropoutConfig {
        &self.config
    }
}

impl ModuleT for Dropout {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.try_forward(xs, train)
            .map_err(candle_core::Error::from)
    }
}
