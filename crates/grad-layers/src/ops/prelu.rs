//! PReLU (He et al. 2015): a learnt slope per channel for the negative inputs, fused on the CPU,
//! with a composed candle-op oracle.

use candle_core::Tensor;
use grad_core::device::Path;

use grad_core::cpu::Fused;

use crate::kernels::channel::{ChannelLayout, ChannelOp, PRelu};
use crate::{Error, Result};

/// PReLU: `x` for `x > 0`, else `weight[c] * x`, with one slope shared (`weight: [1]`) or one per
/// channel (`weight: [C]`, channel = dim 1; inputs of rank below 2 have one channel).
///
/// On the CPU a fused kernel whose backward also sums the slope gradient (over the elements with
/// `x <= 0`); other devices use [`prelu_composed`].
///
/// # Shapes
/// `x`: any rank; `weight`: `[1]` or `[C]`, the input's dtype.
///
/// # Errors
/// [`Error::Core`] with a shape mismatch when the weight count is neither 1 nor `C`, or a dtype
/// mismatch.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[-1f32, 2.0], [-3.0, -4.0]], &Device::Cpu)?;
/// let w = Tensor::new(&[0.5f32, 0.25], &Device::Cpu)?;
/// let y = gradkit::layers::ops::prelu(&x, &w)?;
/// assert_eq!(y.to_vec2::<f32>()?, [[-0.5, 2.0], [-1.5, -1.0]]);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn prelu(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    let (channels, spatial) = validate_prelu(x, weight)?;
    // An empty input has nothing for the kernel to tile; the composed ops return it as it is.
    if Path::of(x.device()) == Path::Composed || x.elem_count() == 0 {
        return prelu_unchecked_composed(x, weight);
    }
    let op = ChannelOp {
        f: PRelu,
        layout: ChannelLayout::First { channels, spatial },
    };
    Ok(x.contiguous()?
        .apply_op2(&weight.contiguous()?, Fused(op))?)
}

/// [`prelu`] written with candle ops: the test oracle and the path for other devices.
///
/// # Errors
/// As [`prelu`].
pub fn prelu_composed(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    validate_prelu(x, weight)?;
    prelu_unchecked_composed(x, weight)
}

fn prelu_unchecked_composed(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    // The weight broadcast against `x`: `[1, C, 1, ...]`, or a scalar for a rank-0 input.
    let mut shape = vec![1; x.rank()];
    if x.rank() >= 2 {
        shape[1] = weight.elem_count();
    }
    let w = weight.reshape(shape)?;
    let negative = x.broadcast_mul(&w)?;
    Ok(x.gt(&x.zeros_like()?)?.where_cond(x, &negative)?)
}

/// Checks `weight` against `x` and returns `(channels, elements per channel plane)`.
fn validate_prelu(x: &Tensor, weight: &Tensor) -> Result<(usize, usize)> {
    grad_core::validate::ensure_float("prelu", "input", x.dtype())?;
    let channels = if x.rank() >= 2 { x.dim(1)? } else { 1 };
    let count = weight.elem_count();
    if weight.rank() > 1 || !(count == 1 || count == channels) {
        return Err(Error::Core(grad_core::Error::shape_mismatch(
            "prelu",
            "weight",
            format!("[1] or [{channels}] (one slope, or one per channel)"),
            weight.dims(),
        )));
    }
    crate::check::param("prelu", "weight", Some(weight), weight.dims(), x)?;
    let spatial = if x.rank() >= 2 {
        x.dims()[2..].iter().product()
    } else {
        x.elem_count().max(1)
    };
    Ok((channels, spatial))
}
