//! The Redis backend's failures: classified once, by
//! [`keel_core::redis::RedisError`], then mapped into [`crate::QueueError`]
//! here.

use keel_core::redis::{RedisError, RedisErrorKind};

use crate::error::QueueError;

/// What can go wrong talking to Redis: the shared classification.
pub(crate) type RedisFailure = RedisError;

/// Redis answered something our scripts never return.
pub(crate) fn protocol_failure(message: impl Into<String>) -> RedisFailure {
    RedisError::new(
        RedisErrorKind::Protocol,
        format!("unexpected answer from redis: {}", message.into()),
    )
}

impl From<RedisError> for QueueError {
    /// `Unavailable` (connection refused, dropped or timed out, `LOADING`,
    /// failover) is [`QueueError::Unavailable`] and retryable; anything else
    /// is [`QueueError::Backend`]. The core error is kept as the source.
    fn from(err: RedisError) -> Self {
        if err.is_retryable() {
            QueueError::Unavailable {
                message: "redis connection failed; it will be re-established on the next call"
                    .into(),
                source: Some(err.into()),
            }
        } else {
            QueueError::Backend {
                message: "redis answered with an error".into(),
                source: Some(err.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use keel_core::{ErrorKind, KeelError};

    use super::*;

    #[test]
    fn loading_is_retryable_like_everywhere_else() {
        let core = RedisError::new(
            RedisErrorKind::Unavailable,
            "LOADING Redis is loading the dataset in memory",
        );
        let err = QueueError::from(core);
        assert!(err.is_retryable(), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Unavailable { retry_after: None });
        assert!(
            std::error::Error::source(&err)
                .and_then(|s| s.downcast_ref::<RedisError>())
                .is_some(),
            "the core error is the source"
        );
    }

    #[test]
    fn a_server_error_is_not_retryable() {
        let err = QueueError::from(RedisError::new(RedisErrorKind::Server, "WRONGTYPE"));
        assert!(!err.is_retryable());
        assert!(!QueueError::from(protocol_failure("odd")).is_retryable());
    }
}
