//! The element-wise activation functions and their derivatives, each a monomorphic type the
//! fused kernels are instantiated with ([`Elementwise`]), in the arithmetic type of the element
//! ([`Real`]): f32 for f16/bf16/f32, f64 for f64. PyTorch's derivative conventions at the kinks
//! are here, one function per activation.

use grad_core::cpu::Real;

/// SELU's `alpha`.
pub const SELU_ALPHA: f64 = 1.673_263_242_354_377_3;
/// SELU's `scale`.
pub const SELU_SCALE: f64 = 1.050_700_987_355_480_5;

/// `sqrt(2 / pi)`, the tanh-GELU's inner scale.
const GELU_BETA: f64 = std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5;
/// The tanh-GELU's cubic coefficient.
const GELU_KAPPA: f64 = 0.044715;
/// `1 / sqrt(2 pi)`, the normal density's constant.
const GELU_PDF: f64 = std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2 * 0.5;

/// One activation as a monomorphic function pair, so kernels instantiate a loop per activation
/// with no `match` inside it (a per-element jump table costs about 2x).
pub(crate) trait Elementwise: Copy + Send + Sync + std::fmt::Debug {
    /// The activation of one value, in the kernel's arithmetic type.
    fn value<R: Real>(self, x: R) -> R;
    /// The derivative at one value, PyTorch's convention at the kink.
    fn derivative<R: Real>(self, x: R) -> R;
}

/// ReLU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReluFn;
/// Leaky ReLU with its slope.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeakyReluFn(pub f64);
/// ELU with its alpha.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EluFn(pub f64);
/// SELU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SeluFn;
/// GELU with erf.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GeluErfFn;
/// GELU with the tanh approximation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GeluTanhFn;
/// The logistic sigmoid.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SigmoidFn;
/// Hyperbolic tangent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TanhFn;

impl Elementwise for ReluFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        // `x <= 0` is false for NaN, which therefore passes through as in PyTorch.
        if x <= R::ZERO { R::ZERO } else { x }
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        // PyTorch's threshold_backward: 0 where x <= 0, so NaN passes the gradient on.
        if x <= R::ZERO { R::ZERO } else { R::ONE }
    }
}

impl Elementwise for LeakyReluFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        if x > R::ZERO { x } else { x * R::of(self.0) }
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        if x > R::ZERO { R::ONE } else { R::of(self.0) }
    }
}

impl Elementwise for EluFn {
    // Both sides computed, then one selected: a branch around the exponential would keep the
    // loop from vectorising.
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        let negative = R::of(self.0) * x.exp_m1();
        if x > R::ZERO { x } else { negative }
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        // PyTorch's `x <= 0 ? negative : 1`: a NaN input takes the positive branch.
        let negative = R::of(self.0) * x.exp();
        if x <= R::ZERO { negative } else { R::ONE }
    }
}

impl Elementwise for SeluFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        let s = R::of(SELU_SCALE);
        let negative = s * (R::of(SELU_ALPHA) * x.exp_m1());
        if x > R::ZERO { s * x } else { negative }
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let negative = R::of(SELU_SCALE * SELU_ALPHA) * x.exp();
        if x <= R::ZERO {
            negative
        } else {
            R::of(SELU_SCALE)
        }
    }
}

impl Elementwise for GeluErfFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        x * R::of(0.5) * (R::ONE + (x * R::of(std::f64::consts::FRAC_1_SQRT_2)).erf())
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let cdf = R::of(0.5) * (R::ONE + (x * R::of(std::f64::consts::FRAC_1_SQRT_2)).erf());
        let pdf = (R::of(-0.5) * x * x).exp() * R::of(GELU_PDF);
        cdf + x * pdf
    }
}

impl Elementwise for GeluTanhFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        let inner = R::of(GELU_BETA) * (x + R::of(GELU_KAPPA) * x * x * x);
        R::of(0.5) * x * (R::ONE + inner.tanh())
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let x_sq = x * x;
        let t = (R::of(GELU_BETA) * (x + R::of(GELU_KAPPA) * x_sq * x)).tanh();
        let sech2 = R::ONE - t * t;
        // Saturated tanh: the second term vanishes (and x^2 may have overflowed).
        let right = if sech2 == R::ZERO {
            R::ZERO
        } else {
            R::of(0.5) * x * sech2 * R::of(GELU_BETA) * (R::ONE + R::of(3.0 * GELU_KAPPA) * x_sq)
        };
        R::of(0.5) * (R::ONE + t) + right
    }
}

impl Elementwise for SigmoidFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        logistic(x)
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let s = logistic(x);
        s * (R::ONE - s)
    }
}

impl Elementwise for TanhFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        x.tanh()
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let t = x.tanh();
        R::ONE - t * t
    }
}

/// `v` clamped into `[lo, hi]`, NaN passing through (C++'s `std::min(std::max(v, lo), hi)`,
/// which PyTorch's kernels use; Rust's `f64::max` would turn NaN into `lo`).
#[inline(always)]
fn clamp_keep_nan<R: Real>(v: R, lo: R, hi: R) -> R {
    if v < lo {
        lo
    } else if v > hi {
        hi
    } else {
        v
    }
}

/// The logistic function.
#[inline(always)]
fn logistic<R: Real>(x: R) -> R {
    R::ONE / (R::ONE + (-x).exp())
}

/// Hardtanh (and ReLU6, `HardtanhFn(0, 6)`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HardtanhFn(pub f64, pub f64);
/// SiLU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SiluFn;
/// Mish.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MishFn;
/// Softplus with `(beta, threshold)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SoftplusFn(pub f64, pub f64);
/// Hardswish.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HardswishFn;
/// Hardsigmoid.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HardsigmoidFn;
/// CELU with its alpha.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CeluFn(pub f64);
/// Softsign.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SoftsignFn;
/// Log-sigmoid.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogSigmoidFn;

/// PyTorch's hardsigmoid backward multiplies by the float32 constant `1.0f / 6.0f`, in every
/// dtype.
pub(crate) const HARDSIGMOID_SLOPE: f64 = (1.0f32 / 6.0f32) as f64;

impl Elementwise for HardtanhFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        clamp_keep_nan(x, R::of(self.0), R::of(self.1))
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        // PyTorch: 0 where x <= min or x >= max, so NaN passes the gradient on.
        if x <= R::of(self.0) || x >= R::of(self.1) {
            R::ZERO
        } else {
            R::ONE
        }
    }
}

impl Elementwise for SiluFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        x / (R::ONE + (-x).exp())
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let s = logistic(x);
        s * (R::ONE + x * (R::ONE - s))
    }
}

impl Elementwise for MishFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        x * x.exp().ln_1p().tanh()
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let t = x.exp().ln_1p().tanh();
        t + x * logistic(x) * (R::ONE - t * t)
    }
}

impl Elementwise for SoftplusFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        let bx = x * R::of(self.0);
        let smooth = bx.exp().ln_1p() / R::of(self.0);
        if bx > R::of(self.1) { x } else { smooth }
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let bx = x * R::of(self.0);
        let z = bx.exp();
        let smooth = z / (z + R::ONE);
        if bx > R::of(self.1) { R::ONE } else { smooth }
    }
}

impl Elementwise for HardswishFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        x * clamp_keep_nan(x + R::of(3.0), R::ZERO, R::of(6.0)) / R::of(6.0)
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        if x <= R::of(-3.0) {
            R::ZERO
        } else if x < R::of(3.0) {
            x / R::of(3.0) + R::of(0.5)
        } else {
            R::ONE
        }
    }
}

impl Elementwise for HardsigmoidFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        clamp_keep_nan(x + R::of(3.0), R::ZERO, R::of(6.0)) / R::of(6.0)
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        if x > R::of(-3.0) && x < R::of(3.0) {
            R::of(HARDSIGMOID_SLOPE)
        } else {
            R::ZERO
        }
    }
}

impl Elementwise for CeluFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        let negative = R::of(self.0) * (x * R::of(1.0 / self.0)).exp_m1();
        if x > R::ZERO { x } else { negative }
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let negative = (x * R::of(1.0 / self.0)).exp();
        if x <= R::ZERO { negative } else { R::ONE }
    }
}

impl Elementwise for SoftsignFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        x / (R::ONE + x.abs())
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let d = R::ONE + x.abs();
        R::ONE / (d * d)
    }
}

impl Elementwise for LogSigmoidFn {
    #[inline(always)]
    fn value<R: Real>(self, x: R) -> R {
        let low = if x < R::ZERO { x } else { R::ZERO };
        low - (-x.abs()).exp().ln_1p()
    }
    #[inline(always)]
    fn derivative<R: Real>(self, x: R) -> R {
        let z = (-x.abs()).exp();
        let q = z / (R::ONE + z);
        if x < R::ZERO { R::ONE - q } else { q }
    }
}
