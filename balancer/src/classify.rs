//! Deciding what an endpoint's answer means: success, busy (backpressure) or
//! failure.

use std::time::Duration;

/// What one attempt's result means for routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The endpoint served the request. An `Err` classified as success is
    /// still returned as [`Error::Failed`](crate::Error::Failed) (not
    /// retryable), but does not count against the endpoint.
    Success,
    /// The endpoint is saturated (HTTP 429 or 503): route around it for a
    /// cooldown and lower its concurrency, but never count it as failed.
    /// The request fails with [`Error::Busy`](crate::Error::Busy), which the
    /// retry layer retries elsewhere.
    Busy {
        /// How long the endpoint asked clients to stay away (`Retry-After`);
        /// `None` uses the balancer's `busy_cooldown`.
        retry_after: Option<Duration>,
    },
    /// The endpoint failed the request. It fails with
    /// [`Error::Failed`](crate::Error::Failed), and the endpoint's latency
    /// estimate is penalised.
    Failure {
        /// Whether the same request may succeed on another endpoint.
        retryable: bool,
    },
}

/// Classifies an endpoint service's results.
///
/// Implemented for closures `Fn(&Result<Res, E>) -> Outcome`, for
/// [`DefaultClassifier`] (every `Ok` succeeds, every `Err` is a retryable
/// failure) and for [`HttpClassifier`].
///
/// ```
/// use keel_balancer::{Classify, Outcome};
///
/// #[derive(Debug)]
/// enum NodeError { QueueFull, Crashed }
///
/// let classify = |result: &Result<String, NodeError>| match result {
///     Ok(_) => Outcome::Success,
///     Err(NodeError::QueueFull) => Outcome::Busy { retry_after: None },
///     Err(NodeError::Crashed) => Outcome::Failure { retryable: true },
/// };
/// assert_eq!(classify.classify(&Err(NodeError::QueueFull)), Outcome::Busy { retry_after: None });
/// ```
pub trait Classify<Res, E>: Clone + Send + Sync + 'static {
    /// What `result` means.
    fn classify(&self, result: &Result<Res, E>) -> Outcome;
}

impl<F, Res, E> Classify<Res, E> for F
where
    F: Fn(&Result<Res, E>) -> Outcome + Clone + Send + Sync + 'static,
{
    fn classify(&self, result: &Result<Res, E>) -> Outcome {
        self(result)
    }
}

/// Every `Ok` is a success; every `Err` is a retryable failure.
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub struct DefaultClassifier;

impl<Res, E> Classify<Res, E> for DefaultClassifier {
    fn classify(&self, result: &Result<Res, E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure { retryable: true },
        }
    }
}

/// Classifies [`http::Response`]s: 429 and 503 are busy (honouring a
/// `Retry-After` given in seconds), 500, 502 and 504 are retryable
/// failures, other 5xx are failures that are not retried, and everything
/// else is a success. A transport `Err` is a retryable failure.
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub struct HttpClassifier;

impl<B, E> Classify<http::Response<B>, E> for HttpClassifier {
    fn classify(&self, result: &Result<http::Response<B>, E>) -> Outcome {
        let response = match result {
            Ok(response) => response,
            Err(_) => return Outcome::Failure { retryable: true },
        };
        let status = response.status();
        match status.as_u16() {
            429 | 503 => Outcome::Busy {
                retry_after: response
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs),
            },
            500 | 502 | 504 => Outcome::Failure { retryable: true },
            _ if status.is_server_error() => Outcome::Failure { retryable: false },
            _ => Outcome::Success,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, retry_after: Option<&str>) -> Result<http::Response<()>, ()> {
        let mut builder = http::Response::builder().status(status);
        if let Some(v) = retry_after {
            builder = builder.header(http::header::RETRY_AFTER, v);
        }
        Ok(builder.body(()).unwrap())
    }

    #[test]
    fn http_statuses() {
        let c = HttpClassifier;
        assert_eq!(c.classify(&response(200, None)), Outcome::Success);
        assert_eq!(c.classify(&response(404, None)), Outcome::Success);
        assert_eq!(
            c.classify(&response(503, Some("7"))),
            Outcome::Busy {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            c.classify(&response(429, Some("Wed, 21 Oct 2015 07:28:00 GMT"))),
            Outcome::Busy { retry_after: None }
        );
        assert_eq!(
            c.classify(&response(502, None)),
            Outcome::Failure { retryable: true }
        );
        assert_eq!(
            c.classify(&response(501, None)),
            Outcome::Failure { retryable: false }
        );
        assert_eq!(
            c.classify(&Err::<http::Response<()>, ()>(())),
            Outcome::Failure { retryable: true }
        );
    }

    #[test]
    fn default_classifier() {
        let c = DefaultClassifier;
        assert_eq!(c.classify(&Ok::<u8, u8>(1)), Outcome::Success);
        assert_eq!(
            c.classify(&Err::<u8, u8>(1)),
            Outcome::Failure { retryable: true }
        );
    }
}
