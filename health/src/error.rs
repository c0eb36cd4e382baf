//! The one error type of `keel-health`.

use std::time::Duration;

use keel_core::{ArgumentError, ClassifyError, ConfigError, ErrorKind, FailureKind, KeelError};

/// What went wrong in a health operation or in the circuit breaker.
///
/// Every variant says whether trying again can help
/// ([`HealthError::is_retryable`]) and what kind of failure it is in the
/// terms every Keel crate shares ([`KeelError::kind`]), so an application
/// maps it to HTTP in the same `match` as the other crates' errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HealthError {
    /// The circuit breaker is open (or half-open with every trial slot
    /// taken): the request was refused at once, without touching the
    /// endpoint.
    ///
    /// Cheap and retryable: another endpoint (or this one after
    /// `retry_after`) may take it. Its kind is
    /// [`ErrorKind::Unavailable`], which the default classifier records as
    /// nothing against the endpoint.
    #[error(
        "endpoint unavailable: {message}; route the request to another endpoint or retry later"
    )]
    Unavailable {
        /// Why the request was refused.
        message: String,
        /// When the breaker will next admit a trial request, if known.
        retry_after: Option<Duration>,
    },
    /// A half-open trial request did not finish within the breaker's
    /// `trial_timeout`; the breaker opened again. Kind
    /// [`ErrorKind::DeadlineExceeded`].
    #[error(
        "trial request timed out after {0:?}: the endpoint is slow or hung, so the circuit breaker opened again"
    )]
    Timeout(Duration),
    /// No endpoint with this id is registered. Kind [`ErrorKind::NotFound`].
    #[error("unknown endpoint `{0}`: it was never inserted, or it was removed")]
    UnknownEndpoint(String),
    /// An endpoint with this id is already registered. Kind
    /// [`ErrorKind::InvalidInput`].
    #[error("endpoint `{0}` is already registered; remove it first to replace it")]
    EndpointExists(String),
    /// An argument is out of range (for example a non-positive weight);
    /// the [`ArgumentError`] names it. Kind [`ErrorKind::InvalidInput`].
    #[error(transparent)]
    InvalidArgument(#[from] ArgumentError),
    /// A configuration field is invalid; the component was not built. The
    /// message names the field (dotted for nested sections, e.g.
    /// `outlier.window`) and what is accepted. Kind [`ErrorKind::Internal`].
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
}

impl HealthError {
    /// Whether trying the same operation again may succeed (the same
    /// answer as [`KeelError::is_retryable`]).
    pub fn is_retryable(&self) -> bool {
        KeelError::is_retryable(self)
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        HealthError::InvalidConfig(ConfigError::new(field, reason))
    }
}

impl KeelError for HealthError {
    /// An exhaustive match with no `_` arm: a new variant forces a decision.
    fn kind(&self) -> ErrorKind {
        match self {
            HealthError::Unavailable { retry_after, .. } => ErrorKind::Unavailable {
                retry_after: *retry_after,
            },
            HealthError::Timeout(_) => ErrorKind::DeadlineExceeded,
            HealthError::UnknownEndpoint(_) => ErrorKind::NotFound,
            HealthError::EndpointExists(_) | HealthError::InvalidArgument(_) => {
                ErrorKind::InvalidInput
            }
            HealthError::InvalidConfig(_) => ErrorKind::Internal,
        }
    }

    /// A breaker refusal is retryable (elsewhere, or later); a hung trial
    /// too (another endpoint may answer), although its kind,
    /// `DeadlineExceeded`, is not retryable in general.
    fn is_retryable(&self) -> bool {
        match self {
            HealthError::Unavailable { .. } | HealthError::Timeout(_) => true,
            HealthError::UnknownEndpoint(_)
            | HealthError::EndpointExists(_)
            | HealthError::InvalidArgument(_)
            | HealthError::InvalidConfig(_) => false,
        }
    }
}

keel_core::register_error_kind!(HealthError);

/// For services whose error type is this crate's [`HealthError`] (the same
/// answer as [`ClassifyError`] for a `BoxError` holding it): an open breaker
/// records nothing against the endpoint, a hung trial is a
/// [`FailureKind::Timeout`], and the registry's own argument and config
/// errors are not the endpoint's fault.
impl ClassifyError for HealthError {
    fn failure_kind(&self) -> Option<FailureKind> {
        match self {
            HealthError::Timeout(_) => Some(FailureKind::Timeout),
            HealthError::Unavailable { .. }
            | HealthError::UnknownEndpoint(_)
            | HealthError::EndpointExists(_)
            | HealthError::InvalidArgument(_) => None,
            HealthError::InvalidConfig(_) => Some(FailureKind::Other),
        }
    }
}

/// `Result` with the crate's [`HealthError`].
pub(crate) type Result<T, E = HealthError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use keel_core::{BoxError, Classify, DefaultClassifier, Outcome, kind_of};

    use super::*;

    fn open() -> HealthError {
        HealthError::Unavailable {
            message: "breaker open".into(),
            retry_after: Some(Duration::from_secs(1)),
        }
    }

    #[test]
    fn unavailable_is_retryable_and_config_is_not() {
        assert!(open().is_retryable());
        assert!(HealthError::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(!HealthError::config("tick", "must be > 0").is_retryable());
        assert!(!HealthError::UnknownEndpoint("a".into()).is_retryable());
    }

    #[test]
    fn kinds_are_found_behind_a_box() {
        let boxed: BoxError = Box::new(open());
        assert_eq!(
            kind_of(boxed.as_ref()),
            ErrorKind::Unavailable {
                retry_after: Some(Duration::from_secs(1))
            }
        );
        let boxed: BoxError = Box::new(HealthError::Timeout(Duration::from_secs(1)));
        assert_eq!(kind_of(boxed.as_ref()), ErrorKind::DeadlineExceeded);
        let boxed: BoxError = Box::new(HealthError::config("tick", "must be > 0"));
        assert_eq!(kind_of(boxed.as_ref()), ErrorKind::Internal);
    }

    #[test]
    fn an_open_breaker_records_nothing_and_a_hung_trial_is_a_timeout() {
        let classify = |err: HealthError| {
            let boxed: Result<(), BoxError> = Err(Box::new(err));
            DefaultClassifier.classify(&boxed)
        };
        assert_eq!(classify(open()), Outcome::Cancelled);
        assert_eq!(
            classify(HealthError::Timeout(Duration::from_secs(1))),
            Outcome::failure(FailureKind::Timeout)
        );
        let direct: Result<(), HealthError> = Err(open());
        assert_eq!(DefaultClassifier.classify(&direct), Outcome::Cancelled);
    }

    #[test]
    fn config_error_names_the_field() {
        let msg = HealthError::config("outlier.window", "must be > 0").to_string();
        assert!(msg.contains("outlier.window"), "{msg}");
    }
}
