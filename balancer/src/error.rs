//! The one error type of `keel-balancer`.

use std::fmt;
use std::time::Duration;

use keel_core::{BoxError, ConfigError, ErrorKind, KeelError};

use crate::endpoint::EndpointIndex;

/// `Result` with the balancer's [`BalancerError`].
pub(crate) type Result<T, E = BalancerError> = std::result::Result<T, E>;

/// What went wrong while routing a request.
///
/// Every variant says whether trying again can help
/// ([`BalancerError::is_retryable`]) and what kind of failure it is in Keel's
/// shared vocabulary ([`KeelError::kind`], so an application maps it to HTTP
/// in the same `match` as every other Keel error). Variants that come from
/// one endpoint carry its [`EndpointIndex`] ([`BalancerError::endpoint`]),
/// which is how the [retry layer](crate::retry) avoids sending the retry to
/// the endpoint that just failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BalancerError {
    /// The balancer has no endpoint it may use for this request: discovery
    /// produced none within `max_wait` (or its stream ended empty), or every
    /// endpoint is excluded by the request's
    /// [`AvoidEndpoints`](crate::AvoidEndpoints).
    ///
    /// Not retryable: a retry would find the same empty fleet. The retry
    /// layer passes it through without spending budget.
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
    /// the upstream call was cancelled and the timeout reported to the
    /// endpoint's key ([`EndpointKey::report`](keel_core::EndpointKey::report)).
    #[error("endpoint {endpoint} did not answer within {after:?}")]
    Timeout {
        /// The endpoint that did not answer.
        endpoint: EndpointIndex,
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
        endpoint: EndpointIndex,
        /// How long the endpoint asked us to stay away, if it said.
        retry_after: Option<Duration>,
    },
    /// The endpoint failed the request (an error from the endpoint service,
    /// or a response the [classifier](crate::Classify) called a failure).
    #[error("endpoint {endpoint} failed the request")]
    Failed {
        /// The endpoint that failed.
        endpoint: EndpointIndex,
        /// Whether the classifier said trying elsewhere may succeed.
        retryable: bool,
        /// The endpoint's error, or a description of the failed response.
        #[source]
        source: BoxError,
    },
    /// The request was already retried (or hedged) by a Keel layer and the
    /// layer gave up. Never retryable, so outer layers do not multiply
    /// attempts; its [kind](KeelError::kind) is its source's.
    #[error("gave up after {attempts} attempts ({reason})")]
    RetriesExhausted {
        /// Attempts made, the first one included.
        attempts: u32,
        /// Why no further attempt was made.
        reason: GiveUp,
        /// The last failed attempt's error.
        #[source]
        source: Box<BalancerError>,
    },
    /// A configuration field is invalid; the component was not built.
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
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
    /// Every endpoint had already failed this request: the next attempt
    /// found no endpoint left to try.
    NoEndpointLeft,
}

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GiveUp::Budget => "retry budget exhausted",
            GiveUp::Deadline => "the next attempt would pass the deadline",
            GiveUp::MaxAttempts => "max attempts reached",
            GiveUp::NoEndpointLeft => "every endpoint already failed this request",
        })
    }
}

impl BalancerError {
    /// Whether trying the request again (elsewhere, after a backoff) may
    /// succeed.
    ///
    /// An exhaustive match with no `_` arm: a new variant forces a decision.
    pub fn is_retryable(&self) -> bool {
        match self {
            BalancerError::NoEndpoints => false,
            BalancerError::Overloaded { .. } => true,
            BalancerError::DeadlineExceeded => false,
            BalancerError::Timeout { .. } => true,
            BalancerError::Busy { .. } => true,
            BalancerError::Failed { retryable, .. } => *retryable,
            BalancerError::RetriesExhausted { .. } => false,
            BalancerError::InvalidConfig(_) => false,
        }
    }

    /// The endpoint this error came from, when it came from one.
    pub fn endpoint(&self) -> Option<EndpointIndex> {
        match self {
            BalancerError::Timeout { endpoint, .. }
            | BalancerError::Busy { endpoint, .. }
            | BalancerError::Failed { endpoint, .. } => Some(*endpoint),
            BalancerError::RetriesExhausted { source, .. } => source.endpoint(),
            BalancerError::NoEndpoints
            | BalancerError::Overloaded { .. }
            | BalancerError::DeadlineExceeded
            | BalancerError::InvalidConfig(_) => None,
        }
    }

    /// A short, stable, lowercase name for the variant (the source's for
    /// [`BalancerError::RetriesExhausted`]), used as a metric label and in
    /// the simulator's "errors by kind". For the cross-crate classification,
    /// see [`KeelError::kind`].
    pub fn label(&self) -> &'static str {
        match self {
            BalancerError::NoEndpoints => "no_endpoints",
            BalancerError::Overloaded { .. } => "overloaded",
            BalancerError::DeadlineExceeded => "deadline_exceeded",
            BalancerError::Timeout { .. } => "timeout",
            BalancerError::Busy { .. } => "busy",
            BalancerError::Failed { .. } => "failed",
            BalancerError::RetriesExhausted { source, .. } => source.label(),
            BalancerError::InvalidConfig(_) => "invalid_config",
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        BalancerError::InvalidConfig(ConfigError::new(field, reason))
    }
}

/// Exhaustive, no `_` arm: `Overloaded` and `Busy` are
/// [`ErrorKind::Overloaded`] (backpressure), `NoEndpoints`
/// [`ErrorKind::Unavailable`], `DeadlineExceeded` and `Timeout`
/// [`ErrorKind::DeadlineExceeded`], `Failed` [`ErrorKind::Upstream`],
/// `RetriesExhausted` the kind of its source, `InvalidConfig`
/// [`ErrorKind::Internal`]. [`KeelError::is_retryable`] is
/// [`BalancerError::is_retryable`] (an attempt timeout may succeed elsewhere;
/// an exhausted retry never is).
impl KeelError for BalancerError {
    fn kind(&self) -> ErrorKind {
        match self {
            BalancerError::NoEndpoints => ErrorKind::Unavailable { retry_after: None },
            BalancerError::Overloaded { .. } => ErrorKind::Overloaded { retry_after: None },
            BalancerError::DeadlineExceeded | BalancerError::Timeout { .. } => {
                ErrorKind::DeadlineExceeded
            }
            BalancerError::Busy { retry_after, .. } => ErrorKind::Overloaded {
                retry_after: *retry_after,
            },
            BalancerError::Failed { .. } => ErrorKind::Upstream,
            BalancerError::RetriesExhausted { source, .. } => source.kind(),
            BalancerError::InvalidConfig(_) => ErrorKind::Internal,
        }
    }

    fn is_retryable(&self) -> bool {
        BalancerError::is_retryable(self)
    }
}

keel_core::register_error_kind!(BalancerError);

/// The source of [`BalancerError::Failed`] when the endpoint answered with a
/// response the classifier called a failure (the response itself is dropped).
#[derive(Debug, thiserror::Error)]
#[error("the response was classified as a failure")]
pub(crate) struct FailedResponse;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_is_retryable_and_exhausted_is_not() {
        let busy = BalancerError::Busy {
            endpoint: EndpointIndex::new(3),
            retry_after: Some(Duration::from_secs(2)),
        };
        assert!(busy.is_retryable());
        assert_eq!(busy.endpoint(), Some(EndpointIndex::new(3)));
        let wrapped = BalancerError::RetriesExhausted {
            attempts: 2,
            reason: GiveUp::Budget,
            source: Box::new(busy),
        };
        assert!(!wrapped.is_retryable());
        assert!(!KeelError::is_retryable(&wrapped));
        assert_eq!(wrapped.label(), "busy");
        assert_eq!(
            wrapped.kind(),
            ErrorKind::Overloaded {
                retry_after: Some(Duration::from_secs(2))
            }
        );
        assert_eq!(wrapped.endpoint(), Some(EndpointIndex::new(3)));
        assert!(wrapped.to_string().contains("retry budget exhausted"));
    }

    #[test]
    fn failed_follows_the_classifier() {
        let failed = |retryable| BalancerError::Failed {
            endpoint: EndpointIndex::new(1),
            retryable,
            source: Box::new(FailedResponse),
        };
        assert!(failed(true).is_retryable());
        assert!(!failed(false).is_retryable());
        assert_eq!(failed(true).kind(), ErrorKind::Upstream);
        assert!(!BalancerError::DeadlineExceeded.is_retryable());
        assert!(
            !BalancerError::NoEndpoints.is_retryable(),
            "the same empty fleet"
        );
    }

    #[test]
    fn kinds_are_found_behind_a_box_error() {
        let cases = [
            (
                BalancerError::NoEndpoints,
                ErrorKind::Unavailable { retry_after: None },
            ),
            (
                BalancerError::Overloaded {
                    waited: Duration::ZERO,
                },
                ErrorKind::Overloaded { retry_after: None },
            ),
            (BalancerError::DeadlineExceeded, ErrorKind::DeadlineExceeded),
            (
                BalancerError::Timeout {
                    endpoint: EndpointIndex::new(0),
                    after: Duration::from_secs(1),
                },
                ErrorKind::DeadlineExceeded,
            ),
            (
                BalancerError::config("max_wait", "bad"),
                ErrorKind::Internal,
            ),
        ];
        for (error, kind) in cases {
            let boxed: BoxError = Box::new(error);
            assert_eq!(keel_core::kind_of(boxed.as_ref()), kind);
        }
    }

    #[test]
    fn config_error_names_the_field() {
        let error = BalancerError::config("max_wait", "must be positive");
        assert!(error.to_string().contains("max_wait"), "{error}");
        assert!(matches!(error, BalancerError::InvalidConfig(ref c) if c.field == "max_wait"));
    }
}
