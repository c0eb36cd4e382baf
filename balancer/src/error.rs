//! The one error type of `keel-balancer`.

use std::fmt;
use std::time::Duration;

use crate::endpoint::EndpointId;

/// A boxed error from an endpoint service or a discovery stream, kept as the
/// [`std::error::Error::source`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with the balancer's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong while routing a request.
///
/// Every variant says whether trying again can help: see
/// [`Error::is_retryable`]. Variants that come from one endpoint carry its
/// [`EndpointId`] ([`Error::endpoint`]), which is how the
/// [retry layer](crate::retry) avoids sending the retry to the endpoint that
/// just failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The balancer knows no endpoint it may use for this request: discovery
    /// has not produced any yet, or every endpoint is excluded by the
    /// request's [`AvoidEndpoints`](crate::AvoidEndpoints) (the endpoints
    /// this request already failed on).
    #[error("no endpoint available")]
    NoEndpoints,
    /// Every usable endpoint stayed at its capacity (or answered busy) for the
    /// whole bounded wait, or too many requests were already waiting.
    ///
    /// This is backpressure: the request was never dispatched.
    #[error("every endpoint is at capacity (waited {waited:?}); the fleet is overloaded")]
    Overloaded {
        /// How long the request waited for a free slot.
        waited: Duration,
    },
    /// The request's [`Deadline`](crate::Deadline) passed. Nothing is
    /// dispatched after its deadline.
    #[error("the request's deadline passed")]
    DeadlineExceeded,
    /// One attempt did not finish within the balancer's `attempt_timeout`;
    /// the upstream call was cancelled.
    #[error("endpoint {endpoint} did not answer within {after:?}")]
    Timeout {
        /// The endpoint that did not answer.
        endpoint: EndpointId,
        /// The attempt timeout.
        after: Duration,
    },
    /// The endpoint answered "busy" (HTTP 429 or 503, or whatever the
    /// [classifier](crate::Classify) says). This is backpressure, not a
    /// failure: the endpoint is routed around for a cooldown and its
    /// concurrency is lowered, but it is never counted as failed.
    #[error("endpoint {endpoint} is busy")]
    Busy {
        /// The busy endpoint.
        endpoint: EndpointId,
        /// How long the endpoint asked us to stay away, if it said.
        retry_after: Option<Duration>,
    },
    /// The endpoint failed the request (an error from the endpoint service,
    /// or a response the [classifier](crate::Classify) called a failure).
    #[error("endpoint {endpoint} failed the request")]
    Failed {
        /// The endpoint that failed.
        endpoint: EndpointId,
        /// Whether the classifier said trying elsewhere may succeed.
        retryable: bool,
        /// The endpoint's error, or a description of the failed response.
        #[source]
        source: BoxError,
    },
    /// The request was already retried (or hedged) by a Keel layer and the
    /// layer gave up. Never retryable, so outer layers do not multiply
    /// attempts.
    #[error("gave up after {attempts} attempts ({reason})")]
    RetriesExhausted {
        /// Attempts made, the first one included.
        attempts: u32,
        /// Why no further attempt was made.
        reason: GiveUp,
        /// The last attempt's error.
        #[source]
        source: Box<Error>,
    },
    /// A configuration field is invalid; the component was not built.
    #[error("invalid balancer config `{field}`: {reason}")]
    InvalidConfig {
        /// The field's name.
        field: &'static str,
        /// Why it was refused and what is accepted.
        reason: String,
    },
}

/// Why the [retry layer](crate::retry) stopped retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GiveUp {
    /// The retry budget had no retry left: the fleet is failing more than
    /// the configured ratio of traffic, so retrying would be a retry storm.
    Budget,
    /// Waiting for the next attempt would pass the request's deadline.
    Deadline,
    /// The configured maximum attempts were made.
    MaxAttempts,
}

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GiveUp::Budget => "retry budget exhausted",
            GiveUp::Deadline => "the next attempt would pass the deadline",
            GiveUp::MaxAttempts => "max attempts reached",
        })
    }
}

impl Error {
    /// Whether trying the request again (elsewhere, after a backoff) may
    /// succeed.
    ///
    /// An exhaustive match with no `_` arm: a new variant forces a decision.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::NoEndpoints => true,
            Error::Overloaded { .. } => true,
            Error::DeadlineExceeded => false,
            Error::Timeout { .. } => true,
            Error::Busy { .. } => true,
            Error::Failed { retryable, .. } => *retryable,
            Error::RetriesExhausted { .. } => false,
            Error::InvalidConfig { .. } => false,
        }
    }

    /// The endpoint this error came from, when it came from one.
    pub fn endpoint(&self) -> Option<EndpointId> {
        match self {
            Error::Timeout { endpoint, .. }
            | Error::Busy { endpoint, .. }
            | Error::Failed { endpoint, .. } => Some(*endpoint),
            Error::RetriesExhausted { source, .. } => source.endpoint(),
            Error::NoEndpoints
            | Error::Overloaded { .. }
            | Error::DeadlineExceeded
            | Error::InvalidConfig { .. } => None,
        }
    }

    /// A short, stable, lowercase name for the variant, used as a metric
    /// label and in the simulator's "errors by kind".
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NoEndpoints => "no_endpoints",
            Error::Overloaded { .. } => "overloaded",
            Error::DeadlineExceeded => "deadline_exceeded",
            Error::Timeout { .. } => "timeout",
            Error::Busy { .. } => "busy",
            Error::Failed { .. } => "failed",
            Error::RetriesExhausted { source, .. } => source.kind(),
            Error::InvalidConfig { .. } => "invalid_config",
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}

/// The source of [`Error::Failed`] when the endpoint answered with a response
/// the classifier called a failure (the response itself is dropped).
#[derive(Debug, thiserror::Error)]
#[error("the response was classified as a failure")]
pub(crate) struct FailedResponse;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_is_retryable_and_exhausted_is_not() {
        let busy = Error::Busy {
            endpoint: EndpointId::new(3),
            retry_after: None,
        };
        assert!(busy.is_retryable());
        assert_eq!(busy.endpoint(), Some(EndpointId::new(3)));
        let wrapped = Error::RetriesExhausted {
            attempts: 2,
            reason: GiveUp::Budget,
            source: Box::new(busy),
        };
        assert!(!wrapped.is_retryable());
        assert_eq!(wrapped.kind(), "busy");
        assert_eq!(wrapped.endpoint(), Some(EndpointId::new(3)));
        assert!(wrapped.to_string().contains("retry budget exhausted"));
    }

    #[test]
    fn failed_follows_the_classifier() {
        let failed = |retryable| Error::Failed {
            endpoint: EndpointId::new(1),
            retryable,
            source: Box::new(FailedResponse),
        };
        assert!(failed(true).is_retryable());
        assert!(!failed(false).is_retryable());
        assert!(!Error::DeadlineExceeded.is_retryable());
    }

    #[test]
    fn config_error_names_the_field() {
        let msg = Error::config("max_wait", "must be positive").to_string();
        assert!(msg.contains("max_wait"), "{msg}");
    }
}
