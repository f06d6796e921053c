//! Functional activations, fused on the CPU, with composed candle-op oracles.

use candle_core::Tensor;
use grad_core::cpu::Fused;
use grad_core::device::Path;

use crate::kernels::activation::ActivationOp;
use crate::kernels::elementwise::{HARDSIGMOID_SLOPE, SELU_ALPHA, SELU_SCALE};
use crate::{Activation, GeluApproximation, Result};

/// Runs `$body` with `$f` bound to the monomorphic function of activation `$act`.
macro_rules! with_elementwise {
    ($act:expr, |$f:ident| $body:expr) => {
        match $act {
            $crate::Activation::Relu => {
                let $f = $crate::kernels::elementwise::ReluFn;
                $body
            }
            $crate::Activation::LeakyRelu { negative_slope } => {
                let $f = $crate::kernels::elementwise::LeakyReluFn(negative_slope);
                $body
            }
            $crate::Activation::Elu { alpha } => {
                let $f = $crate::kernels::elementwise::EluFn(alpha);
                $body
            }
            $crate::Activation::Selu => {
                let $f = $crate::kernels::elementwise::SeluFn;
                $body
            }
            $crate::Activation::Gelu {
                approximate: $crate::GeluApproximation::None,
            } => {
                let $f = $crate::kernels::elementwise::GeluErfFn;
                $body
            }
            $crate::Activation::Gelu {
                approximate: $crate::GeluApproximation::Tanh,
            } => {
                let $f = $crate::kernels::elementwise::GeluTanhFn;
                $body
            }
            $crate::Activation::Sigmoid => {
                let $f = $crate::kernels::elementwise::SigmoidFn;
                $body
            }
            $crate::Activation::Tanh => {
                let $f = $crate::kernels::elementwise::TanhFn;
                $body
            }
            $crate::Activation::Relu6 => {
                let $f = $crate::kernels::elementwise::HardtanhFn(0.0, 6.0);
                $body
            }
            $crate::Activation::Silu => {
                let $f = $crate::kernels::elementwise::SiluFn;
                $body
            }
            $crate::Activation::Mish => {
                let $f = $crate::kernels::elementwise::MishFn;
                $body
            }
            $crate::Activation::Softplus { beta, threshold } => {
                let $f = $crate::kernels::elementwise::SoftplusFn(beta, threshold);
                $body
            }
            $crate::Activation::Hardswish => {
                let $f = $crate::kernels::elementwise::HardswishFn;
                $body
            }
            $crate::Activation::Hardsigmoid => {
                let $f = $crate::kernels::elementwise::HardsigmoidFn;
                $body
            }
            $crate::Activation::Hardtanh { min_val, max_val } => {
                let $f = $crate::kernels::elementwise::HardtanhFn(min_val, max_val);
                $body
            }
            $crate::Activation::Celu { alpha } => {
                let $f = $crate::kernels::elementwise::CeluFn(alpha);
                $body
            }
            $crate::Activation::Softsign => {
                let $f = $crate::kernels::elementwise::SoftsignFn;
                $body
            }
            $crate::Activation::LogSigmoid => {
                let $f = $crate::kernels::elementwise::LogSigmoidFn;
                $body
            }
        }
    };
}

pub(crate) use with_elementwise;

/// Applies `act` element-wise.
///
/// On the CPU a fused kernel (one read and one write each way, PyTorch's derivative at the
/// kink); other devices use [`activation_composed`].
///
/// # Shapes
/// `x`: any shape, a float dtype; the output has its shape and dtype.
///
/// # Errors
/// [`Error::Core`](crate::Error::Core) for a non-float input or an invalid parameter (see
/// [`Activation::validate`]).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::layers::{Activation, ops::activation};
/// let x = Tensor::new(&[-1f64, 0.0, 2.0], &Device::Cpu)?;
/// let y = activation(&x, Activation::Elu { alpha: 1.0 })?;
/// let v = y.to_vec1::<f64>()?;
/// assert!((v[0] - (-1f64).exp_m1()).abs() < 1e-15 && v[1] == 0.0 && v[2] == 2.0);
/// # Ok::<(), gradkit::layers::Error>(())
/// ```
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    validate(x, act)?;
    if Path::of(x.device()) == Path::Composed {
        return composed(x, act);
    }
    let x = x.contiguous()?;
    Ok(with_elementwise!(act, |f| x.apply_op1(Fused(ActivationOp(f)))?))
}

/// [`activation`] written with candle ops (with `where_cond` so the derivative at 0 follows
/// PyTorch): the test oracle and the path for other devices.
///
/// # Errors
/// As [`activation`].
pub fn activation_composed(x: &Tensor, act: Activation) -> Result<Tensor> {
    let x = &grad_core::device::own_empty(x)?;
    validate(x, act)?;
    composed(x, act)
}

fn composed(x: &Tensor, act: Activation) -> Result<Tensor> {
    // f16/bf16 compute in f32, as PyTorch's kernels and the fused path do (in bf16, mish's
    // `1 + e^-5.5` rounds to 1 and the result to 0).
    let compute = grad_core::device::compute_dtype(x.dtype());
    if compute != x.dtype() {
        return Ok(composed(&x.to_dtype(compute)?, act)?.to_dtype(x.dtype())?);
    }
    let zeros = x.zeros_like()?;
    let positive = x.gt(&zeros)?;
    // PyTorch's `x <= 0 ? alpha (exp(x) - 1) : x`: a NaN takes the x branch (gradient 1). The
    // exponential sees only the non-positive inputs (0 elsewhere), so neither a large x nor a
    // NaN reaches it and its unselected gradient stays 0.
    let nonpositive = x.le(&zeros)?;
    let elu = |alpha: f64| -> Result<Tensor> {
        let neg = nonpositive.where_cond(x, &zeros)?;
        Ok(nonpositive.where_cond(&(neg.exp()? - 1.0)?.affine(alpha, 0.0)?, x)?)
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
        // candle-nn's sigmoid op: its backward uses the output, so -800 gives gradient 0,
        // where autograd through `1 / (1 + exp(-x))` would make 0 * inf = NaN.
        Activation::Sigmoid => candle_nn::ops::sigmoid(x)?,
        Activation::Tanh => x.tanh()?,
        Activation::Relu6 => hardtanh(x, 0.0, 6.0)?,
        Activation::Hardtanh { min_val, max_val } => hardtanh(x, min_val, max_val)?,
        Activation::Silu => x.silu()?,
        Activation::Mish => (x * softplus_stable(x)?.tanh()?)?,
        Activation::Softplus { beta, threshold } => {
            let bx = x.affine(beta, 0.0)?;
            let smooth = softplus_stable(&bx)?.affine(1.0 / beta, 0.0)?;
            bx.gt(threshold)?.where_cond(x, &smooth)?
        }
        Activation::Hardswish => {
            // PyTorch's x * clamp(x + 3, 0, 6) / 6 piece by piece: x * 0 at and below -3 (so
            // -inf gives NaN, as in PyTorch), x * 6 / 6 at and above 3 (so f32::MAX overflows to
            // inf, as in PyTorch), x (x + 3) / 6 between; each piece has its own derivative.
            // A NaN falls in neither of PyTorch's tests (`x <= -3`, `x < 3`) and takes the last
            // piece, gradient 1; the polynomial sees only the inputs inside.
            let inside = x.gt(-3.0)?.minimum(&x.lt(3.0)?)?;
            let xi = inside.where_cond(x, &zeros)?;
            let inner = (&xi * xi.affine(1.0, 3.0)?)?.affine(1.0 / 6.0, 0.0)?;
            let upper = inside.where_cond(&inner, &x.affine(6.0, 0.0)?.affine(1.0 / 6.0, 0.0)?)?;
            x.le(-3.0)?.where_cond(&x.affine(0.0, 0.0)?, &upper)?
        }
        Activation::Hardsigmoid => {
            // The value (x + 3) / 6 with PyTorch's float32 slope as the gradient: the value's
            // own graph is cut, and `s x - detach(s x)` (exactly 0) carries the slope.
            let value = x
                .affine(1.0, 3.0)?
                .clamp(0.0, 6.0)?
                .affine(1.0 / 6.0, 0.0)?
                .detach();
            let sloped = x.affine(HARDSIGMOID_SLOPE, 0.0)?;
            let slope = (&sloped - sloped.detach())?;
            // Selected, not multiplied: at x = ±inf the carrier is inf - inf = NaN.
            let inside = x.gt(-3.0)?.minimum(&x.lt(3.0)?)?;
            (value + inside.where_cond(&slope, &zeros)?)?
        }
        Activation::Celu { alpha } => {
            // As ELU (PyTorch computes CELU with ELU's kernels): a NaN takes the x branch.
            let neg = nonpositive.where_cond(x, &zeros)?;
            let negative = (neg.affine(1.0 / alpha, 0.0)?.exp()? - 1.0)?.affine(alpha, 0.0)?;
            nonpositive.where_cond(&negative, x)?
        }
        Activation::Softsign => x.div(&(x.abs()? + 1.0)?)?,
        Activation::LogSigmoid => {
            // min(x, 0) - ln(1 + exp(-|x|)).
            let low = x.lt(&zeros)?.where_cond(x, &zeros)?;
            (low - (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?
        }
    })
}

/// `clamp(x, lo, hi)` with gradient 1 strictly inside and 0 at and beyond the bounds, NaN
/// passing through with gradient 1 (PyTorch's hardtanh backward tests `x <= lo || x >= hi`).
fn hardtanh(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let outside = x.le(lo)?.maximum(&x.ge(hi)?)?;
    let clamped = x.clamp(lo, hi)?.detach();
    Ok(outside.where_cond(&clamped, x)?)
}

/// `ln(1 + exp(x))` as `max(x, 0) + ln(1 + exp(-|x|))`: no overflow, and no NaN in its
/// gradient at large `|x|`.
fn softplus_stable(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

fn validate(x: &Tensor, act: Activation) -> Result<()> {
    grad_core::validate::ensure_float("activation", "input", x.dtype())?;
    act.validate()
}
