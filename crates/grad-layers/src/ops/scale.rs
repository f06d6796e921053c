//! Scaling by a learnt factor per channel, or one for all: the forward of the residual-branch
//! scales (ReZero/SkipInit's scalar, LayerScale's per-channel `gamma`), fused on the CPU with a
//! composed candle-op oracle.

use candle_core::Tensor;
use grad_core::cpu::Fused;
use grad_core::device::Path;

use crate::ChannelAxis;
use crate::kernels::channel::{ChannelLayout, ChannelOp, Scale};
use crate::{Error, Result};

const OP: &str = "channel_scale";

/// `x * scale[c]`, with `c` the channel on `axis`; a `scale` of one element multiplies every
/// element.
///
/// On the CPU a fused kernel whose backward also sums the scale's gradient (`sum(grad * x)`
/// per channel) in f64, without a full-size intermediate; other devices use
/// [`channel_scale_composed`].
///
/// # Shapes
/// `x`: `[.., C]` ([`ChannelAxis::Last`]) or `[N, C, *]` ([`ChannelAxis::First`]), or any
/// shape when `scale` has one element; `scale`: `[C]`, `[1]` or `[]`, the input's dtype and
/// device. The output has the input's shape.
///
/// # Errors
/// [`Error::Core`] for a non-float input, a scale of another shape, dtype or device.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::layers::ChannelAxis;
/// let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
/// let gamma = Tensor::new(&[10f32, 0.5], &Device::Cpu)?;
/// let y = gradkit::layers::ops::channel_scale(&x, &gamma, ChannelAxis::Last)?;
/// assert_eq!(y.to_vec2::<f32>()?, [[10.0, 1.0], [30.0, 2.0]]);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn channel_scale(x: &Tensor, scale: &Tensor, axis: ChannelAxis) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    let layout = validate(x, scale, axis)?;
    // An empty input has nothing for the kernel to tile; the composed ops return it as it is.
    if Path::of(x.device()) == Path::Composed || x.elem_count() == 0 {
        return composed(x, scale, axis);
    }
    let op = ChannelOp { f: Scale, layout };
    Ok(x.contiguous()?.apply_op2(&scale.contiguous()?, Fused(op))?)
}

/// [`channel_scale`] written with candle ops: the test oracle and the path for other devices.
///
/// # Errors
/// As [`channel_scale`].
pub fn channel_scale_composed(x: &Tensor, scale: &Tensor, axis: ChannelAxis) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    validate(x, scale, axis)?;
    composed(x, scale, axis)
}

fn composed(x: &Tensor, scale: &Tensor, axis: ChannelAxis) -> Result<Tensor> {
    let shape = match axis {
        _ if scale.elem_count() == 1 => vec![],
        ChannelAxis::Last => vec![scale.elem_count()],
        ChannelAxis::First => {
            let mut s = vec![1; x.rank() - 1];
            s[0] = scale.elem_count();
            s
        }
    };
    Ok(x.broadcast_mul(&scale.reshape(shape)?)?)
}

/// Checks `scale` against `x` and returns the kernel's layout.
fn validate(x: &Tensor, scale: &Tensor, axis: ChannelAxis) -> Result<ChannelLayout> {
    grad_core::validate::ensure_float(OP, "input", x.dtype())?;
    let count = scale.elem_count();
    let (dim, expected) = match axis {
        ChannelAxis::Last => (x.rank().checked_sub(1), "[.., C]"),
        ChannelAxis::First => ((x.rank() >= 2).then_some(1), "[N, C, *]"),
    };
    let channels = dim.map(|d| x.dims()[d]);
    if scale.rank() > 1 || (count != 1 && channels != Some(count)) {
        return Err(Error::Core(grad_core::Error::shape_mismatch(
            OP,
            "scale",
            format!("one element, or one per channel of an input {expected} on the {axis:?} axis"),
            scale.dims(),
        )));
    }
    crate::check::param(OP, "scale", Some(scale), scale.dims(), x)?;
    let channels = channels.unwrap_or(1);
    Ok(match axis {
        ChannelAxis::Last => ChannelLayout::Last { channels },
        ChannelAxis::First => ChannelLayout::First {
            channels,
            spatial: x.dims()[2.min(x.rank())..].iter().product(),
        },
    })
}
