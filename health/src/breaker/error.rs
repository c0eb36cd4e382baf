//! The errors the breaker itself answers with, all variants of the crate's
//! [`HealthError`], boxed as the service's `BoxError`:
//!
//! | when | error | retryable |
//! | --- | --- | --- |
//! | open | [`HealthError::Unavailable`] with `retry_after` = time until half-open | yes |
//! | half-open, every trial slot taken | [`HealthError::Unavailable`] without `retry_after` | yes |
//! | a trial ran past `trial_timeout` | [`HealthError::Timeout`] | yes |
//!
//! Errors of the inner service pass through unchanged (boxed). The default
//! classifier records the refusals as [`Outcome::Cancelled`](crate::Outcome::Cancelled)
//! (the endpoint never saw the request), so an outlier layer outside the
//! breaker does not count them against the endpoint.

use std::time::Duration;

use crate::error::HealthError;

pub(super) fn open(retry_after: Duration) -> HealthError {
    HealthError::Unavailable {
        message: "circuit breaker open".to_owned(),
        retry_after: Some(retry_after),
    }
}

pub(super) fn trials_taken() -> HealthError {
    HealthError::Unavailable {
        message: "circuit breaker half-open and every trial slot is taken".to_owned(),
        retry_after: None,
    }
}

pub(super) fn trial_timeout(after: Duration) -> HealthError {
    HealthError::Timeout(after)
}
