//! The error type shared by every gradkit crate.
//!
//! Each variant names the operation and the argument at fault, so a caller can match on it and a
//! user reading the message knows what to change. Leaf crates wrap this type with `#[from]`.

use candle_core::DType;

use crate::gradcheck::GradcheckReport;

/// gradkit's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in grad-core.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A hyper-parameter lies outside the range where the operation is defined.
    #[error("invalid hyper-parameter {name} = {value}: expected {allowed}")]
    InvalidHyperParameter {
        /// The argument's name, as the user wrote it (`eps`, `max_norm`, `p`).
        name: &'static str,
        /// The value received.
        value: f64,
        /// The allowed range, in words or interval notation (`(0, inf)`, `[0, 1]`).
        allowed: &'static str,
    },

    /// A tensor's shape does not match what the operation needs.
    #[error("{op}: shape mismatch for {arg}: expected {expected}, got {got:?}")]
    ShapeMismatch {
        /// The operation that checked the shape.
        op: &'static str,
        /// The argument whose shape is wrong.
        arg: String,
        /// The expected shape, in words when it is a pattern (`[N, C, ...] with C = 3`).
        expected: String,
        /// The shape received.
        got: Vec<usize>,
    },

    /// A tensor's rank is not one the operation supports.
    #[error("{op}: rank mismatch for {arg}: expected {expected}, got rank {got}")]
    RankMismatch {
        /// The operation that checked the rank.
        op: &'static str,
        /// The argument whose rank is wrong.
        arg: &'static str,
        /// The supported ranks, in words (`2 to 5`, `at least 2`).
        expected: &'static str,
        /// The rank received.
        got: usize,
    },

    /// A tensor has a dtype the operation does not support.
    #[error("{op}: unsupported dtype {dtype:?} for {arg}: expected {expected}")]
    UnsupportedDType {
        /// The operation that checked the dtype.
        op: &'static str,
        /// The argument whose dtype is wrong.
        arg: &'static str,
        /// The dtype received.
        dtype: DType,
        /// The supported dtypes, in words (`a float dtype`, `f64`).
        expected: &'static str,
    },

    /// Tensors that must share a device do not.
    #[error("{op}: tensors on different devices: {first} and {other}")]
    DeviceMismatch {
        /// The operation that checked the devices.
        op: &'static str,
        /// The device of the first tensor.
        first: String,
        /// The first device that differs from it.
        other: String,
    },

    /// Non-finite values (NaN or infinity) where the operation needs finite ones.
    #[error("{op}: {count} non-finite value(s) in {what}")]
    NonFinite {
        /// The operation that found them.
        op: &'static str,
        /// Where they were found (an argument, a parameter name, a total norm).
        what: String,
        /// How many were found (1 for a scalar such as a total norm).
        count: u64,
    },

    /// An input that must hold at least one element (or one tensor) is empty.
    #[error("{op}: {what} is empty")]
    EmptyInput {
        /// The operation that needs the input.
        op: &'static str,
        /// The empty input.
        what: &'static str,
    },

    /// Two parameters share a name where names must be unique.
    #[error("duplicate parameter name {name:?}")]
    DuplicateName {
        /// The repeated name.
        name: String,
    },

    /// A name does not refer to any known parameter.
    #[error("no parameter named {name:?}")]
    UnknownName {
        /// The name asked for.
        name: String,
    },

    /// `gradcheck` found an autograd gradient that disagrees with finite differences.
    #[error("gradcheck failed: {0}")]
    GradcheckFailed(Box<GradcheckReport>),

    /// The function under [`gradcheck`](crate::gradcheck) returned an error.
    #[error("the function under gradcheck failed: {0}")]
    Function(Box<dyn std::error::Error + Send + Sync>),

    /// An error raised by candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// An [`Error::ShapeMismatch`]: `op` found `got` where it needed `expected` for `arg`.
    ///
    /// ```
    /// let e = gradkit::core::Error::shape_mismatch("clip", "grad", "[2, 3]", &[3, 2]);
    /// assert_eq!(e.to_string(), "clip: shape mismatch for grad: expected [2, 3], got [3, 2]");
    /// ```
    pub fn shape_mismatch(
        op: &'static str,
        arg: impl Into<String>,
        expected: impl Into<String>,
        got: &[usize],
    ) -> Self {
        Self::ShapeMismatch {
            op,
            arg: arg.into(),
            expected: expected.into(),
            got: got.to_vec(),
        }
    }
}

/// Converts to candle's error type, so `?` works in a function returning
/// `candle_core::Result`. A candle error inside comes back as it was; any other keeps this error
/// reachable with [`downcast`].
impl From<Error> for candle_core::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Candle(e) => e,
            other => to_candle(other),
        }
    }
}

/// Wraps a gradkit error in a `candle_core::Error` that keeps it typed: the message is the
/// error's own, and [`downcast`] gets the error back. Every gradkit crate's `From<Error> for
/// candle_core::Error` is built on this; a candle error inside a gradkit error should be
/// unwrapped first rather than wrapped twice.
///
/// ```
/// let e = gradkit::core::Error::shape_mismatch("clip", "grad", "[2, 3]", &[3, 2]);
/// let wrapped = gradkit::core::to_candle(e);
/// assert!(wrapped.to_string().contains("clip: shape mismatch for grad"));
/// ```
pub fn to_candle<E>(err: E) -> candle_core::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    let context = err.to_string();
    candle_core::Error::WrappedContext {
        wrapped: Box::new(err),
        context,
    }
}

/// The gradkit error of type `E` inside a `candle_core::Error` (for example one returned by a
/// layer's `Module::forward` or by `Optimizer::step` of `Clipped`), looking through candle's
/// context, path and backtrace layers; `None` when it holds no such error.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::VarBuilder;
/// use gradkit::layers::{Error, PReluConfig, prelu};
///
/// let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
/// let act = prelu(PReluConfig { num_parameters: 3, ..Default::default() }, vb)?;
/// let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?; // 4 channels, not 3
/// let err = act.forward(&x).unwrap_err(); // a candle_core::Error, as Module returns
/// assert!(matches!(gradkit::core::downcast::<Error>(&err), Some(Error::Core(_))));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn downcast<E>(err: &candle_core::Error) -> Option<&E>
where
    E: std::error::Error + 'static,
{
    match err {
        candle_core::Error::WrappedContext { wrapped, .. } => wrapped.downcast_ref::<E>(),
        candle_core::Error::Context { inner, .. }
        | candle_core::Error::WithPath { inner, .. }
        | candle_core::Error::WithBacktrace { inner, .. } => downcast(inner),
        _ => None,
    }
}
