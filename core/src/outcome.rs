//! One outcome classification: what a request's result says about the
//! endpoint that served it. Health's outlier detection and circuit breaker
//! and the balancer's routing read the same [`Outcome`] from the same
//! [`Classify`] implementation, so they cannot disagree.

use std::convert::Infallible;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{BoxError, ErrorKind, find_kind};

/// What one request's result says about the endpoint that served it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The endpoint did its job (a 4xx is the caller's fault, so a success
    /// for the endpoint).
    Success,
    /// The endpoint failed. Counts toward ejection and the breaker; the
    /// balancer penalises its latency estimate.
    Failure {
        /// The class of failure (the breaker keeps a threshold per class).
        kind: FailureKind,
        /// Whether the same request may succeed on another endpoint.
        retryable: bool,
    },
    /// The endpoint is alive but full (HTTP 429/503): backpressure. Route
    /// around it for a cooldown and slow down; never count it as failed.
    Busy {
        /// How long the endpoint asked callers to stay away, if it said.
        retry_after: Option<Duration>,
    },
    /// Nothing to learn about the endpoint: the caller gave up, or a layer
    /// refused the request before it reached the endpoint (an open breaker,
    /// a rate limit).
    Cancelled,
}

impl Outcome {
    /// A retryable failure of `kind`.
    pub fn failure(kind: FailureKind) -> Self {
        Outcome::Failure {
            kind,
            retryable: true,
        }
    }

    /// Whether this is a [`Outcome::Failure`].
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Failure { .. })
    }
}

/// The class of a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureKind {
    /// Connecting or talking to the endpoint failed.
    Transport,
    /// The endpoint did not answer in time (including attempt timeouts and
    /// deadlines a Keel layer imposed while the request was in flight).
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

    /// The kind's position in [`FailureKind::ALL`], for per-kind arrays.
    pub fn index(self) -> usize {
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
/// Implemented by [`DefaultClassifier`], [`ResultClassifier`] and every
/// closure `Fn(&Result<Res, E>) -> Outcome`:
///
/// ```
/// use keel_core::{Classify, FailureKind, Outcome};
///
/// // A gRPC-ish classifier: our responses carry an application code.
/// let classifier = |result: &Result<u32, std::io::Error>| match result {
///     Ok(0) => Outcome::Success,
///     Ok(8) => Outcome::Busy { retry_after: None }, // RESOURCE_EXHAUSTED
///     Ok(_) => Outcome::failure(FailureKind::Server),
///     Err(_) => Outcome::failure(FailureKind::Transport),
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
/// Implemented for `http::Response<B>` and for `()` (no status: every `Ok`
/// is a success). Implement it for your own response type to use
/// [`DefaultClassifier`].
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

impl<B> ResponseStatus for http::Response<B> {
    fn status_code(&self) -> Option<u16> {
        Some(self.status().as_u16())
    }

    /// Reads `Retry-After` in both of its forms with
    /// [`parse_retry_after`](crate::parse_retry_after).
    fn retry_after(&self) -> Option<Duration> {
        crate::retry_after_header(self.headers())
    }
}

/// An error that can say what kind of endpoint failure it is.
///
/// `None` means "not the endpoint's fault, record nothing". Implemented for
/// [`BoxError`] (walking the source chain), `std::io::Error` and
/// `Infallible`.
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
        Some(failure_kind_of(self))
    }
}

/// Walks the source chain: a registered Keel error is read through its
/// [`ErrorKind`] (a deadline or timeout is [`FailureKind::Timeout`]; a
/// local refusal such as an open breaker, a rate limit or a cancellation
/// records nothing); timeouts are recognised; anything else is a
/// [`FailureKind::Transport`].
impl ClassifyError for BoxError {
    fn failure_kind(&self) -> Option<FailureKind> {
        let err: &(dyn std::error::Error + 'static) = self.as_ref();
        match find_kind(err) {
            None | Some(ErrorKind::Upstream) => Some(FailureKind::Transport),
            Some(ErrorKind::DeadlineExceeded) => Some(FailureKind::Timeout),
            Some(ErrorKind::Internal) => Some(FailureKind::Other),
            Some(
                ErrorKind::RateLimited { .. }
                | ErrorKind::Overloaded { .. }
                | ErrorKind::QueueFull
                | ErrorKind::Unavailable { .. }
                | ErrorKind::InvalidInput
                | ErrorKind::NotFound
                | ErrorKind::Cancelled,
            ) => None,
        }
    }
}

fn failure_kind_of(err: &std::io::Error) -> FailureKind {
    match err.kind() {
        std::io::ErrorKind::TimedOut => FailureKind::Timeout,
        _ => FailureKind::Transport,
    }
}

/// The classifier for HTTP-shaped responses (anything [`ResponseStatus`]).
///
/// For `Ok(response)`: 429 and 503 are [`Outcome::Busy`] (with the
/// response's `Retry-After`, both forms), 504 a retryable
/// [`FailureKind::Timeout`], 500 and 502 retryable [`FailureKind::Server`]
/// failures, any other 5xx a server failure that is not retried,
/// everything else (including 4xx, the caller's fault) a success. For
/// `Err(error)`: [`ClassifyError`] decides; transport failures and
/// timeouts are retryable.
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
                Some(504) => Outcome::failure(FailureKind::Timeout),
                Some(500 | 502) => Outcome::failure(FailureKind::Server),
                Some(500..=599) => Outcome::Failure {
                    kind: FailureKind::Server,
                    retryable: false,
                },
                _ => Outcome::Success,
            },
            Err(err) => match err.failure_kind() {
                Some(kind) => Outcome::failure(kind),
                None => Outcome::Cancelled,
            },
        }
    }
}

/// The classifier for any result: every `Ok` is a success, every `Err` a
/// retryable [`FailureKind::Transport`] failure. The balancer's default,
/// for services whose responses carry no status; use
/// [`DefaultClassifier`] for HTTP.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResultClassifier;

impl<Res, E> Classify<Res, E> for ResultClassifier {
    fn classify(&self, result: &Result<Res, E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::failure(FailureKind::Transport),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ConfigError, KeelError};

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
            Outcome::failure(FailureKind::Server)
        );
        assert_eq!(
            classify(Ok(Status(504))),
            Outcome::failure(FailureKind::Timeout)
        );
        assert_eq!(
            classify(Ok(Status(501))),
            Outcome::Failure {
                kind: FailureKind::Server,
                retryable: false
            }
        );
    }

    #[test]
    fn http_retry_after_in_both_forms() {
        let busy = |value: String| {
            let response = http::Response::builder()
                .status(429)
                .header("retry-after", value)
                .body(())
                .unwrap();
            match DefaultClassifier.classify(&Ok::<_, std::io::Error>(response)) {
                Outcome::Busy { retry_after } => retry_after,
                other => panic!("429 classified as {other:?}"),
            }
        };
        assert_eq!(busy("7".into()), Some(Duration::from_secs(7)));
        let now = std::time::SystemTime::now();
        let ahead = busy(httpdate::fmt_http_date(now + Duration::from_secs(120))).unwrap();
        assert!(ahead > Duration::from_secs(118) && ahead <= Duration::from_secs(120));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("refused")]
    struct Refused;
    impl KeelError for Refused {
        fn kind(&self) -> ErrorKind {
            ErrorKind::Unavailable { retry_after: None }
        }
    }
    crate::register_error_kind!(Refused);

    #[test]
    fn errors_walk_the_chain() {
        let io: BoxError = Box::new(std::io::Error::new(std::io::ErrorKind::TimedOut, "slow"));
        assert_eq!(classify(Err(io)), Outcome::failure(FailureKind::Timeout));
        let refused: BoxError =
            Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(
            classify(Err(refused)),
            Outcome::failure(FailureKind::Transport)
        );
        let open: BoxError = Box::new(Refused);
        assert_eq!(classify(Err(open)), Outcome::Cancelled);
        let elapsed: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(
            classify(Err(elapsed)),
            Outcome::failure(FailureKind::Timeout)
        );
        let config: BoxError = Box::new(ConfigError::new("f", "r"));
        assert_eq!(classify(Err(config)), Outcome::failure(FailureKind::Other));
    }

    #[test]
    fn result_classifier_takes_anything() {
        assert_eq!(
            ResultClassifier.classify(&Ok::<u8, u8>(1)),
            Outcome::Success
        );
        assert_eq!(
            ResultClassifier.classify(&Err::<u8, u8>(1)),
            Outcome::failure(FailureKind::Transport)
        );
    }
}
