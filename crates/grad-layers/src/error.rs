//! grad-layers' error type.

/// grad-layers' result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong building or running a grad-layers layer.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A shared check failed: a hyper-parameter, shape, rank, dtype or device (see
    /// [`grad_core::Error`]).
    #[error(transparent)]
    Core(#[from] grad_core::Error),

    /// Batch statistics need more than one value per channel (PyTorch raises the same).
    #[error(
        "{op}: expected more than 1 value per channel when using batch statistics, got input of shape {shape:?}"
    )]
    TooFewValuesPerChannel {
        /// The operation.
        op: &'static str,
        /// The input's shape.
        shape: Vec<usize>,
    },

    /// The channels cannot be split into equal groups.
    #[error("group_norm: {channels} channels cannot be split into {groups} groups")]
    IndivisibleGroups {
        /// The number of channels.
        channels: usize,
        /// The number of groups asked for.
        groups: usize,
    },

    /// A `dim` argument outside the tensor's rank (negative dims count from the end).
    #[error("{op}: dim {dim} is out of range for a tensor of rank {rank}")]
    DimOutOfRange {
        /// The operation.
        op: &'static str,
        /// The dim asked for.
        dim: isize,
        /// The tensor's rank.
        rank: usize,
    },

    /// A nonlinearity name `calculate_gain` does not know.
    #[error(
        "unknown nonlinearity {0:?} (expected linear, conv1d, conv2d, conv3d, conv_transpose1d, conv_transpose2d, conv_transpose3d, sigmoid, tanh, relu, leaky_relu or selu)"
    )]
    UnknownNonlinearity(String),

    /// LSUV met a layer whose output variance it cannot scale to one.
    #[error(
        "lsuv: layer {layer} has output variance {variance} (zero or not finite), cannot rescale it"
    )]
    DegenerateVariance {
        /// The layer's position in the list given to LSUV.
        layer: usize,
        /// The variance measured.
        variance: f64,
    },

    /// [`reinit`](crate::init::reinit)'s rule for a parameter failed.
    #[error("reinit: parameter {name}: {source}")]
    Reinit {
        /// The parameter.
        name: String,
        /// Why.
        source: Box<Error>,
    },

    /// An error raised by candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// A [`grad_core::Error::RankMismatch`].
    pub(crate) fn rank(
        op: &'static str,
        arg: &'static str,
        expected: &'static str,
        got: usize,
    ) -> Self {
        Self::Core(grad_core::Error::RankMismatch {
            op,
            arg,
            expected,
            got,
        })
    }

    /// A [`grad_core::Error::EmptyInput`].
    pub(crate) fn empty(op: &'static str, what: &'static str) -> Self {
        Self::Core(grad_core::Error::EmptyInput { op, what })
    }
}

/// Converts to candle's error type, so `?` works in a function returning `candle_core::Result`
/// (and the `Module`/`Optimizer` traits can return it): a candle error inside comes back as it
/// was; any other stays reachable with [`grad_core::downcast::<Error>`](grad_core::downcast).
impl From<Error> for candle_core::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Candle(e) => e,
            other => grad_core::to_candle(other),
        }
    }
}
