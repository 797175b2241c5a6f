//! [`HandlerError`]: everything that can go wrong loading a model or running a batch.
//!
//! candle and tokenizers errors are kept as sources, with context naming the file or
//! step, so the server can log the whole chain while showing clients a short message.

use std::path::PathBuf;

/// The error type of the handlers crate.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// A file the model needs is not in its archive.
    #[error("model file `{0}` is missing from the archive")]
    MissingFile(String),

    /// A model file exists but cannot be read or parsed.
    #[error("cannot read model file `{file}`: {reason}")]
    BadFile { file: String, reason: String },

    /// An I/O error while reading model files.
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The request body is not a valid input for this handler (a client error).
    #[error("{0}")]
    Input(String),

    /// A tensor operation failed while loading or running the model.
    #[error("{context}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },

    /// The tokenizer failed.
    #[error("{context}: {source}")]
    Tokenizer {
        context: String,
        #[source]
        source: tokenizers::Error,
    },

    /// The model or option is valid but this build cannot serve it.
    #[error("{0}")]
    Unsupported(String),

    /// The handler panicked while running a batch.
    #[error("handler panicked: {0}")]
    Panicked(String),
}

impl HandlerError {
    /// True when the error is the client's fault (bad input), false when it is the
    /// model's or the server's.
    pub fn is_client_error(&self) -> bool {
        matches!(self, HandlerError::Input(_))
    }

    pub(crate) fn bad_file(file: &str, reason: impl std::fmt::Display) -> Self {
        HandlerError::BadFile {
            file: file.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// Adds context to candle results, keeping the candle error as the source.
pub(crate) trait CandleContext<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, HandlerError>;
}

impl<T> CandleContext<T> for Result<T, candle_core::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, HandlerError> {
        self.map_err(|source| HandlerError::Candle {
            context: context(),
            source,
        })
    }
}
