//! One job's life in a worker: run the handler, keep the lease, say how
//! to settle it. The worker's own task polls every job of a worker (no task
//! per job); settling is the worker's business (see `super::pull`).

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use keel_core::{Backoff, RetryBudget};
use keel_queue::{Nack, Queue, Receipt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

use super::Counters;
use super::config::WorkerConfig;
use super::item::{JobOutcome, WorkItem};
use crate::error::{BoxError, SchedulerError};
use crate::metrics::WorkerMetrics;

/// What every job of one worker shares.
pub(super) struct JobContext {
    pub(super) queue: Arc<dyn Queue>,
    pub(super) config: WorkerConfig,
    pub(super) metrics: WorkerMetrics,
    pub(super) counters: Arc<Counters>,
    pub(super) budget: RetryBudget,
    /// The delay between failing `dequeue`s.
    pub(super) reconnect: Backoff,
    /// The delay between tries of a failing ack or nack.
    pub(super) settle_backoff: Backoff,
    /// Cancelled when the shutdown grace is over: release what still runs.
    pub(super) release: CancellationToken,
}

/// When a running job's lease ends, as last renewed: written by the
/// renewal beside the handler, read when the job is settled.
#[derive(Debug)]
pub(super) struct LeaseClock {
    base: Instant,
    /// Nanoseconds after `base`.
    until: AtomicU64,
}

impl LeaseClock {
    /// A lease ending at `until`, measured from `base` (no later than
    /// `until`; the batch's `dequeue` time, so making one reads no clock).
    pub(super) fn new(base: Instant, until: Instant) -> Self {
        let clock = LeaseClock {
            base,
            until: AtomicU64::new(0),
        };
        clock.set(until);
        clock
    }

    pub(super) fn set(&self, until: Instant) {
        let nanos = until.saturating_duration_since(self.base).as_nanos();
        self.until
            .store(nanos.min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    pub(super) fn until(&self) -> Instant {
        self.base + Duration::from_nanos(self.until.load(Ordering::Relaxed))
    }
}

/// How a job's handler was started by the worker's loop.
pub(super) enum Start<S: Service<WorkItem>> {
    /// Called on the worker's service, which was ready (and polled once:
    /// it waits).
    Called(Pin<Box<S::Future>>),
    /// The service was not ready: this clone waits for readiness, then
    /// takes the item.
    NotReady(S, WorkItem),
    /// The service failed in `poll_ready`.
    Failed(BoxError),
    /// `poll_ready` or `call` panicked.
    Panicked(Box<dyn Any + Send>),
}

/// How a job's run ended, before settling.
enum Ended {
    /// The handler answered (or panicked).
    Handled(std::thread::Result<Result<JobOutcome, BoxError>>),
    /// Shutdown's grace period ran out first.
    Released,
    /// The lease could not be kept; someone else may hold the job now.
    LeaseLost(String),
}

/// What to tell the queue.
pub(super) enum Settle {
    Ack,
    Nack(Nack),
}

/// A job whose handler is done (or was cancelled).
pub(super) struct Finished {
    pub(super) receipt: Receipt,
    /// When its lease ends, as last renewed.
    pub(super) lease_until: Instant,
    /// `None` when the lease was lost: nothing to settle.
    pub(super) settle: Option<Settle>,
    /// When the handler was started.
    pub(super) dispatched: Instant,
}

/// Runs one job's handler, with its lease extended beside it every
/// `renew_every` and a caught panic, and says how to settle it. The
/// renewal and the release at shutdown are only polled while the handler
/// waits, so a handler that answers at once costs neither a timer nor a
/// clock reading.
pub(super) async fn run<S>(
    ctx: &JobContext,
    start: Start<S>,
    receipt: Receipt,
    lease: LeaseClock,
    dispatched: Instant,
) -> Finished
where
    S: Service<WorkItem, Response = JobOutcome> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    let handler = async move {
        match start {
            Start::Called(call) => call.await.map_err(Into::into),
            Start::NotReady(mut service, item) => {
                ServiceExt::<WorkItem>::ready(&mut service)
                    .await
                    .map_err(Into::into)?;
                service.call(item).await.map_err(Into::into)
            }
            Start::Failed(err) => Err(err),
            Start::Panicked(panic) => std::panic::resume_unwind(panic),
        }
    };
    // A panic anywhere in the handler (readiness, call or its future) is
    // caught here and becomes a retry.
    let handler = AssertUnwindSafe(handler).catch_unwind();
    let ended = tokio::select! {
        biased;
        result = handler => Ended::Handled(result),
        () = ctx.release.cancelled() => Ended::Released,
        lost = keep_lease(ctx, &receipt, &lease) => Ended::LeaseLost(lost),
    };
    let settle = match ended {
        Ended::Handled(result) => Some(settle_of(ctx, result)),
        Ended::Released => {
            // Not a failure of the job: hand it back without spending an
            // attempt, so a clean shutdown never dead-letters a job on its
            // last attempt.
            tracing::info!("shutdown grace over; releasing the job to the queue");
            Some(Settle::Nack(Nack::release("released at worker shutdown")))
        }
        Ended::LeaseLost(why) => {
            tracing::warn!(reason = %why, "lease lost while the handler ran; cancelled it (the job is redelivered)");
            ctx.metrics.lease_lost.increment(1);
            ctx.counters.lease_lost.fetch_add(1, Ordering::Relaxed);
            None
        }
    };
    Finished {
        receipt,
        lease_until: lease.until(),
        settle,
        dispatched,
    }
}

/// How to settle a job whose handler answered (or panicked).
pub(super) fn settle_of(
    ctx: &JobContext,
    result: std::thread::Result<Result<JobOutcome, BoxError>>,
) -> Settle {
    match result {
        Ok(Ok(JobOutcome::Ack)) => Settle::Ack,
        Ok(Ok(JobOutcome::Retry { after, reason })) => retry(ctx, after, reason),
        Ok(Ok(JobOutcome::Abort { reason })) => Settle::Nack(Nack::dead_letter(reason)),
        Ok(Err(err)) => from_error(ctx, &err),
        Err(panic) => {
            let message = panic_message(&*panic);
            tracing::error!(panic = %message, "job handler panicked; the job will be retried");
            ctx.metrics.panics.increment(1);
            ctx.counters.panics.fetch_add(1, Ordering::Relaxed);
            retry(ctx, None, format!("handler panicked: {message}"))
        }
    }
}

/// A retry, delayed when the retry budget is spent.
fn retry(ctx: &JobContext, after: Option<Duration>, reason: String) -> Settle {
    let after = if ctx.budget.withdraw() {
        after
    } else {
        ctx.metrics.budget_exhausted.increment(1);
        ctx.counters
            .budget_exhausted
            .fetch_add(1, Ordering::Relaxed);
        let floor = ctx.config.budget_exhausted_delay;
        tracing::debug!(delay = ?floor, "retry budget spent; delaying the retry");
        Some(after.map_or(floor, |a| a.max(floor)))
    };
    Settle::Nack(Nack::Retry { after, reason })
}

/// The settlement of a handler error.
fn from_error(ctx: &JobContext, err: &BoxError) -> Settle {
    match err.downcast_ref::<SchedulerError>() {
        Some(SchedulerError::Rejected(rejection)) => retry(
            ctx,
            rejection.retry_after(),
            format!("admission: {rejection}"),
        ),
        Some(SchedulerError::DeadlineExceeded { .. }) => Settle::Nack(Nack::dead_letter(
            "deadline exceeded before the job was dispatched",
        )),
        _ => {
            tracing::debug!(error = %chain(&**err), "job handler failed; the job will be retried");
            retry(ctx, None, chain(&**err))
        }
    }
}

/// An error and its causes, on one line.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}

/// Extends the lease every `renew_every` while the handler runs. Returns
/// only when the lease is lost.
async fn keep_lease(ctx: &JobContext, receipt: &Receipt, lease: &LeaseClock) -> String {
    let every = ctx.config.renew_every();
    let mut next = Instant::now() + every;
    loop {
        tokio::time::sleep_until(next).await;
        next += every;
        let asked = Instant::now();
        match ctx.queue.extend_lease(receipt, ctx.config.lease).await {
            Ok(()) => {
                lease.set(asked + ctx.config.lease);
                ctx.metrics.renewals.increment(1);
            }
            Err(keel_queue::QueueError::InvalidReceipt(why)) => return why,
            Err(keel_queue::QueueError::Unsupported { backend, .. }) => {
                tracing::warn!(%backend, "the queue cannot extend leases; jobs longer than the lease may run twice");
                std::future::pending::<()>().await;
            }
            Err(err) => {
                // Try again sooner: the lease has two thirds left.
                tracing::warn!(error = %err, "could not extend the lease; trying again");
                next = Instant::now() + every / 3;
            }
        }
    }
}
