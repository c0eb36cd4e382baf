//! The one error type of `keel-scheduler`, and the reasons a request is
//! rejected.

use std::time::Duration;

/// A boxed error from a service or a backend, kept as the
/// [`std::error::Error::source`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

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
/// [`Error::Rejected`], [`Error::DeadlineExceeded`], the service's own
/// failure ([`Error::Service`]), or [`Error::Closed`] when the scheduler
/// stops under it. Every variant says whether trying again can help: see
/// [`Error::is_retryable`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
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
    Queue(#[source] keel_queue::Error),
    /// A shared rate limiter's backend could not be reached or answered
    /// something unexpected.
    #[error("rate limiter unavailable: {message}")]
    RateLimiter {
        /// What was being attempted.
        message: String,
        /// The underlying cause.
        #[source]
        source: Option<BoxError>,
    },
    /// A configuration field is invalid; the component was not built.
    #[error("invalid scheduler config `{field}`: {reason}")]
    InvalidConfig {
        /// The field's name.
        field: &'static str,
        /// Why it was refused and what is accepted.
        reason: String,
    },
}

impl Error {
    /// Whether trying the same request again may succeed.
    ///
    /// An exhaustive match with no `_` arm: a new variant forces a decision.
    /// Rejections are retryable after [`retry_after`](Error::retry_after);
    /// an expired deadline is not (the caller's time is up), and neither is
    /// a service failure (the service, or a retry layer around it, decides).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Rejected(_) => true,
            Error::DeadlineExceeded { .. } => false,
            Error::Service(_) => false,
            Error::Closed { .. } => false,
            Error::Queue(err) => err.is_retryable(),
            Error::RateLimiter { .. } => true,
            Error::InvalidConfig { .. } => false,
        }
    }

    /// How long to wait before retrying a rejected request, when known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Rejected(rejection) => rejection.retry_after(),
            _ => None,
        }
    }

    /// The rejection, if admission refused the request.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            Error::Rejected(rejection) => Some(rejection),
            _ => None,
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn closed(reason: impl Into<String>) -> Self {
        Error::Closed {
            reason: reason.into(),
        }
    }
}

impl From<Rejection> for Error {
    fn from(rejection: Rejection) -> Self {
        Error::Rejected(rejection)
    }
}

impl From<keel_queue::Error> for Error {
    fn from(err: keel_queue::Error) -> Self {
        Error::Queue(err)
    }
}

/// `Result` with the scheduler's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_retryable_with_a_hint() {
        let err = Error::from(Rejection::RateLimited {
            retry_after: Duration::from_millis(250),
        });
        assert!(err.is_retryable());
        assert_eq!(err.retry_after(), Some(Duration::from_millis(250)));
        assert!(Error::from(Rejection::QueueFull).is_retryable());
        assert_eq!(Error::from(Rejection::QueueFull).retry_after(), None);
    }

    #[test]
    fn expiry_and_config_are_not_retryable() {
        assert!(
            !Error::DeadlineExceeded {
                waited: Duration::from_secs(1)
            }
            .is_retryable()
        );
        let err = Error::config("max_queued", "must be at least 1");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("max_queued"), "{err}");
    }

    #[test]
    fn queue_errors_keep_their_classification() {
        let full = Error::from(keel_queue::Error::Full { capacity: 1 });
        assert!(full.is_retryable());
        let bad = Error::from(keel_queue::Error::InvalidReceipt("gone".into()));
        assert!(!bad.is_retryable());
    }
}
