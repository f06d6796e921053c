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
    /// let e = grad_core::Error::shape_mismatch("clip", "grad", "[2, 3]", &[3, 2]);
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
