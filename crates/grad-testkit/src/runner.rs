//! Running an op against every case of its conformance file.

use std::collections::BTreeMap;
use std::io::Write;

use candle_core::{DType, Tensor};

use crate::case::{Case, Expected, RawData, RawTensor, load};

/// The named outputs an op under test returns for a case (`y`, `grad_x`, `running_mean`, ...).
pub type Outputs = BTreeMap<String, Tensor>;

/// Any error an op under test may return for a case.
pub type CaseError = Box<dyn std::error::Error + Send + Sync>;

/// The precision a conformance run computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f64 inputs; tolerances `rtol = 1e-9`, `atol = 1e-12`.
    F64,
    /// f32 inputs cast from the f64 ones; tolerances `rtol = 1e-4`, `atol = 1e-5`.
    F32,
}

impl Precision {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F64 => DType::F64,
            Self::F32 => DType::F32,
        }
    }

    /// `(rtol, atol)` from the conformance README.
    pub fn tolerances(self) -> (f64, f64) {
        match self {
            Self::F64 => (1e-9, 1e-12),
            Self::F32 => (1e-4, 1e-5),
        }
    }

    /// `"f64"` or `"f32"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F64 => "f64",
            Self::F32 => "f32",
        }
    }
}

/// The outcome of [`run`].
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// The op's name.
    pub op: String,
    /// Cases that passed.
    pub passed: usize,
    /// One line per failed case (or `load` failure).
    pub failures: Vec<String>,
}

impl Summary {
    /// Panics with every failure when any case failed or none ran.
    ///
    /// # Panics
    /// That is its purpose: it ends a conformance test.
    #[allow(clippy::panic, reason = "ends a test")]
    pub fn assert_all_passed(&self) {
        if !self.failures.is_empty() || self.passed == 0 {
            panic!(
                "conformance {}: {} passed, {} failed:\n{}",
                self.op,
                self.passed,
                self.failures.len(),
                self.failures.join("\n")
            );
        }
    }
}

/// Runs `op_fn` on every case of `<op>.json` in `precision` (in f32, the cases the file's notes
/// list as f64-only are left out), compares, and prints
/// `conformance <op> <f64|f32>: N passed, M failed` to stderr, uncaptured.
///
/// A case passes when: it expects an error and `op_fn` returns the gradkit error listed for it
/// (the reason PyTorch rejects the input, not any error); or it expects tensors and
/// `op_fn` returns every one of them with the expected shape, within the precision's tolerances
/// (NaN matching NaN, infinities matching in sign, integers exactly). Anything else — including an
/// `Err` for a case that expects tensors — is a failure.
pub fn run<F>(op: &str, precision: Precision, op_fn: F) -> Summary
where
    F: FnMut(&Case, Precision) -> Result<Outputs, CaseError>,
{
    run_as(op, op, precision, op_fn)
}

/// [`run`] on the cases of `<op>.json`, reporting as `label` (for example `batch_norm_composed`
/// for the same vectors through the composed path): `conformance <label> <f64|f32>: N passed,
/// M failed`.
pub fn run_as<F>(op: &str, label: &str, precision: Precision, op_fn: F) -> Summary
where
    F: FnMut(&Case, Precision) -> Result<Outputs, CaseError>,
{
    run_subset(op, label, precision, |_| true, op_fn)
}

/// [`run_as`] on the cases `applies` accepts: for a composite that owns only some of a file's
/// ops (a block whose activation can be any of grad-layers' activations, but not PReLU). The
/// line printed also counts the cases left out, so none is dropped silently:
/// `conformance <label> <f64|f32>: N passed, M failed, K left out (not this op's)`.
pub fn run_subset<F>(
    op: &str,
    label: &str,
    precision: Precision,
    applies: impl Fn(&Case) -> bool,
    mut op_fn: F,
) -> Summary
where
    F: FnMut(&Case, Precision) -> Result<Outputs, CaseError>,
{
    let mut summary = Summary {
        op: format!("{label} {}", precision.name()),
        ..Summary::default()
    };
    let mut left_out = 0;
    match load(op) {
        Err(e) => summary
            .failures
            .push(format!("cannot load the vectors: {e}")),
        Ok(file) => {
            let f64_only = file.f64_only();
            for case in &file.cases {
                if precision == Precision::F32 && f64_only.contains(&case.name.as_str()) {
                    continue;
                }
                if !applies(case) {
                    left_out += 1;
                    continue;
                }
                match check_case(op, case, precision, op_fn(case, precision)) {
                    Ok(()) => summary.passed += 1,
                    Err(why) => summary.failures.push(format!("  {}: {why}", case.name)),
                }
            }
        }
    }
    let left_out = if left_out == 0 {
        String::new()
    } else {
        format!(", {left_out} left out (not this op's)")
    };
    // Written to the process's stderr directly: the test harness captures `eprintln!`, not this.
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "conformance {label} {}: {} passed, {} failed{left_out}",
        precision.name(),
        summary.passed,
        summary.failures.len()
    );
    for f in &summary.failures {
        let _ = writeln!(err, "{f}");
    }
    summary
}

fn check_case(
    op: &str,
    case: &Case,
    precision: Precision,
    got: Result<Outputs, CaseError>,
) -> Result<(), String> {
    match (&case.expected, got) {
        (Expected::Error(_), Err(e)) => crate::error_kinds::check(op, &case.name, e.as_ref()),
        (Expected::Error(msg), Ok(_)) => Err(format!("expected an error ({msg}), got outputs")),
        (Expected::Tensors(_), Err(e)) => Err(format!("could not run: {e}")),
        (Expected::Tensors(expected), Ok(outputs)) => {
            for (name, want) in expected {
                let got = outputs
                    .get(name)
                    .ok_or_else(|| format!("output {name} missing"))?;
                compare_tensor(got, want, precision).map_err(|e| format!("{name}: {e}"))?;
            }
            Ok(())
        }
    }
}

/// Compares a computed tensor with an expected one: same dims, and element-wise
/// `|got - want| <= atol + rtol * |want|` (NaN = NaN, equal infinities; integers exactly).
///
/// # Errors
/// A description of the first difference.
pub fn compare_tensor(got: &Tensor, want: &RawTensor, precision: Precision) -> Result<(), String> {
    if got.dims() != want.shape.as_slice() {
        return Err(format!("shape {:?}, expected {:?}", got.dims(), want.shape));
    }
    let values = crate::values(got).map_err(|e| format!("cannot read the output: {e}"))?;
    let (rtol, atol) = precision.tolerances();
    let exact = matches!(want.data, RawData::I64(_));
    let mut worst: Option<(usize, f64, f64, f64)> = None;
    let mut bad = 0usize;
    for (i, (&g, &w)) in values.iter().zip(&want.values_f64()).enumerate() {
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() || exact {
            g == w
        } else {
            (g - w).abs() <= atol + rtol * w.abs()
        };
        if !ok {
            bad += 1;
            let err = if g.is_nan() {
                f64::INFINITY
            } else {
                (g - w).abs()
            };
            if worst.is_none_or(|(_, _, _, e)| err > e) {
                worst = Some((i, g, w, err));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((i, g, w, _)) => Err(format!(
            "{bad} of {} elements out of tolerance; worst at flat index {i}: got {g:e}, expected {w:e}",
            values.len()
        )),
    }
}
