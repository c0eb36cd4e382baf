//! The one error type of `keel-scheduler`, and the reasons a request is
//! rejected.

use std::time::Duration;

use keel_core::{ConfigError, ErrorKind, KeelError};

/// A boxed error from a service or a backend, kept as the
/// [`std::error::Error::source`].
pub use keel_core::BoxError;

/// Why admission refused a request before it was queued or while it waited.
///
/// Every rejection is backpressure: the request never reached the service.
/// [`retry_after`](Rejection::retry_after) says when trying again can help.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The tenant is over its request or cost rate; a retry before
    /// `retry_after` is refused again.
    RateLimited {
        /// When the limiter will admit this request's cost.
        retry_after: Duration,
    },
    /// Queueing delay stayed above target (CoDel): the request's priority
    /// class is being shed to protect higher classes and latency.
    Overloaded {
        /// The standing queueing delay that was measured; retrying sooner
        /// meets the same queue.
        retry_after: Duration,
    },
    /// The tenant's queue or the whole queue holds its configured maximum.
    QueueFull,
}

impl Rejection {
    /// How long to wait before retrying, when the scheduler knows.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Rejection::RateLimited { retry_after } | Rejection::Overloaded { retry_after } => {
                Some(*retry_after)
            }
            Rejection::QueueFull => None,
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::RateLimited { retry_after } => {
                write!(f, "rate limited; retry after {retry_after:?}")
            }
            Rejection::Overloaded { retry_after } => {
                write!(f, "overloaded, shedding load; retry after {retry_after:?}")
            }
            Rejection::QueueFull => f.write_str("queue full"),
        }
    }
}

/// What went wrong in the scheduler, a worker or a limiter.
///
/// An admitted request ends in exactly one of: the service's response,
/// [`SchedulerError::Rejected`], [`SchedulerError::DeadlineExceeded`], the
/// service's own failure ([`SchedulerError::Service`]), or
/// [`SchedulerError::Closed`] when the scheduler stops under it. Every
/// variant says whether trying again can help: see
/// [`SchedulerError::is_retryable`]. It implements [`KeelError`] (so an
/// application maps it with one `match` over [`ErrorKind`]) and is registered
/// with [`keel_core::kind_of`]; a service error inside keeps its own kind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchedulerError {
    /// Admission refused the request; it never reached the service.
    #[error("request rejected: {0}")]
    Rejected(Rejection),
    /// The request's deadline passed while it waited; it was dropped before
    /// dispatch and never reached the service.
    #[error("deadline exceeded after waiting {waited:?} in the queue; the request was not sent")]
    DeadlineExceeded {
        /// How long the request waited.
        waited: Duration,
    },
    /// The service answered with an error.
    #[error("the service failed")]
    Service(#[source] BoxError),
    /// The scheduler or batcher stopped (its handles were dropped, or the
    /// service failed in `poll_ready` and can take no more requests).
    #[error("scheduler closed: {reason}")]
    Closed {
        /// Why it closed.
        reason: String,
    },
    /// A queue operation failed.
    #[error("queue operation failed")]
    Queue(#[source] keel_queue::QueueError),
    /// A shared rate limiter's backend could not be reached or answered
    /// something unexpected. With the `redis` feature the source is a
    /// [`keel_core::redis::RedisError`], whose classification decides
    /// whether a retry can help.
    #[error("rate limiter unavailable: {message}")]
    RateLimiter {
        /// What was being attempted.
        message: String,
        /// The underlying cause.
        #[source]
        source: Option<BoxError>,
    },
    /// A configuration field is invalid; the component was not built. The
    /// [`ConfigError`] names the field.
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
}

impl SchedulerError {
    /// Whether trying the same request again may succeed.
    ///
    /// An exhaustive match with no `_` arm: a new variant forces a decision.
    /// Rejections are retryable after
    /// [`retry_after`](SchedulerError::retry_after); an expired deadline is
    /// not (the caller's time is up), and neither is a service failure (the
    /// service, or a retry layer around it, decides).
    pub fn is_retryable(&self) -> bool {
        match self {
            SchedulerError::Rejected(_) => true,
            SchedulerError::DeadlineExceeded { .. } => false,
            SchedulerError::Service(_) => false,
            SchedulerError::Closed { .. } => false,
            SchedulerError::Queue(err) => err.is_retryable(),
            SchedulerError::RateLimiter { source, .. } => source
                .as_deref()
                .and_then(|source| keel_core::find_kind(source))
                .is_none_or(|kind| kind.is_retryable()),
            SchedulerError::InvalidConfig(_) => false,
        }
    }

    /// How long to wait before retrying a rejected request, when known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SchedulerError::Rejected(rejection) => rejection.retry_after(),
            _ => None,
        }
    }

    /// The rejection, if admission refused the request.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            SchedulerError::Rejected(rejection) => Some(rejection),
            _ => None,
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        SchedulerError::InvalidConfig(ConfigError::new(field, reason))
    }

    pub(crate) fn closed(reason: impl Into<String>) -> Self {
        SchedulerError::Closed {
            reason: reason.into(),
        }
    }
}

impl Rejection {
    /// The [`ErrorKind`] of this rejection.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Rejection::RateLimited { retry_after } => ErrorKind::RateLimited {
                retry_after: Some(*retry_after),
            },
            Rejection::Overloaded { retry_after } => ErrorKind::Overloaded {
                retry_after: Some(*retry_after),
            },
            Rejection::QueueFull => ErrorKind::QueueFull,
        }
    }
}

impl KeelError for SchedulerError {
    /// An exhaustive match with no `_` arm: a new variant forces a decision.
    /// A service error keeps its own kind ([`keel_core::kind_of`]: a
    /// balancer's `Overloaded` stays `Overloaded`).
    fn kind(&self) -> ErrorKind {
        match self {
            SchedulerError::Rejected(rejection) => rejection.kind(),
            SchedulerError::DeadlineExceeded { .. } => ErrorKind::DeadlineExceeded,
            SchedulerError::Service(source) => keel_core::kind_of(source.as_ref()),
            SchedulerError::Closed { .. } => ErrorKind::Unavailable { retry_after: None },
            SchedulerError::Queue(err) => err.kind(),
            SchedulerError::RateLimiter { source, .. } => source
                .as_deref()
                .and_then(|source| keel_core::find_kind(source))
                .unwrap_or(ErrorKind::Unavailable { retry_after: None }),
            SchedulerError::InvalidConfig(_) => ErrorKind::Internal,
        }
    }

    fn is_retryable(&self) -> bool {
        SchedulerError::is_retryable(self)
    }
}

keel_core::register_error_kind!(SchedulerError);

impl From<Rejection> for SchedulerError {
    fn from(rejection: Rejection) -> Self {
        SchedulerError::Rejected(rejection)
    }
}

impl From<keel_queue::QueueError> for SchedulerError {
    fn from(err: keel_queue::QueueError) -> Self {
        SchedulerError::Queue(err)
    }
}

/// `Result` with the scheduler's [`SchedulerError`].
pub(crate) type Result<T, E = SchedulerError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_retryable_with_a_hint() {
        let err = SchedulerError::from(Rejection::RateLimited {
            retry_after: Duration::from_millis(250),
        });
        assert!(err.is_retryable());
        assert_eq!(err.retry_after(), Some(Duration::from_millis(250)));
        assert!(SchedulerError::from(Rejection::QueueFull).is_retryable());
        assert_eq!(
            SchedulerError::from(Rejection::QueueFull).retry_after(),
            None
        );
    }

    #[test]
    fn expiry_and_config_are_not_retryable() {
        assert!(
            !SchedulerError::DeadlineExceeded {
                waited: Duration::from_secs(1)
            }
            .is_retryable()
        );
        let err = SchedulerError::config("max_queued", "must be at least 1");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("max_queued"), "{err}");
    }

    #[test]
    fn kinds_map_in_one_match() {
        let limited = SchedulerError::from(Rejection::RateLimited {
            retry_after: Duration::from_millis(250),
        });
        assert_eq!(
            limited.kind(),
            ErrorKind::RateLimited {
                retry_after: Some(Duration::from_millis(250))
            }
        );
        assert_eq!(
            SchedulerError::from(Rejection::QueueFull).kind(),
            ErrorKind::QueueFull
        );
        let expired = SchedulerError::DeadlineExceeded {
            waited: Duration::ZERO,
        };
        assert_eq!(expired.kind(), ErrorKind::DeadlineExceeded);
        assert_eq!(
            SchedulerError::from(keel_queue::QueueError::Full { capacity: 1 }).kind(),
            ErrorKind::QueueFull
        );
        assert_eq!(
            SchedulerError::config("name", "empty").kind(),
            ErrorKind::Internal
        );
        // Behind a BoxError, as a tower stack hands it out.
        let boxed: BoxError = Box::new(limited);
        assert!(matches!(
            keel_core::kind_of(boxed.as_ref()),
            ErrorKind::RateLimited { .. }
        ));
    }

    #[test]
    fn a_service_error_keeps_its_own_kind() {
        // A Keel error from below (here the queue's) keeps its kind.
        let inner: BoxError = Box::new(keel_queue::QueueError::Full { capacity: 1 });
        assert_eq!(SchedulerError::Service(inner).kind(), ErrorKind::QueueFull);
        let inner: BoxError = Box::new(SchedulerError::from(Rejection::Overloaded {
            retry_after: Duration::from_secs(1),
        }));
        assert!(matches!(
            SchedulerError::Service(inner).kind(),
            ErrorKind::Overloaded { .. }
        ));
        // Anything unknown is the upstream's failure.
        let inner: BoxError = "boom".into();
        assert_eq!(SchedulerError::Service(inner).kind(), ErrorKind::Upstream);
    }

    #[test]
    fn queue_errors_keep_their_classification() {
        let full = SchedulerError::from(keel_queue::QueueError::Full { capacity: 1 });
        assert!(full.is_retryable());
        let bad = SchedulerError::from(keel_queue::QueueError::InvalidReceipt("gone".into()));
        assert!(!bad.is_retryable());
    }
}
