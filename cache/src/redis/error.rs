//! The Redis backend's private error, classified into [`crate::Error`] in one place.

use crate::error::Error;

/// What can go wrong talking to Redis.
#[derive(Debug)]
pub(crate) enum RedisFailure {
    /// The client library failed.
    Redis(::redis::RedisError),
    /// The pool could not hand out a connection.
    Pool(deadpool_redis::PoolError),
}

impl From<::redis::RedisError> for RedisFailure {
    fn from(err: ::redis::RedisError) -> Self {
        RedisFailure::Redis(err)
    }
}

impl From<deadpool_redis::PoolError> for RedisFailure {
    fn from(err: deadpool_redis::PoolError) -> Self {
        RedisFailure::Pool(err)
    }
}

impl From<RedisFailure> for Error {
    fn from(failure: RedisFailure) -> Self {
        match failure {
            RedisFailure::Redis(err)
                if err.is_timeout()
                    || err.is_io_error()
                    || err.is_connection_dropped()
                    || err.is_connection_refusal()
                    || err.is_unrecoverable_error() =>
            {
                Error::unavailable(
                    "redis connection failed; it will be re-established on the next call",
                    err,
                )
            }
            RedisFailure::Redis(err) => Error::Backend {
                message: "redis answered with an error".into(),
                source: Some(err.into()),
            },
            RedisFailure::Pool(deadpool_redis::PoolError::Backend(err)) => {
                Error::from(RedisFailure::Redis(err))
            }
            RedisFailure::Pool(err) => Error::unavailable("no redis connection available", err),
        }
    }
}
