//! The one error type of `keel-health`.

use std::time::Duration;

/// A boxed error, the error type of tower middleware (`tower::BoxError`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong in a health operation or in the circuit breaker.
///
/// Every variant says whether trying again can help: see [`Error::is_retryable`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The circuit breaker is open (or half-open with every trial slot
    /// taken): the request was refused at once, without touching the
    /// endpoint.
    ///
    /// Cheap and retryable: another endpoint (or this one after
    /// `retry_after`) may take it. The default classifier does not count it
    /// as an endpoint failure.
    #[error("endpoint unavailable: {message}")]
    Unavailable {
        /// Why the request was refused.
        message: String,
        /// When the breaker will next admit a trial request, if known.
        retry_after: Option<Duration>,
    },
    /// A half-open trial request did not finish within the breaker's
    /// `trial_timeout`; the breaker opened again.
    #[error("trial request timed out after {0:?}; the endpoint is slow or hung")]
    Timeout(Duration),
    /// No endpoint with this id is registered.
    #[error("unknown endpoint `{0}`")]
    UnknownEndpoint(String),
    /// An endpoint with this id is already registered; remove it first.
    #[error("endpoint `{0}` is already registered")]
    EndpointExists(String),
    /// An argument is out of range (for example a non-positive weight).
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument's name.
        name: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// A configuration field is invalid; the component was not built.
    #[error("invalid health config `{field}`: {reason}")]
    InvalidConfig {
        /// The field's name (dotted for nested sections, e.g. `outlier.window`).
        field: &'static str,
        /// Why it was refused and what is accepted.
        reason: String,
    },
}

impl Error {
    /// Whether trying the same operation again may succeed.
    ///
    /// An exhaustive match with no `_` arm: a new variant forces a decision.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable { .. } => true,
            Error::Timeout(_) => true,
            Error::UnknownEndpoint(_) => false,
            Error::EndpointExists(_) => false,
            Error::InvalidArgument { .. } => false,
            Error::InvalidConfig { .. } => false,
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_is_retryable_and_config_is_not() {
        let open = Error::Unavailable {
            message: "breaker open".into(),
            retry_after: Some(Duration::from_secs(1)),
        };
        assert!(open.is_retryable());
        assert!(Error::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(!Error::config("tick", "must be > 0").is_retryable());
        assert!(!Error::UnknownEndpoint("a".into()).is_retryable());
    }

    #[test]
    fn config_error_names_the_field() {
        let msg = Error::config("outlier.window", "must be > 0").to_string();
        assert!(msg.contains("outlier.window"), "{msg}");
    }
}
