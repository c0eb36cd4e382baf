//! Settling jobs: acks coalesced per round trip by one settler task, and
//! every settlement retried with backoff for as long as the job's lease
//! lasts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel_queue::{Nack, Queue, Receipt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::job::JobContext;

/// Retries of a failed settlement stop this long before the lease ends:
/// an answer that arrives after it would be refused anyway.
const LEASE_MARGIN: Duration = Duration::from_millis(20);

/// When a job's lease ends, as last renewed; shared by the task that
/// renews it and the one that settles it.
#[derive(Debug)]
pub(super) struct LeaseClock {
    base: Instant,
    /// Nanoseconds after `base`.
    until: AtomicU64,
}

impl LeaseClock {
    pub(super) fn new(until: Instant) -> Self {
        let base = Instant::now();
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

    /// Whether a settlement sent now can still be taken.
    fn live(&self) -> bool {
        Instant::now() + LEASE_MARGIN < self.until()
    }
}

/// One ack waiting for its round trip.
pub(super) struct PendingAck {
    pub(super) receipt: Receipt,
    pub(super) lease: Arc<LeaseClock>,
}

/// Extends the lease when less than a third of it is left, so a long
/// outage of settlements does not run it out while the backend answers
/// extensions. Errors are left to the caller's next look.
async fn renew_if_short(ctx: &JobContext, receipt: &Receipt, lease: &LeaseClock) {
    let left = lease.until().saturating_duration_since(Instant::now());
    if left >= ctx.config.lease / 3 {
        return;
    }
    let asked = Instant::now();
    if ctx
        .queue
        .extend_lease(receipt, ctx.config.lease)
        .await
        .is_ok()
    {
        lease.set(asked + ctx.config.lease);
        ctx.metrics.renewals.increment(1);
    }
}

/// Acks in batches: takes every ack waiting (up to `ack_batch`) into one
/// `ack_batch` call, so acks are coalesced per round trip and no ack waits
/// for more than the call in flight before it. A call that fails with a
/// retryable error is tried again with backoff, with the acks that arrived
/// meanwhile, for as long as each job's lease lasts (renewing leases that
/// run short); an ack whose lease ran out is dropped, and its job comes
/// back. Ends when every sender is gone and nothing is left.
pub(super) async fn settler(ctx: Arc<JobContext>, mut rx: mpsc::UnboundedReceiver<PendingAck>) {
    let max = ctx.config.ack_batch;
    let mut pending: Vec<PendingAck> = Vec::with_capacity(max);
    let mut failures = 0u32;
    let mut open = true;
    loop {
        if pending.is_empty() {
            if !open {
                return;
            }
            match rx.recv().await {
                Some(ack) => pending.push(ack),
                None => return,
            }
        }
        while open && pending.len() < max {
            match rx.try_recv() {
                Ok(ack) => pending.push(ack),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        // Leases that ran out cannot be acked: those jobs come back.
        let before = pending.len();
        pending.retain(|ack| ack.lease.live());
        let expired = (before - pending.len()) as u64;
        if expired > 0 {
            tracing::warn!(
                count = expired,
                "leases ran out before their acks got through; those jobs come back"
            );
            count_settle_errors(&ctx, expired);
        }
        if pending.is_empty() {
            continue;
        }
        let take = pending.len().min(max);
        let receipts: Vec<Receipt> = pending[..take]
            .iter()
            .map(|ack| ack.receipt.clone())
            .collect();
        match ctx.queue.ack_batch(&receipts).await {
            Ok(()) => {
                failures = 0;
                count_acked(&ctx, take as u64);
                pending.drain(..take);
            }
            Err(keel_queue::QueueError::InvalidReceipt(why)) => {
                failures = 0;
                let invalid = invalid_count(&why, take);
                tracing::warn!(reason = %why, invalid, "leases gone before their jobs were acked; they will be redelivered");
                count_acked(&ctx, (take - invalid) as u64);
                count_settle_errors(&ctx, invalid as u64);
                pending.drain(..take);
            }
            Err(err) if err.is_retryable() => {
                failures = failures.saturating_add(1);
                let delay = ctx.settle_backoff.delay(failures);
                tracing::debug!(error = %err, failures, retry_in = ?delay, "acking failed; trying again while the leases last");
                tokio::time::sleep(delay).await;
                for ack in &pending {
                    renew_if_short(&ctx, &ack.receipt, &ack.lease).await;
                }
            }
            Err(err) => {
                failures = 0;
                tracing::warn!(error = %err, count = take, "acking failed for good; the jobs come back after their leases");
                count_settle_errors(&ctx, take as u64);
                pending.drain(..take);
            }
        }
    }
}

/// How many receipts of a batch of `sent` an `InvalidReceipt` answer says
/// were invalid (`"<n> of <m> receipts …"`, else all).
fn invalid_count(why: &str, sent: usize) -> usize {
    why.split_once(" of ")
        .and_then(|(n, _)| n.trim().parse::<usize>().ok())
        .map_or(sent, |n| n.min(sent))
}

fn count_acked(ctx: &JobContext, n: u64) {
    ctx.metrics.acked.increment(n);
    ctx.counters.acked.fetch_add(n, Ordering::Relaxed);
}

fn count_settle_errors(ctx: &JobContext, n: u64) {
    ctx.metrics.settle_errors.increment(n);
    ctx.counters.settle_errors.fetch_add(n, Ordering::Relaxed);
}

/// Nacks one job (or acks it, for `None`), retrying a retryable failure
/// with backoff for as long as its lease lasts (renewing it when it runs
/// short).
pub(super) async fn nack_or_ack(
    ctx: &JobContext,
    receipt: &Receipt,
    lease: &LeaseClock,
    nack: Option<Nack>,
) {
    let queue: &dyn Queue = &*ctx.queue;
    let mut failures = 0u32;
    loop {
        let result = match &nack {
            Some(nack) => queue.nack(receipt, nack.clone()).await,
            None => queue.ack(receipt).await,
        };
        match result {
            Ok(()) => {
                let (metric, counter) = match &nack {
                    None => (&ctx.metrics.acked, &ctx.counters.acked),
                    Some(Nack::Retry { .. }) => (&ctx.metrics.retried, &ctx.counters.retried),
                    Some(Nack::DeadLetter { .. }) => {
                        (&ctx.metrics.dead_lettered, &ctx.counters.dead_lettered)
                    }
                    Some(Nack::Release { .. }) => (&ctx.metrics.released, &ctx.counters.released),
                };
                metric.increment(1);
                counter.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(keel_queue::QueueError::InvalidReceipt(why)) => {
                tracing::warn!(reason = %why, "lease gone before the job was settled; it will be redelivered");
            }
            Err(err) if err.is_retryable() => {
                failures = failures.saturating_add(1);
                // Never sleep past the lease: the last try lands inside it.
                let left = lease
                    .until()
                    .saturating_duration_since(Instant::now() + LEASE_MARGIN);
                let delay = ctx.settle_backoff.delay(failures).min(left / 2);
                if !delay.is_zero() {
                    tracing::debug!(error = %err, failures, retry_in = ?delay, "settling failed; trying again while the lease lasts");
                    tokio::time::sleep(delay).await;
                    renew_if_short(ctx, receipt, lease).await;
                    continue;
                }
                tracing::warn!(error = %err, "settling failed until the lease ran out; the job comes back");
            }
            Err(err) => {
                tracing::warn!(error = %err, "settling failed; the job comes back after its lease");
            }
        }
        count_settle_errors(ctx, 1);
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_counts_are_read_from_the_answer() {
        assert_eq!(
            invalid_count("2 of 10 receipts were not valid (the rest were acked)", 10),
            2
        );
        assert_eq!(invalid_count("the lease expired", 1), 1);
        assert_eq!(invalid_count("99 of 3 receipts", 3), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_clock_tells_whether_a_settlement_can_land() {
        let clock = LeaseClock::new(Instant::now() + Duration::from_secs(1));
        assert!(clock.live());
        tokio::time::advance(Duration::from_millis(990)).await;
        assert!(!clock.live(), "inside the margin");
        clock.set(Instant::now() + Duration::from_secs(5));
        assert!(clock.live());
    }
}
