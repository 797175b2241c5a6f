//! Errors as HTTP responses: the status for each [`ErrorKind`] and TorchServe's body
//! shape `{"code": N, "type": "...", "message": "..."}`. Internal errors are logged
//! with their whole source chain and answered with a generic message.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::{Error, ErrorKind};

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::QueueFull | ErrorKind::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// TorchServe's exception names.
    fn type_name(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "ModelNotFoundException",
            ErrorKind::BadRequest => "BadRequestException",
            ErrorKind::PayloadTooLarge => "RequestEntityTooLargeException",
            ErrorKind::QueueFull => "ServiceUnavailableException",
            ErrorKind::NotReady => "ServiceUnavailableException",
            ErrorKind::Timeout => "RequestTimeoutException",
            ErrorKind::InsufficientStorage => "InsufficientMemoryException",
            ErrorKind::Conflict => "ConflictStatusException",
            ErrorKind::Unauthorized => "InvalidKeyException",
            ErrorKind::Internal => "InternalServerException",
        }
    }
}

impl Error {
    /// TorchServe's error body.
    pub fn body(&self) -> serde_json::Value {
        let kind = self.kind();
        json!({
            "code": kind.status().as_u16(),
            "type": kind.type_name(),
            "message": self.public_message(),
        })
    }

    /// What a client is told: the whole cause, which it can act on (which file, what
    /// ran out) — except for internal errors, which are logged with their chain and
    /// answered with a generic message.
    pub fn public_message(&self) -> String {
        if self.kind() == ErrorKind::Internal {
            tracing::error!(error = %self.chain(), "internal error");
            "Internal server error; the server log has the details".to_string()
        } else {
            self.chain()
        }
    }
}

/// The answer for paths no route matches.
pub async fn unknown_endpoint(uri: axum::http::Uri) -> Response {
    let message = format!("no such endpoint: {}", uri.path());
    let body = json!({"code": 404, "type": "ResourceNotFoundException", "message": message});
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let kind = self.kind();
        let status = kind.status();
        let body = self.body();
        let mut response = (status, axum::Json(body)).into_response();
        if kind == ErrorKind::QueueFull {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
