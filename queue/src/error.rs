//! The one error type of `keel-queue`.

use std::time::Duration;

use keel_core::{ArgumentError, ConfigError, ErrorKind, KeelError};

/// A boxed error from a backend library, kept as the [`std::error::Error::source`].
pub use keel_core::BoxError;

/// What went wrong in a queue operation.
///
/// Every variant says whether trying again can help: see
/// [`QueueError::is_retryable`]. Backend errors are classified into these
/// variants in exactly one place per backend; no backend library type appears
/// here. It implements [`KeelError`], so an application maps it (and any Keel
/// error) with one `match` over [`ErrorKind`]; it is registered with
/// [`keel_core::kind_of`], so it keeps its kind inside a `BoxError`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The backend could not be reached or dropped the connection.
    ///
    /// The operation may or may not have taken effect; the queue is
    /// at-least-once, so retrying an `enqueue` can create a duplicate unless
    /// the job carries an idempotency key.
    #[error("queue backend unavailable: {message}")]
    Unavailable {
        /// What was being attempted, and what failed.
        message: String,
        /// The underlying cause.
        #[source]
        source: Option<BoxError>,
    },
    /// The backend did not answer within the configured operation timeout.
    #[error("queue operation timed out after {0:?}; the backend is slow or unreachable")]
    Timeout(Duration),
    /// The queue holds its configured maximum of jobs; the job was not enqueued.
    ///
    /// This is backpressure: slow the producer down and try again later.
    #[error("queue is full ({capacity} jobs); retry later or raise `capacity`")]
    Full {
        /// The configured capacity.
        capacity: u64,
    },
    /// The receipt no longer names a job leased to the caller: the lease
    /// expired (the job went back to the queue or to the dead letters), or the
    /// job was already acked or nacked.
    #[error("receipt is not valid: {0}")]
    InvalidReceipt(String),
    /// The backend does not support this operation or option; see
    /// [`QueueCapabilities`](crate::QueueCapabilities).
    #[error("unsupported by the {backend} backend: {what}")]
    Unsupported {
        /// The backend's name.
        backend: &'static str,
        /// The operation or option.
        what: String,
    },
    /// A payload or stored record could not be encoded or decoded.
    #[error("codec error: {message}")]
    Codec {
        /// What could not be decoded, and why.
        message: String,
        /// The underlying cause.
        #[source]
        source: Option<BoxError>,
    },
    /// An argument is out of range (for example a priority above the
    /// configured levels); the [`ArgumentError`] names it.
    #[error(transparent)]
    InvalidArgument(#[from] ArgumentError),
    /// A configuration field is invalid; the component was not built. The
    /// [`ConfigError`] names the field.
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    /// The backend answered with an error we did not expect.
    #[error("queue backend error: {message}")]
    Backend {
        /// What was being attempted.
        message: String,
        /// The underlying cause.
        #[source]
        source: Option<BoxError>,
    },
}

impl QueueError {
    /// Whether trying the same operation again may succeed.
    ///
    /// An exhaustive match with no `_` arm: a new variant forces a decision.
    pub fn is_retryable(&self) -> bool {
        match self {
            QueueError::Unavailable { .. } => true,
            QueueError::Timeout(_) => true,
            QueueError::Full { .. } => true,
            QueueError::InvalidReceipt(_) => false,
            QueueError::Unsupported { .. } => false,
            QueueError::Codec { .. } => false,
            QueueError::InvalidArgument(_) => false,
            QueueError::InvalidConfig(_) => false,
            QueueError::Backend { .. } => false,
        }
    }

    #[allow(dead_code)] // used by the network backends
    pub(crate) fn unavailable(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        QueueError::Unavailable {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        QueueError::InvalidConfig(ConfigError::new(field, reason))
    }
}

impl KeelError for QueueError {
    /// An exhaustive match with no `_` arm: a new variant forces a decision.
    fn kind(&self) -> ErrorKind {
        match self {
            QueueError::Unavailable { .. } => ErrorKind::Unavailable { retry_after: None },
            QueueError::Timeout(_) => ErrorKind::DeadlineExceeded,
            QueueError::Full { .. } => ErrorKind::QueueFull,
            QueueError::InvalidReceipt(_) => ErrorKind::NotFound,
            QueueError::Unsupported { .. } => ErrorKind::Internal,
            QueueError::Codec { .. } => ErrorKind::InvalidInput,
            QueueError::InvalidArgument(_) => ErrorKind::InvalidInput,
            QueueError::InvalidConfig(_) => ErrorKind::Internal,
            QueueError::Backend { .. } => ErrorKind::Internal,
        }
    }

    fn is_retryable(&self) -> bool {
        QueueError::is_retryable(self)
    }
}

keel_core::register_error_kind!(QueueError);

/// `Result` with the queue's [`QueueError`].
pub(crate) type Result<T, E = QueueError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_is_retryable_and_config_is_not() {
        assert!(QueueError::Full { capacity: 3 }.is_retryable());
        assert!(!QueueError::config("capacity", "must be > 0").is_retryable());
        assert!(QueueError::Timeout(Duration::from_secs(1)).is_retryable());
    }

    #[test]
    fn kinds_map_in_one_match() {
        assert_eq!(
            QueueError::Full { capacity: 3 }.kind(),
            ErrorKind::QueueFull
        );
        assert_eq!(
            QueueError::Timeout(Duration::from_secs(1)).kind(),
            ErrorKind::DeadlineExceeded
        );
        assert_eq!(
            QueueError::config("capacity", "must be > 0").kind(),
            ErrorKind::Internal
        );
        let codec = QueueError::Codec {
            message: "bad".into(),
            source: None,
        };
        assert_eq!(codec.kind(), ErrorKind::InvalidInput);
        // Behind a BoxError (a tower stack), the kind is still found.
        let boxed: BoxError = Box::new(QueueError::Full { capacity: 1 });
        assert_eq!(keel_core::kind_of(boxed.as_ref()), ErrorKind::QueueFull);
    }

    #[test]
    fn config_error_names_the_field() {
        let msg = QueueError::config("priority_levels", "must be between 1 and 16").to_string();
        assert!(msg.contains("priority_levels"), "{msg}");
    }
}
