//! Functional dropout: standard (Srivastava et al. 2014, inverted), channel dropout (Tompson et
//! al. 2015) and alpha dropout for SELU networks (Klambauer et al. 2017), with PyTorch's formulas.
//!
//! Masks come from grad-core's mask stream ([`grad_core::mask`]): one 32-bit word per element
//! (per channel plane for the channel kinds), kept when below `(1 - p) * 2^32`. The same
//! `(seed, offset)` gives the same mask on the CPU's fused kernel, on the composed path of any
//! device (CUDA, Metal: built there with candle integer ops, nothing copied from the host but
//! 16 KiB of tables) and for any thread count. Kept values are `x * scale + shift`, dropped ones
//! `x * 0 + value`, so NaN and infinite inputs stay visible as PyTorch's `x * mask` keeps them.

use std::sync::Arc;

use candle_core::Tensor;
use grad_core::cpu::Fused;
use grad_core::device::Path;
use grad_core::mask::{MaskStream, mask_words_tensor};
use grad_core::rng::bernoulli_threshold;
use grad_core::{Philox, PhiloxState};
use serde::{Deserialize, Serialize};

use crate::kernels::dropout::DropoutOp;
use crate::{Error, Result};

/// SELU's `scale * alpha`: the value a SELU unit saturates to (negated).
const SELU_SCALE_ALPHA: f64 = 1.758_099_340_847_376_6;

/// Which member of the dropout family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DropoutKind {
    /// `nn.Dropout`: independent elements, kept ones scaled by `1 / (1 - p)`.
    Element,
    /// `nn.Dropout1d`: whole channels of `[N, C, L]` (or unbatched `[C, L]`).
    Channel1d,
    /// `nn.Dropout2d`: whole channels of `[N, C, H, W]`. A rank-3 input is read as PyTorch 2.15
    /// reads it, as `[N, C, L]` with whole rows of `L` dropped (PyTorch warns that this will
    /// change to an unbatched `[C, H, W]`; use `Channel1d` for rows, or unsqueeze an unbatched
    /// image to `[1, C, H, W]`).
    Channel2d,
    /// `nn.Dropout3d`: whole channels of `[N, C, D, H, W]` (or unbatched `[C, D, H, W]`).
    Channel3d,
    /// `nn.AlphaDropout`: independent elements set to SELU's saturation value, then an affine
    /// correction that keeps the mean and variance of a standard-normal input.
    Alpha,
    /// `nn.FeatureAlphaDropout`: alpha dropout of whole channels of `[N, C, *]`.
    FeatureAlpha,
}

impl DropoutKind {
    /// The number of random words (masked units) for `dims`, and the elements per unit.
    fn units(self, dims: &[usize]) -> Result<(usize, usize)> {
        let rank = dims.len();
        // The ranks read as `[N, C, *]`, and the rank read as an unbatched `[C, *]`.
        let (batched, unbatched, expected): (&[usize], Option<usize>, _) = match self {
            Self::Element | Self::Alpha => return Ok((dims.iter().product(), 1)),
            Self::Channel1d => (&[3], Some(2), "2 or 3 ([C, L] or [N, C, L])"),
            // PyTorch 2.15's dropout2d reads a rank-3 input as batched [N, C, L].
            Self::Channel2d => (&[3, 4], None, "3 or 4 ([N, C, L] or [N, C, H, W])"),
            Self::Channel3d => (&[5], Some(4), "4 or 5 ([C, D, H, W] or [N, C, D, H, W])"),
            Self::FeatureAlpha if rank >= 2 => {
                return Ok((dims[0] * dims[1], dims[2..].iter().product()));
            }
            Self::FeatureAlpha => {
                return Err(Error::rank(
                    "feature_alpha_dropout",
                    "input",
                    "at least 2 ([N, C, *])",
                    rank,
                ));
            }
        };
        if batched.contains(&rank) {
            Ok((dims[0] * dims[1], dims[2..].iter().product()))
        } else if unbatched == Some(rank) {
            Ok((dims[0], dims[1..].iter().product()))
        } else {
            Err(Error::rank("dropout", "input", expected, rank))
        }
    }

    fn is_alpha(self) -> bool {
        matches!(self, Self::Alpha | Self::FeatureAlpha)
    }
}

/// The element-wise map of a dropout with drop probability `p`: `(keep_scale, keep_shift,
/// drop_value)`.
fn coefficients(kind: DropoutKind, p: f64) -> (f64, f64, f64) {
    if p >= 1.0 {
        // Everything dropped: PyTorch multiplies by 0 (so inf and NaN become NaN).
        return (0.0, 0.0, 0.0);
    }
    if kind.is_alpha() {
        let alpha = SELU_SCALE_ALPHA;
        let a = 1.0 / ((alpha * alpha * p + 1.0) * (1.0 - p)).sqrt();
        (a, alpha * a * p, alpha * a * (p - 1.0))
    } else {
        (1.0 / (1.0 - p), 0.0, 0.0)
    }
}

/// Applies dropout of `kind` with drop probability `p` to `x`, as in training, drawing the mask
/// from `rng`'s position in the mask stream (which advances by one word per element, or per
/// channel plane).
///
/// `p = 0` returns `x` itself and draws nothing; `p = 1` returns `x * 0`. On the CPU a fused kernel
/// that keeps no mask: the backward regenerates it from the stream position. Other devices take
/// [`dropout_composed`], which builds the same mask on the device.
///
/// # Shapes
/// `x`: any shape for [`DropoutKind::Element`] and `Alpha`; `[N, C, L]` or `[C, L]` for
/// `Channel1d`, `[N, C, H, W]` or `[C, H, W]` for `Channel2d`, `[N, C, D, H, W]` or
/// `[C, D, H, W]` for `Channel3d`, rank 2 or more for `FeatureAlpha`. The output has the
/// input's shape and dtype.
///
/// # Errors
/// [`Error::Core`] for `p` outside `[0, 1]` or NaN, or a non-float input;
/// a rank mismatch for the channel kinds.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::core::Philox;
/// use gradkit::layers::ops::{DropoutKind, dropout};
/// let x = Tensor::ones(1000, candle_core::DType::F32, &Device::Cpu)?;
/// let mut rng = Philox::new(7);
/// let y = dropout(&x, 0.25, DropoutKind::Element, &mut rng)?;
/// let kept = y.to_vec1::<f32>()?.iter().filter(|v| **v > 0.0).count();
/// assert!((650..850).contains(&kept));
/// assert_eq!(rng.state().offset, 1000);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn dropout(x: &Tensor, p: f64, kind: DropoutKind, rng: &mut Philox) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    let Some(plan) = plan(x, p, kind)? else {
        return Ok(x.clone());
    };
    match Path::of(x.device()) {
        Path::Fused => fused(x, &plan, rng.reserve(plan.units as u64)),
        Path::Composed => composed(x, &plan, rng.reserve(plan.units as u64)),
    }
}

/// [`dropout`] written with candle ops on `x`'s device (the mask words computed there from the
/// same stream position, so the result equals the fused kernel's): the path for other devices
/// and the fused kernel's oracle.
///
/// # Errors
/// As [`dropout`].
pub fn dropout_composed(x: &Tensor, p: f64, kind: DropoutKind, rng: &mut Philox) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    let Some(plan) = plan(x, p, kind)? else {
        return Ok(x.clone());
    };
    composed(x, &plan, rng.reserve(plan.units as u64))
}

/// The number of words of the random stream [`dropout`] draws for `x` (one per masked unit: an
/// element, or a channel for the channel variants; 0 when dropout is the identity). A caller
/// that shares one [`Philox`] between several dropout calls reserves this many per call, as the
/// [`Dropout`](crate::Dropout) layer does.
///
/// # Errors
/// As [`dropout`].
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use gradkit::layers::ops::{DropoutKind, dropout_words};
/// let x = Tensor::zeros((4, 3, 8, 8), DType::F32, &Device::Cpu)?;
/// assert_eq!(dropout_words(&x, 0.5, DropoutKind::Element)?, 4 * 3 * 8 * 8);
/// assert_eq!(dropout_words(&x, 0.5, DropoutKind::Channel2d)?, 4 * 3);
/// assert_eq!(dropout_words(&x, 0.0, DropoutKind::Element)?, 0);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn dropout_words(x: &Tensor, p: f64, kind: DropoutKind) -> Result<usize> {
    Ok(plan(x, p, kind)?.map_or(0, |plan| plan.units))
}

/// What a validated dropout call does.
pub(crate) struct Plan {
    /// Masked units (words drawn).
    pub(crate) units: usize,
    /// Elements per unit.
    plane: usize,
    threshold: u64,
    keep_scale: f64,
    keep_shift: f64,
    drop_value: f64,
}

/// Validates, or `None` when dropout is the identity.
pub(crate) fn plan(x: &Tensor, p: f64, kind: DropoutKind) -> Result<Option<Plan>> {
    grad_core::validate::unit_interval("p", p)?;
    grad_core::validate::ensure_float("dropout", "input", x.dtype())?;
    let (units, plane) = kind.units(x.dims())?;
    if p == 0.0 || x.elem_count() == 0 {
        return Ok(None);
    }
    let (keep_scale, keep_shift, drop_value) = coefficients(kind, p);
    Ok(Some(Plan {
        units,
        plane,
        threshold: bernoulli_threshold(1.0 - p)?,
        keep_scale,
        keep_shift,
        drop_value,
    }))
}

impl Plan {
    /// The fused kernel's mask, drawn from stream position `at`.
    pub(crate) fn op(&self, at: PhiloxState) -> DropoutOp {
        DropoutOp {
            state: at,
            stream: Arc::new(MaskStream::at(at)),
            threshold: self.threshold,
            plane: self.plane,
            keep_scale: self.keep_scale,
            keep_shift: self.keep_shift,
            drop_value: self.drop_value,
        }
    }
}

fn fused(x: &Tensor, plan: &Plan, at: PhiloxState) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Fused(plan.op(at)))?)
}

/// `x * a + b` with `(a, b)` per unit from the device-built mask: `(scale, shift)` where kept,
/// `(0, value)` where dropped.
fn composed(x: &Tensor, plan: &Plan, at: PhiloxState) -> Result<Tensor> {
    let words = mask_words_tensor(at, plan.units, x.device())?;
    #[allow(
        clippy::cast_precision_loss,
        reason = "a threshold of at most 2^32, exact in f64"
    )]
    let keep = words
        .lt(plan.threshold as f64)?
        .to_dtype(x.dtype())?
        .reshape((plan.units, 1))?;
    let a = keep.affine(plan.keep_scale, 0.0)?;
    let units = x.reshape((plan.units, plan.plane))?;
    let mut y = units.broadcast_mul(&a)?;
    if plan.keep_shift != 0.0 || plan.drop_value != 0.0 {
        let b = keep.affine(plan.keep_shift - plan.drop_value, plan.drop_value)?;
        y = y.broadcast_add(&b)?;
    }
    Ok(y.reshape(x.shape())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_coefficients_match_pytorch() {
        // PyTorch: a = 1 / sqrt((alpha^2 p + 1)(1 - p)), b = alpha a p for kept values and
        // alpha a (p - 1) for dropped ones.
        let (a, b, d) = coefficients(DropoutKind::Alpha, 0.2);
        let alpha = SELU_SCALE_ALPHA;
        assert!((a - 1.0 / ((alpha * alpha * 0.2 + 1.0) * 0.8f64).sqrt()).abs() < 1e-15);
        assert!((b - alpha * a * 0.2).abs() < 1e-15);
        assert!((d + alpha * a * 0.8).abs() < 1e-15);
        assert_eq!(coefficients(DropoutKind::Element, 1.0), (0.0, 0.0, 0.0));
    }

    #[test]
    fn unit_counts_follow_the_kind() {
        assert_eq!(
            DropoutKind::Channel2d.units(&[2, 3, 4, 5]).unwrap(),
            (6, 20)
        );
        // PyTorch 2.15 reads a rank-3 dropout2d input as [N, C, L].
        assert_eq!(DropoutKind::Channel2d.units(&[3, 4, 5]).unwrap(), (12, 5));
        assert_eq!(DropoutKind::Channel1d.units(&[4, 5]).unwrap(), (4, 5));
        assert_eq!(
            DropoutKind::Channel3d.units(&[2, 3, 4, 5]).unwrap(),
            (2, 60)
        );
        assert!(DropoutKind::Channel2d.units(&[3, 4]).is_err());
        assert_eq!(DropoutKind::FeatureAlpha.units(&[2, 3]).unwrap(), (6, 1));
        assert_eq!(DropoutKind::Element.units(&[2, 3]).unwrap(), (6, 1));
    }
}
