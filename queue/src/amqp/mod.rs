//! The RabbitMQ backend (feature `amqp`).
//!
//! # Topology
//!
//! For a queue named `q` with `n` priority levels:
//!
//! | name | kind | holds |
//! | --- | --- | --- |
//! | `q.p<level>` | durable queue (quorum by default) | ready jobs of one priority level |
//! | `q.delay.p<level>.<ms>ms` | durable queue with a message TTL | jobs waiting out a delay; they dead-letter back into `q.p<level>` (this broker has no delay plugin) and the queue expires when unused |
//! | `q.dlx` | fanout exchange | the broker's dead-lettering (delivery limit) |
//! | `q.dead` | durable queue bound to `q.dlx` | dead letters, with their reason |
//! | `q.delays` | durable classic queue | the name of every delay queue declared, each record expiring with its queue, so `purge` and `delete` find delay queues any handle made (on a cluster it lives on one node: while that node is down, delayed enqueues, `purge` and `delete` fail, and jobs flow on) |
//!
//! Ready queues carry `x-max-length` = `capacity` with `x-overflow:
//! reject-publish` (so a full queue refuses the publish and `enqueue` answers
//! `Full`), and, for quorum queues, `x-delivery-limit` as a broker-side
//! safety net above `max_attempts` for consumers that crash on a message
//! before this handle can count it.
//!
//! # What `Ok` from `enqueue` promises
//!
//! The broker confirmed the publish (publisher confirms, `mandatory`, a
//! persistent message on a durable queue): on a quorum queue, a majority of
//! the cluster has it on disk. An unroutable message is an error, never a
//! silent confirm.
//!
//! # Leases and crashed consumers
//!
//! Deliveries are consumed with manual acks and a prefetch per level. A
//! lease is kept by this handle: when it expires unacked, the handle puts
//! the job back at the tail of its level as a fresh message that counts the
//! attempt (confirmed before the original is acked), so it reaches any
//! consumer with `attempt + 1`; a `Nack::Release` does the same at once
//! without counting the attempt. When a consumer process dies or its
//! connection drops, the broker requeues everything it held at once (the
//! quorum queue's `x-delivery-count` counts that as an attempt). A handle
//! that nobody has called `dequeue` on for `release_idle_after` stops
//! consuming and gives its prefetched jobs back, so an idle or stuck process
//! never hoards work. Deliveries past `max_attempts` are dead-lettered with
//! their reason instead of delivered.
//!
//! # Differences from the other backends
//!
//! - No idempotency keys: RabbitMQ has no deduplication, so a job with an
//!   idempotency key is refused with `Unsupported` rather than enqueued
//!   twice silently.
//! - `stats` are estimates: the broker counts ready messages per queue, but
//!   in-flight and delayed counts only include this handle's view, and the
//!   oldest job's age is unknown.
//! - Capacity is per priority level and counts ready messages.
//! - `purge` removes what the broker holds ready or delayed and what this
//!   handle prefetched; jobs other handles have prefetched are in flight
//!   and stay.
//!
//! # Failures
//!
//! Every broker operation is bounded by `operation_timeout`; a broker that
//! misses it is not trusted again (the connection is closed). After the
//! connection drops or times out, the next call reconnects, redeclares the topology and
//! restarts consumption: publishing and consuming resume on their own.
//! Given the other nodes of a cluster (`fallback_urls`), a reconnect
//! starts with the node after the lost connection's and takes the first
//! that answers, so a handle whose node died resumes on a live one; with
//! quorum queues the surviving majority keeps every confirmed job.
//! Receipts from before the drop answer `InvalidReceipt` (the broker has
//! already requeued those jobs).

mod admin;
mod codec;
mod config;
mod consume;
mod dead;
mod error;
mod lease;
mod link;
mod publish;
mod settle;
mod topology;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::Notify;

use self::codec::reserved_header;
pub use self::config::{AmqpQueueConfig, AmqpQueueType};
use self::lease::{Leases, lease_keeper};
use self::link::Link;
use crate::error::{QueueError, Result};
use crate::ids::IdGen;
use crate::metrics::QueueMetrics;
use crate::queue::Queue;
use crate::types::{
    DeadLetter, Delivery, DequeueOptions, Enqueued, Job, JobId, Nack, QueueCapabilities,
    QueueStats, Receipt,
};

const BACKEND: &str = "amqp";

/// What one job may hold: AMQP short strings (header names, the message
/// id) are at most 255 bytes, the properties travel in one frame (128 KiB
/// by default), and RabbitMQ 3.10 refuses messages above 128 MiB.
const LIMITS: crate::types::Limits = crate::types::Limits {
    backend: BACKEND,
    caller_ids: true,
    max_id: 255,
    max_header_name: 255,
    max_headers: 64 * 1024,
    max_payload: 128 * 1024 * 1024,
    reserved_header,
};
/// Most dead letters one `replay_dead_letters` call looks through.
const REPLAY_SCAN_LIMIT: usize = 100_000;

/// A durable queue on RabbitMQ; see the [module docs](crate::AmqpQueue#topology).
///
/// Cloning is cheap; clones share one connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), keel_queue::QueueError> {
/// use keel_queue::{AmqpQueue, AmqpQueueConfig, Job, Queue, QueueConfig};
///
/// let queue = AmqpQueue::connect(AmqpQueueConfig::new(
///     "amqp://guest:guest@127.0.0.1:5672/%2f",
///     QueueConfig::new("embeddings").capacity(100_000),
/// ))
/// .await?;
/// queue.enqueue(Job::new("hello")).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AmqpQueue {
    inner: Arc<Inner>,
}

struct Inner {
    config: AmqpQueueConfig,
    ids: IdGen,
    metrics: QueueMetrics,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    generation: AtomicU64,
    /// Index (into `url`, then `fallback_urls`) of the node the next
    /// connection tries first.
    next_url: AtomicUsize,
    leases: Mutex<Leases>,
    lease_changed: Arc<Notify>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(link) = self.link.get_mut().take() {
            link.retire();
        }
    }
}

impl fmt::Debug for AmqpQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpQueue")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl AmqpQueue {
    /// Connects to the broker, declares the topology and checks it answers.
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidConfig`] naming a bad field;
    /// [`QueueError::Unavailable`] or [`QueueError::Timeout`] when the broker
    /// does not answer.
    pub async fn connect(config: AmqpQueueConfig) -> Result<Self> {
        config.validate()?;
        let queue = AmqpQueue {
            inner: Arc::new(Inner {
                ids: IdGen::new(),
                metrics: QueueMetrics::new(BACKEND, &config.queue.name),
                config,
                link: tokio::sync::Mutex::new(None),
                generation: AtomicU64::new(0),
                next_url: AtomicUsize::new(0),
                leases: Mutex::new(Leases::default()),
                lease_changed: Arc::new(Notify::new()),
            }),
        };
        queue.link().await?;
        tokio::spawn(lease_keeper(Arc::downgrade(&queue.inner)));
        Ok(queue)
    }

    /// The configuration the queue was built with.
    pub fn config(&self) -> &AmqpQueueConfig {
        &self.inner.config
    }
}

#[async_trait]
impl Queue for AmqpQueue {
    async fn enqueue(&self, job: Job) -> Result<Enqueued> {
        let mut out = self.enqueue_batch(vec![job]).await?;
        out.pop().ok_or_else(|| QueueError::Backend {
            message: "empty enqueue answer".into(),
            source: None,
        })
    }
    async fn enqueue_batch(&self, jobs: Vec<Job>) -> Result<Vec<Enqueued>> {
        self.publish_jobs(jobs).await
    }

    async fn dequeue(&self, options: DequeueOptions) -> Result<Vec<Delivery>> {
        self.take_deliveries(options).await
    }

    async fn ack(&self, receipt: &Receipt) -> Result<()> {
        let lease = self.take_lease(receipt)?;
        let link = self.link_of(&lease).await?;
        self.settle_raw(&link, lease.level, lease.tag, true).await?;
        self.inner.metrics.acked.increment(1);
        Ok(())
    }
    async fn nack(&self, receipt: &Receipt, action: Nack) -> Result<()> {
        self.nack_receipt(receipt, action).await
    }

    async fn extend_lease(&self, receipt: &Receipt, lease: Duration) -> Result<()> {
        self.renew_lease(receipt, lease)
    }

    async fn stats(&self) -> Result<QueueStats> {
        self.count().await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        self.list_dead(limit).await
    }

    async fn replay_dead_letters(&self, ids: &[JobId]) -> Result<u64> {
        self.replay_dead(ids).await
    }

    async fn purge_dead_letters(&self) -> Result<u64> {
        self.purge_dead().await
    }

    async fn purge(&self) -> Result<u64> {
        self.purge_all().await
    }

    async fn delete(&self) -> Result<()> {
        self.delete_all().await
    }

    fn capabilities(&self) -> QueueCapabilities {
        QueueCapabilities {
            backend: BACKEND,
            delay: true,
            priority_levels: self.inner.config.queue.priority_levels,
            idempotency: false,
            lease_expiry: true,
            capacity: true,
            exact_stats: false,
            dead_letter_admin: true,
            durable: true,
            caller_ids: true,
        }
    }

    async fn ping(&self) -> Result<()> {
        let link = self.link().await?;
        // A round trip: open and close a channel.
        self.timed(async {
            let channel = link.connection.create_channel().await?;
            channel.close(200, "ping".into()).await?;
            Ok(())
        })
        .await
    }
}
