//! What a job handler receives and answers.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use keel_core::{Deadline, RequestExtensions};
use keel_queue::{Delivery, Headers, JobId, Priority, Receipt};

use crate::ticket::Ticket;

/// One job, as handed to the handler service.
///
/// The lease is the worker's business: the handler answers an
/// [`JobOutcome`] and never acks or nacks itself.
///
/// It carries [`http::Extensions`] ([`RequestExtensions`]): a job with a
/// deadline arrives with the matching [`keel_core::Deadline`] in them, so
/// the layers of the handler (admission, retries, the balancer) enforce
/// the job's deadline as they would a request's.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WorkItem {
    /// The job's id, stable across retries.
    pub id: JobId,
    /// The payload, as enqueued.
    pub payload: Bytes,
    /// The headers, as enqueued.
    pub headers: Headers,
    /// Which delivery this is: 1 the first time.
    pub attempt: u32,
    /// When the job was first enqueued.
    pub enqueued_at: SystemTime,
    /// The job's priority level.
    pub priority: Priority,
    /// The job's deadline, if any (also in the extensions, as a
    /// [`Deadline`]).
    pub deadline: Option<SystemTime>,
    extensions: http::Extensions,
}

impl RequestExtensions for WorkItem {
    fn extensions(&self) -> &http::Extensions {
        &self.extensions
    }

    fn extensions_mut(&mut self) -> &mut http::Extensions {
        &mut self.extensions
    }
}

/// The [`Deadline`] (on the Tokio clock) of a deadline on the wall clock.
fn deadline_of(at: SystemTime) -> Deadline {
    let left = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Deadline::after(left)
}

impl From<Delivery> for WorkItem {
    /// The delivery's fields, and its deadline as a [`Deadline`] in the
    /// extensions.
    fn from(delivery: Delivery) -> Self {
        WorkItem::split(delivery).0
    }
}

impl WorkItem {
    /// The work item of a delivery, and the delivery's receipt (moved, not
    /// copied).
    pub(crate) fn split(delivery: Delivery) -> (Self, Receipt) {
        let mut extensions = http::Extensions::new();
        if let Some(at) = delivery.deadline {
            extensions.insert(deadline_of(at));
        }
        let item = WorkItem {
            id: delivery.id,
            payload: delivery.payload,
            headers: delivery.headers,
            attempt: delivery.attempt,
            enqueued_at: delivery.enqueued_at,
            priority: delivery.priority,
            deadline: delivery.deadline,
            extensions,
        };
        (item, delivery.receipt)
    }
}

impl WorkItem {
    /// A work item for tests and for callers that build jobs by hand.
    pub fn new(id: JobId, payload: impl Into<Bytes>) -> Self {
        WorkItem {
            id,
            payload: payload.into(),
            headers: Headers::new(),
            attempt: 1,
            enqueued_at: SystemTime::now(),
            priority: Priority::NORMAL,
            deadline: None,
            extensions: http::Extensions::new(),
        }
    }

    /// Sets the job's deadline (and the [`Deadline`] in the extensions).
    pub fn with_deadline(mut self, at: SystemTime) -> Self {
        self.deadline = Some(at);
        self.extensions.insert(deadline_of(at));
        self
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// An admission [`Ticket`] for this job: the tenant from the header
    /// `tenant_header` (`"default"` when missing), the job's priority and
    /// deadline, and the cost from the header `cost_header` when given
    /// and numeric (else 1). For stacking an
    /// [`AdmissionLayer`](crate::AdmissionLayer) in front of a worker's
    /// handler, so jobs are ordered by tenant fairness and deadlines.
    pub fn ticket(&self, tenant_header: &str, cost_header: Option<&str>) -> Ticket {
        let mut ticket =
            Ticket::new(self.header(tenant_header).unwrap_or("default")).priority(self.priority);
        if let Some(cost) = cost_header
            .and_then(|h| self.header(h))
            .and_then(|v| v.parse().ok())
        {
            ticket = ticket.cost(cost);
        }
        // The Deadline in the extensions (set from the job's when the item
        // was made) is authoritative; else the wall-clock field.
        let deadline = Deadline::of(self).or_else(|| self.deadline.map(deadline_of));
        if let Some(deadline) = deadline {
            ticket = ticket.deadline(deadline.instant());
        }
        ticket
    }
}

/// What the handler says should happen to a job.
///
/// A handler error (`Err` from the service) is a retry with the queue's
/// backoff, except for admission outcomes: a
/// [`Rejected`](crate::SchedulerError::Rejected) job is retried after the
/// rejection's `retry_after`, and a job whose
/// [`DeadlineExceeded`](crate::SchedulerError::DeadlineExceeded) is
/// dead-lettered.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobOutcome {
    /// Done: ack it.
    Ack,
    /// Failed, worth another try: nack it for a retry, after `after` or the
    /// queue's exponential backoff with jitter. Past the queue's
    /// `max_attempts` it is dead-lettered. Retries also draw on the
    /// worker's retry budget.
    Retry {
        /// Retry no sooner than this; `None` uses the queue's backoff.
        after: Option<Duration>,
        /// Why, kept if the job ends up dead-lettered.
        reason: String,
    },
    /// Failed for good (a poison message): dead-letter it now.
    Abort {
        /// Why, kept with the dead letter.
        reason: String,
    },
}

impl JobOutcome {
    /// Retry with the queue's backoff.
    pub fn retry(reason: impl Into<String>) -> Self {
        JobOutcome::Retry {
            after: None,
            reason: reason.into(),
        }
    }

    /// Retry after a fixed delay.
    pub fn retry_after(after: Duration, reason: impl Into<String>) -> Self {
        JobOutcome::Retry {
            after: Some(after),
            reason: reason.into(),
        }
    }

    /// Dead-letter now.
    pub fn abort(reason: impl Into<String>) -> Self {
        JobOutcome::Abort {
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tickets_from_headers() {
        let mut item = WorkItem::new(JobId::random(), "x");
        item.headers.insert("tenant".into(), "acme".into());
        item.headers.insert("tokens".into(), "300".into());
        item.priority = Priority::HIGH;
        item.deadline = Some(SystemTime::now() + Duration::from_secs(10));
        let ticket = item.ticket("tenant", Some("tokens"));
        assert_eq!(ticket.tenant.as_str(), "acme");
        assert_eq!(ticket.cost, 300);
        assert_eq!(ticket.priority, Priority::HIGH);
        let left = ticket.deadline.unwrap() - Instant::now();
        assert!(left > Duration::from_secs(9) && left <= Duration::from_secs(10));
        let bare = WorkItem::new(JobId::random(), "y").ticket("tenant", None);
        assert_eq!(bare.tenant.as_str(), "default");
        assert_eq!(bare.cost, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_deadline_arrives_as_a_deadline() {
        let at = SystemTime::now() + Duration::from_secs(5);
        let item = WorkItem::new(JobId::random(), "x").with_deadline(at);
        let deadline = Deadline::of(&item).expect("the job's deadline is in the extensions");
        assert!(deadline.remaining() > Duration::from_secs(4));
        assert!(deadline.remaining() <= Duration::from_secs(5));
        let ticket = item.ticket("tenant", None);
        assert_eq!(ticket.deadline, Some(deadline.instant()));
        assert!(Deadline::of(&WorkItem::new(JobId::random(), "y")).is_none());
    }
}
