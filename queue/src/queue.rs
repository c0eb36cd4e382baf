//! The [`Queue`] trait and its forwarding impls.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;
use crate::types::{
    DeadLetter, Delivery, DequeueOptions, Enqueued, Job, JobId, Nack, QueueCapabilities,
    QueueStats, Receipt,
};

/// A durable, at-least-once job queue with leases, retries, delays,
/// priorities and a dead-letter store.
///
/// Object safe: use it as `Arc<dyn Queue>`. Convenience methods (typed JSON,
/// a stream of deliveries) live on [`QueueExt`](crate::QueueExt), which every
/// `Queue` gets for free.
///
/// # The contract
///
/// - `enqueue` returning `Ok` means the job is as durable as the backend can
///   promise (each backend documents exactly what that is).
/// - A dequeued job is *leased*: if it is not acked before the lease
///   expires, it is delivered again with `attempt + 1`. An acked job never
///   comes back.
/// - A failed job retries with backoff up to `max_attempts` deliveries, then
///   moves to the dead letters, where it can be listed, replayed or purged.
/// - A full queue answers [`QueueError::Full`](crate::QueueError::Full)
///   instead of growing.
///
/// The [conformance suite](crate::conformance) checks every clause on every
/// backend.
#[async_trait]
pub trait Queue: Debug + Send + Sync + 'static {
    /// Enqueues one job.
    ///
    /// # Behavior
    ///
    /// The job becomes ready at once, or after `job.delay`. A job whose
    /// idempotency key was enqueued within the dedup window is not enqueued
    /// again: the answer carries the first job's id and `duplicate: true`.
    ///
    /// # Errors
    ///
    /// [`Full`](crate::QueueError::Full) at capacity;
    /// [`InvalidArgument`](crate::QueueError::InvalidArgument) for a priority
    /// out of range; [`Unavailable`](crate::QueueError::Unavailable) or
    /// [`Timeout`](crate::QueueError::Timeout) when the backend cannot be
    /// reached (the job may or may not have been stored).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may or may not enqueue the job.
    async fn enqueue(&self, job: Job) -> Result<Enqueued>;

    /// Enqueues several jobs, in order, in as few round trips as the backend
    /// allows.
    ///
    /// # Behavior
    ///
    /// As [`enqueue`](Queue::enqueue) for each job. Not atomic: on error a
    /// prefix of the batch may have been enqueued.
    ///
    /// # Errors
    ///
    /// As [`enqueue`](Queue::enqueue).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may enqueue a prefix of the batch.
    async fn enqueue_batch(&self, jobs: Vec<Job>) -> Result<Vec<Enqueued>> {
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            out.push(self.enqueue(job).await?);
        }
        Ok(out)
    }

    /// Receives up to `options.max` jobs, waiting up to `options.wait` for
    /// the first one, and leases them for `options.lease`.
    ///
    /// # Behavior
    ///
    /// Higher priorities first, FIFO within a priority. Returns as soon as at
    /// least one job is available; returns an empty vector once `wait` has
    /// passed with nothing ready (a long poll, never a busy loop). Jobs past
    /// their deadline are dead-lettered instead of delivered.
    ///
    /// # Errors
    ///
    /// [`Unavailable`](crate::QueueError::Unavailable) or
    /// [`Timeout`](crate::QueueError::Timeout) when the backend cannot be
    /// reached.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped before it completes, no job is
    /// lost. Backends that take jobs on the server side before answering
    /// leave them leased, so they come back after the lease.
    async fn dequeue(&self, options: DequeueOptions) -> Result<Vec<Delivery>>;

    /// Acknowledges a delivery: the job is done and never comes back.
    ///
    /// # Errors
    ///
    /// [`InvalidReceipt`](crate::QueueError::InvalidReceipt) when the lease
    /// expired or the delivery was already settled.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may or may not ack; an un-acked job comes back
    /// after its lease.
    async fn ack(&self, receipt: &Receipt) -> Result<()>;

    /// Acknowledges several deliveries in as few round trips as the backend
    /// allows.
    ///
    /// # Behavior
    ///
    /// Every valid receipt is acked, even when some are not.
    ///
    /// # Errors
    ///
    /// [`InvalidReceipt`](crate::QueueError::InvalidReceipt) naming how many
    /// receipts were invalid (the valid ones were acked); otherwise as
    /// [`ack`](Queue::ack).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may ack a subset.
    async fn ack_batch(&self, receipts: &[Receipt]) -> Result<()> {
        let mut invalid = 0usize;
        let mut first = None;
        for receipt in receipts {
            match self.ack(receipt).await {
                Ok(()) => {}
                Err(crate::QueueError::InvalidReceipt(why)) => {
                    invalid += 1;
                    first.get_or_insert(why);
                }
                Err(other) => return Err(other),
            }
        }
        match first {
            None => Ok(()),
            Some(why) => Err(crate::QueueError::InvalidReceipt(format!(
                "{invalid} of {} receipts were not valid (the rest were acked); first: {why}",
                receipts.len()
            ))),
        }
    }

    /// Settles a delivery that was not processed: retry it later,
    /// dead-letter it, or release it untried.
    ///
    /// # Behavior
    ///
    /// `Retry` makes the job ready again after the given delay or the
    /// queue's backoff, with `attempt + 1`; if this delivery was the last of
    /// `max_attempts`, the job is dead-lettered instead. `DeadLetter` moves
    /// it to the dead letters now. `Release` makes it ready again at once, at
    /// the tail of its priority level, with the **same** `attempt` (the
    /// delivery is not counted), and never dead-letters it.
    ///
    /// # Errors
    ///
    /// [`InvalidReceipt`](crate::QueueError::InvalidReceipt) as for `ack`.
    ///
    /// # Cancel safety
    ///
    /// As [`ack`](Queue::ack).
    async fn nack(&self, receipt: &Receipt, action: Nack) -> Result<()>;

    /// Extends a lease to `lease` from now, for handlers that run long.
    ///
    /// # Errors
    ///
    /// [`InvalidReceipt`](crate::QueueError::InvalidReceipt) when the lease
    /// already expired; [`Unsupported`](crate::QueueError::Unsupported) where
    /// [`QueueCapabilities::lease_expiry`] is false.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may or may not extend the lease.
    async fn extend_lease(&self, receipt: &Receipt, lease: std::time::Duration) -> Result<()>;

    /// Counts of ready, delayed, in-flight and dead jobs, and the age of the
    /// oldest ready job.
    ///
    /// # Errors
    ///
    /// [`Unavailable`](crate::QueueError::Unavailable) when the backend
    /// cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe (read only).
    async fn stats(&self) -> Result<QueueStats>;

    /// Lists up to `limit` dead letters, oldest first.
    ///
    /// # Errors
    ///
    /// [`Unsupported`](crate::QueueError::Unsupported) where
    /// [`QueueCapabilities::dead_letter_admin`] is false.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe (read only).
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>>;

    /// Moves the named dead letters back to the queue as fresh jobs (attempt
    /// 1, no delay) and answers how many were found and replayed.
    ///
    /// # Errors
    ///
    /// [`Unsupported`](crate::QueueError::Unsupported) where
    /// [`QueueCapabilities::dead_letter_admin`] is false.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may replay a subset.
    async fn replay_dead_letters(&self, ids: &[JobId]) -> Result<u64>;

    /// Deletes every dead letter and answers how many there were.
    ///
    /// # Errors
    ///
    /// [`Unsupported`](crate::QueueError::Unsupported) where
    /// [`QueueCapabilities::dead_letter_admin`] is false.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may purge some or all.
    async fn purge_dead_letters(&self) -> Result<u64>;

    /// Removes every job that is waiting (ready or delayed) and answers how
    /// many there were.
    ///
    /// # Behavior
    ///
    /// Jobs leased at the time are not touched: they can still be acked or
    /// nacked, and come back after their lease like any other. Dead letters
    /// stay (see [`purge_dead_letters`](Queue::purge_dead_letters)), and so
    /// do remembered idempotency keys. Jobs enqueued while the purge runs
    /// may or may not be removed.
    ///
    /// # Errors
    ///
    /// [`Unavailable`](crate::QueueError::Unavailable) or
    /// [`Timeout`](crate::QueueError::Timeout) when the backend cannot be
    /// reached (some jobs may have been removed).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may remove some of the jobs.
    async fn purge(&self) -> Result<u64>;

    /// Deletes the queue and everything it created on the backend: its
    /// jobs (ready, delayed and leased), its dead letters, its idempotency
    /// keys, and every key, stream, set, queue or exchange it declared
    /// (RabbitMQ's delay and dead-letter queues included).
    ///
    /// # Behavior
    ///
    /// Afterwards nothing of the queue is left on the backend, and the
    /// receipts of earlier deliveries are invalid. The handle stays usable:
    /// its next call starts the queue afresh, empty (so do other handles on
    /// the same queue — stop them first). Deleting a queue that holds
    /// nothing succeeds.
    ///
    /// # Errors
    ///
    /// [`Unavailable`](crate::QueueError::Unavailable) or
    /// [`Timeout`](crate::QueueError::Timeout) when the backend cannot be
    /// reached (part of the queue may be gone).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may delete part of the queue; call it again.
    async fn delete(&self) -> Result<()>;

    /// What this backend supports.
    fn capabilities(&self) -> QueueCapabilities;

    /// Checks that the backend answers.
    ///
    /// # Errors
    ///
    /// [`Unavailable`](crate::QueueError::Unavailable) or
    /// [`Timeout`](crate::QueueError::Timeout).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    async fn ping(&self) -> Result<()>;
}

macro_rules! forward_queue {
    ($($ptr:ident),*) => {$(
        #[async_trait]
        impl<Q: Queue + ?Sized> Queue for $ptr<Q> {
            async fn enqueue(&self, job: Job) -> Result<Enqueued> {
                (**self).enqueue(job).await
            }
            async fn enqueue_batch(&self, jobs: Vec<Job>) -> Result<Vec<Enqueued>> {
                (**self).enqueue_batch(jobs).await
            }
            async fn dequeue(&self, options: DequeueOptions) -> Result<Vec<Delivery>> {
                (**self).dequeue(options).await
            }
            async fn ack(&self, receipt: &Receipt) -> Result<()> {
                (**self).ack(receipt).await
            }
            async fn ack_batch(&self, receipts: &[Receipt]) -> Result<()> {
                (**self).ack_batch(receipts).await
            }
            async fn nack(&self, receipt: &Receipt, action: Nack) -> Result<()> {
                (**self).nack(receipt, action).await
            }
            async fn extend_lease(&self, receipt: &Receipt, lease: std::time::Duration) -> Result<()> {
                (**self).extend_lease(receipt, lease).await
            }
            async fn stats(&self) -> Result<QueueStats> {
                (**self).stats().await
            }
            async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
                (**self).dead_letters(limit).await
            }
            async fn replay_dead_letters(&self, ids: &[JobId]) -> Result<u64> {
                (**self).replay_dead_letters(ids).await
            }
            async fn purge_dead_letters(&self) -> Result<u64> {
                (**self).purge_dead_letters().await
            }
            async fn purge(&self) -> Result<u64> {
                (**self).purge().await
            }
            async fn delete(&self) -> Result<()> {
                (**self).delete().await
            }
            fn capabilities(&self) -> QueueCapabilities {
                (**self).capabilities()
            }
            async fn ping(&self) -> Result<()> {
                (**self).ping().await
            }
        }
    )*};
}

forward_queue!(Arc, Box);
