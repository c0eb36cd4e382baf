//! Any Keel error as an HTTP answer, in one function: status, `Retry-After`
//! and an OpenAI-style error body (`{"error": {"message", "type", "code"}}`).

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};

use crate::error::{ErrorKind, kind_of};

/// The HTTP answer for an error: build it with [`http_error`] (any error)
/// or [`HttpError::from_kind`].
///
/// ```
/// use keel_core::{ErrorKind, http_error};
///
/// // Whatever the stack returned, boxed or typed:
/// let err: keel_core::BoxError = Box::new(keel_core::ConfigError::new("pool.size", "must be > 0"));
/// let answer = http_error(err.as_ref());
/// assert_eq!(answer.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
/// let response = answer.into_response();
/// assert_eq!(response.headers()["content-type"], "application/json");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpError {
    kind: ErrorKind,
    message: String,
}

/// The HTTP answer for `err`: its [`ErrorKind`] (found with
/// [`kind_of`]) decides the status and `Retry-After`; its `Display` is the
/// message.
pub fn http_error(err: &(dyn std::error::Error + 'static)) -> HttpError {
    HttpError {
        kind: kind_of(err),
        message: err.to_string(),
    }
}

impl HttpError {
    /// The answer for `kind` with `message`.
    pub fn from_kind(kind: ErrorKind, message: impl Into<String>) -> Self {
        HttpError {
            kind,
            message: message.into(),
        }
    }

    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message sent to the client.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The status for the kind: 429 rate-limited; 503 overloaded, queue
    /// full, unavailable; 504 deadline exceeded; 502 upstream failed; 400
    /// invalid input; 404 not found; 499 cancelled; 500 internal.
    pub fn status(&self) -> StatusCode {
        status_of(self.kind)
    }

    /// The OpenAI error `type` for the kind.
    pub fn error_type(&self) -> &'static str {
        match self.kind {
            ErrorKind::RateLimited { .. } => "rate_limit_exceeded",
            ErrorKind::InvalidInput | ErrorKind::NotFound => "invalid_request_error",
            ErrorKind::DeadlineExceeded => "timeout",
            ErrorKind::Overloaded { .. }
            | ErrorKind::QueueFull
            | ErrorKind::Unavailable { .. }
            | ErrorKind::Upstream
            | ErrorKind::Cancelled
            | ErrorKind::Internal => "server_error",
        }
    }

    /// The OpenAI-style JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.error_type(),
                "code": self.kind.as_str(),
            }
        })
    }

    /// The full response: status, `Retry-After` (whole seconds, at least 1)
    /// when the kind carries one, JSON content type and body.
    pub fn into_response(self) -> http::Response<Bytes> {
        let body = Bytes::from(self.body().to_string());
        let mut response = http::Response::new(body);
        *response.status_mut() = self.status();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(after) = self.kind.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, crate::retry_after_value(after));
        }
        response
    }
}

/// The HTTP status for `kind` (see [`HttpError::status`]).
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Overloaded { .. } | ErrorKind::QueueFull | ErrorKind::Unavailable { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Upstream => StatusCode::BAD_GATEWAY,
        ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Cancelled => StatusCode::from_u16(499).expect("499 is a valid status"),
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rate_limited_carries_retry_after() {
        let answer = HttpError::from_kind(
            ErrorKind::RateLimited {
                retry_after: Some(Duration::from_millis(1_200)),
            },
            "slow down",
        );
        let response = answer.into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "2");
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["error"]["code"], "rate_limited");
        assert_eq!(body["error"]["message"], "slow down");
    }

    #[test]
    fn every_kind_has_a_status() {
        for (kind, status) in [
            (ErrorKind::QueueFull, 503),
            (ErrorKind::DeadlineExceeded, 504),
            (ErrorKind::Upstream, 502),
            (ErrorKind::InvalidInput, 400),
            (ErrorKind::NotFound, 404),
            (ErrorKind::Cancelled, 499),
            (ErrorKind::Overloaded { retry_after: None }, 503),
        ] {
            assert_eq!(status_of(kind), status, "{kind}");
        }
    }
}
