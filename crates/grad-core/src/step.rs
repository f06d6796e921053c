//! What an optimizer wrapper did at its last step, passed to whoever watches the training loop.
//!
//! A clipping wrapper (`grad_regularize::Clipped`) and a gradient monitor
//! (`grad_diagnostics::GradMonitor`) live in crates that never depend on each other, and meet
//! only in the user's loop, where the wrapper hides behind candle's `Optimizer` trait. So the
//! wrapper [`publish`]es a [`StepOutcome`] on the thread that ran the step, and the monitor,
//! which called `optimizer.step` on that same thread a moment before, [`take`]s it. A loop that
//! calls both itself can pass the outcome by hand instead (`GradMonitor::annotate`).

use std::cell::Cell;

use serde::{Deserialize, Serialize};

/// The outcome of one optimizer step taken through a clipping wrapper.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepOutcome {
    /// The global L2 norm of the gradients before clipping (NaN or inf when one is non-finite).
    pub total_norm: f64,
    /// Whether clipping changed any gradient.
    pub clipped: bool,
    /// Whether the step was skipped (non-finite gradients).
    pub skipped: bool,
}

thread_local! {
    static LAST: Cell<Option<StepOutcome>> = const { Cell::new(None) };
}

/// Leaves `outcome` for a watcher on this thread, replacing any not yet taken.
///
/// ```
/// use gradkit::core::step::{StepOutcome, publish, take};
/// publish(StepOutcome { total_norm: 3.0, clipped: true, skipped: false });
/// assert_eq!(take().map(|o| o.clipped), Some(true));
/// assert_eq!(take(), None);
/// ```
pub fn publish(outcome: StepOutcome) {
    LAST.set(Some(outcome));
}

/// The outcome published on this thread since the last `take`, if any.
pub fn take() -> Option<StepOutcome> {
    LAST.take()
}
