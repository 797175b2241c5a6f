//! Errors as HTTP responses: the status for each [`ErrorKind`] and TorchServe's body
//! shape `{"code": N, "type": "...", "message": "..."}`. Internal errors are logged
//! with their whole source chain and answered with a generic message.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
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
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
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
            ErrorKind::MethodNotAllowed => "MethodNotAllowedException",
            ErrorKind::UnsupportedMediaType => "UnsupportedMediaTypeException",
            ErrorKind::HeadersTooLarge => "RequestHeaderFieldsTooLargeException",
            ErrorKind::RequestTimeout => "RequestTimeoutException",
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

/// Gives every error answer a JSON body in its API's shape: OpenAI's under `/v1/`, KServe's
/// under `/v2/`, TorchServe's elsewhere. Handlers' own errors already have one; this
/// catches what axum answers before a handler runs, as plain text or an empty body: an
/// extractor's rejection (a body past `max_request_size` (the state), a path segment that
/// is not UTF-8) and 405 for a method a path does not take.
///
/// A 413 also says `Connection: close`: the body it refused was not read, so the connection
/// cannot carry another request, and a client that reused it would lose its next one.
pub async fn json_errors(
    limit: usize,
    method: &axum::http::Method,
    path: &str,
    response: Response,
) -> Response {
    let mut response = as_json(limit, method, path, response).await;
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads the request's body whole within `within` (a client trickling its body holds a
/// task and a connection slot no longer) and at most `limit` bytes (413 as soon as more
/// arrive: a body declared far larger is never read whole; refusing it before reading
/// any would cut off clients still writing it, which then never see the 413), then passes the request on with the body in memory (every
/// handler reads it whole anyway). A body too slow is answered 408 and its connection
/// closed (it is half read).
pub async fn read_body_within(
    limit: usize,
    within: std::time::Duration,
    request: Request,
) -> Result<Request, Response> {
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(within, axum::body::to_bytes(body, limit)).await;
    match read {
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, axum::body::Body::from(bytes))),
        // Past the limit (or the connection failed): json_errors gives it its body.
        Ok(Err(_)) => Err(StatusCode::PAYLOAD_TOO_LARGE.into_response()),
        Err(_) => {
            let error = Error::BodyTimeout { within };
            let mut response = in_shape_of(parts.uri.path(), &error);
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(response)
        }
    }
}

/// `response` with a JSON body in its API's shape, if it is an error without one.
async fn as_json(
    limit: usize,
    method: &axum::http::Method,
    path: &str,
    response: Response,
) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    if status == StatusCode::NOT_FOUND {
        return unknown_endpoint(path.parse().unwrap_or_default()).await;
    }
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => Error::PayloadTooLarge { limit },
        StatusCode::METHOD_NOT_ALLOWED => {
            Error::MethodNotAllowed(format!("{method} is not allowed on {path}"))
        }
        s if s.is_server_error() => Error::Internal(text),
        _ if text.is_empty() => Error::BadRequest(format!("{method} {path}: {status}")),
        _ => Error::BadRequest(text),
    };
    in_shape_of(path, &error)
}

/// `error` answered in the shape of the API that `path` belongs to: OpenAI's under `/v1/`,
/// KServe's under `/v2/`, TorchServe's elsewhere.
fn in_shape_of(path: &str, error: &Error) -> Response {
    let body = if path.starts_with("/v1/") {
        crate::http::openai::error_body(error)
    } else if path.starts_with("/v2/") {
        json!({"error": error.public_message()})
    } else {
        error.body()
    };
    (error.kind().status(), axum::Json(body)).into_response()
}

/// Refuses, with 415, a body whose declared type is not one the JSON protocols read:
/// JSON (`application/json`, `*/*+json`), or what clients send for it when not told
/// otherwise (`application/x-www-form-urlencoded` from `curl -d`, `text/plain`), or
/// KServe's binary extension (`application/octet-stream`). XML, multipart and the like are
/// refused rather than parsed as JSON. No content type is taken as JSON.
pub async fn json_bodies_only(request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("?").to_ascii_lowercase());
    if let Some(declared) = declared {
        let essence = declared.split(';').next().unwrap_or("").trim();
        let readable = essence == "application/json"
            || essence.ends_with("+json")
            || matches!(
                essence,
                "application/x-www-form-urlencoded" | "text/plain" | "application/octet-stream"
            );
        if !readable {
            let error = Error::UnsupportedMediaType(format!(
                "the body is declared {essence:?}; this endpoint reads JSON (application/json)"
            ));
            return in_shape_of(request.uri().path(), &error);
        }
    }
    next.run(request).await
}

/// Bytes of request headers (names and values) a request may carry. Netty, under
/// TorchServe, stops at 8 KiB per header line; 64 KiB in all leaves room for long bearer
/// tokens and cookies. (hyper itself buffers at most about 400 KiB before this runs.)
pub const MAX_HEADER_BYTES: usize = 64 << 10;

/// The 431 for a request whose headers pass [`MAX_HEADER_BYTES`], if they do.
pub fn headers_too_large(request: &Request) -> Option<Response> {
    let size: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    (size > MAX_HEADER_BYTES).then(|| {
        Error::HeadersTooLarge {
            size,
            limit: MAX_HEADER_BYTES,
        }
        .into_response()
    })
}
