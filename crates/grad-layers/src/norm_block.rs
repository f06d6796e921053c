//! Batch norm, an activation and dropout as one layer, the pattern of
//! `nn.Sequential(nn.BatchNorm2d(C), nn.LeakyReLU(), nn.Dropout(p))`, with one fused forward and
//! one fused backward on the CPU ([`ops::batch_norm_block`](crate::ops::batch_norm_block())).
//!
//! The block is exactly its three layers in sequence: the same parameters and running
//! statistics as a [`BatchNorm`] built under the same prefix, the same mask stream as a
//! [`Dropout`] with the same seed, the same outputs and gradients. It costs less because it
//! stores only its output and runs one op instead of three through candle's autograd: on
//! `[32, 64, 56, 56]` with leaky ReLU and dropout 0.2 a training step took 58 ms against the
//! three layers' 68 ms (`BENCHMARKS.md`, `fused_block`).

use candle_core::{ModuleT, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::ops::{BlockDropout, batch_norm_block as batch_norm_block_fn, check_block};
use crate::{Activation, BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Result, batch_norm};

/// Configuration of a [`BatchNormBlock`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchNormBlockConfig {
    /// The batch norm's configuration.
    pub norm: BatchNormConfig,
    /// The activation after it. Default: ReLU.
    pub activation: Activation,
    /// The dropout after the activation, if any. Default: none.
    pub dropout: Option<DropoutConfig>,
}

impl Default for BatchNormBlockConfig {
    fn default() -> Self {
        Self {
            norm: BatchNormConfig::default(),
            activation: Activation::Relu,
            dropout: None,
        }
    }
}

impl BatchNormBlockConfig {
    /// Checks the norm's configuration, the activation's parameters and the dropout's `p`.
    ///
    /// # Errors
    /// [`Error::Core`](crate::Error::Core) with
    /// [`grad_core::Error::InvalidHyperParameter`] naming the field.
    pub fn validate(&self) -> Result<()> {
        self.norm.validate()?;
        validate_tail(self.activation, self.dropout.as_ref())
    }
}

/// Checks a block's activation parameters and dropout `p`.
pub(crate) fn validate_tail(activation: Activation, dropout: Option<&DropoutConfig>) -> Result<()> {
    activation.validate()?;
    if let Some(d) = dropout {
        grad_core::validate::unit_interval("p", d.p)?;
    }
    Ok(())
}

/// The activation and dropout layer of a block, shared by the batch-, layer- and group-norm
/// blocks.
#[derive(Debug)]
pub(crate) struct BlockTail {
    pub activation: Activation,
    pub dropout: Option<Dropout>,
}

impl BlockTail {
    /// The tail of a block under `vb`: its dropout stream named `dropout` there.
    pub(crate) fn new(
        activation: Activation,
        dropout: Option<DropoutConfig>,
        vb: &VarBuilder,
    ) -> Result<Self> {
        validate_tail(activation, dropout.as_ref())?;
        let dropout = dropout
            .map(|d| crate::dropout(d, vb.pp("dropout")))
            .transpose()?;
        Ok(Self {
            activation,
            dropout,
        })
    }

    /// Runs `op` with the dropout of a forward on `x`: in training, the words it draws reserved
    /// from the layer's stream; otherwise none. Call it after the norm's arguments are checked
    /// (a failing reservation draws no words).
    pub(crate) fn run<R>(
        &self,
        x: &Tensor,
        train: bool,
        op: impl FnOnce(Option<BlockDropout<'_>>) -> Result<R>,
    ) -> Result<R> {
        let mut drawn = match (&self.dropout, train) {
            (Some(d), true) => Some((d.config(), d.reserve(x)?)),
            _ => None,
        };
        op(drawn.as_mut().map(|(c, rng)| BlockDropout {
            p: c.p,
            kind: c.kind,
            rng,
        }))
    }
}

/// Batch norm over dim 1, then an activation, then optional dropout; a candle [`ModuleT`]
/// (`train = true` uses and updates batch statistics and drops; evaluation normalises with the
/// running statistics and does not drop).
///
/// Its parameters and buffers are a [`BatchNorm`]'s, under the block's own prefix (`weight`,
/// `bias`, `running_mean`, `running_var`, `num_batches_tracked`), so a checkpoint of a
/// `BatchNorm` at that prefix loads unchanged. Its dropout stream is a [`Dropout`]'s named
/// `dropout` under the prefix (or seeded by [`DropoutConfig::seed`]), saved and restored with
/// [`BatchNormBlock::dropout`]'s `state`/`set_state`.
#[derive(Debug)]
pub struct BatchNormBlock {
    norm: BatchNorm,
    tail: BlockTail,
}

/// Builds a [`BatchNormBlock`] over `num_features` channels, its parameters taken from or created
/// in `vb`.
///
/// # Errors
/// [`Error::Core`](crate::Error::Core) for an invalid config, `num_features` of 0, or stored
/// parameters of the wrong shape.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use gradkit::layers::{
///     Activation, BatchNormBlockConfig, DropoutConfig, batch_norm_block,
/// };
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let config = BatchNormBlockConfig {
///     activation: Activation::LeakyRelu { negative_slope: 0.01 },
///     dropout: Some(DropoutConfig { p: 0.1, seed: Some(7), ..Default::default() }),
///     ..Default::default()
/// };
/// let block = batch_norm_block(16, config, vb.pp("block"))?;
/// let x = Tensor::randn(0f32, 1.0, (4, 16, 8, 8), &Device::Cpu)?;
/// let y = block.try_forward(&x, true)?;
/// assert_eq!(y.dims(), [4, 16, 8, 8]);
/// assert_eq!(block.norm().num_batches_tracked()?, Some(1));
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn batch_norm_block(
    num_features: usize,
    config: BatchNormBlockConfig,
    vb: VarBuilder,
) -> Result<BatchNormBlock> {
    config.validate()?;
    Ok(BatchNormBlock {
        tail: BlockTail::new(config.activation, config.dropout, &vb)?,
        norm: batch_norm(num_features, config.norm, vb)?,
    })
}

impl BatchNormBlock {
    /// The forward pass with gradkit's error type; [`ModuleT::forward_t`] wraps it.
    ///
    /// An f16 or bf16 input with f32 parameters is computed in f32 and returned in the input's
    /// dtype, as [`BatchNorm::try_forward`] does.
    ///
    /// # Shapes
    /// As [`BatchNorm::try_forward`], and the ranks the dropout's kind takes.
    ///
    /// # Errors
    /// As [`BatchNorm::try_forward`], [`Activation::validate`] and
    /// [`ops::dropout`](crate::ops::dropout()); a failing call draws no words.
    pub fn try_forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.norm.check_channels(x)?;
        let (norm, stats) = (&self.norm, self.norm.stats(train));
        let eps = norm.config().eps;
        crate::check::in_param_precision(x, norm.param_dtype(), |x| {
            let act = self.tail.activation;
            check_block(x, norm.weight(), norm.bias(), stats, eps, act)?;
            let out = self.tail.run(x, train, |dropout| {
                batch_norm_block_fn(x, norm.weight(), norm.bias(), stats, eps, act, dropout)
            })?;
            norm.after_forward(train, &out)?;
            Ok(out.y)
        })
    }

    /// The batch norm: its parameters, running statistics and configuration.
    pub fn norm(&self) -> &BatchNorm {
        &self.norm
    }

    /// The activation.
    pub fn activation(&self) -> Activation {
        self.tail.activation
    }

    /// The dropout layer, when there is one: its stream's `state`/`set_state`.
    pub fn dropout(&self) -> Option<&Dropout> {
        self.tail.dropout.as_ref()
    }
}

impl ModuleT for BatchNormBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.try_forward(xs, train)
            .map_err(candle_core::Error::from)
    }
}
