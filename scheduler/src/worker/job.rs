//! One job's life in a worker: run the handler, keep the lease, settle.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt;
use keel_core::{Backoff, RetryBudget};
use keel_queue::{Delivery, Nack, Queue, Receipt};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

use super::Counters;
use super::config::WorkerConfig;
use super::item::{JobOutcome, WorkItem};
use super::settle::{self, LeaseClock, PendingAck};
use crate::error::{BoxError, SchedulerError};
use crate::metrics::WorkerMetrics;

/// What every job task of one worker shares.
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
enum Settle {
    Ack,
    Nack(Nack),
}

/// A delivery with what its task needs to settle it.
pub(super) struct Leased {
    pub(super) delivery: Delivery,
    /// When the lease ends (from just before the `dequeue` that took it).
    pub(super) lease_until: Instant,
    /// Where acks go to be coalesced.
    pub(super) acks: mpsc::UnboundedSender<PendingAck>,
}

/// Runs one job: the handler (after waiting for readiness unless `ready`),
/// lease renewal beside it, then the ack or nack.
#[tracing::instrument(
    name = "job",
    skip_all,
    fields(worker = %ctx.config.name, id = %job.delivery.id, attempt = job.delivery.attempt),
)]
pub(super) async fn run<S>(
    ctx: Arc<JobContext>,
    mut service: S,
    ready: bool,
    job: Leased,
    permit: OwnedSemaphorePermit,
) where
    S: Service<WorkItem, Response = JobOutcome> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    let Leased {
        delivery,
        lease_until,
        acks,
    } = job;
    let lease = Arc::new(LeaseClock::new(lease_until));
    let receipt = delivery.receipt.clone();
    let item = WorkItem::from(delivery);
    ctx.metrics.started.increment(1);
    ctx.counters.started.fetch_add(1, Ordering::Relaxed);
    ctx.metrics.in_flight.increment(1.0);
    ctx.budget.deposit();
    let started = Instant::now();

    let handler = async move {
        if !ready {
            ServiceExt::<WorkItem>::ready(&mut service)
                .await
                .map_err(Into::into)?;
        }
        service.call(item).await.map_err(Into::into)
    };
    // A panic anywhere in the handler (readiness, call or its future) is
    // caught here and becomes a retry.
    let handler = AssertUnwindSafe(handler).catch_unwind();
    let renew = keep_lease(&ctx, &receipt, &lease);
    let ended = tokio::select! {
        biased;
        result = handler => Ended::Handled(result),
        () = ctx.release.cancelled() => Ended::Released,
        lost = renew => Ended::LeaseLost(lost),
    };
    ctx.metrics.in_flight.decrement(1.0);
    ctx.metrics
        .job_seconds
        .record(started.elapsed().as_secs_f64());

    let settle = match ended {
        Ended::Handled(Ok(Ok(JobOutcome::Ack))) => Settle::Ack,
        Ended::Handled(Ok(Ok(JobOutcome::Retry { after, reason }))) => retry(&ctx, after, reason),
        Ended::Handled(Ok(Ok(JobOutcome::Abort { reason }))) => {
            Settle::Nack(Nack::dead_letter(reason))
        }
        Ended::Handled(Ok(Err(err))) => from_error(&ctx, &err),
        Ended::Handled(Err(panic)) => {
            let message = panic_message(&*panic);
            tracing::error!(panic = %message, "job handler panicked; the job will be retried");
            ctx.metrics.panics.increment(1);
            ctx.counters.panics.fetch_add(1, Ordering::Relaxed);
            retry(&ctx, None, format!("handler panicked: {message}"))
        }
        Ended::Released => {
            // Not a failure of the job: hand it back without spending an
            // attempt, so a clean shutdown never dead-letters a job on its
            // last attempt.
            tracing::info!("shutdown grace over; releasing the job to the queue");
            Settle::Nack(Nack::release("released at worker shutdown"))
        }
        Ended::LeaseLost(why) => {
            tracing::warn!(reason = %why, "lease lost while the handler ran; cancelled it (the job is redelivered)");
            ctx.metrics.lease_lost.increment(1);
            ctx.counters.lease_lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    // The handler slot is free once the handler is done; settling does not
    // hold it.
    drop(permit);
    match settle {
        Settle::Ack => {
            let ack = PendingAck {
                receipt,
                lease: lease.clone(),
            };
            if let Err(mpsc::error::SendError(ack)) = acks.send(ack) {
                // The settler is gone (never while the worker runs): ack
                // here, under the same rules.
                settle::nack_or_ack(&ctx, &ack.receipt, &lease, None).await;
            }
        }
        Settle::Nack(nack) => settle::nack_or_ack(&ctx, &receipt, &lease, Some(nack)).await,
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
