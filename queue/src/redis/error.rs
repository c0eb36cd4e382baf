//! The Redis backend's private error, classified into [`crate::Error`] in one place.

use crate::error::Error;

/// What can go wrong talking to Redis.
#[derive(Debug)]
pub(crate) enum RedisFailure {
    /// The client library failed.
    Redis(::redis::RedisError),
    /// The pool could not hand out a connection.
    Pool(deadpool_redis::PoolError),
    /// Redis answered something our scripts never return.
    Protocol(String),
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

impl From<::redis::ParsingError> for RedisFailure {
    fn from(err: ::redis::ParsingError) -> Self {
        RedisFailure::Protocol(err.to_string())
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
                    || err.is_unrecoverable_error()
                    || coming_back(&err) =>
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
            RedisFailure::Protocol(message) => Error::Backend {
                message: format!("unexpected answer from redis: {message}"),
                source: None,
            },
        }
    }
}

/// LOADING, TRYAGAIN, MASTERDOWN, CLUSTERDOWN: the server is coming back and
/// waiting helps, also when the answer came for a command inside a pipeline
/// or an aborted transaction.
fn coming_back(err: &::redis::RedisError) -> bool {
    let transient = |err: &::redis::RedisError| {
        matches!(
            err.retry_method(),
            ::redis::RetryMethod::WaitAndRetry | ::redis::RetryMethod::RetryImmediately
        )
    };
    transient(err)
        || err.clone().into_server_errors().is_some_and(|errors| {
            errors
                .iter()
                .any(|(_, error)| transient(&error.clone().into()))
        })
}
