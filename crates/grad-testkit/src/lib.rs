//! # grad-testkit
//!
//! Test support for gradkit (never a normal dependency, never published): the loader for the
//! PyTorch conformance vectors in `conformance/`, and the runner every op's conformance test uses.
//!
//! The vectors (see `conformance/README.md`) were computed by PyTorch in float64. [`load`] reads an
//! op's file from the folder named by `GRADKIT_CONFORMANCE_DIR`, or from the repository's
//! `conformance/` folder. [`run`] feeds every case to the op under test in f64 and in f32 (f32
//! inputs are cast from the f64 ones), compares with the README's tolerances, treats a case the op
//! cannot run as a failure, and prints `conformance <op> <f64|f32>: N passed, M failed` to the
//! terminal even when the test harness captures output.
//!
//! ```no_run
//! use grad_testkit::{Outputs, Precision, run};
//! let summary = run("layer_norm", Precision::F64, |case, precision| {
//!     let x = case.input("x")?.to_tensor(precision.dtype())?;
//!     let y = x.clone(); // the op under test goes here
//!     Ok(Outputs::from([("y".to_string(), y)]))
//! });
//! summary.assert_all_passed();
//! ```

mod bounds;
mod case;
pub mod digits;
mod error_kinds;
mod runner;
mod values;

pub use bounds::judge_row;
pub use case::{
    Case, ConformanceFile, Expected, LoadError, RawData, RawTensor, conformance_dir, load,
};
pub use runner::{CaseError, Outputs, Precision, Summary, compare_tensor, run, run_as, run_subset};
pub use values::{grads_of, values};
