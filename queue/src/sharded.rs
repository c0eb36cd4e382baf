//! One logical queue over several queues (shards), so that producers and
//! consumers of one queue spread over several servers or Redis Cluster
//! nodes.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::ConfigError;
use tokio::time::Instant;

use crate::error::{QueueError, Result};
use crate::queue::Queue;
use crate::types::{
    DeadLetter, Delivery, DequeueOptions, Enqueued, Job, JobId, Nack, QueueCapabilities,
    QueueStats, Receipt,
};

/// How long a waiting `dequeue` waits on one shard before it looks at the
/// next.
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// One logical queue spread over `N` shards, each a [`Queue`] of its own
/// (on Redis, `RedisQueue`s named `name#0` … `name#N-1`: their keys
/// `keel:{name#i}:…` hash to different slots, so a Redis Cluster spreads
/// them over its masters).
///
/// # Behavior
///
/// - `enqueue` sends a job with an idempotency key (or a caller-chosen id)
///   to the shard its key (or id) hashes to, so deduplication keeps its
///   meaning; other jobs go round-robin, a batch's unkeyed jobs together to
///   the next shard. Shards' batches are sent concurrently.
/// - `dequeue` looks at every shard without waiting, starting with a
///   different one each call, until it has `max` jobs; when all are empty
///   it waits on one shard at a time, 50 ms each in turn, and answers with
///   the first that has jobs: a job enqueued into an empty queue is
///   delivered up to `(N - 1) × 50 ms` later than from a single queue.
/// - **Order is per shard only**: jobs of one priority come out in
///   enqueue order within a shard, not across shards; priorities are
///   served highest first within each shard read, not across the whole
///   queue. Leases, retries, delays and dead letters are each shard's.
/// - A receipt names its shard (`<shard>/<receipt>`); `ack_batch` settles
///   each shard's receipts in one call, concurrently.
/// - `stats` and the admin calls (`purge`, `delete`, dead letters) add up
///   or go to every shard. The capacity bound is each shard's own.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), keel_queue::QueueError> {
/// use keel_queue::{DequeueOptions, Job, MemoryQueue, Queue, QueueConfig, ShardedQueue};
///
/// let shards = (0..3)
///     .map(|i| MemoryQueue::new(QueueConfig::new(format!("jobs#{i}"))))
///     .collect::<Result<Vec<_>, _>>()?;
/// let queue = ShardedQueue::new(shards)?;
/// for i in 0..6 {
///     queue.enqueue(Job::new(format!("job {i}"))).await?;
/// }
/// let got = queue.dequeue(DequeueOptions::new(10)).await?;
/// assert_eq!(got.len(), 6);
/// queue.ack_batch(&got.into_iter().map(|d| d.receipt).collect::<Vec<_>>()).await?;
/// # Ok(()) }
/// ```
pub struct ShardedQueue<Q> {
    shards: Arc<[Q]>,
    next_enqueue: Arc<AtomicUsize>,
    next_dequeue: Arc<AtomicUsize>,
}

impl<Q> Clone for ShardedQueue<Q> {
    fn clone(&self) -> Self {
        ShardedQueue {
            shards: self.shards.clone(),
            next_enqueue: self.next_enqueue.clone(),
            next_dequeue: self.next_dequeue.clone(),
        }
    }
}

impl<Q: fmt::Debug> fmt::Debug for ShardedQueue<Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardedQueue")
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

impl<Q: Queue> ShardedQueue<Q> {
    /// A queue over `shards`, in this order (a receipt names its shard by
    /// position: every handle of one logical queue must list the same
    /// shards in the same order).
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidConfig`] naming `shards` when there are none.
    pub fn new(shards: impl IntoIterator<Item = Q>) -> Result<Self> {
        let shards: Arc<[Q]> = shards.into_iter().collect();
        if shards.is_empty() {
            return Err(
                ConfigError::new("shards", "a sharded queue needs at least one shard").into(),
            );
        }
        Ok(ShardedQueue {
            shards,
            next_enqueue: Arc::new(AtomicUsize::new(0)),
            next_dequeue: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The shards, in order.
    pub fn shards(&self) -> &[Q] {
        &self.shards
    }

    /// The shard a keyed job goes to, if it is keyed.
    fn keyed_shard(&self, job: &Job) -> Option<usize> {
        let key = job
            .idempotency_key
            .as_deref()
            .or(job.id.as_ref().map(JobId::as_str))?;
        Some((keel_core::stable_hash(key.as_bytes()) % self.shards.len() as u64) as usize)
    }

    fn round_robin(&self) -> usize {
        self.next_enqueue.fetch_add(1, Ordering::Relaxed) % self.shards.len()
    }

    fn wrap(shard: usize, mut delivery: Delivery) -> Delivery {
        delivery.receipt = Receipt::from_string(format!("{shard}/{}", delivery.receipt.as_str()));
        delivery
    }

    /// The shard and the shard's own receipt.
    fn unwrap_receipt(&self, receipt: &Receipt) -> Result<(usize, Receipt)> {
        receipt
            .as_str()
            .split_once('/')
            .and_then(|(shard, inner)| {
                let shard = shard.parse::<usize>().ok()?;
                (shard < self.shards.len()).then(|| (shard, Receipt::from_string(inner)))
            })
            .ok_or_else(|| {
                QueueError::InvalidReceipt(
                    "not a receipt of this sharded queue (no `<shard>/` of one of its shards)"
                        .into(),
                )
            })
    }

    /// Reads every shard without waiting, from a rotating first shard,
    /// until `options.max` jobs are read.
    async fn read_all(&self, options: DequeueOptions) -> Result<Vec<Delivery>> {
        let n = self.shards.len();
        let first = self.next_dequeue.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::new();
        let mut failed = None;
        for k in 0..n {
            let shard = (first + k) % n;
            let want = options.max - out.len();
            if want == 0 {
                break;
            }
            let mut now = options;
            now.max = want;
            now.wait = Duration::ZERO;
            match self.shards[shard].dequeue(now).await {
                Ok(batch) => out.extend(batch.into_iter().map(|d| Self::wrap(shard, d))),
                // Jobs already read are leased: hand them out.
                Err(err) => {
                    failed.get_or_insert(err);
                }
            }
        }
        match failed {
            Some(err) if out.is_empty() => Err(err),
            _ => Ok(out),
        }
    }
}

#[async_trait]
impl<Q: Queue> Queue for ShardedQueue<Q> {
    async fn enqueue(&self, job: Job) -> Result<Enqueued> {
        let shard = self.keyed_shard(&job).unwrap_or_else(|| self.round_robin());
        self.shards[shard].enqueue(job).await
    }

    async fn enqueue_batch(&self, jobs: Vec<Job>) -> Result<Vec<Enqueued>> {
        let unkeyed = self.round_robin();
        let mut groups: Vec<(Vec<usize>, Vec<Job>)> =
            (0..self.shards.len()).map(|_| Default::default()).collect();
        let count = jobs.len();
        for (index, job) in jobs.into_iter().enumerate() {
            let shard = self.keyed_shard(&job).unwrap_or(unkeyed);
            groups[shard].0.push(index);
            groups[shard].1.push(job);
        }
        let sends = groups
            .into_iter()
            .enumerate()
            .filter(|(_, (indexes, _))| !indexes.is_empty())
            .map(|(shard, (indexes, jobs))| async move {
                (indexes, self.shards[shard].enqueue_batch(jobs).await)
            });
        let mut out: Vec<Option<Enqueued>> = (0..count).map(|_| None).collect();
        for (indexes, answer) in futures::future::join_all(sends).await {
            for (index, enqueued) in indexes.into_iter().zip(answer?) {
                out[index] = Some(enqueued);
            }
        }
        out.into_iter()
            .map(|e| {
                e.ok_or_else(|| QueueError::Backend {
                    message: "a shard answered fewer enqueues than it was given".into(),
                    source: None,
                })
            })
            .collect()
    }

    async fn dequeue(&self, options: DequeueOptions) -> Result<Vec<Delivery>> {
        options.validate()?;
        let found = self.read_all(options).await?;
        if !found.is_empty() || options.wait.is_zero() {
            return Ok(found);
        }
        // Wait on one shard at a time, a slice each: waiting on all at once
        // and dropping the waits that lost the race would leave the jobs
        // they had just leased out until their leases ran out.
        let give_up = Instant::now() + options.wait;
        let n = self.shards.len();
        let mut shard = self.next_dequeue.fetch_add(1, Ordering::Relaxed) % n;
        loop {
            let left = give_up.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            let mut now = options;
            now.wait = if n == 1 { left } else { left.min(WAIT_SLICE) };
            let got = self.shards[shard].dequeue(now).await?;
            if !got.is_empty() {
                return Ok(got.into_iter().map(|d| Self::wrap(shard, d)).collect());
            }
            shard = (shard + 1) % n;
        }
    }

    async fn ack(&self, receipt: &Receipt) -> Result<()> {
        let (shard, inner) = self.unwrap_receipt(receipt)?;
        self.shards[shard].ack(&inner).await
    }

    async fn ack_batch(&self, receipts: &[Receipt]) -> Result<()> {
        let mut groups: Vec<Vec<Receipt>> = (0..self.shards.len()).map(|_| Vec::new()).collect();
        let mut invalid = 0usize;
        for receipt in receipts {
            match self.unwrap_receipt(receipt) {
                Ok((shard, inner)) => groups[shard].push(inner),
                Err(_) => invalid += 1,
            }
        }
        let acks = groups
            .iter()
            .enumerate()
            .filter(|(_, receipts)| !receipts.is_empty())
            .map(|(shard, receipts)| self.shards[shard].ack_batch(receipts));
        let mut failed = None;
        for answer in futures::future::join_all(acks).await {
            match answer {
                Ok(()) => {}
                Err(QueueError::InvalidReceipt(_)) => invalid += 1,
                Err(err) => {
                    failed.get_or_insert(err);
                }
            }
        }
        if let Some(err) = failed {
            return Err(err);
        }
        if invalid > 0 {
            return Err(QueueError::InvalidReceipt(format!(
                "some of {} receipts were not valid (the rest were acked): the lease expired, \
                 the delivery was already settled, or the receipt is not this queue's",
                receipts.len()
            )));
        }
        Ok(())
    }

    async fn nack(&self, receipt: &Receipt, action: Nack) -> Result<()> {
        let (shard, inner) = self.unwrap_receipt(receipt)?;
        self.shards[shard].nack(&inner, action).await
    }

    async fn extend_lease(&self, receipt: &Receipt, lease: Duration) -> Result<()> {
        let (shard, inner) = self.unwrap_receipt(receipt)?;
        self.shards[shard].extend_lease(&inner, lease).await
    }

    async fn stats(&self) -> Result<QueueStats> {
        let mut total = QueueStats::default();
        for shard in self.shards.iter() {
            let stats = shard.stats().await?;
            total.ready += stats.ready;
            total.delayed += stats.delayed;
            total.in_flight += stats.in_flight;
            total.dead += stats.dead;
            total.oldest_ready_age = total.oldest_ready_age.max(stats.oldest_ready_age);
        }
        Ok(total)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            if out.len() >= limit {
                break;
            }
            out.extend(shard.dead_letters(limit - out.len()).await?);
        }
        Ok(out)
    }

    async fn replay_dead_letters(&self, ids: &[JobId]) -> Result<u64> {
        let mut replayed = 0;
        for shard in self.shards.iter() {
            replayed += shard.replay_dead_letters(ids).await?;
        }
        Ok(replayed)
    }

    async fn purge_dead_letters(&self) -> Result<u64> {
        let mut purged = 0;
        for shard in self.shards.iter() {
            purged += shard.purge_dead_letters().await?;
        }
        Ok(purged)
    }

    async fn purge(&self) -> Result<u64> {
        let mut purged = 0;
        for shard in self.shards.iter() {
            purged += shard.purge().await?;
        }
        Ok(purged)
    }

    async fn delete(&self) -> Result<()> {
        for shard in self.shards.iter() {
            shard.delete().await?;
        }
        Ok(())
    }

    fn capabilities(&self) -> QueueCapabilities {
        self.shards[0].capabilities()
    }

    async fn ping(&self) -> Result<()> {
        for shard in self.shards.iter() {
            shard.ping().await?;
        }
        Ok(())
    }
}
