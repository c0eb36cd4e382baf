//! The deadline layer and service.

use std::task::{Context, Poll};
use std::time::Duration;

use tower_layer::Layer;
use tower_service::Service;

use super::future::DeadlineFuture;
use crate::error::BalancerError;
use keel_core::{Deadline, RequestExtensions};

/// Gives each request a [`Deadline`] (unless it carries an earlier one) and
/// enforces it over everything below: retries, backoffs, hedges, waiting
/// for a slot and the endpoint call itself.
///
/// Put it outermost, so the deadline bounds the whole request:
///
/// ```
/// use std::time::Duration;
/// use keel_balancer::{Balancer, DeadlineLayer, BalancerError};
/// use keel_balancer::retry::{RetryConfig, RetryLayer};
/// use tower::ServiceBuilder;
/// use tower::discover::ServiceList;
///
/// # fn main() -> Result<(), keel_balancer::BalancerError> {
/// let nodes = vec![tower::service_fn(|_: http::Request<()>| async { Ok::<_, BalancerError>(()) })];
/// let client = ServiceBuilder::new()
///     .layer(DeadlineLayer::new(Duration::from_secs(30)))
///     .layer(RetryLayer::new(RetryConfig::default())?)
///     .service(Balancer::builder().build(ServiceList::new(nodes))?);
/// # drop(client);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct DeadlineLayer {
    timeout: Option<Duration>,
}

impl DeadlineLayer {
    /// Requests get a deadline `timeout` from when they enter the layer,
    /// unless they already carry an earlier one.
    pub fn new(timeout: Duration) -> Self {
        DeadlineLayer {
            timeout: Some(timeout),
        }
    }

    /// Enforces deadlines requests already carry; requests without one are
    /// not bounded.
    pub fn enforce_only() -> Self {
        DeadlineLayer { timeout: None }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = EnforceDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EnforceDeadline {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service of [`DeadlineLayer`].
#[derive(Clone, Debug)]
pub struct EnforceDeadline<S> {
    inner: S,
    timeout: Option<Duration>,
}

impl<S> EnforceDeadline<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Req> Service<Req> for EnforceDeadline<S>
where
    S: Service<Req>,
    S::Error: Into<BalancerError>,
    Req: RequestExtensions,
{
    type Response = S::Response;
    type Error = BalancerError;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BalancerError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Req) -> Self::Future {
        let deadline = match self.timeout {
            Some(timeout) => Some(Deadline::after(timeout).apply(&mut request)),
            None => Deadline::of(&request),
        };
        match deadline {
            // Expired work is never dispatched.
            Some(d) if d.is_expired() => DeadlineFuture::expired(),
            _ => DeadlineFuture::new(self.inner.call(request), deadline),
        }
    }
}
