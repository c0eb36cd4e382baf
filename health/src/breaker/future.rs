use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Sleep, sleep};

use super::{Breaker, error};
use crate::error::HealthError;
use keel_core::BoxError;
use keel_core::Classify;

pin_project! {
    /// The response future of [`CircuitBreaker`](super::CircuitBreaker).
    pub struct BreakerFuture<F, C> {
        #[pin]
        kind: Kind<F>,
        guard: Option<Guard<C>>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Rejected { error: Option<HealthError> },
        Normal { #[pin] inner: F },
        Trial { #[pin] inner: F, #[pin] sleep: Sleep, timeout: Duration },
    }
}

impl<F, C> fmt::Debug for BreakerFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Rejected { .. } => "rejected",
            Kind::Normal { .. } => "normal",
            Kind::Trial { .. } => "trial",
        };
        f.debug_struct("BreakerFuture")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

/// Reports the request's result to the breaker exactly once; a trial
/// dropped unfinished gives its slot back.
struct Guard<C> {
    breaker: Arc<Breaker>,
    generation: u64,
    trial: bool,
    classifier: C,
    done: bool,
}

impl<C> Guard<C> {
    fn finish<T, E>(&mut self, result: &Result<T, E>)
    where
        C: Classify<T, E>,
    {
        self.done = true;
        let outcome = self.classifier.classify(result);
        self.breaker.record(self.trial, self.generation, outcome);
    }
}

impl<C> Drop for Guard<C> {
    fn drop(&mut self) {
        if self.trial && !self.done {
            self.breaker.cancel_trial(self.generation);
        }
    }
}

impl<F, C> BreakerFuture<F, C> {
    pub(super) fn rejected(error: HealthError) -> Self {
        BreakerFuture {
            kind: Kind::Rejected { error: Some(error) },
            guard: None,
        }
    }

    pub(super) fn normal(inner: F, breaker: Arc<Breaker>, generation: u64, classifier: C) -> Self {
        BreakerFuture {
            kind: Kind::Normal { inner },
            guard: Some(Guard {
                breaker,
                generation,
                trial: false,
                classifier,
                done: false,
            }),
        }
    }

    pub(super) fn trial(inner: F, breaker: Arc<Breaker>, generation: u64, classifier: C) -> Self {
        let timeout = breaker.config().trial_timeout;
        BreakerFuture {
            kind: Kind::Trial {
                inner,
                sleep: sleep(timeout),
                timeout,
            },
            guard: Some(Guard {
                breaker,
                generation,
                trial: true,
                classifier,
                done: false,
            }),
        }
    }
}

impl<F, C, T, E> Future for BreakerFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, E>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Rejected { error } => {
                let error = error.take().unwrap_or_else(error::trials_taken);
                Poll::Ready(Err(error.into()))
            }
            KindProj::Normal { inner } => match inner.poll(cx) {
                Poll::Ready(result) => {
                    if let Some(guard) = this.guard {
                        guard.finish(&result);
                    }
                    Poll::Ready(result.map_err(Into::into))
                }
                Poll::Pending => Poll::Pending,
            },
            KindProj::Trial {
                inner,
                sleep,
                timeout,
            } => {
                if let Poll::Ready(result) = inner.poll(cx) {
                    if let Some(guard) = this.guard {
                        guard.finish(&result);
                    }
                    return Poll::Ready(result.map_err(Into::into));
                }
                if sleep.poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if let Some(guard) = this.guard {
                    guard.done = true;
                    guard.breaker.trial_timed_out(guard.generation);
                }
                Poll::Ready(Err(error::trial_timeout(*timeout).into()))
            }
        }
    }
}
