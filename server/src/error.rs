//! [`Error`]: the server crate's one error type, and [`ErrorKind`], the classification
//! that `http::error` turns into a status code. Nothing else in the crate knows HTTP
//! statuses.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use spillway_handlers::{ErrorClass, HandlerError};

/// How an error is reported to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Unknown model, version or archive (404).
    NotFound,
    /// Malformed or invalid request (400).
    BadRequest,
    /// Body larger than `max_request_size` (413).
    PayloadTooLarge,
    /// The model's job queue is full (503, with Retry-After).
    QueueFull,
    /// Not answered within the model's response timeout (504).
    Timeout,
    /// A device ran out of memory loading or running the model (507, saying what ran out).
    InsufficientStorage,
    /// The model is loading, failed to load or is being removed (503).
    NotReady,
    /// The model or version already exists, or the change is not allowed now (409).
    Conflict,
    /// Missing or wrong bearer token (401).
    Unauthorized,
    /// The path exists but does not take this method (405).
    MethodNotAllowed,
    /// A body in a format the endpoint does not read (415).
    UnsupportedMediaType,
    /// Request headers larger than the server reads (431).
    HeadersTooLarge,
    /// The request's body did not arrive within `request_read_timeout` (408).
    RequestTimeout,
    /// The server's or the model's fault (500).
    Internal,
}

/// The server's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Model not found: {0}")]
    ModelNotFound(String),

    #[error("Model version not found: {name} version {version}")]
    VersionNotFound { name: String, version: String },

    #[error("archive not found in the model store: {0}")]
    ArchiveNotFound(String),

    #[error("{0}")]
    BadRequest(String),

    #[error("invalid archive {path}: {reason}")]
    BadArchive { path: PathBuf, reason: String },

    #[error("invalid {file}: {reason}")]
    BadConfig { file: String, reason: String },

    /// Building the model from its files failed; the cause keeps its class (the
    /// archive's, a resource's, or an internal fault).
    #[error("cannot load the model from {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: Box<HandlerError>,
    },

    #[error("cannot place the model: {0}{hint}", hint = gpu_hint(.0))]
    Plan(spillway_placement::PlanError),

    /// The device manager has no room for the model, even after evicting every model
    /// it may evict.
    #[error("no room for model {model}: {refusal}")]
    NoRoom {
        model: String,
        refusal: spillway_placement::ledger::Refusal,
    },

    #[error("request body is larger than max_request_size ({limit} bytes)")]
    PayloadTooLarge { limit: usize },

    #[error("Model \"{model}\" has no free slot in its job queue ({capacity} jobs); retry later")]
    QueueFull { model: String, capacity: usize },

    #[error("Model \"{model}\" did not answer within its response timeout of {timeout:?}")]
    Timeout { model: String, timeout: Duration },

    #[error("the request body did not arrive within {within:?} (request_read_timeout)")]
    BodyTimeout { within: Duration },

    #[error("Model \"{model}\" is not ready: {state}")]
    NotReady { model: String, state: String },

    /// A request on a model whose load failed: answered with the failure's class (a
    /// bad archive 400, no memory 507, a fault 500; past its startup timeout 503).
    #[error("Model \"{model}\" failed to load: {reason}")]
    LoadFailed {
        model: String,
        reason: String,
        kind: ErrorKind,
    },

    #[error("{0}")]
    Conflict(String),

    #[error("missing or invalid bearer token")]
    Unauthorized,

    /// A handler error. Shared, because one batch failure answers every job in the batch.
    #[error(transparent)]
    Handler(Arc<HandlerError>),

    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{0}")]
    MethodNotAllowed(String),

    #[error("{0}")]
    UnsupportedMediaType(String),

    #[error("the request's headers hold {size} bytes, more than the {limit} this server reads")]
    HeadersTooLarge { size: usize, limit: usize },

    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The message with every source after it (`a: b: c`), for logs and for describe.
    pub fn chain(&self) -> String {
        chain(self)
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::ModelNotFound(_) | Error::VersionNotFound { .. } | Error::ArchiveNotFound(_) => {
                ErrorKind::NotFound
            }
            Error::BadRequest(_)
            | Error::BadArchive { .. }
            | Error::BadConfig { .. }
            | Error::Plan(_) => ErrorKind::BadRequest,
            Error::PayloadTooLarge { .. } => ErrorKind::PayloadTooLarge,
            Error::NoRoom {
                refusal: spillway_placement::ledger::Refusal::NoSuchGpus(_),
                ..
            } => ErrorKind::BadRequest,
            Error::NoRoom { .. } => ErrorKind::InsufficientStorage,
            Error::QueueFull { .. } => ErrorKind::QueueFull,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::NotReady { .. } => ErrorKind::NotReady,
            Error::LoadFailed { kind, .. } => *kind,
            Error::Conflict(_) => ErrorKind::Conflict,
            Error::Unauthorized => ErrorKind::Unauthorized,
            Error::MethodNotAllowed(_) => ErrorKind::MethodNotAllowed,
            Error::UnsupportedMediaType(_) => ErrorKind::UnsupportedMediaType,
            Error::HeadersTooLarge { .. } => ErrorKind::HeadersTooLarge,
            Error::BodyTimeout { .. } => ErrorKind::RequestTimeout,
            Error::Handler(e) => handler_kind(e),
            Error::Load { source, .. } => handler_kind(source),
            // A full disk while unpacking or converting: storage ran out (507).
            Error::Io { source, .. } if spillway_handlers::error::storage_ran_out(source) => {
                ErrorKind::InsufficientStorage
            }
            Error::Io { .. } | Error::Internal(_) => ErrorKind::Internal,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }

    /// Wraps a failure to build the model from the archive at `path`, keeping its class.
    pub(crate) fn load(path: impl Into<PathBuf>) -> impl FnOnce(HandlerError) -> Error {
        let path = path.into();
        move |source| Error::Load {
            path,
            source: Box::new(source),
        }
    }

    pub(crate) fn bad_archive(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Error {
        Error::BadArchive {
            path: path.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn bad_config(file: impl Into<String>, reason: impl std::fmt::Display) -> Error {
        Error::BadConfig {
            file: file.into(),
            reason: reason.to_string(),
        }
    }
}

/// How a handler's error is reported, by its class.
fn handler_kind(error: &HandlerError) -> ErrorKind {
    match error.class() {
        // Bad input, or an archive whose files cannot be served: the client's to fix.
        ErrorClass::Input | ErrorClass::Model => ErrorKind::BadRequest,
        ErrorClass::Exhausted => ErrorKind::InsufficientStorage,
        // Its files changed under it: it is loaded again from them.
        ErrorClass::Unavailable => ErrorKind::NotReady,
        ErrorClass::Internal => ErrorKind::Internal,
    }
}

/// Why no GPU is there, when a plan asks for one that is not.
fn gpu_hint(error: &spillway_placement::PlanError) -> String {
    match error {
        spillway_placement::PlanError::Unavailable { device, .. } if device.starts_with("cuda") => {
            spillway_handlers::gpu::probe()
                .unavailable()
                .map(|why| format!("; {why}"))
                .unwrap_or_default()
        }
        _ => String::new(),
    }
}

impl From<spillway_placement::PlanError> for Error {
    fn from(e: spillway_placement::PlanError) -> Self {
        Error::Plan(e)
    }
}

impl From<HandlerError> for Error {
    fn from(e: HandlerError) -> Self {
        Error::Handler(Arc::new(e))
    }
}

/// Any error's message with every source after it (`a: b: c`).
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Transparent wrappers repeat their source's message; say it once.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
