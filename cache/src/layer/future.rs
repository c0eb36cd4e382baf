//! The response future of [`CacheService`](super::CacheService).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;

use crate::error::BoxError;

/// The response of a [`CacheService`](super::CacheService): from the cache,
/// or from the inner service.
#[must_use = "futures do nothing unless polled"]
pub struct CacheFuture<R> {
    inner: BoxFuture<'static, Result<R, BoxError>>,
}

impl<R> CacheFuture<R> {
    pub(crate) fn new(inner: BoxFuture<'static, Result<R, BoxError>>) -> Self {
        CacheFuture { inner }
    }
}

impl<R> fmt::Debug for CacheFuture<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheFuture").finish_non_exhaustive()
    }
}

impl<R> Future for CacheFuture<R> {
    type Output = Result<R, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
