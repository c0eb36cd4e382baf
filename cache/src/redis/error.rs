//! Redis failures, classified once by `keel_core::redis::RedisError` and
//! turned into the cache's [`CacheError`] here.

use keel_core::redis::{RedisError, RedisErrorKind};

use crate::error::CacheError;

impl From<RedisError> for CacheError {
    fn from(err: RedisError) -> Self {
        match err.redis_kind() {
            RedisErrorKind::Unavailable => CacheError::Unavailable {
                message: "redis cannot answer right now".into(),
                source: Some(Box::new(err)),
            },
            RedisErrorKind::Server | RedisErrorKind::Protocol => CacheError::Backend {
                message: "redis refused the command".into(),
                source: Some(Box::new(err)),
            },
            // A kind added to keel-core later: waiting is the safe guess for
            // a cache (a miss, never a failed request).
            _ => CacheError::Unavailable {
                message: "redis failed".into(),
                source: Some(Box::new(err)),
            },
        }
    }
}

impl From<::redis::RedisError> for CacheError {
    fn from(err: ::redis::RedisError) -> Self {
        CacheError::from(RedisError::from(err))
    }
}

#[cfg(test)]
mod tests {
    use keel_core::{ErrorKind, KeelError};
    use keel_testkit::redis_error_reply;

    use super::*;

    #[test]
    fn loading_is_retryable_and_unavailable() {
        let err = CacheError::from(redis_error_reply(
            "LOADING Redis is loading the dataset in memory",
        ));
        assert!(err.is_retryable(), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Unavailable { retry_after: None });
        assert!(matches!(err, CacheError::Unavailable { .. }));
        // The core classification is the source, for logs and `kind_of`.
        let source = std::error::Error::source(&err).expect("a source");
        assert!(source.is::<RedisError>());
    }

    #[test]
    fn wrong_type_is_a_backend_error() {
        let err = CacheError::from(redis_error_reply(
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ));
        assert!(matches!(err, CacheError::Backend { .. }), "{err:?}");
        assert!(!err.is_retryable());
        assert_eq!(err.kind(), ErrorKind::Internal);
    }

    #[test]
    fn refused_connections_are_unavailable() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let err = CacheError::from(::redis::RedisError::from(io));
        assert!(err.is_retryable());
        assert!(matches!(err, CacheError::Unavailable { .. }));
    }
}
