//! Remedies as values: what a [`Finding`](crate::Finding) tells a user to do, each naming the
//! gradkit (or candle) items that do it.
//!
//! The items are written as a user of the `gradkit` façade writes them. The façade's doctests
//! resolve every one with the compiler (`use <path> as _;` for each path of
//! [`Remedy::ALL`]), so a renamed or moved item breaks the build, not the advice.

use serde::{Deserialize, Serialize};

/// One remedy for a gradient failure.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Remedy {
    /// Normalise activations over the batch (Ioffe & Szegedy 2015).
    BatchNorm,
    /// Normalise each sample's features (Ba, Kiros & Hinton 2016).
    LayerNorm,
    /// A non-saturating activation with He (Kaiming) initialisation (He et al. 2015).
    LeakyReluWithKaiming,
    /// A learnt negative slope instead of a dead zero.
    Prelu,
    /// Layer-sequential unit-variance initialisation (Mishkin & Matas 2016).
    Lsuv,
    /// Re-initialise a layer's parameters.
    Reinit,
    /// Xavier initialisation with the activation's gain (Glorot & Bengio 2010).
    XavierWithGain,
    /// Clip the global gradient norm (Pascanu, Mikolov & Bengio 2013).
    ClipGlobalNorm,
    /// Skip optimizer steps whose gradients are not finite.
    SkipNonFinite,
    /// Dynamic loss scaling for f16/bf16 training (Micikevicius et al. 2018).
    LossScaling,
    /// Normalisation layers whose backward reaches every input, where candle-nn's fast paths
    /// drop the gradient.
    GradientKeepingOps,
    /// Lower the learning rate.
    LowerLearningRate,
    /// Raise the learning rate.
    RaiseLearningRate,
    /// Start from a small learning rate and raise it over the first steps (Goyal et al. 2017).
    Warmup,
    /// Larger batches, up to about the simple noise scale (McCandlish et al. 2018).
    LargerBatch,
}

impl Remedy {
    /// Every remedy, in declaration order.
    pub const ALL: [Self; 15] = [
        Self::BatchNorm,
        Self::LayerNorm,
        Self::LeakyReluWithKaiming,
        Self::Prelu,
        Self::Lsuv,
        Self::Reinit,
        Self::XavierWithGain,
        Self::ClipGlobalNorm,
        Self::SkipNonFinite,
        Self::LossScaling,
        Self::GradientKeepingOps,
        Self::LowerLearningRate,
        Self::RaiseLearningRate,
        Self::Warmup,
        Self::LargerBatch,
    ];

    /// What to do, in words.
    pub fn advice(self) -> &'static str {
        match self {
            Self::BatchNorm => "insert batch normalisation after the layers named",
            Self::LayerNorm => "insert layer normalisation",
            Self::LeakyReluWithKaiming => {
                "use LeakyReLU with Kaiming init instead of saturating activations"
            }
            Self::Prelu => "use PReLU, whose negative slope is learnt",
            Self::Lsuv => "initialise with LSUV",
            Self::Reinit => "re-initialise the layer's bias and weight",
            Self::XavierWithGain => "use Xavier init with the activation's gain",
            Self::ClipGlobalNorm => {
                "clip the global gradient norm at about 1-5x its usual value (the run's median)"
            }
            Self::SkipNonFinite => {
                "skip non-finite steps and trace the source back from the first parameter named"
            }
            Self::LossScaling => "with f16/bf16, scale the loss dynamically",
            Self::GradientKeepingOps => {
                "look for an op without a backward between the loss and these parameters: candle-nn's fast LayerNorm, RmsNorm and softmax_last_dim drop gradients (use gradkit's norms or candle's composed softmax), a detach(), or a parameter the forward never uses"
            }
            Self::LowerLearningRate => "lower the learning rate",
            Self::RaiseLearningRate => {
                "raise the learning rate (or the layer's: its updates barely move it); about 1e-3 of the weights per step is typical"
            }
            Self::LargerBatch => {
                "use larger batches (or accumulate gradients over more micro-batches), up to about the noise scale B_simple, raising the learning rate with the batch"
            }
            Self::Warmup => {
                "warm the learning rate up, from about a tenth of it over the first few hundred steps (candle's Optimizer::set_learning_rate each step)"
            }
        }
    }

    /// The items that do it, as a user of the `gradkit` façade writes them (empty where it is a
    /// setting, not an API).
    pub fn api(self) -> &'static [&'static str] {
        match self {
            Self::BatchNorm => &["gradkit::layers::batch_norm"],
            Self::LayerNorm => &["gradkit::layers::layer_norm"],
            Self::LeakyReluWithKaiming => &[
                "gradkit::layers::Activation::LeakyRelu",
                "gradkit::layers::init::Initializer::KaimingNormal",
            ],
            Self::Prelu => &["gradkit::layers::prelu"],
            Self::Lsuv => &["gradkit::layers::lsuv"],
            Self::Reinit => &["gradkit::layers::init::reinit"],
            Self::XavierWithGain => &[
                "gradkit::layers::init::Initializer::XavierNormal",
                "gradkit::layers::init::calculate_gain",
            ],
            Self::ClipGlobalNorm => &[
                "gradkit::regularize::Clipped",
                "gradkit::regularize::ClipRule::Norm",
            ],
            Self::SkipNonFinite => &[
                "gradkit::regularize::Clipped",
                "gradkit::regularize::ClippedConfig",
            ],
            Self::LossScaling => &["gradkit::regularize::LossScaler"],
            Self::GradientKeepingOps => &[
                "gradkit::layers::layer_norm",
                "gradkit::layers::rms_norm",
                "gradkit::layers::ops::layer_norm",
                "candle_nn::ops::softmax",
            ],
            Self::LowerLearningRate
            | Self::RaiseLearningRate
            | Self::Warmup
            | Self::LargerBatch => &[],
        }
    }

    /// The advice with its items: `advice (item, item)`.
    ///
    /// ```
    /// use gradkit::diagnostics::Remedy;
    /// assert_eq!(
    ///     Remedy::BatchNorm.render(),
    ///     "insert batch normalisation after the layers named (gradkit::layers::batch_norm)"
    /// );
    /// ```
    pub fn render(self) -> String {
        match self.api() {
            [] => self.advice().to_string(),
            api => format!("{} ({})", self.advice(), api.join(", ")),
        }
    }

    /// Several remedies as one sentence: `first; or second; or ...`.
    ///
    /// ```
    /// use gradkit::diagnostics::Remedy;
    /// let text = Remedy::render_all(&[Remedy::LossScaling, Remedy::LowerLearningRate]);
    /// assert_eq!(
    ///     text,
    ///     "with f16/bf16, scale the loss dynamically (gradkit::regularize::LossScaler); or lower the learning rate"
    /// );
    /// assert!(Remedy::ALL.iter().all(|r| !r.advice().is_empty()));
    /// assert!(Remedy::LowerLearningRate.api().is_empty()); // a setting, not an API
    /// ```
    pub fn render_all(remedies: &[Self]) -> String {
        remedies
            .iter()
            .map(|r| r.render())
            .collect::<Vec<_>>()
            .join("; or ")
    }
}
