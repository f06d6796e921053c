//! Functional activations and PReLU, fused on the CPU, with composed candle-op oracles.

use candle_core::Tensor;

use crate::activation::{Activation, GeluApproximation, SELU_ALPHA, SELU_SCALE};
use crate::kernels::activation::{ActivationOp, PReluOp};
use crate::{Error, Result};

/// Applies `act` element-wise.
///
/// On the CPU a fused kernel (one read and one write each way, PyTorch's derivative at the
/// kink); other devices use [`activation_composed`].
///
/// # Errors
/// [`Error::Core`] for a non-float input or an invalid parameter (see [`Activation::validate`]).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use grad_layers::{Activation, ops::activation};
/// let x = Tensor::new(&[-1f64, 0.0, 2.0], &Device::Cpu)?;
/// let y = activation(&x, Activation::Elu { alpha: 1.0 })?;
/// let v = y.to_vec1::<f64>()?;
/// assert!((v[0] - (-1f64).exp_m1()).abs() < 1e-15 && v[1] == 0.0 && v[2] == 2.0);
/// # Ok::<(), grad_layers::Error>(())
/// ```
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    validate(x, act)?;
    if !x.device().is_cpu() {
        return activation_composed(x, act);
    }
    Ok(x.contiguous()?.apply_op1(ActivationOp(act))?)
}

/// [`activation`] written with candle ops (with `where_cond` so the derivative at 0 follows
/// PyTorch): the test oracle and the path for other devices.
///
/// # Errors
/// As [`activation`].
pub fn activation_composed(x: &Tensor, act: Activation) -> Result<Tensor> {
    validate(x, act)?;
    let zeros = x.zeros_like()?;
    let positive = x.gt(&zeros)?;
    // exp(x) - 1 on the non-positive branch only, so a large positive x never makes inf.
    let elu = |alpha: f64| -> Result<Tensor> {
        let neg = positive.where_cond(&zeros, x)?;
        Ok(positive.where_cond(x, &(neg.exp()? - 1.0)?.affine(alpha, 0.0)?)?)
    };
    Ok(match act {
        Activation::Relu => x.le(&zeros)?.where_cond(&zeros, x)?,
        Activation::LeakyRelu { negative_slope } => {
            positive.where_cond(x, &x.affine(negative_slope, 0.0)?)?
        }
        Activation::Elu { alpha } => elu(alpha)?,
        Activation::Selu => elu(SELU_ALPHA)?.affine(SELU_SCALE, 0.0)?,
        // Not candle's `gelu_erf`/`gelu`: their backward passes use constants rounded to six
        // digits (0.398942 for 1/sqrt(2 pi)), about 1e-6 off.
        Activation::Gelu {
            approximate: GeluApproximation::None,
        } => {
            (x.affine(0.5, 0.0)? * (x.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)?)?
        }
        Activation::Gelu {
            approximate: GeluApproximation::Tanh,
        } => {
            let beta = std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5;
            let cube = (x * x)?.mul(x)?;
            let inner = (x + cube.affine(0.044715, 0.0)?)?.affine(beta, 0.0)?;
            (x.affine(0.5, 0.0)? * (inner.tanh()? + 1.0)?)?
        }
        Activation::Sigmoid => (x.neg()?.exp()? + 1.0)?.recip()?,
        Activation::Tanh => x.tanh()?,
    })
}

fn validate(x: &Tensor, act: Activation) -> Result<()> {
    grad_core::float::ensure_float("activation", "input", x.dtype())?;
    act.validate()
}

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
/// let y = grad_layers::ops::prelu(&x, &w)?;
/// assert_eq!(y.to_vec2::<f32>()?, [[-0.5, 2.0], [-1.5, -1.0]]);
/// # Ok::<(), grad_layers::Error>(())
/// ```
pub fn prelu(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (channels, spatial) = validate_prelu(x, weight)?;
    if !x.device().is_cpu() {
        return prelu_composed(x, weight);
    }
    let op = PReluOp { channels, spatial };
    Ok(x.contiguous()?.apply_op2(&weight.contiguous()?, op)?)
}

/// [`prelu`] written with candle ops: the test oracle and the path for other devices.
///
/// # Errors
/// As [`prelu`].
pub fn prelu_composed(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    validate_prelu(x, weight)?;
    let mut shape = vec![1; x.rank().max(1)];
    if x.rank() >= 2 {
        shape[1] = weight.elem_count();
    }
    let w = weight.reshape(shape)?;
    let negative = x.broadcast_mul(&w)?;
    Ok(x.gt(&x.zeros_like()?)?.where_cond(x, &negative)?)
}

/// Checks `weight` against `x` and returns `(channels, elements per channel plane)`.
fn validate_prelu(x: &Tensor, weight: &Tensor) -> Result<(usize, usize)> {
    grad_core::float::ensure_float("prelu", "input", x.dtype())?;
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
