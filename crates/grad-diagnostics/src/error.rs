//! grad-diagnostics' error type.

use std::path::PathBuf;

/// grad-diagnostics' result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong observing, logging or plotting.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A shared check failed (see [`grad_core::Error`]).
    #[error(transparent)]
    Core(#[from] grad_core::Error),

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },

    /// A record could not be encoded as JSON.
    #[error("cannot encode a record: {0}")]
    Encode(#[from] serde_json::Error),

    /// A log holds no readable record.
    #[error("{path}: no readable record in the log")]
    EmptyLog {
        /// The log.
        path: PathBuf,
    },

    /// Drawing a plot failed.
    #[error("cannot draw {path}: {message}")]
    Plot {
        /// The plot file.
        path: PathBuf,
        /// The drawing backend's message.
        message: String,
    },

    /// An error raised by candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// An I/O error on `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Converts to candle's error type, so `?` works in a function returning `candle_core::Result`:
/// a candle error inside comes back as it was; any other stays reachable with
/// [`grad_core::downcast::<Error>`](grad_core::downcast).
impl From<Error> for candle_core::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Candle(e) => e,
            other => grad_core::to_candle(other),
        }
    }
}
