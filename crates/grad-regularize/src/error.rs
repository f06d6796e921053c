//! grad-regularize's error type.

/// grad-regularize's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong clipping, computing a loss or scaling one.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A shared check failed: a hyper-parameter, shape, rank, dtype or device (see
    /// [`grad_core::Error`]).
    #[error(transparent)]
    Core(#[from] grad_core::Error),

    /// The total gradient norm is NaN or infinite and the clipping rule asked to fail on that
    /// ([`NonFiniteNorm::Error`](crate::NonFiniteNorm::Error), PyTorch's `error_if_nonfinite=True`).
    #[error(
        "the total norm of order {norm_type} of the gradients is non-finite ({total_norm}), so it cannot be clipped; use NonFiniteNorm::Scale to scale anyway"
    )]
    NonFiniteTotalNorm {
        /// The norm's exponent (`inf` for the max norm).
        norm_type: f64,
        /// The total norm found.
        total_norm: f64,
    },

    /// The optimizer wrapper skipped more consecutive steps than allowed.
    #[error(
        "{skips} consecutive optimizer steps skipped for non-finite gradients (limit {limit}); first non-finite parameter of the last one: {parameter}"
    )]
    TooManySkippedSteps {
        /// Consecutive skipped steps, the last included.
        skips: usize,
        /// The configured limit.
        limit: usize,
        /// The first parameter (in order) whose gradient held a NaN or infinity.
        parameter: String,
    },

    /// A class-index target outside `[0, C)` that is not the ignore index.
    #[error(
        "cross_entropy: target {target} at flat position {position} is out of bounds for {classes} classes"
    )]
    TargetOutOfRange {
        /// The offending target value.
        target: i64,
        /// Its position in the flattened target tensor.
        position: usize,
        /// The number of classes.
        classes: usize,
    },

    /// Probability targets do not support `ignore_index` (PyTorch raises the same).
    #[error(
        "cross_entropy: ignore_index ({0}) is only supported with class-index targets (set it to None)"
    )]
    IgnoreIndexWithProbabilities(i64),

    /// [`LossScaler::step`](crate::LossScaler::step) called again before
    /// [`LossScaler::update`](crate::LossScaler::update).
    #[error(
        "LossScaler::step was already called since the last update(); call update() after each step"
    )]
    StepWithoutUpdate,

    /// An error raised by candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Converts to candle's error type, so `?` works in a function returning `candle_core::Result`
/// (and `Optimizer::step` can return it): a candle error inside comes back as it was; any other
/// stays reachable with [`grad_core::downcast::<Error>`](grad_core::downcast).
impl From<Error> for candle_core::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Candle(e) => e,
            other => grad_core::to_candle(other),
        }
    }
}
