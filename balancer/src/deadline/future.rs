//! The deadline layer's response future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{Sleep, sleep_until};

use crate::error::BalancerError;
use keel_core::Deadline;

pin_project! {
    /// The response future of [`EnforceDeadline`](super::EnforceDeadline):
    /// the inner future, cancelled with
    /// [`BalancerError::DeadlineExceeded`](crate::BalancerError::DeadlineExceeded)
    /// when the deadline passes.
    #[derive(Debug)]
    pub struct DeadlineFuture<F> {
        #[pin]
        inner: Option<F>,
        #[pin]
        sleep: Option<Sleep>,
    }
}

impl<F> DeadlineFuture<F> {
    pub(crate) fn new(inner: F, deadline: Option<Deadline>) -> Self {
        DeadlineFuture {
            inner: Some(inner),
            sleep: deadline.map(|d| sleep_until(d.instant())),
        }
    }

    pub(crate) fn expired() -> Self {
        DeadlineFuture {
            inner: None,
            sleep: None,
        }
    }
}

impl<F, T, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BalancerError>,
{
    type Output = Result<T, BalancerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(Err(BalancerError::DeadlineExceeded));
        };
        if let Poll::Ready(result) = inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        if let Some(sleep) = this.sleep.as_pin_mut()
            && sleep.poll(cx).is_ready()
        {
            // Dropping the inner future cancels whatever it was doing.
            this.inner.set(None);
            return Poll::Ready(Err(BalancerError::DeadlineExceeded));
        }
        Poll::Pending
    }
}
