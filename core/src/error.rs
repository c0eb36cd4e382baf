//! The error vocabulary every Keel crate shares: one [`ErrorKind`] that an
//! application maps to HTTP (or gRPC, or a job outcome) in one `match`, the
//! [`ConfigError`] every builder returns for a bad field, and the
//! [`ArgumentError`] every call returns for a bad argument.

use std::fmt;
use std::time::Duration;

/// A boxed, thread-safe error, as tower passes them around.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What kind of failure an error is, in the terms a caller acts on.
///
/// Every Keel crate's error type implements [`KeelError::kind`], so one
/// `match` over this enum turns any Keel error into an HTTP status, a gRPC
/// code or a job outcome (see `http_error` under the `http` feature).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A rate limit refused the request (HTTP 429).
    RateLimited {
        /// When the limit will admit it, if known.
        retry_after: Option<Duration>,
    },
    /// The system is saturated: the admission queue sheds, every node is at
    /// capacity or busy (HTTP 503). Backpressure, not a fault.
    Overloaded {
        /// When to try again, if known.
        retry_after: Option<Duration>,
    },
    /// A bounded queue is full (HTTP 503): the producer should slow down.
    QueueFull,
    /// The request's [`Deadline`](crate::Deadline) passed, or an attempt
    /// timed out (HTTP 504).
    DeadlineExceeded,
    /// A dependency cannot be reached: no endpoint, a circuit open, a
    /// backend server down (HTTP 503).
    Unavailable {
        /// When to try again, if known.
        retry_after: Option<Duration>,
    },
    /// The upstream node failed the request (HTTP 502).
    Upstream,
    /// The caller's input is invalid: a bad argument, a payload that does
    /// not decode (HTTP 400). Retrying the same input cannot help.
    InvalidInput,
    /// What the caller asked for does not exist (HTTP 404).
    NotFound,
    /// The caller gave up (HTTP 499, client closed request).
    Cancelled,
    /// A configuration error or a bug (HTTP 500).
    Internal,
}

impl ErrorKind {
    /// Whether trying the same request again (later, or elsewhere) can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            ErrorKind::RateLimited { .. }
            | ErrorKind::Overloaded { .. }
            | ErrorKind::QueueFull
            | ErrorKind::Unavailable { .. }
            | ErrorKind::Upstream => true,
            ErrorKind::DeadlineExceeded
            | ErrorKind::InvalidInput
            | ErrorKind::NotFound
            | ErrorKind::Cancelled
            | ErrorKind::Internal => false,
        }
    }

    /// The `Retry-After` the kind carries, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ErrorKind::RateLimited { retry_after }
            | ErrorKind::Overloaded { retry_after }
            | ErrorKind::Unavailable { retry_after } => *retry_after,
            ErrorKind::QueueFull
            | ErrorKind::DeadlineExceeded
            | ErrorKind::Upstream
            | ErrorKind::InvalidInput
            | ErrorKind::NotFound
            | ErrorKind::Cancelled
            | ErrorKind::Internal => None,
        }
    }

    /// A short snake_case name, for metric labels and error codes.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorKind::RateLimited { .. } => "rate_limited",
            ErrorKind::Overloaded { .. } => "overloaded",
            ErrorKind::QueueFull => "queue_full",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Unavailable { .. } => "unavailable",
            ErrorKind::Upstream => "upstream",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error that knows its [`ErrorKind`]. Every Keel crate's error type
/// implements it.
pub trait KeelError: std::error::Error + Send + Sync + 'static {
    /// The kind of failure.
    fn kind(&self) -> ErrorKind;

    /// Whether trying again can help. Defaults to the kind's answer; an
    /// error that already went through retries says `false`, so outer layers
    /// do not multiply attempts.
    fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// How [`kind_of`] recognises one concrete error type behind a
/// `dyn Error`. Registered with [`register_error_kind!`](crate::register_error_kind).
#[derive(Debug)]
pub struct KindProbe(pub fn(&(dyn std::error::Error + 'static)) -> Option<ErrorKind>);

inventory::collect!(KindProbe);

/// Registers a [`KeelError`] type so that [`kind_of`] finds it behind a
/// `dyn Error` (a tower `BoxError`, a `#[source]`). Every Keel crate
/// registers its error type; an application may register its own.
///
/// ```
/// use keel_core::{ErrorKind, KeelError, kind_of};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("model not loaded")]
/// struct NotLoaded;
///
/// impl KeelError for NotLoaded {
///     fn kind(&self) -> ErrorKind {
///         ErrorKind::Unavailable { retry_after: None }
///     }
/// }
/// keel_core::register_error_kind!(NotLoaded);
///
/// let boxed: keel_core::BoxError = Box::new(NotLoaded);
/// assert_eq!(kind_of(boxed.as_ref()), ErrorKind::Unavailable { retry_after: None });
/// ```
#[macro_export]
macro_rules! register_error_kind {
    ($ty:ty) => {
        $crate::__private::inventory::submit! {
            $crate::KindProbe(|err| err.downcast_ref::<$ty>().map($crate::KeelError::kind))
        }
    };
}

/// The [`ErrorKind`] of any error: walks the source chain and answers the
/// kind of the first registered Keel error in it; a timeout (tokio's or
/// tower's `Elapsed`, an `io::Error` of kind `TimedOut`) is
/// [`ErrorKind::DeadlineExceeded`]; anything else is
/// [`ErrorKind::Upstream`] (an error the node or its transport raised).
pub fn kind_of(err: &(dyn std::error::Error + 'static)) -> ErrorKind {
    find_kind(err).unwrap_or(ErrorKind::Upstream)
}

/// Like [`kind_of`], but `None` when nothing in the chain says what it is.
pub fn find_kind(err: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
    let mut current = Some(err);
    while let Some(err) = current {
        for probe in inventory::iter::<KindProbe> {
            if let Some(kind) = (probe.0)(err) {
                return Some(kind);
            }
        }
        if err.is::<tokio::time::error::Elapsed>() || err.is::<tower::timeout::error::Elapsed>() {
            return Some(ErrorKind::DeadlineExceeded);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return Some(ErrorKind::DeadlineExceeded);
        }
        current = err.source();
    }
    None
}

/// A configuration field was refused; the component was not built.
///
/// Every Keel builder validates its config and answers this (wrapped in
/// its crate's `InvalidConfig` variant), naming the field and what is
/// accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid config `{field}`: {reason}")]
pub struct ConfigError {
    /// The field's name, dotted from the config's root (`budget.ratio`).
    pub field: &'static str,
    /// Why it was refused and what is accepted.
    pub reason: String,
}

impl ConfigError {
    /// `field` was refused for `reason`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError {
            field,
            reason: reason.into(),
        }
    }
}

impl KeelError for ConfigError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Internal
    }
}

crate::register_error_kind!(ConfigError);

/// An argument was refused; the call did nothing.
///
/// Every Keel call that checks its arguments (a TTL, a priority level, a
/// job's headers) answers this, wrapped in its crate's `InvalidArgument`
/// variant, naming the argument and what is accepted. Its kind is
/// [`ErrorKind::InvalidInput`]: the same call cannot succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid argument `{name}`: {reason}")]
pub struct ArgumentError {
    /// The argument's name.
    pub name: &'static str,
    /// Why it was refused and what is accepted.
    pub reason: String,
}

impl ArgumentError {
    /// `name` was refused for `reason`.
    pub fn new(name: &'static str, reason: impl Into<String>) -> Self {
        ArgumentError {
            name,
            reason: reason.into(),
        }
    }
}

impl KeelError for ArgumentError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::InvalidInput
    }
}

crate::register_error_kind!(ArgumentError);

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] BoxError);

    #[test]
    fn kind_of_walks_the_chain() {
        let inner: BoxError = Box::new(ConfigError::new("x", "bad"));
        assert_eq!(kind_of(&Outer(inner)), ErrorKind::Internal);
        let elapsed: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(kind_of(&Outer(elapsed)), ErrorKind::DeadlineExceeded);
        let argument: BoxError = Box::new(ArgumentError::new("ttl", "must be > 0"));
        assert_eq!(kind_of(&Outer(argument)), ErrorKind::InvalidInput);
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(kind_of(&io), ErrorKind::Upstream);
        assert_eq!(find_kind(&io), None);
    }

    #[test]
    fn retryable_kinds() {
        assert!(ErrorKind::QueueFull.is_retryable());
        assert!(!ErrorKind::DeadlineExceeded.is_retryable());
        assert_eq!(
            ErrorKind::RateLimited {
                retry_after: Some(Duration::from_secs(2))
            }
            .retry_after(),
            Some(Duration::from_secs(2))
        );
    }
}
