//! The functional batch-norm block: `dropout(act(batch_norm(x)))` in one fused op on the CPU.
//!
//! What PyTorch writes as `nn.Sequential(nn.BatchNorm2d(C), nn.LeakyReLU(), nn.Dropout(p))`. Run
//! as three ops, a training step stores the normalised values, the activation's output and the
//! block's output, and reads and writes each of them again in the backward. Fused, the forward
//! writes only the output, and the backward recomputes the rest from the input, the batch
//! statistics and the mask stream's position (see `kernels/norm_block.rs`).

use candle_core::Tensor;
use grad_core::Philox;
use grad_core::cpu::Fused;
use grad_core::device::Path;

use super::activation::with_elementwise;
use super::batch_norm::{BatchNormOutput, BatchNormStats, fused_op, fused_params, validate};
use super::dropout::{DropoutKind, plan};
use super::{activation_composed, batch_norm_composed, dropout_composed};
use crate::kernels::dropout::DropoutOp;
use crate::kernels::norm_block::BatchNormBlockOp;
use crate::{Activation, Result};

/// The dropout of a [`batch_norm_block`]: its drop probability, its kind, and the stream its mask
/// is drawn from (advanced by the words drawn, as [`dropout`](super::dropout()) advances it).
#[derive(Debug)]
pub struct BlockDropout<'a> {
    /// Probability of dropping an element (or channel), in `[0, 1]`.
    pub p: f64,
    /// Which member of the dropout family.
    pub kind: DropoutKind,
    /// The mask stream.
    pub rng: &'a mut Philox,
}

/// Batch normalisation, then `act`, then (when `dropout` is given) dropout, as one op: the same
/// result as [`batch_norm`](super::batch_norm()), [`activation`](super::activation()) and
/// [`dropout`](super::dropout()) applied in turn, with the same stream position drawn.
///
/// On the CPU this is one fused kernel: the forward reads the input twice (statistics, then
/// everything else) and writes only the output; the backward reads the upstream gradient and the
/// input twice and writes the input's gradient, regenerating the dropout mask and the
/// normalised values instead of storing them. Other devices use [`batch_norm_block_composed`].
///
/// # Shapes
/// As [`batch_norm`](super::batch_norm()); the channel dropout kinds take the ranks
/// [`dropout`](super::dropout()) takes for them.
///
/// # Errors
/// As [`batch_norm`](super::batch_norm()), [`Activation::validate`] and
/// [`dropout`](super::dropout()), all checked before any word is drawn.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use gradkit::core::Philox;
/// use gradkit::layers::Activation;
/// use gradkit::layers::ops::{BatchNormStats, BlockDropout, DropoutKind, batch_norm_block};
/// let x = Tensor::randn(0f32, 1.0, (8, 4, 5, 5), &Device::Cpu)?;
/// let mut rng = Philox::new(3);
/// let dropout = BlockDropout { p: 0.25, kind: DropoutKind::Element, rng: &mut rng };
/// let act = Activation::LeakyRelu { negative_slope: 0.01 };
/// let out = batch_norm_block(&x, None, None, BatchNormStats::Batch, 1e-5, act, Some(dropout))?;
/// assert_eq!(out.y.dims(), [8, 4, 5, 5]);
/// assert_eq!(rng.state().offset, 8 * 4 * 5 * 5);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn batch_norm_block(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    stats: BatchNormStats<'_>,
    eps: f64,
    act: Activation,
    dropout: Option<BlockDropout<'_>>,
) -> Result<BatchNormOutput> {
    let x = &grad_core::device::own_empty(x)?;
    let dims = check_block(x, weight, bias, stats, eps, act)?;
    if Path::of(x.device()) == Path::Composed {
        return composed(x, weight, bias, stats, eps, act, dropout);
    }
    let mask = mask_op(x, dropout)?;
    let (norm, x, batch_stats) = fused_op(x, weight, bias, stats, eps, dims)?;
    let (w, b) = fused_params(weight, bias, &x)?;
    let y = with_elementwise!(act, |f| x.apply_op3(
        &w,
        &b,
        Fused(BatchNormBlockOp { norm, f, mask })
    )?);
    Ok(BatchNormOutput { y, batch_stats })
}

/// [`batch_norm_block`] as [`batch_norm_composed`], [`activation_composed`] and
/// [`dropout_composed`] in turn: the test oracle, and the path for devices without a fused
/// kernel.
///
/// # Errors
/// As [`batch_norm_block`].
pub fn batch_norm_block_composed(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    stats: BatchNormStats<'_>,
    eps: f64,
    act: Activation,
    dropout: Option<BlockDropout<'_>>,
) -> Result<BatchNormOutput> {
    let x = &grad_core::device::own_empty(x)?;
    check_block(x, weight, bias, stats, eps, act)?;
    composed(x, weight, bias, stats, eps, act, dropout)
}

/// Checks a block's norm and activation arguments (the dropout's are checked where its words
/// are drawn) and returns `(N, C, S)`.
pub(crate) fn check_block(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    stats: BatchNormStats<'_>,
    eps: f64,
    act: Activation,
) -> Result<(usize, usize, usize)> {
    let dims = validate(x, weight, bias, stats, eps)?;
    act.validate()?;
    Ok(dims)
}

fn composed(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    stats: BatchNormStats<'_>,
    eps: f64,
    act: Activation,
    dropout: Option<BlockDropout<'_>>,
) -> Result<BatchNormOutput> {
    check_dropout(x, dropout.as_ref())?;
    let out = batch_norm_composed(x, weight, bias, stats, eps)?;
    Ok(BatchNormOutput {
        y: activate_and_drop(&out.y, act, dropout)?,
        batch_stats: out.batch_stats,
    })
}

/// Checks a block's dropout arguments for `x` without drawing: the composed paths call it
/// before the norm runs, as the fused ones check them before their kernel.
pub(super) fn check_dropout(x: &Tensor, dropout: Option<&BlockDropout<'_>>) -> Result<()> {
    if let Some(d) = dropout {
        plan(x, d.p, d.kind)?;
    }
    Ok(())
}

/// A fused block's dropout mask over `x`, its words reserved from the stream; `None` without
/// dropout or with nothing to drop.
pub(super) fn mask_op(x: &Tensor, dropout: Option<BlockDropout<'_>>) -> Result<Option<DropoutOp>> {
    Ok(match dropout {
        Some(d) => plan(x, d.p, d.kind)?.map(|plan| plan.op(d.rng.reserve(plan.units as u64))),
        None => None,
    })
}

/// The composed tail of a block: `act`, then the dropout when there is one.
pub(super) fn activate_and_drop(
    y: &Tensor,
    act: Activation,
    dropout: Option<BlockDropout<'_>>,
) -> Result<Tensor> {
    let y = activation_composed(y, act)?;
    Ok(match dropout {
        Some(d) => dropout_composed(&y, d.p, d.kind, d.rng)?,
        None => y,
    })
}
