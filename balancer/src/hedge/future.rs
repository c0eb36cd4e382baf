//! The hedge layer's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::error::BalancerError;

/// The response future of [`Hedge`](super::Hedge). Dropping it cancels both
/// copies.
pub struct HedgeFuture<R> {
    pub(crate) inner: Pin<Box<dyn Future<Output = Result<R, BalancerError>> + Send>>,
}

impl<R> fmt::Debug for HedgeFuture<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeFuture").finish_non_exhaustive()
    }
}

impl<R> Future for HedgeFuture<R> {
    type Output = Result<R, BalancerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
