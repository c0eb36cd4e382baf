//! [`AdmissionFuture`]: the answer of an [`Admission`](crate::Admission)
//! service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use crate::error::{BoxError, Result};

/// The answer to one request through [`Admission`](crate::Admission).
///
/// Dropping it before dispatch takes the request out of the queue; after
/// dispatch it drops the inner service's response future.
pub struct AdmissionFuture<Resp> {
    inner: Pin<Box<dyn Future<Output = Result<Resp>> + Send>>,
}

impl<Resp> AdmissionFuture<Resp> {
    pub(crate) fn new(inner: Pin<Box<dyn Future<Output = Result<Resp>> + Send>>) -> Self {
        AdmissionFuture { inner }
    }
}

impl<Resp> fmt::Debug for AdmissionFuture<Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdmissionFuture").finish_non_exhaustive()
    }
}

impl<Resp> Future for AdmissionFuture<Resp> {
    type Output = std::result::Result<Resp, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = ready!(self.inner.as_mut().poll(cx));
        Poll::Ready(result.map_err(crate::service::unwrap_service_error))
    }
}
