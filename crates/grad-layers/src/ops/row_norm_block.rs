//! The functional layer-norm and group-norm blocks: `dropout(act(norm(x)))` in one fused op on
//! the CPU.
//!
//! What PyTorch writes as `nn.Sequential(nn.LayerNorm(D), nn.GELU(), nn.Dropout(p))` or
//! `nn.Sequential(nn.GroupNorm(G, C), nn.SiLU(), nn.Dropout(p))`. Run as three ops, a training
//! step stores the normalised values, the activation's output and the block's output; fused, it
//! stores only the output and the rows' statistics, and the backward recomputes the rest row by
//! row in cache (see `kernels/row_norm_block.rs`).

use candle_core::Tensor;
use grad_core::cpu::Fused;
use grad_core::device::Path;

use super::activation::with_elementwise;
use super::norm_block::{BlockDropout, activate_and_drop, check_dropout, mask_op};
use super::{group_norm, group_norm_composed, layer_norm, layer_norm_composed};
use crate::kernels::row_norm::RowNorm;
use crate::kernels::row_norm_block::RowNormBlockOp;
use crate::{Activation, Result};

/// Layer normalisation over the trailing dims `normalized_shape`, then `act`, then (when
/// `dropout` is given) dropout, as one op: the same result as
/// [`layer_norm`](super::layer_norm()), [`activation`](super::activation()) and
/// [`dropout`](super::dropout()) applied in turn, with the same stream position drawn.
///
/// On the CPU one fused kernel, whose forward writes only the output and whose backward
/// regenerates the normalised values and the mask row by row; other devices use
/// [`layer_norm_block_composed`].
///
/// # Shapes
/// As [`layer_norm`](super::layer_norm()); the channel dropout kinds take the ranks
/// [`dropout`](super::dropout()) takes for them.
///
/// # Errors
/// As [`layer_norm`](super::layer_norm()), [`Activation::validate`] and
/// [`dropout`](super::dropout()), all checked before any word is drawn.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::core::Philox;
/// use gradkit::layers::{Activation, GeluApproximation};
/// use gradkit::layers::ops::{BlockDropout, DropoutKind, layer_norm_block};
/// let x = Tensor::randn(0f32, 1.0, (6, 32), &Device::Cpu)?;
/// let mut rng = Philox::new(3);
/// let dropout = BlockDropout { p: 0.1, kind: DropoutKind::Element, rng: &mut rng };
/// let act = Activation::Gelu { approximate: GeluApproximation::None };
/// let y = layer_norm_block(&x, &[32], None, None, 1e-5, act, Some(dropout))?;
/// assert_eq!(y.dims(), [6, 32]);
/// assert_eq!(rng.state().offset, 6 * 32);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn layer_norm_block(
    x: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    act: Activation,
    dropout: Option<BlockDropout<'_>>,
) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    check_layer_block(x, normalized_shape, weight, bias, eps, act)?;
    if Path::of(x.device()) == Path::Composed {
        return layer_composed(x, normalized_shape, weight, bias, eps, act, dropout);
    }
    let mask = mask_op(x, dropout)?;
    let inputs = layer_norm::fused_inputs(x, normalized_shape, weight, bias, eps)?;
    fused(inputs, act, mask)
}

/// [`layer_norm_block`] as [`layer_norm_composed`], [`activation_composed`] and
/// [`dropout_composed`] in turn: the test oracle, and the path for devices without a fused
/// kernel.
///
/// [`activation_composed`]: super::activation_composed()
/// [`dropout_composed`]: super::dropout_composed()
///
/// # Errors
/// As [`layer_norm_block`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::core::Philox;
/// use gradkit::layers::Activation;
/// use gradkit::layers::ops::{BlockDropout, DropoutKind};
/// use gradkit::layers::ops::{layer_norm_block, layer_norm_block_composed};
/// let x = Tensor::randn(0f64, 1.0, (4, 16), &Device::Cpu)?;
/// // Two streams at the same position: the same mask on both paths.
/// let (mut a, mut b) = (Philox::new(5), Philox::new(5));
/// let drop = |rng| Some(BlockDropout { p: 0.5, kind: DropoutKind::Element, rng });
/// let act = Activation::Tanh;
/// let fused = layer_norm_block(&x, &[16], None, None, 1e-5, act, drop(&mut a))?;
/// let composed = layer_norm_block_composed(&x, &[16], None, None, 1e-5, act, drop(&mut b))?;
/// let diff = (fused - composed)?.abs()?.max_all()?.to_scalar::<f64>()?;
/// assert!(diff < 1e-12);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn layer_norm_block_composed(
    x: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    act: Activation,
    dropout: Option<BlockDropout<'_>>,
) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    check_layer_block(x, normalized_shape, weight, bias, eps, act)?;
    layer_composed(x, normalized_shape, weight, bias, eps, act, dropout)
}

/// Group normalisation with `num_groups` groups, then `act`, then (when `dropout` is given)
/// dropout, as one op: the same result as [`group_norm`](super::group_norm()),
/// [`activation`](super::activation()) and [`dropout`](super::dropout()) applied in turn, with
/// the same stream position drawn.
///
/// On the CPU one fused kernel (each `(sample, group)` a row, as for group norm); other devices
/// use [`group_norm_block_composed`].
///
/// # Shapes
/// As [`group_norm`](super::group_norm()); the channel dropout kinds take the ranks
/// [`dropout`](super::dropout()) takes for them.
///
/// # Errors
/// As [`group_norm`](super::group_norm()), [`Activation::validate`] and
/// [`dropout`](super::dropout()), all checked before any word is drawn.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::core::Philox;
/// use gradkit::layers::Activation;
/// use gradkit::layers::ops::{BlockDropout, DropoutKind, group_norm_block};
/// let x = Tensor::randn(0f32, 1.0, (2, 8, 4, 4), &Device::Cpu)?;
/// let mut rng = Philox::new(3);
/// let dropout = BlockDropout { p: 0.5, kind: DropoutKind::Channel2d, rng: &mut rng };
/// let y = group_norm_block(&x, 4, None, None, 1e-5, Activation::Silu, Some(dropout))?;
/// assert_eq!(y.dims(), [2, 8, 4, 4]);
/// assert_eq!(rng.state().offset, 2 * 8); // one word per channel plane
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn group_norm_block(
    x: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    act: Activation,
    dropout: Option<BlockDropout<'_>>,
) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    let dims = check_group_block(x, num_groups, weight, bias, eps, act)?;
    if Path::of(x.device()) == Path::Composed {
        return group_composed(x, num_groups, weight, bias, eps, act, dropout);
    }
    let mask = mask_op(x, dropout)?;
    let inputs = group_norm::fused_inputs(x, num_groups, dims, weight, bias, eps)?;
    fused(inputs, act, mask)
}

/// [`group_norm_block`] as [`group_norm_composed`], [`activation_composed`] and
/// [`dropout_composed`] in turn: the test oracle, and the path for devices without a fused
/// kernel.
///
/// [`activation_composed`]: super::activation_composed()
/// [`dropout_composed`]: super::dropout_composed()
///
/// # Errors
/// As [`group_norm_block`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::layers::Activation;
/// use gradkit::layers::ops::{group_norm_block, group_norm_block_composed};
/// let x = Tensor::randn(0f64, 1.0, (2, 6, 5), &Device::Cpu)?;
/// let fused = group_norm_block(&x, 3, None, None, 1e-5, Activation::Silu, None)?;
/// let composed = group_norm_block_composed(&x, 3, None, None, 1e-5, Activation::Silu, None)?;
/// let diff = (fused - composed)?.abs()?.max_all()?.to_scalar::<f64>()?;
/// assert!(diff < 1e-12);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn group_norm_block_composed(
    x: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    act: Activation,
    dropout: Option<BlockDropout<'_>>,
) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    check_group_block(x, num_groups, weight, bias, eps, act)?;
    group_composed(x, num_groups, weight, bias, eps, act, dropout)
}

/// Checks a layer-norm block's norm and activation arguments (the dropout's are checked where
/// its words are drawn).
pub(crate) fn check_layer_block(
    x: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    act: Activation,
) -> Result<()> {
    layer_norm::validate(x, normalized_shape, weight, bias, eps)?;
    act.validate()
}

/// Checks a group-norm block's norm and activation arguments and returns `(channels per group,
/// spatial size)`.
pub(crate) fn check_group_block(
    x: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    act: Activation,
) -> Result<(usize, usize)> {
    let dims = group_norm::validate(x, num_groups, weight, bias, eps)?;
    act.validate()?;
    Ok(dims)
}

fn fused(
    (x, w, b, norm): (Tensor, Tensor, Tensor, RowNorm),
    act: Activation,
    mask: Option<crate::kernels::dropout::DropoutOp>,
) -> Result<Tensor> {
    Ok(with_elementwise!(act, |f| x.apply_op3(
        &w,
        &b,
        Fused(RowNormBlockOp { norm, f, mask })
    )?))
}

fn layer_composed(
    x: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    act: Activation,
    dropout: Option<BlockDropout<'_>>,
) -> Result<Tensor> {
    check_dropout(x, dropout.as_ref())?;
    let y = layer_norm_composed(x, normalized_shape, weight, bias, eps)?;
    activate_and_drop(&y, act, dropout)
}

fn group_composed(
    x: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    act: Activation,
    dropout: Option<BlockDropout<'_>>,
) -> Result<Tensor> {
    check_dropout(x, dropout.as_ref())?;
    let y = group_norm_composed(x, num_groups, weight, bias, eps)?;
    activate_and_drop(&y, act, dropout)
}
