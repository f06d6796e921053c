//! The judge of a hyper-parameter table's row: at a bound a remedy runs with a finite result,
//! past it the error names the argument.

use std::fmt::Display;

/// Checks one row of a bounds table: `named` is `None` when `outcome` must be values that are
/// all finite, or the argument the error must name.
///
/// # Errors
/// A message saying what went wrong with the row, for the test to report.
pub fn judge_row<E: Display>(
    row: &str,
    outcome: Result<Vec<f64>, E>,
    named: Option<&str>,
) -> Result<(), String> {
    match (outcome, named) {
        (Ok(v), None) if v.iter().all(|x| x.is_finite()) => Ok(()),
        (Ok(v), None) => Err(format!("{row}: a non-finite result {v:?}")),
        (Err(e), Some(arg)) if e.to_string().contains(arg) => Ok(()),
        (Err(e), Some(arg)) => Err(format!("{row}: the error does not name {arg}: {e}")),
        (Ok(v), Some(arg)) => Err(format!("{row}: gave {v:?}, expected an error naming {arg}")),
        (Err(e), None) => Err(format!("{row}: rejected: {e}")),
    }
}
