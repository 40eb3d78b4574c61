//! Errors a caller can act on. Everything else travels as `anyhow`-style context inside
//! [`Error::Candle`] or [`Error::Other`], but the cases a user hits by pointing the tool at the
//! wrong file, key, shape or prompt each get their own variant that names the culprit.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is not a valid safetensors file (missing or truncated?): {reason}")]
    BadSafetensors { path: PathBuf, reason: String },

    #[error(
        "{path}: tensor `{tensor}` holds {count} non-finite value(s) (NaN or Inf); \
         load with allow_non_finite to inspect it"
    )]
    NonFinite {
        path: PathBuf,
        tensor: String,
        count: usize,
    },

    #[error("{path}: invalid JSON config: {reason}")]
    BadConfig { path: PathBuf, reason: String },

    #[error("tensor `{key}` not found in the checkpoint ({location})")]
    MissingKey { key: String, location: String },

    #[error("tensor `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("unknown connector type `{0}` (supported: linear, mlp2x_gelu, mlp3x_gelu, ...)")]
    UnknownConnector(String),

    #[error("unknown activation `{0}`")]
    UnknownActivation(String),

    #[error("cannot load image {path}: {reason}")]
    BadImage { path: PathBuf, reason: String },

    #[error("{path}: {count} bad record(s): {summary}")]
    BadRecords {
        path: PathBuf,
        count: usize,
        summary: String,
    },

    #[error("prompt error: {0}")]
    Prompt(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("checkpoint not found: {0}")]
    NotFound(String),

    #[error("invalid argument: {0}")]
    Invalid(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A failed write (or folder creation, or rename) of `path`.
    pub fn write(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Write {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Turn candle's loading errors into the typed variants: candle already names the key and
/// the shapes, we only give them a shape a caller can match on.
pub fn classify_candle(err: candle_core::Error, location: &str) -> Error {
    match err {
        candle_core::Error::CannotFindTensor { path } => Error::MissingKey {
            key: path,
            location: location.to_string(),
        },
        candle_core::Error::UnexpectedShape { msg, expected, got } => {
            let key = msg
                .strip_prefix("shape mismatch for ")
                .unwrap_or(&msg)
                .to_string();
            Error::ShapeMismatch {
                key,
                expected: expected.dims().to_vec(),
                found: got.dims().to_vec(),
            }
        }
        candle_core::Error::WithBacktrace { inner, .. } => classify_candle(*inner, location),
        candle_core::Error::Context { inner, context } => match classify_candle(*inner, location) {
            Error::Candle(e) => Error::Candle(e.context(context)),
            other => other,
        },
        other => Error::Candle(other),
    }
}
