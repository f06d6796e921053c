//! The float element types gradkit's CPU kernels compute with, and dtype dispatch.
//!
//! Kernels are written once, generic over [`Float`], and dispatched on a tensor's dtype with
//! [`dispatch`]. Half-precision types convert to `f32` for arithmetic (see STYLE: reductions
//! accumulate in f32 for f16/bf16), `f64` stays `f64`.

use candle_core::{CpuStorage, DType, WithDType};
use half::{bf16, f16};

use crate::{Error, Result};

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A float dtype gradkit's CPU kernels support: `f16`, `bf16`, `f32` and `f64`.
///
/// Sealed: the set is exactly candle's float dtypes that hold numbers (the MX and f8 types do not
/// take part in training).
///
/// The conversions are defined here, always inlined, rather than taken from candle's
/// `WithDType::to_f64`: that one is not `#[inline]`, so across crates it is a function call per
/// element and stops the compiler from vectorising a kernel.
pub trait Float: WithDType + sealed::Sealed {
    /// The type element-wise arithmetic runs in: `f32` for f16, bf16 and f32; `f64` for f64.
    type Acc: Real;
    /// Converts to `f32`, exactly for `f16`/`bf16`, rounding for `f64`.
    fn to_f32(self) -> f32;
    /// Converts from `f32`, rounding to nearest for `f16`/`bf16`.
    fn from_f32(v: f32) -> Self;
    /// Converts to `f64`, exactly.
    fn as_f64(self) -> f64;
    /// Converts from `f64`, rounding to nearest.
    fn cast_f64(v: f64) -> Self;
    /// Converts to the arithmetic type, exactly.
    fn to_acc(self) -> Self::Acc;
    /// Converts from the arithmetic type, rounding to nearest.
    fn from_acc(v: Self::Acc) -> Self;
    /// The mutable element slice of a CPU storage of this dtype, `None` for another dtype.
    fn storage_slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! impl_float {
    ($ty:ty, $variant:ident, $acc:ty, $to_f32:expr, $from_f32:expr, $as_f64:expr, $cast_f64:expr) => {
        impl Float for $ty {
            type Acc = $acc;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                $to_f32(self)
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                $from_f32(v)
            }
            #[inline(always)]
            fn as_f64(self) -> f64 {
                $as_f64(self)
            }
            #[inline(always)]
            fn cast_f64(v: f64) -> Self {
                $cast_f64(v)
            }
            #[inline(always)]
            fn to_acc(self) -> $acc {
                <$acc>::of_real(self)
            }
            #[inline(always)]
            fn from_acc(v: $acc) -> Self {
                <$acc>::into_real(v)
            }
            fn storage_slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
                match storage {
                    CpuStorage::$variant(data) => Some(data.as_mut_slice()),
                    _ => None,
                }
            }
        }
    };
}

/// Conversions between an element type and its arithmetic type.
trait AccConvert<T> {
    fn of_real(v: T) -> Self;
    fn into_real(self) -> T;
}

impl AccConvert<f16> for f32 {
    #[inline(always)]
    fn of_real(v: f16) -> Self {
        v.to_f32()
    }
    #[inline(always)]
    fn into_real(self) -> f16 {
        f16::from_f32(self)
    }
}

impl AccConvert<bf16> for f32 {
    #[inline(always)]
    fn of_real(v: bf16) -> Self {
        v.to_f32()
    }
    #[inline(always)]
    fn into_real(self) -> bf16 {
        bf16::from_f32(self)
    }
}

impl<T> AccConvert<T> for T {
    #[inline(always)]
    fn of_real(v: T) -> Self {
        v
    }
    #[inline(always)]
    fn into_real(self) -> T {
        self
    }
}

impl_float!(
    f16,
    F16,
    f32,
    f16::to_f32,
    f16::from_f32,
    f16::to_f64,
    f16::from_f64
);
impl_float!(
    bf16,
    BF16,
    f32,
    bf16::to_f32,
    bf16::from_f32,
    bf16::to_f64,
    bf16::from_f64
);
impl_float!(f32, F32, f32, |v| v, |v| v, f64::from, f64_to_f32);
impl_float!(f64, F64, f64, f64_to_f32, f64::from, |v| v, |v| v);

#[allow(
    clippy::cast_possible_truncation,
    reason = "rounding f64 to f32 is the point"
)]
#[inline(always)]
fn f64_to_f32(v: f64) -> f32 {
    v as f32
}

/// The arithmetic types of CPU kernels, `f32` and `f64`, with the operations kernels need.
///
/// Every method is `#[inline(always)]` so generic kernels vectorise.
pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + 'static
{
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// Converts from `f64`, rounding to nearest.
    fn of(v: f64) -> Self;
    /// Converts to `f64`, exactly.
    fn f64(self) -> f64;
    /// Square root.
    fn sqrt(self) -> Self;
    /// Exponential.
    fn exp(self) -> Self;
    /// `exp(self) - 1`, accurate near zero.
    fn exp_m1(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// `ln(1 + self)`, accurate near zero (the standard library's `ln_1p`).
    fn ln_1p(self) -> Self;
    /// Hyperbolic tangent.
    fn tanh(self) -> Self;
    /// The error function (libm's `erf`/`erff`).
    fn erf(self) -> Self;
    /// Absolute value.
    fn abs(self) -> Self;
    /// The larger of two values (the other when one is NaN).
    fn max(self, other: Self) -> Self;
    /// The smaller of two values (the other when one is NaN).
    fn min(self, other: Self) -> Self;
    /// Whether the value is neither infinite nor NaN.
    fn is_finite(self) -> bool;
}

macro_rules! impl_real {
    ($ty:ty, $erf:path, $exp:path, $exp_m1:path, $ln_1p:path, $tanh:path) => {
        impl Real for $ty {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            #[allow(
                clippy::cast_possible_truncation,
                reason = "rounding to the arithmetic type"
            )]
            fn of(v: f64) -> Self {
                v as $ty
            }
            #[inline(always)]
            fn f64(self) -> f64 {
                f64::from(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$ty>::sqrt(self)
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            #[inline(always)]
            fn exp_m1(self) -> Self {
                $exp_m1(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$ty>::ln(self)
            }
            #[inline(always)]
            fn ln_1p(self) -> Self {
                $ln_1p(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                $tanh(self)
            }
            #[inline(always)]
            fn erf(self) -> Self {
                $erf(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$ty>::abs(self)
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                <$ty>::max(self, other)
            }
            #[inline(always)]
            fn min(self, other: Self) -> Self {
                <$ty>::min(self, other)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$ty>::is_finite(self)
            }
        }
    };
}

impl_real!(f32, erf_f32, exp_f32, exp_m1_f32, ln_1p_f32, tanh_f32);
impl_real!(f64, libm::erf, f64::exp, f64::exp_m1, f64::ln_1p, f64::tanh);

/// `e^x` in f32 without a call: Cody–Waite reduction `x = n ln2 + r`, a degree-7 Taylor
/// polynomial for `e^r` on `|r| <= ln2 / 2`, and `2^n` built from its bits (in two halves, so
/// results that underflow to subnormals round correctly). Branch-free, so loops over it
/// vectorise (libm's `expf` is a call per element, about 10x slower in a kernel). Relative error
/// below 2.5e-7 (about 2 ulp) on the whole range; overflows to inf above 88.72, underflows to 0
/// below about -103.9, NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-104.0, 89.0);
    let t = x * LOG2E + MAGIC;
    let nf = t - MAGIC;
    #[allow(
        clippy::cast_possible_wrap,
        reason = "the low bits of the magic sum hold n"
    )]
    let n = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = (x - nf * LN2_HI) - nf * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let half = n >> 1;
    #[allow(
        clippy::cast_sign_loss,
        reason = "exponents are in range after the clamp"
    )]
    let (s1, s2) = (
        f32::from_bits(((half + 127) as u32) << 23),
        f32::from_bits(((n - half + 127) as u32) << 23),
    );
    p * s1 * s2
}

/// `e^x - 1` in f32 without a call, accurate near 0: a degree-9 Taylor polynomial for
/// `|x| <= 0.5`, [`exp_f32`]` - 1` beyond (where the subtraction loses under 2 bits). Both are
/// computed and one selected, so loops vectorise. Relative error below 1e-6.
#[inline(always)]
pub fn exp_m1_f32(x: f32) -> f32 {
    let small = x
        * (1.0
            + x * (1.0 / 2.0
                + x * (1.0 / 6.0
                    + x * (1.0 / 24.0
                        + x * (1.0 / 120.0
                            + x * (1.0 / 720.0
                                + x * (1.0 / 5040.0 + x * (1.0 / 40320.0 + x / 362_880.0))))))));
    let large = exp_f32(x) - 1.0;
    if x.abs() <= 0.5 { small } else { large }
}

/// `ln(1 + x)` in f32 without a call: `u = 1 + x` split as `2^e m` with `m` in
/// `[sqrt(1/2), sqrt(2))`, `ln m = 2 atanh(s)` with `s = (m - 1)/(m + 1)` by its odd series to
/// `s^9`, `e ln 2` in two parts, and the rounding of `1 + x` corrected by `(x - (u - 1)) / u`
/// (so tiny `x` gives `x`). Branch-free, so loops vectorise (libm's `log1pf` is a call per
/// element, about 20x slower in a kernel). Relative error below 3e-7; -1 gives -inf, below -1
/// or NaN gives NaN, inf gives inf.
///
/// ```
/// use gradkit::core::cpu::ln_1p_f32;
/// assert!((ln_1p_f32(1.0) - std::f32::consts::LN_2).abs() < 1e-7);
/// assert_eq!(ln_1p_f32(1e-30), 1e-30);
/// assert_eq!(ln_1p_f32(-1.0), f32::NEG_INFINITY);
/// ```
#[inline(always)]
pub fn ln_1p_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let u = 1.0 + x;
    let bits = u.to_bits();
    #[allow(clippy::cast_possible_wrap, reason = "an 8-bit exponent field")]
    let exponent = ((bits >> 23) & 0xff) as i32 - 127;
    let mantissa = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let big = mantissa > std::f32::consts::SQRT_2;
    let m = if big { mantissa * 0.5 } else { mantissa };
    #[allow(clippy::cast_precision_loss, reason = "|e| <= 128 is exact in f32")]
    let e = (exponent + i32::from(big)) as f32;
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0))));
    let ln_m = 2.0 * s + 2.0 * s * series;
    let correction = (x - (u - 1.0)) / u;
    let r = e * LN2_HI + (ln_m + (e * LN2_LO + correction));
    if x.is_nan() || x < -1.0 {
        f32::NAN
    } else if x == -1.0 {
        f32::NEG_INFINITY
    } else if x == f32::INFINITY {
        f32::INFINITY
    } else {
        r
    }
}

/// `tanh x` in f32 without a call: below `|x| = 0.9` an odd polynomial `x + x^3 P(x^2)` (degree
/// 6 in `x^2`, fitted in f64 for relative error), beyond it `1 - 2 / (e^{2|x|} + 1)` with
/// [`exp_f32`], the sign restored; `|x|` is capped at 10, where tanh is 1 in f32. Both are
/// computed and one selected, so loops vectorise. Relative error below 1e-7 (absolute below
/// 7e-8 on [-10, 10], twice PyTorch's correctly rounded f32 tanh; `1 - tanh^2` from it within
/// 1.7x of PyTorch's tanh backward); NaN stays NaN.
#[inline(always)]
pub fn tanh_f32(x: f32) -> f32 {
    let a = x.abs().clamp(0.0, 10.0);
    let z = x * x;
    let p = -0.333_333_25
        + z * (0.133_330_27
            + z * (-0.053_933_67
                + z * (0.021_681_074
                    + z * (-0.008_299_722 + z * (0.002_617_103_5 + z * -0.000_468_554_12)))));
    let small = x + x * z * p;
    let large = (1.0 - 2.0 / (exp_f32(2.0 * a) + 1.0)).copysign(x);
    if a < 0.9 { small } else { large }
}

/// The error function in f32 without a call: Eigen's and XLA's rational approximation
/// `x P(x^2) / Q(x^2)`, and ±1 beyond `|x| = 3.9`, where erf rounds to ±1 in f32. Relative
/// error below 3e-7 for `|x| < 3`, absolute error below 5e-7 everywhere; NaN stays NaN.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = x
        * (-1.609_603_3e-2
            + x2 * (-2.954_6e-3
                + x2 * (-7.349_906e-4
                    + x2 * (-5.692_506_4e-5
                        + x2 * (-2.101_024e-6 + x2 * (2.770_681_4e-8 + x2 * -2.726_142_3e-10))))));
    let q = -1.426_473_9e-2
        + x2 * (-7.373_329e-3
            + x2 * (-1.682_827e-3 + x2 * (-2.133_740_5e-4 + x2 * -1.456_607_2e-5)));
    // Beyond 3.9, erf rounds to ±1 in f32.
    if x.abs() >= 3.9 {
        1f32.copysign(x)
    } else {
        p / q
    }
}

/// Runs `f` compiled with AVX2 enabled when the CPU supports it, else as is.
///
/// The closure runs inside a `#[target_feature(enable = "avx2")]` function; mark it
/// `#[inline(always)]` (and the kernel functions it calls) so that it is compiled there and its
/// loops vectorise four f64 or eight f32 lanes wide. Rust never contracts `a * b + c` into a
/// fused multiply-add, so both builds round identically: results do not depend on the CPU.
///
/// ```
/// let sum: f64 = gradkit::core::cpu::with_avx2(
///     #[inline(always)]
///     || (0..100).map(f64::from).sum(),
/// );
/// assert_eq!(sum, 4950.0);
/// ```
#[inline(always)]
pub fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[allow(
            unsafe_code,
            reason = "calling an AVX2 function after checking AVX2 support"
        )]
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { avx2(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// A computation generic over the element type, run for a dtype by [`dispatch`].
pub trait FloatFn {
    /// What the computation returns.
    type Output;
    /// Runs the computation for element type `T`.
    ///
    /// # Errors
    /// Whatever the computation reports.
    fn call<T: Float>(self) -> Result<Self::Output>;
}

/// The dtype of a CPU storage (candle's `BackendStorage::dtype`, without importing the trait).
#[inline]
pub fn dtype_of(storage: &CpuStorage) -> DType {
    candle_core::backend::BackendStorage::dtype(storage)
}

/// [`dispatch`] inside a candle custom op (`cpu_fwd`, `bwd`): the error converted into candle's,
/// as the `CustomOp` traits need.
///
/// # Errors
/// As [`dispatch`], converted into `candle_core::Error` (the typed error stays reachable with
/// [`downcast`](crate::downcast)).
///
/// ```
/// use candle_core::{CpuStorage, DType};
/// use gradkit::core::cpu::{Float, FloatFn, dispatch_op, dtype_of};
///
/// /// The element count of a storage, computed for its element type.
/// struct Len<'a>(&'a CpuStorage);
/// impl FloatFn for Len<'_> {
///     type Output = usize;
///     fn call<T: Float>(self) -> gradkit::core::Result<usize> {
///         Ok(T::cpu_storage_as_slice(self.0)?.len())
///     }
/// }
/// let s = CpuStorage::F32(vec![1.0, 2.0, 3.0]);
/// assert_eq!(dtype_of(&s), DType::F32);
/// assert_eq!(dispatch_op("len", dtype_of(&s), Len(&s))?, 3);
/// assert!(dispatch_op("len", DType::U8, Len(&s)).is_err()); // not a float dtype
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn dispatch_op<F: FloatFn>(
    op: &'static str,
    dtype: DType,
    f: F,
) -> candle_core::Result<F::Output> {
    dispatch(op, dtype, f).map_err(candle_core::Error::from)
}

/// Runs `f` for the element type of `dtype`.
///
/// # Errors
/// [`Error::UnsupportedDType`] naming `op` for a non-float dtype, else `f`'s error.
pub fn dispatch<F: FloatFn>(op: &'static str, dtype: DType, f: F) -> Result<F::Output> {
    match dtype {
        DType::F16 => f.call::<f16>(),
        DType::BF16 => f.call::<bf16>(),
        DType::F32 => f.call::<f32>(),
        DType::F64 => f.call::<f64>(),
        other => Err(Error::UnsupportedDType {
            op,
            arg: "input",
            dtype: other,
            expected: "a float dtype (f16, bf16, f32 or f64)",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_accurate_over_its_whole_range() {
        let mut worst = 0.0f64;
        let mut x = -103.0f32;
        while x < 88.7 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_f32(x));
            if want > f64::from(f32::MIN_POSITIVE) {
                worst = worst.max((got - want).abs() / want);
            }
            x += 0.000_731;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-1e30), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    /// The worst error of `f` against `want` over a dense grid of `[lo, hi]`, relative where
    /// `|want| >= 1e-3`, absolute below.
    fn worst(f: fn(f32) -> f32, want: fn(f64) -> f64, lo: f32, hi: f32) -> (f64, f64) {
        let (mut rel, mut abs) = (0.0f64, 0.0f64);
        let mut x = lo;
        while x < hi {
            let (got, want) = (f64::from(f(x)), want(f64::from(x)));
            let err = (got - want).abs();
            abs = abs.max(err);
            if want.abs() >= 1e-3 {
                rel = rel.max(err / want.abs());
            }
            x += 0.000_377;
        }
        (rel, abs)
    }

    #[test]
    fn exp_m1_f32_is_accurate_near_zero_and_beyond() {
        let (rel, _) = worst(exp_m1_f32, f64::exp_m1, -20.0, 20.0);
        assert!(rel < 1e-6, "worst relative error {rel}");
        for x in [1e-30f32, -1e-7, 3e-4, -0.4999, 0.5001] {
            let want = f64::from(x).exp_m1();
            assert!(
                (f64::from(exp_m1_f32(x)) - want).abs() <= 1e-6 * want.abs(),
                "{x}"
            );
        }
        assert_eq!(exp_m1_f32(0.0), 0.0);
        assert_eq!(exp_m1_f32(f32::NEG_INFINITY), -1.0);
        assert!(exp_m1_f32(f32::NAN).is_nan());
    }

    #[test]
    fn ln_1p_f32_is_accurate_over_its_whole_range() {
        let (rel, _) = worst(ln_1p_f32, f64::ln_1p, -0.999, 50.0);
        assert!(rel < 3e-7, "worst relative error {rel}");
        for x in [
            1e-30f32,
            -1e-7,
            3e-4,
            1e10,
            3e38,
            -0.999_999,
            1.0,
            0.414_213_6,
        ] {
            let want = f64::from(x).ln_1p();
            let got = f64::from(ln_1p_f32(x));
            assert!(
                (got - want).abs() <= 3e-7 * want.abs(),
                "{x}: {got} vs {want}"
            );
        }
        assert_eq!(ln_1p_f32(0.0), 0.0);
        assert_eq!(ln_1p_f32(-1.0), f32::NEG_INFINITY);
        assert_eq!(ln_1p_f32(f32::INFINITY), f32::INFINITY);
        assert!(ln_1p_f32(-1.5).is_nan() && ln_1p_f32(f32::NAN).is_nan());
        assert!(ln_1p_f32(f32::NEG_INFINITY).is_nan());
    }

    #[test]
    fn tanh_f32_is_accurate_over_its_whole_range() {
        let (rel, abs) = worst(tanh_f32, f64::tanh, -12.0, 12.0);
        assert!(rel < 1e-7, "worst relative error {rel}");
        assert!(abs < 7e-8, "worst absolute error {abs}");
        for x in [1e-30f32, -1e-6, 2e-3] {
            let want = f64::from(x).tanh();
            assert!(
                (f64::from(tanh_f32(x)) - want).abs() <= 2e-6 * want.abs(),
                "{x}"
            );
        }
        assert_eq!(tanh_f32(0.0), 0.0);
        assert_eq!(tanh_f32(f32::INFINITY), 1.0);
        assert_eq!(tanh_f32(-1e30), -1.0);
        assert!(tanh_f32(f32::NAN).is_nan());
    }

    #[test]
    fn erf_f32_is_accurate_over_its_whole_range() {
        let (rel, _) = worst(erf_f32, libm::erf, -3.0, 3.0);
        assert!(rel < 3e-7, "worst relative error {rel}");
        let (_, abs) = worst(erf_f32, libm::erf, -6.0, 6.0);
        assert!(abs < 5e-7, "worst absolute error {abs}");
        for x in [1e-30f32, -1e-6, 2e-3] {
            let want = libm::erf(f64::from(x));
            assert!(
                (f64::from(erf_f32(x)) - want).abs() <= 1e-6 * want.abs(),
                "{x}"
            );
        }
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert_eq!(erf_f32(f32::NEG_INFINITY), -1.0);
        assert!(erf_f32(f32::NAN).is_nan());
    }
}
