//! The one classification of Redis failures.

use std::fmt;

use crate::error::{ErrorKind, KeelError};

/// What kind of Redis failure happened, decided in one place for every
/// Keel crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RedisErrorKind {
    /// The server cannot be used right now and waiting helps: connection
    /// refused, dropped or timed out, no pooled connection in time, or the
    /// server is coming back (`LOADING`, `TRYAGAIN`, `MASTERDOWN`,
    /// `CLUSTERDOWN`, a failover's `READONLY`), or a cluster moved the slot
    /// (`MOVED`, `ASK`: the cluster client follows those itself, so one
    /// reaches the caller only when its retries ran out mid-resharding),
    /// also when that answer came for a command inside a pipeline or an
    /// aborted transaction.
    Unavailable,
    /// The server answered a command with an error that waiting does not
    /// fix (a wrong type, a script error).
    Server,
    /// The server answered something Keel's commands never return.
    Protocol,
}

/// A Redis failure, classified. Every Keel crate wraps it as the
/// `#[source]` of its own error.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RedisError {
    kind: RedisErrorKind,
    message: String,
    #[source]
    source: Option<crate::BoxError>,
}

impl RedisError {
    /// A failure of `kind` described by `message`.
    pub fn new(kind: RedisErrorKind, message: impl Into<String>) -> Self {
        RedisError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// The same error with `source` as its cause.
    pub fn with_source(mut self, source: impl Into<crate::BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The classification.
    pub fn redis_kind(&self) -> RedisErrorKind {
        self.kind
    }

    /// Whether waiting and trying again can help.
    pub fn is_retryable(&self) -> bool {
        match self.kind {
            RedisErrorKind::Unavailable => true,
            RedisErrorKind::Server | RedisErrorKind::Protocol => false,
        }
    }

    /// The same error with `context` in front of its message (e.g. which
    /// server did not answer and how to start it).
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl KeelError for RedisError {
    fn kind(&self) -> ErrorKind {
        match self.kind {
            RedisErrorKind::Unavailable => ErrorKind::Unavailable { retry_after: None },
            RedisErrorKind::Server | RedisErrorKind::Protocol => ErrorKind::Internal,
        }
    }
}

crate::register_error_kind!(RedisError);

impl From<::redis::RedisError> for RedisError {
    fn from(err: ::redis::RedisError) -> Self {
        if is_unavailable(&err) {
            RedisError::new(
                RedisErrorKind::Unavailable,
                "redis is unavailable; the connection is re-established on the next call",
            )
            .with_source(err)
        } else {
            RedisError::new(RedisErrorKind::Server, "redis answered with an error").with_source(err)
        }
    }
}

impl From<deadpool_redis::PoolError> for RedisError {
    fn from(err: deadpool_redis::PoolError) -> Self {
        match err {
            deadpool_redis::PoolError::Backend(err) => RedisError::from(err),
            other => RedisError::new(
                RedisErrorKind::Unavailable,
                "no redis connection available in time",
            )
            .with_source(other),
        }
    }
}

impl From<::redis::ParsingError> for RedisError {
    fn from(err: ::redis::ParsingError) -> Self {
        RedisError::new(
            RedisErrorKind::Protocol,
            format!("unexpected answer from redis: {err}"),
        )
    }
}

/// Whether waiting helps for this client error.
fn is_unavailable(err: &::redis::RedisError) -> bool {
    err.is_timeout()
        || err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_unrecoverable_error()
        || coming_back(err)
}

/// LOADING, TRYAGAIN, MASTERDOWN, CLUSTERDOWN, READONLY: the server is
/// coming back and waiting helps, also when the answer came for a command
/// inside a pipeline or an aborted transaction.
fn coming_back(err: &::redis::RedisError) -> bool {
    let transient = |err: &::redis::RedisError| {
        matches!(
            err.retry_method(),
            ::redis::RetryMethod::WaitAndRetry
                | ::redis::RetryMethod::RetryImmediately
                | ::redis::RetryMethod::Reconnect
                | ::redis::RetryMethod::ReconnectFromInitialConnections
                | ::redis::RetryMethod::MovedRedirect
                | ::redis::RetryMethod::AskRedirect
        ) || err.code() == Some("READONLY")
    };
    transient(err)
        || err.clone().into_server_errors().is_some_and(|errors| {
            errors
                .iter()
                .any(|(_, error)| transient(&error.clone().into()))
        })
}

#[cfg(test)]
mod tests {
    use keel_testkit::redis_error_reply;

    use super::*;

    #[test]
    fn loading_and_failover_are_retryable() {
        for text in [
            "LOADING Redis is loading the dataset in memory",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "MASTERDOWN Link with MASTER is down",
            "CLUSTERDOWN The cluster is down",
            "READONLY You can't write against a read only replica.",
        ] {
            let err = RedisError::from(redis_error_reply(text));
            assert_eq!(err.redis_kind(), RedisErrorKind::Unavailable, "{text}");
            assert!(err.is_retryable());
            assert_eq!(err.kind(), ErrorKind::Unavailable { retry_after: None });
        }
    }

    #[test]
    fn cluster_redirections_are_retryable() {
        for text in [
            "MOVED 3999 127.0.0.1:6381",
            "ASK 3999 127.0.0.1:6381",
            "CLUSTERDOWN Hash slot not served",
            "TRYAGAIN Multiple keys request during rehashing of slot",
        ] {
            let err = RedisError::from(redis_error_reply(text));
            assert_eq!(err.redis_kind(), RedisErrorKind::Unavailable, "{text}");
            assert!(err.is_retryable(), "{text}");
        }
        // Keys of several slots in one command: waiting does not fix it.
        let err = RedisError::from(redis_error_reply(
            "CROSSSLOT Keys in request don't hash to the same slot",
        ));
        assert_eq!(err.redis_kind(), RedisErrorKind::Server);
        assert!(!err.is_retryable());
    }

    #[test]
    fn wrong_type_is_not_retryable() {
        let err = RedisError::from(redis_error_reply(
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ));
        assert_eq!(err.redis_kind(), RedisErrorKind::Server);
        assert!(!err.is_retryable());
    }

    #[test]
    fn io_errors_are_retryable() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let err = RedisError::from(::redis::RedisError::from(io));
        assert!(err.is_retryable());
    }
}
