//! The response future of [`Batcher`](crate::Batcher) as a service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::sync::oneshot;

use crate::error::{BoxError, Result, SchedulerError};

/// The answer to one item sent through [`Batcher`](crate::Batcher) as a
/// `tower::Service`.
pub struct BatchFuture<Resp> {
    state: State<Resp>,
}

enum State<Resp> {
    Waiting(oneshot::Receiver<Result<Resp>>),
    Failed(Option<SchedulerError>),
}

impl<Resp> BatchFuture<Resp> {
    pub(super) fn waiting(rx: oneshot::Receiver<Result<Resp>>) -> Self {
        BatchFuture {
            state: State::Waiting(rx),
        }
    }

    pub(super) fn failed(err: SchedulerError) -> Self {
        BatchFuture {
            state: State::Failed(Some(err)),
        }
    }
}

impl<Resp> fmt::Debug for BatchFuture<Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchFuture").finish_non_exhaustive()
    }
}

impl<Resp> Future for BatchFuture<Resp> {
    type Output = std::result::Result<Resp, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match &mut this.state {
            State::Waiting(rx) => {
                let answer = ready!(Pin::new(rx).poll(cx))
                    .unwrap_or_else(|_| Err(SchedulerError::closed("the batcher stopped")));
                Poll::Ready(answer.map_err(crate::service::unwrap_service_error))
            }
            State::Failed(err) => {
                Poll::Ready(Err(err.take().expect("polled after completion").into()))
            }
        }
    }
}
