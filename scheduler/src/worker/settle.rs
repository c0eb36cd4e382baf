//! Settling jobs: acks coalesced per round trip by one settler task, and
//! every settlement retried with backoff for as long as the job's lease
//! lasts.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keel_queue::{Nack, Queue, Receipt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::job::JobContext;

/// Retries of a failed settlement stop this long before the lease ends:
/// an answer that arrives after it would be refused anyway.
const LEASE_MARGIN: Duration = Duration::from_millis(20);

/// Whether a settlement sent at `now` can still be taken by a lease that
/// ends at `until`.
fn live(until: Instant, now: Instant) -> bool {
    now + LEASE_MARGIN < until
}

/// Acks waiting for their round trip, as the worker's loop hands them
/// over (one send per batch, not per job): each receipt with when its
/// lease ends.
#[derive(Debug, Default)]
pub(super) struct Acks {
    pub(super) receipts: Vec<Receipt>,
    pub(super) untils: Vec<Instant>,
}

impl Acks {
    /// Room for `n` acks.
    pub(super) fn with_capacity(n: usize) -> Self {
        Acks {
            receipts: Vec::with_capacity(n),
            untils: Vec::with_capacity(n),
        }
    }

    pub(super) fn push(&mut self, receipt: Receipt, until: Instant) {
        self.receipts.push(receipt);
        self.untils.push(until);
    }

    pub(super) fn len(&self) -> usize {
        self.receipts.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.receipts.is_empty()
    }
}

/// Acks taken from the channel, oldest first (a ring, so taking a batch
/// off the front moves nothing).
#[derive(Debug, Default)]
struct Pending {
    receipts: VecDeque<Receipt>,
    untils: VecDeque<Instant>,
}

impl Pending {
    fn len(&self) -> usize {
        self.receipts.len()
    }

    fn is_empty(&self) -> bool {
        self.receipts.is_empty()
    }

    fn append(&mut self, acks: Acks) {
        self.receipts.extend(acks.receipts);
        self.untils.extend(acks.untils);
    }

    /// The oldest receipts, at most `max`, as one slice (fewer where the
    /// ring wraps around).
    fn front(&self, max: usize) -> &[Receipt] {
        let (front, _) = self.receipts.as_slices();
        &front[..front.len().min(max)]
    }

    fn drain_front(&mut self, n: usize) {
        self.receipts.drain(..n);
        self.untils.drain(..n);
    }
}

/// Extends the lease when less than a third of it is left, so a long
/// outage of settlements does not run it out while the backend answers
/// extensions. Errors are left to the caller's next look.
async fn renew_if_short(ctx: &JobContext, receipt: &Receipt, until: &mut Instant) {
    let left = until.saturating_duration_since(Instant::now());
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
        *until = asked + ctx.config.lease;
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
pub(super) async fn settler(ctx: Arc<JobContext>, mut rx: mpsc::UnboundedReceiver<Acks>) {
    let max = ctx.config.ack_batch;
    let mut pending = Pending::default();
    let mut failures = 0u32;
    let mut open = true;
    loop {
        if pending.is_empty() {
            if !open {
                return;
            }
            match rx.recv().await {
                Some(acks) => pending.append(acks),
                None => return,
            }
        }
        while open && pending.len() < max {
            match rx.try_recv() {
                Ok(acks) => pending.append(acks),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        // Leases that ran out cannot be acked: those jobs come back.
        let now = Instant::now();
        if pending.untils.iter().any(|&until| !live(until, now)) {
            let before = pending.len();
            let mut keep = pending.untils.iter().map(|&until| live(until, now));
            pending.receipts.retain(|_| keep.next().unwrap_or(false));
            pending.untils.retain(|&until| live(until, now));
            let expired = (before - pending.len()) as u64;
            tracing::warn!(
                count = expired,
                "leases ran out before their acks got through; those jobs come back"
            );
            count_settle_errors(&ctx, expired);
        }
        if pending.is_empty() {
            continue;
        }
        let front = pending.front(max);
        let take = front.len();
        match ctx.queue.ack_batch(front).await {
            Ok(()) => {
                failures = 0;
                count_acked(&ctx, take as u64);
                pending.drain_front(take);
            }
            Err(keel_queue::QueueError::InvalidReceipt(why)) => {
                failures = 0;
                let invalid = invalid_count(&why, take);
                tracing::warn!(reason = %why, invalid, "leases gone before their jobs were acked; they will be redelivered");
                count_acked(&ctx, (take - invalid) as u64);
                count_settle_errors(&ctx, invalid as u64);
                pending.drain_front(take);
            }
            Err(err) if err.is_retryable() => {
                failures = failures.saturating_add(1);
                let delay = ctx.settle_backoff.delay(failures);
                tracing::debug!(error = %err, failures, retry_in = ?delay, "acking failed; trying again while the leases last");
                tokio::time::sleep(delay).await;
                for (receipt, until) in pending.receipts.iter().zip(pending.untils.iter_mut()) {
                    renew_if_short(&ctx, receipt, until).await;
                }
            }
            Err(err) => {
                failures = 0;
                tracing::warn!(error = %err, count = take, "acking failed for good; the jobs come back after their leases");
                count_settle_errors(&ctx, take as u64);
                pending.drain_front(take);
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
    receipt: Receipt,
    mut until: Instant,
    nack: Option<Nack>,
) {
    let queue: &dyn Queue = &*ctx.queue;
    let mut failures = 0u32;
    loop {
        let result = match &nack {
            Some(nack) => queue.nack(&receipt, nack.clone()).await,
            None => queue.ack(&receipt).await,
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
                let left = until.saturating_duration_since(Instant::now() + LEASE_MARGIN);
                let delay = ctx.settle_backoff.delay(failures).min(left / 2);
                if !delay.is_zero() {
                    tracing::debug!(error = %err, failures, retry_in = ?delay, "settling failed; trying again while the lease lasts");
                    tokio::time::sleep(delay).await;
                    renew_if_short(ctx, &receipt, &mut until).await;
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
    async fn a_lease_end_tells_whether_a_settlement_can_land() {
        let until = Instant::now() + Duration::from_secs(1);
        assert!(live(until, Instant::now()));
        tokio::time::advance(Duration::from_millis(990)).await;
        assert!(!live(until, Instant::now()), "inside the margin");
        assert!(live(
            Instant::now() + Duration::from_secs(5),
            Instant::now()
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_clock_keeps_its_renewals() {
        let base = Instant::now();
        let clock = super::super::job::LeaseClock::new(base, base + Duration::from_secs(1));
        assert_eq!(clock.until(), base + Duration::from_secs(1));
        clock.set(base + Duration::from_secs(7));
        assert_eq!(clock.until(), base + Duration::from_secs(7));
    }
}
