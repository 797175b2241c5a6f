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

    /// The weights cannot be built into the model (a tensor missing, or of another shape
    /// than config.json says): the archive's to fix.
    #[error("{context}")]
    BadWeights {
        context: String,
        #[source]
        source: candle_core::Error,
    },

    /// A tensor operation failed while running the model.
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

    /// A device ran out of memory (resource exhaustion, not a fault).
    #[error("{context}: out of memory")]
    OutOfMemory {
        context: String,
        #[source]
        source: candle_core::Error,
    },

    /// A weight file was truncated or rewritten while mapped: what was read from it
    /// since cannot be trusted, and the model must be loaded again from the file as it
    /// is now.
    #[error("model file {} changed while the model served from it ({why}); the model is loaded again from the file as it is now", path.display())]
    WeightsChanged { path: PathBuf, why: String },

    /// The handler panicked while running a batch.
    #[error("handler panicked: {0}")]
    Panicked(String),
}

/// Whose problem an error is, which decides how it is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request is not valid for this model (the client's to fix).
    Input,
    /// The model's files or configuration cannot be served (the archive's to fix; the
    /// message names the file).
    Model,
    /// A resource ran out (memory on a device).
    Exhausted,
    /// The model cannot answer now, but will once loaded again (its files changed).
    Unavailable,
    /// A fault in the server or model code.
    Internal,
}

impl HandlerError {
    /// True when the error is the client's fault (bad input), false when it is the
    /// model's or the server's.
    pub fn is_client_error(&self) -> bool {
        self.class() == ErrorClass::Input
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            HandlerError::Input(_) => ErrorClass::Input,
            HandlerError::MissingFile(_)
            | HandlerError::BadFile { .. }
            | HandlerError::BadWeights { .. }
            | HandlerError::Unsupported(_) => ErrorClass::Model,
            HandlerError::OutOfMemory { .. } => ErrorClass::Exhausted,
            // A full disk (or quota) while writing converted or offloaded weights.
            HandlerError::Io { source, .. } if storage_ran_out(source) => ErrorClass::Exhausted,
            HandlerError::WeightsChanged { .. } => ErrorClass::Unavailable,
            HandlerError::Io { .. }
            | HandlerError::Candle { .. }
            | HandlerError::Tokenizer { .. }
            | HandlerError::Panicked(_) => ErrorClass::Internal,
        }
    }

    pub(crate) fn bad_file(file: &str, reason: impl std::fmt::Display) -> Self {
        HandlerError::BadFile {
            file: file.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// Whether an I/O error says the disk (or the user's quota on it) is full.
pub fn storage_ran_out(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// Adds context to candle results, keeping the candle error as the source.
pub(crate) trait CandleContext<T> {
    /// A failure while computing (an internal fault, or a device out of memory).
    fn context(self, context: impl FnOnce() -> String) -> Result<T, HandlerError>;

    /// A failure while building the model from its weights (the archive's, or a device
    /// out of memory).
    fn weights_context(self, context: impl FnOnce() -> String) -> Result<T, HandlerError>;
}

impl<T> CandleContext<T> for Result<T, candle_core::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, HandlerError> {
        self.map_err(|source| {
            classify(source, context(), |context, source| HandlerError::Candle {
                context,
                source,
            })
        })
    }

    fn weights_context(self, context: impl FnOnce() -> String) -> Result<T, HandlerError> {
        self.map_err(|source| {
            classify(source, context(), |context, source| {
                HandlerError::BadWeights { context, source }
            })
        })
    }
}

/// `source` as `OutOfMemory` when it says a device ran out, else as `otherwise` says.
fn classify(
    source: candle_core::Error,
    context: String,
    otherwise: impl FnOnce(String, candle_core::Error) -> HandlerError,
) -> HandlerError {
    if is_out_of_memory(&source) {
        HandlerError::OutOfMemory { context, source }
    } else {
        otherwise(context, source)
    }
}

/// Whether a candle error says a device ran out of memory. candle has no variant for
/// it: CUDA reports `CUDA_ERROR_OUT_OF_MEMORY` through its driver error, the CPU an
/// allocation failure (which aborts the process before it could be seen here).
fn is_out_of_memory(error: &candle_core::Error) -> bool {
    let text = error.to_string().to_ascii_lowercase();
    text.contains("out_of_memory") || text.contains("out of memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_errors_keep_their_class() {
        let oom: Result<(), _> = Err(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ));
        let err = oom
            .context(|| "cannot load unit model.layers.3".into())
            .expect_err("oom");
        assert_eq!(err.class(), ErrorClass::Exhausted, "{err}");
        assert!(err.to_string().contains("model.layers.3"));
        let shape = || -> Result<(), _> { Err(candle_core::Error::Msg("shape mismatch".into())) };
        let err = shape().context(|| "forward".into()).expect_err("fault");
        assert_eq!(err.class(), ErrorClass::Internal, "running: a fault");
        let err = shape()
            .weights_context(|| "cannot load unit encoder.layer.0".into())
            .expect_err("bad weights");
        assert_eq!(err.class(), ErrorClass::Model, "loading: the archive's");
        assert_eq!(HandlerError::Input("x".into()).class(), ErrorClass::Input);
        assert_eq!(
            HandlerError::bad_file("config.json", "no").class(),
            ErrorClass::Model
        );
    }
}
