use std::task::{Context, Poll};

use tokio::time::Instant;
use tower::load::Load;
use tower_service::Service;

use super::OutlierFuture;
use crate::recorder::Recorder;
use keel_core::{Classify, DefaultClassifier};

/// A service that records each completed request's outcome and latency
/// into its endpoint's [`Recorder`]; built by
/// [`OutlierLayer`](super::OutlierLayer) or
/// [`Health::discover`](crate::Health::discover).
///
/// Responses and errors pass through untouched. It implements
/// `tower::load::Load` when the inner service does, so it can sit inside a
/// `tower::balance::p2c::Balance` over `PeakEwma` or `PendingRequests`.
#[derive(Clone, Debug)]
pub struct Outlier<S, C = DefaultClassifier> {
    inner: S,
    recorder: Recorder,
    classifier: C,
}

impl<S, C> Outlier<S, C> {
    /// Wraps `inner`, recording into `recorder` through `classifier`.
    pub fn new(inner: S, recorder: Recorder, classifier: C) -> Self {
        Outlier {
            inner,
            recorder,
            classifier,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The recorder outcomes go to.
    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, C, Req> Service<Req> for Outlier<S, C>
where
    S: Service<Req>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = OutlierFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let start = Instant::now();
        OutlierFuture::new(
            self.inner.call(request),
            self.recorder.clone(),
            self.classifier.clone(),
            start,
        )
    }
}

impl<S: Load, C> Load for Outlier<S, C> {
    type Metric = S::Metric;

    fn load(&self) -> Self::Metric {
        self.inner.load()
    }
}
