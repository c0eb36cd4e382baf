//! Every answer the gateway refuses with, as OpenAI error JSON
//! (`{"error": {"message", "type", "code"}}`).

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use keel_core::{ErrorKind, HttpError};

/// Why the gateway answered with an error.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// No `Authorization: Bearer <key>` header, or a key the gateway does
    /// not know (401).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The body is larger than `max_body_bytes` (413).
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The body is not valid JSON or misses a required field (400).
    #[error("{0}")]
    BadRequest(String),
    /// The model does not exist or the key may not use it (404).
    #[error("the model `{0}` does not exist or you do not have access to it")]
    ModelNotFound(String),
    /// A job id that is unknown or expired (404).
    #[error("no job `{0}` (unknown, or its result expired)")]
    JobNotFound(String),
    /// A Keel component refused or failed: its [`ErrorKind`] decides the
    /// status (429 rate limited, 503 overloaded, 504 deadline, 502
    /// upstream…).
    #[error("{message}")]
    Keel {
        /// The kind.
        kind: ErrorKind,
        /// What happened.
        message: String,
    },
}

impl GatewayError {
    /// The error of any Keel component (or anything in its chain).
    pub fn keel(err: &(dyn std::error::Error + 'static)) -> Self {
        let answer = keel_core::http_error(err);
        GatewayError::Keel {
            kind: answer.kind(),
            message: answer.message().to_owned(),
        }
    }

    /// The same error with `context` (what the gateway was doing, what the
    /// client can do) before its message; the status is unchanged.
    pub fn context(self, context: &str) -> Self {
        match self {
            GatewayError::Keel { kind, message } => GatewayError::Keel {
                kind,
                message: format!("{context}: {message}"),
            },
            other => other,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::ModelNotFound(_) | GatewayError::JobNotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::Keel { kind, .. } => keel_core::status_of(*kind),
        }
    }

    /// A short label for metrics (`outcome` label).
    pub fn label(&self) -> &'static str {
        match self {
            GatewayError::Unauthorized(_) => "unauthorized",
            GatewayError::PayloadTooLarge { .. } => "too_large",
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::ModelNotFound(_) | GatewayError::JobNotFound(_) => "not_found",
            GatewayError::Keel { kind, .. } => kind.as_str(),
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let (error_type, code) = match &self {
            GatewayError::Unauthorized(_) => ("invalid_request_error", "invalid_api_key"),
            GatewayError::PayloadTooLarge { .. } => ("invalid_request_error", "payload_too_large"),
            GatewayError::BadRequest(_) => ("invalid_request_error", "invalid_request"),
            GatewayError::ModelNotFound(_) => ("invalid_request_error", "model_not_found"),
            GatewayError::JobNotFound(_) => ("invalid_request_error", "job_not_found"),
            GatewayError::Keel { kind, message } => {
                return HttpError::from_kind(*kind, message.clone())
                    .into_response()
                    .map(Body::from);
            }
        };
        let body = serde_json::json!({
            "error": {"message": self.to_string(), "type": error_type, "code": code}
        });
        let mut response = (self.status(), body.to_string()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}
