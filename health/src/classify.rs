//! Outcome classification: what a request's result says about its endpoint.
//!
//! The passive outlier layer and the circuit breaker both ask a
//! [`Classify`] implementation to turn `&Result<Response, Error>` into an
//! [`Outcome`]: a success, a failure of some [`FailureKind`], a **busy**
//! answer (backpressure, never a failure), or nothing to record.
//!
//! [`DefaultClassifier`] reads an HTTP-like status through
//! [`ResponseStatus`] (implemented for `http::Response<B>` with the `http`
//! feature) and error kinds through [`ClassifyError`]. Any closure
//! `Fn(&Result<Res, E>) -> Outcome` is a classifier too.

use std::convert::Infallible;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{BoxError, Error};

/// What one request's result says about the endpoint that served it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The endpoint did its job (a 4xx is the caller's fault, so a success
    /// for the endpoint).
    Success,
    /// The endpoint failed; counts toward ejection and the breaker.
    Failure(FailureKind),
    /// The endpoint is alive but full (HTTP 429/503): backpressure. Lowers
    /// its weight for a moment; never counts toward ejection or the breaker.
    Busy {
        /// How long the endpoint asked callers to stay away, if it said.
        retry_after: Option<Duration>,
    },
    /// Nothing to learn (for example the breaker refused the request before
    /// it reached the endpoint).
    Ignored,
}

/// The class of a failure; the breaker keeps one threshold per class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureKind {
    /// Connecting or talking to the endpoint failed.
    Transport,
    /// The endpoint did not answer in time.
    Timeout,
    /// The endpoint answered with a server error (HTTP 5xx other than 503).
    Server,
    /// A failure the classifier could not place.
    Other,
}

impl FailureKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FailureKind; 4] = [
        FailureKind::Transport,
        FailureKind::Timeout,
        FailureKind::Server,
        FailureKind::Other,
    ];

    /// The kind's name as used in metric labels and configs.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Transport => "transport",
            FailureKind::Timeout => "timeout",
            FailureKind::Server => "server",
            FailureKind::Other => "other",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            FailureKind::Transport => 0,
            FailureKind::Timeout => 1,
            FailureKind::Server => 2,
            FailureKind::Other => 3,
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Turns a request's result into an [`Outcome`].
///
/// Implemented by [`DefaultClassifier`] and by every closure
/// `Fn(&Result<Res, E>) -> Outcome`:
///
/// ```
/// use keel_health::{Classify, FailureKind, Outcome};
///
/// // A gRPC-ish classifier: our responses carry an application code.
/// let classifier = |result: &Result<u32, std::io::Error>| match result {
///     Ok(0) => Outcome::Success,
///     Ok(8) => Outcome::Busy { retry_after: None }, // RESOURCE_EXHAUSTED
///     Ok(_) => Outcome::Failure(FailureKind::Server),
///     Err(_) => Outcome::Failure(FailureKind::Transport),
/// };
/// assert_eq!(classifier.classify(&Ok(8)), Outcome::Busy { retry_after: None });
/// ```
pub trait Classify<Res, E> {
    /// Classifies one result. Called once per completed request, on the
    /// request path: keep it cheap.
    fn classify(&self, result: &Result<Res, E>) -> Outcome;
}

impl<F, Res, E> Classify<Res, E> for F
where
    F: Fn(&Result<Res, E>) -> Outcome,
{
    fn classify(&self, result: &Result<Res, E>) -> Outcome {
        self(result)
    }
}

/// A response that can say its HTTP status and `Retry-After`.
///
/// Implemented for `http::Response<B>` (feature `http`) and for `()` (no
/// status: every `Ok` is a success). Implement it for your own response
/// type to use [`DefaultClassifier`].
pub trait ResponseStatus {
    /// The HTTP status code, if the response has one.
    fn status_code(&self) -> Option<u16>;

    /// The `Retry-After` the response asked for, if any.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

impl ResponseStatus for () {
    fn status_code(&self) -> Option<u16> {
        None
    }
}

#[cfg(feature = "http")]
impl<B> ResponseStatus for http::Response<B> {
    fn status_code(&self) -> Option<u16> {
        Some(self.status().as_u16())
    }

    /// Reads `Retry-After` in both of its forms (RFC 9110 §10.2.3):
    /// delta-seconds, or an HTTP-date taken as the time left until then by
    /// this host's clock (zero when it is past). Either way the dampening
    /// is capped by the configured maximum, so a skewed date costs at most
    /// that.
    fn retry_after(&self) -> Option<Duration> {
        let value = self
            .headers()
            .get(http::header::RETRY_AFTER)?
            .to_str()
            .ok()?
            .trim();
        if let Ok(seconds) = value.parse::<u64>() {
            return Some(Duration::from_secs(seconds));
        }
        let at = httpdate::parse_http_date(value).ok()?;
        Some(
            at.duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO),
        )
    }
}

/// An error that can say what kind of failure it is.
///
/// `None` means "not the endpoint's fault, record nothing" (the breaker's
/// own refusal, [`Error::Unavailable`], answers `None`). Implemented for
/// [`BoxError`] (walking the source chain), `std::io::Error`, this crate's
/// [`Error`] and `Infallible`.
pub trait ClassifyError {
    /// The failure kind, or `None` to record nothing.
    fn failure_kind(&self) -> Option<FailureKind>;
}

impl ClassifyError for Infallible {
    fn failure_kind(&self) -> Option<FailureKind> {
        match *self {}
    }
}

impl ClassifyError for std::io::Error {
    fn failure_kind(&self) -> Option<FailureKind> {
        Some(io_kind(self))
    }
}

impl ClassifyError for Error {
    fn failure_kind(&self) -> Option<FailureKind> {
        match self {
            Error::Unavailable { .. } => None,
            Error::Timeout(_) => Some(FailureKind::Timeout),
            Error::UnknownEndpoint(_)
            | Error::EndpointExists(_)
            | Error::InvalidArgument { .. }
            | Error::InvalidConfig { .. } => Some(FailureKind::Other),
        }
    }
}

/// Walks the source chain: this crate's [`Error`], `std::io::Error`, tokio's
/// and tower's `Elapsed` are recognised; anything else is a
/// [`FailureKind::Transport`].
impl ClassifyError for BoxError {
    fn failure_kind(&self) -> Option<FailureKind> {
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(self.as_ref());
        while let Some(err) = current {
            if let Some(err) = err.downcast_ref::<Error>() {
                return err.failure_kind();
            }
            if err.is::<tokio::time::error::Elapsed>() || err.is::<tower::timeout::error::Elapsed>()
            {
                return Some(FailureKind::Timeout);
            }
            if let Some(err) = err.downcast_ref::<std::io::Error>() {
                return Some(io_kind(err));
            }
            current = err.source();
        }
        Some(FailureKind::Transport)
    }
}

fn io_kind(err: &std::io::Error) -> FailureKind {
    match err.kind() {
        std::io::ErrorKind::TimedOut => FailureKind::Timeout,
        _ => FailureKind::Transport,
    }
}

/// The classifier used unless you pass your own.
///
/// For `Ok(response)`: 429 and 503 are [`Outcome::Busy`] (with the
/// response's `Retry-After`), 504 is a [`FailureKind::Timeout`], any other
/// 5xx a [`FailureKind::Server`], everything else (including 4xx, the
/// caller's fault) a success. For `Err(error)`: [`ClassifyError`] decides.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultClassifier;

impl<Res, E> Classify<Res, E> for DefaultClassifier
where
    Res: ResponseStatus,
    E: ClassifyError,
{
    fn classify(&self, result: &Result<Res, E>) -> Outcome {
        match result {
            Ok(response) => match response.status_code() {
                Some(429 | 503) => Outcome::Busy {
                    retry_after: response.retry_after(),
                },
                Some(504) => Outcome::Failure(FailureKind::Timeout),
                Some(500..=599) => Outcome::Failure(FailureKind::Server),
                _ => Outcome::Success,
            },
            Err(err) => match err.failure_kind() {
                Some(kind) => Outcome::Failure(kind),
                None => Outcome::Ignored,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Status(u16);
    impl ResponseStatus for Status {
        fn status_code(&self) -> Option<u16> {
            Some(self.0)
        }
    }

    fn classify(result: Result<Status, BoxError>) -> Outcome {
        DefaultClassifier.classify(&result)
    }

    #[test]
    fn statuses() {
        assert_eq!(classify(Ok(Status(200))), Outcome::Success);
        assert_eq!(classify(Ok(Status(404))), Outcome::Success);
        assert_eq!(
            classify(Ok(Status(503))),
            Outcome::Busy { retry_after: None }
        );
        assert_eq!(
            classify(Ok(Status(429))),
            Outcome::Busy { retry_after: None }
        );
        assert_eq!(
            classify(Ok(Status(500))),
            Outcome::Failure(FailureKind::Server)
        );
        assert_eq!(
            classify(Ok(Status(504))),
            Outcome::Failure(FailureKind::Timeout)
        );
    }

    #[test]
    fn errors_walk_the_chain() {
        let io: BoxError = Box::new(std::io::Error::new(std::io::ErrorKind::TimedOut, "slow"));
        assert_eq!(classify(Err(io)), Outcome::Failure(FailureKind::Timeout));
        let refused: BoxError =
            Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(
            classify(Err(refused)),
            Outcome::Failure(FailureKind::Transport)
        );
        let open: BoxError = Box::new(Error::Unavailable {
            message: "open".into(),
            retry_after: None,
        });
        assert_eq!(classify(Err(open)), Outcome::Ignored);
        let elapsed: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(
            classify(Err(elapsed)),
            Outcome::Failure(FailureKind::Timeout)
        );
    }

    #[cfg(feature = "http")]
    #[test]
    fn http_retry_after_as_a_date() {
        let busy = |date: std::time::SystemTime| {
            let response = http::Response::builder()
                .status(429)
                .header("retry-after", httpdate::fmt_http_date(date))
                .body(())
                .unwrap();
            match DefaultClassifier.classify(&Ok::<_, std::io::Error>(response)) {
                Outcome::Busy { retry_after } => retry_after,
                other => panic!("429 classified as {other:?}"),
            }
        };
        let now = std::time::SystemTime::now();
        let ahead = busy(now + Duration::from_secs(120)).expect("a date is read");
        // HTTP dates have whole seconds.
        assert!(
            ahead > Duration::from_secs(118) && ahead <= Duration::from_secs(120),
            "{ahead:?}"
        );
        assert_eq!(busy(now - Duration::from_secs(60)), Some(Duration::ZERO));
    }

    #[cfg(feature = "http")]
    #[test]
    fn http_retry_after() {
        let response = http::Response::builder()
            .status(503)
            .header("retry-after", "7")
            .body(())
            .unwrap();
        let result: Result<_, std::io::Error> = Ok(response);
        assert_eq!(
            DefaultClassifier.classify(&result),
            Outcome::Busy {
                retry_after: Some(Duration::from_secs(7))
            }
        );
    }
}
