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
pub struct ResponseFuture<R> {
    inner: BoxFuture<'static, Result<R, BoxError>>,
}

impl<R> ResponseFuture<R> {
    pub(crate) fn new(inner: BoxFuture<'static, Result<R, BoxError>>) -> Self {
        ResponseFuture { inner }
    }
}

impl<R> fmt::Debug for ResponseFuture<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<R> Future for ResponseFuture<R> {
    type Output = Result<R, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
