//! Hyper-parameter checks, one function per rule, shared by every gradkit config.
//!
//! Each returns [`Error::InvalidHyperParameter`] naming the argument, the value and the allowed
//! range, so configs validate every field in one fallible step with `?`.
//!
//! ```
//! use gradkit::core::validate;
//! assert!(validate::positive("eps", 1e-5).is_ok());
//! assert!(validate::positive("eps", 0.0).is_err());
//! assert!(validate::unit_interval("p", f64::NAN).is_err());
//! assert!(validate::finite("mean", f64::INFINITY).is_err());
//! ```

use candle_core::DType;

use crate::{Error, Result};

/// The error for a hyper-parameter `name` with `value` outside what is `allowed`: the one
/// constructor behind every rule here, for a rule of a config's own (one that needs another
/// field).
///
/// ```
/// let e = gradkit::core::validate::invalid("growth_tracker", 7.0, "below growth_interval");
/// assert!(e.to_string().contains("growth_tracker"));
/// ```
pub fn invalid(name: &'static str, value: f64, allowed: &'static str) -> Error {
    Error::InvalidHyperParameter {
        name,
        value,
        allowed,
    }
}

/// Checks `-inf < value < inf`.
///
/// # Errors
/// [`Error::InvalidHyperParameter`] when the value is infinite or NaN.
pub fn finite(name: &'static str, value: f64) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(invalid(name, value, "a finite number"))
    }
}

/// Checks that `value` is finite and not zero (a divisor, such as CELU's `alpha`).
///
/// # Errors
/// [`Error::InvalidHyperParameter`] when the value is zero, infinite or NaN.
pub fn finite_nonzero(name: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value != 0.0 {
        Ok(())
    } else {
        Err(invalid(name, value, "a finite, non-zero number"))
    }
}

/// Checks that `value` is a number: anything but NaN (infinities allowed, as a threshold).
///
/// # Errors
/// [`Error::InvalidHyperParameter`] when the value is NaN.
pub fn not_nan(name: &'static str, value: f64) -> Result<()> {
    if value.is_nan() {
        Err(invalid(name, value, "a number (not NaN)"))
    } else {
        Ok(())
    }
}

/// Checks bounds `lower < upper`, each given as `(name, value)`, neither NaN (infinite bounds
/// allowed, as Hardtanh's).
///
/// # Errors
/// [`Error::InvalidHyperParameter`] naming the lower bound when it is NaN, else the upper one.
///
/// ```
/// use gradkit::core::validate::ordered;
/// assert!(ordered(("min_val", f64::NEG_INFINITY), ("max_val", 1.0)).is_ok());
/// assert!(ordered(("min_val", 1.0), ("max_val", 1.0)).is_err());
/// ```
pub fn ordered(lower: (&'static str, f64), upper: (&'static str, f64)) -> Result<()> {
    not_nan(lower.0, lower.1)?;
    if upper.1 > lower.1 {
        Ok(())
    } else {
        Err(invalid(upper.0, upper.1, "a number above the lower bound"))
    }
}

/// Checks finite bounds `lower < upper` (a sampling range), each given as `(name, value)`.
///
/// # Errors
/// [`Error::InvalidHyperParameter`] naming the first bound that is not finite, else the upper
/// one.
pub fn finite_ordered(lower: (&'static str, f64), upper: (&'static str, f64)) -> Result<()> {
    finite(lower.0, lower.1)?;
    finite(upper.0, upper.1)?;
    ordered(lower, upper)
}

/// Checks `0 < value < inf`.
///
/// # Errors
/// [`Error::InvalidHyperParameter`] when the value is zero, negative, infinite or NaN.
pub fn positive(name: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(invalid(name, value, "a finite number > 0"))
    }
}

/// Checks `0 <= value < inf`.
///
/// # Errors
/// [`Error::InvalidHyperParameter`] when the value is negative, infinite or NaN.
pub fn non_negative(name: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(invalid(name, value, "a finite number >= 0"))
    }
}

/// Checks `0 <= value <= 1` (a probability, a momentum, a smoothing factor).
///
/// # Errors
/// [`Error::InvalidHyperParameter`] when the value is outside `[0, 1]` or NaN.
pub fn unit_interval(name: &'static str, value: f64) -> Result<()> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(invalid(name, value, "[0, 1]"))
    }
}

/// Checks `0 < value < 1` (a back-off factor).
///
/// # Errors
/// [`Error::InvalidHyperParameter`] when the value is outside the open interval or NaN.
pub fn open_unit_interval(name: &'static str, value: f64) -> Result<()> {
    if value > 0.0 && value < 1.0 {
        Ok(())
    } else {
        Err(invalid(name, value, "(0, 1)"))
    }
}

/// Checks `1 < value < inf` (a growth factor).
///
/// # Errors
/// [`Error::InvalidHyperParameter`] when the value is at most 1, infinite or NaN.
pub fn greater_than_one(name: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value > 1.0 {
        Ok(())
    } else {
        Err(invalid(name, value, "a finite number > 1"))
    }
}

/// Checks that a count is at least one.
///
/// # Errors
/// [`Error::InvalidHyperParameter`] when the count is zero.
pub fn at_least_one(name: &'static str, value: usize) -> Result<()> {
    if value >= 1 {
        Ok(())
    } else {
        Err(invalid(name, value as f64, "an integer >= 1"))
    }
}

/// Whether candle's `dtype` is one of the float dtypes gradkit computes with.
pub fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

/// Checks that `dtype` is a supported float dtype.
///
/// # Errors
/// [`Error::UnsupportedDType`] naming `op` and `arg` otherwise.
///
/// ```
/// use candle_core::DType;
/// assert!(gradkit::core::validate::ensure_float("demo", "x", DType::BF16).is_ok());
/// assert!(gradkit::core::validate::ensure_float("demo", "x", DType::U32).is_err());
/// ```
pub fn ensure_float(op: &'static str, arg: &'static str, dtype: DType) -> Result<()> {
    if is_float(dtype) {
        Ok(())
    } else {
        Err(Error::UnsupportedDType {
            op,
            arg,
            dtype,
            expected: "a float dtype (f16, bf16, f32 or f64)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_accept_and_reject_the_boundaries() {
        assert!(positive("x", f64::MIN_POSITIVE).is_ok());
        assert!(positive("x", f64::INFINITY).is_err());
        assert!(non_negative("x", 0.0).is_ok());
        assert!(non_negative("x", -0.1).is_err());
        assert!(unit_interval("x", 0.0).is_ok() && unit_interval("x", 1.0).is_ok());
        assert!(unit_interval("x", 1.0 + 1e-12).is_err());
        assert!(open_unit_interval("x", 1.0).is_err() && open_unit_interval("x", 0.0).is_err());
        assert!(greater_than_one("x", 1.0).is_err() && greater_than_one("x", 2.0).is_ok());
        assert!(at_least_one("x", 0).is_err() && at_least_one("x", 1).is_ok());
    }

    #[test]
    fn message_names_argument_value_and_range() {
        let err = unit_interval("momentum", 1.5).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid hyper-parameter momentum = 1.5: expected [0, 1]"
        );
    }
}
