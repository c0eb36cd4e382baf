//! [`Admission`]: the service an [`AdmissionLayer`](crate::AdmissionLayer)
//! makes.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use keel_core::RequestExtensions;
use tower::Service;

use crate::admission::Scheduler;
use crate::error::{BoxError, SchedulerError};
use crate::future::AdmissionFuture;
use crate::ticket::Ticket;

/// How a request becomes a ticket.
pub(crate) type Classify<Req> = Arc<dyn Fn(&Req) -> Ticket + Send + Sync>;

/// A service behind admission; see [`AdmissionLayer`](crate::AdmissionLayer).
///
/// Cheap to clone: clones share the scheduler.
pub struct Admission<Req, Resp> {
    scheduler: Scheduler<Req, Resp>,
    classify: Classify<Req>,
}

impl<Req, Resp> Clone for Admission<Req, Resp> {
    fn clone(&self) -> Self {
        Admission {
            scheduler: self.scheduler.clone(),
            classify: self.classify.clone(),
        }
    }
}

impl<Req, Resp> fmt::Debug for Admission<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("scheduler", &self.scheduler)
            .finish_non_exhaustive()
    }
}

impl<Req, Resp> Admission<Req, Resp> {
    pub(crate) fn new(scheduler: Scheduler<Req, Resp>, classify: Classify<Req>) -> Self {
        Admission {
            scheduler,
            classify,
        }
    }

    /// The scheduler behind this service (for its stats).
    pub fn scheduler(&self) -> &Scheduler<Req, Resp> {
        &self.scheduler
    }
}

/// Requests go through [`Scheduler::submit_request`]: the [`Deadline`](keel_core::Deadline)
/// a request carries (or the scheduler's `request_timeout`, counted from
/// the call) orders and expires it, and is set on it for the layers below.
impl<Req, Resp> Service<Req> for Admission<Req, Resp>
where
    Req: RequestExtensions + Send + 'static,
    Resp: Send + 'static,
{
    type Response = Resp;
    type Error = BoxError;
    type Future = AdmissionFuture<Resp>;

    /// Always ready: admission answers overload per request.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let ticket = (self.classify)(&request);
        AdmissionFuture::new(Box::pin(self.scheduler.submit_request(ticket, request)))
    }
}

/// The inner service's error as it was; the scheduler's own errors boxed.
pub(crate) fn unwrap_service_error(err: SchedulerError) -> BoxError {
    match err {
        SchedulerError::Service(inner) => inner,
        other => Box::new(other),
    }
}
