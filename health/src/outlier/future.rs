use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::recorder::Recorder;
use keel_core::Classify;

pin_project! {
    /// The response future of [`Outlier`](super::Outlier): the inner future,
    /// recording the outcome when it completes.
    #[derive(Debug)]
    pub struct OutlierFuture<F, C> {
        #[pin]
        inner: F,
        recorder: Recorder,
        classifier: C,
        start: Instant,
    }
}

impl<F, C> OutlierFuture<F, C> {
    pub(crate) fn new(inner: F, recorder: Recorder, classifier: C, start: Instant) -> Self {
        OutlierFuture {
            inner,
            recorder,
            classifier,
            start,
        }
    }
}

impl<F, C, T, E> Future for OutlierFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    C: Classify<T, E>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let outcome = this.classifier.classify(&result);
        this.recorder.record(outcome, this.start.elapsed());
        Poll::Ready(result)
    }
}
