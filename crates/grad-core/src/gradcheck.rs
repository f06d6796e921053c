//! Checks autograd gradients against central finite differences, like
//! `torch.autograd.gradcheck`.
//!
//! For a function `f` of tensors, [`gradcheck`] draws a fixed random upstream gradient `v` of the
//! output's shape (seeded, standard normal) and differentiates the scalar `s(x) = sum(f(x) * v)`
//! both ways: by `backward()` (the gradient under test) and numerically, element by element,
//! `(s(x + eps e_j) - s(x - eps e_j)) / (2 eps)`. Projecting on a random `v` checks every output
//! at once — a wrong Jacobian entry changes the projection with probability one — at the cost of
//! `2 * numel` evaluations instead of `2 * numel * outputs`; PyTorch's `fast_mode` does the same.
//! Run it in f64 on small inputs: the finite differences need the precision.

use std::fmt;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::rng::Philox;
use crate::{Error, Result};

/// Settings of [`gradcheck`], with PyTorch's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradcheckConfig {
    /// Finite-difference step. Default: 1e-6.
    pub eps: f64,
    /// Absolute tolerance. Default: 1e-5.
    pub atol: f64,
    /// Relative tolerance, applied to the numerical gradient. Default: 1e-3.
    pub rtol: f64,
    /// Seed of the random upstream gradient. Default: 0.
    pub seed: u64,
}

impl Default for GradcheckConfig {
    fn default() -> Self {
        Self {
            eps: 1e-6,
            atol: 1e-5,
            rtol: 1e-3,
            seed: 0,
        }
    }
}

impl GradcheckConfig {
    /// Checks that `eps > 0` and the tolerances are finite and non-negative.
    ///
    /// # Errors
    /// [`Error::InvalidHyperParameter`] naming the bad field.
    pub fn validate(&self) -> Result<()> {
        crate::validate::positive("eps", self.eps)?;
        crate::validate::non_negative("atol", self.atol)?;
        crate::validate::non_negative("rtol", self.rtol)
    }
}

/// The element of an input whose gradient is furthest out of tolerance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorstElement {
    /// Its multi-index in the input.
    pub position: Vec<usize>,
    /// The autograd gradient there.
    pub analytic: f64,
    /// The finite-difference gradient there.
    pub numeric: f64,
}

/// How one input's gradient compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputReport {
    /// The input's position in the argument list.
    pub index: usize,
    /// Largest `|analytic - numeric|`.
    pub max_abs_error: f64,
    /// Largest `|analytic - numeric| / |numeric|` over elements with a non-zero numeric gradient.
    pub max_rel_error: f64,
    /// The element with the largest error relative to its tolerance (`None` for an empty input).
    pub worst: Option<WorstElement>,
    /// Whether every element is within `atol + rtol * |numeric|`.
    pub passed: bool,
    /// Whether autograd produced a gradient at all (a missing one is compared as zeros).
    pub has_gradient: bool,
}

/// The outcome of [`gradcheck`], one entry per input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradcheckReport {
    /// Per-input results, in argument order.
    pub inputs: Vec<InputReport>,
    /// The settings used.
    pub config: GradcheckConfig,
}

impl GradcheckReport {
    /// Whether every input passed.
    pub fn passed(&self) -> bool {
        self.inputs.iter().all(|i| i.passed)
    }
}

impl fmt::Display for GradcheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        write!(f, "eps {:e}, atol {:e}, rtol {:e}", c.eps, c.atol, c.rtol)?;
        for i in &self.inputs {
            let verdict = if i.passed { "ok" } else { "FAILED" };
            write!(
                f,
                "; input {}: {verdict}, max abs error {:.3e}, max rel error {:.3e}",
                i.index, i.max_abs_error, i.max_rel_error
            )?;
            if !i.has_gradient {
                write!(f, " (no gradient reached this input)")?;
            }
            if let (false, Some(w)) = (i.passed, &i.worst) {
                write!(
                    f,
                    ", worst at {:?}: analytic {:e} vs numeric {:e}",
                    w.position, w.analytic, w.numeric
                )?;
            }
        }
        Ok(())
    }
}

/// Compares the autograd gradients of `f` at `inputs` with central finite differences.
///
/// `inputs` must be f64 tensors; `f` may use any differentiable candle ops or custom ops.
///
/// # Errors
/// [`Error::GradcheckFailed`] with the full report when any gradient is out of tolerance;
/// [`Error::UnsupportedDType`] for a non-f64 input; [`Error::EmptyInput`] for no inputs;
/// [`Error::Function`] when `f` fails.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::core::{GradcheckConfig, gradcheck};
/// let x = Tensor::new(&[[0.5f64, -1.0], [2.0, 0.25]], &Device::Cpu)?;
/// let w = Tensor::new(&[[1.5f64], [-0.5]], &Device::Cpu)?;
/// let report = gradcheck(
///     |xs: &[Tensor]| xs[0].matmul(&xs[1])?.tanh(),
///     &[x, w],
///     &GradcheckConfig::default(),
/// )?;
/// assert!(report.passed());
/// # Ok::<(), gradkit::core::Error>(())
/// ```
pub fn gradcheck<F, E>(f: F, inputs: &[Tensor], config: &GradcheckConfig) -> Result<GradcheckReport>
where
    F: Fn(&[Tensor]) -> std::result::Result<Tensor, E>,
    E: std::error::Error + Send + Sync + 'static,
{
    config.validate()?;
    if inputs.is_empty() {
        return Err(Error::EmptyInput {
            op: "gradcheck",
            what: "inputs",
        });
    }
    for x in inputs {
        if x.dtype() != DType::F64 {
            return Err(Error::UnsupportedDType {
                op: "gradcheck",
                arg: "inputs",
                dtype: x.dtype(),
                expected: "f64 (finite differences need its precision)",
            });
        }
    }
    let call = |xs: &[Tensor]| f(xs).map_err(|e| Error::Function(Box::new(e)));

    // Autograd side.
    let vars = inputs
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let var_tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = call(&var_tensors)?;
    let upstream = Philox::new(config.seed).normal(y.shape(), 0.0, 1.0, DType::F64, y.device())?;
    let project =
        |y: &Tensor| -> Result<Tensor> { Ok((y.to_dtype(DType::F64)? * &upstream)?.sum_all()?) };
    let grads = project(&y)?.backward()?;

    // Numeric side, one input element at a time.
    let mut reports = Vec::with_capacity(inputs.len());
    for (index, (x, var)) in inputs.iter().zip(&vars).enumerate() {
        let analytic = grads.get(var.as_tensor());
        let has_gradient = analytic.is_some();
        let analytic = match analytic {
            Some(g) => g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
            None => vec![0.0; x.elem_count()],
        };
        let base = x.flatten_all()?.to_vec1::<f64>()?;
        let mut numeric = Vec::with_capacity(base.len());
        let mut args: Vec<Tensor> = inputs.to_vec();
        for j in 0..base.len() {
            let mut eval = |delta: f64| -> Result<f64> {
                let mut data = base.clone();
                data[j] += delta;
                args[index] = Tensor::from_vec(data, x.shape(), x.device())?;
                Ok(project(&call(&args)?)?.to_scalar::<f64>()?)
            };
            let (plus, minus) = (eval(config.eps)?, eval(-config.eps)?);
            numeric.push((plus - minus) / (2.0 * config.eps));
        }
        reports.push(compare(
            index,
            x.dims(),
            &analytic,
            &numeric,
            has_gradient,
            config,
        ));
    }
    let report = GradcheckReport {
        inputs: reports,
        config: *config,
    };
    if report.passed() {
        Ok(report)
    } else {
        Err(Error::GradcheckFailed(Box::new(report)))
    }
}

fn compare(
    index: usize,
    dims: &[usize],
    analytic: &[f64],
    numeric: &[f64],
    has_gradient: bool,
    c: &GradcheckConfig,
) -> InputReport {
    let mut report = InputReport {
        index,
        max_abs_error: 0.0,
        max_rel_error: 0.0,
        worst: None,
        passed: true,
        has_gradient,
    };
    let mut worst_ratio = f64::NEG_INFINITY;
    for (j, (&a, &n)) in analytic.iter().zip(numeric).enumerate() {
        let err = (a - n).abs();
        let tol = c.atol + c.rtol * n.abs();
        // NaN errors fail: `err <= tol` is false for NaN.
        let ok = err <= tol;
        report.passed &= ok;
        // `f64::max` drops a NaN: a NaN error must show as NaN, not as 0.
        let nan_max = |acc: f64, v: f64| {
            if acc.is_nan() || v.is_nan() {
                f64::NAN
            } else {
                acc.max(v)
            }
        };
        report.max_abs_error = nan_max(report.max_abs_error, err);
        if n != 0.0 || err.is_nan() {
            report.max_rel_error = nan_max(report.max_rel_error, err / n.abs());
        }
        let ratio = if err.is_nan() {
            f64::INFINITY
        } else {
            err / tol.max(f64::MIN_POSITIVE)
        };
        if ratio > worst_ratio {
            worst_ratio = ratio;
            report.worst = Some(WorstElement {
                position: unravel(j, dims),
                analytic: a,
                numeric: n,
            });
        }
    }
    report
}

/// The multi-index of flat (row-major) index `flat` in `dims`.
fn unravel(mut flat: usize, dims: &[usize]) -> Vec<usize> {
    let mut pos = vec![0; dims.len()];
    for d in (0..dims.len()).rev() {
        pos[d] = flat % dims[d].max(1);
        flat /= dims[d].max(1);
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unravel_is_row_major() {
        assert_eq!(unravel(7, &[2, 3, 2]), [1, 0, 1]);
        assert_eq!(unravel(0, &[]), Vec::<usize>::new());
    }
}
