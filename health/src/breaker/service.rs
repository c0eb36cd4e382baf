use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::{Admission, Breaker, BreakerFuture, BreakerState};
use keel_core::BoxError;
use keel_core::{Classify, DefaultClassifier};

/// A service behind a circuit breaker; see the [module docs](super).
///
/// Clones share one breaker.
#[derive(Clone, Debug)]
pub struct CircuitBreaker<S, C = DefaultClassifier> {
    inner: S,
    breaker: Arc<Breaker>,
    classifier: C,
}

impl<S, C> CircuitBreaker<S, C> {
    pub(crate) fn new(inner: S, breaker: Arc<Breaker>, classifier: C) -> Self {
        CircuitBreaker {
            inner,
            breaker,
            classifier,
        }
    }

    /// The breaker's current state.
    pub fn state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S, C, Req> Service<Req> for CircuitBreaker<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BreakerFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        match self.breaker.admit() {
            Admission::Rejected(error) => BreakerFuture::rejected(error),
            Admission::Normal(generation) => BreakerFuture::normal(
                self.inner.call(request),
                self.breaker.clone(),
                generation,
                self.classifier.clone(),
            ),
            Admission::Trial(generation) => BreakerFuture::trial(
                self.inner.call(request),
                self.breaker.clone(),
                generation,
                self.classifier.clone(),
            ),
        }
    }
}
