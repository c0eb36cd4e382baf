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
//! | `q.delays` | durable classic queue | the name of every delay queue declared, each record expiring with its queue, so `purge` and `delete` find delay queues any handle made |
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
//! Receipts from before the drop answer `InvalidReceipt` (the broker has
//! already requeued those jobs).

mod codec;
mod config;
mod error;
mod lease;
mod link;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use self::codec::*;
pub use self::config::{AmqpQueueConfig, AmqpQueueType};
use self::error::AmqpFailure;
use self::lease::*;
use self::link::*;
use crate::error::{Error, Result};
use crate::ids::IdGen;
use crate::metrics::QueueMetrics;
use crate::queue::Queue;
use crate::types::{
    Capabilities, DeadLetter, Delivery, DequeueOptions, Enqueued, Headers, Job, JobId, Nack,
    Priority, QueueStats, Receipt,
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
/// # async fn demo() -> keel_queue::Result<()> {
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
    /// [`Error::InvalidConfig`] naming a bad field; [`Error::Unavailable`]
    /// or [`Error::Timeout`] when the broker does not answer.
    pub async fn connect(config: AmqpQueueConfig) -> Result<Self> {
        config.validate()?;
        let queue = AmqpQueue {
            inner: Arc::new(Inner {
                ids: IdGen::new(),
                metrics: QueueMetrics::new(BACKEND, &config.queue.name),
                config,
                link: tokio::sync::Mutex::new(None),
                generation: AtomicU64::new(0),
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

    fn name(&self) -> &str {
        &self.inner.config.queue.name
    }

    fn ready_queue(&self, level: usize) -> String {
        format!("{}.p{level}", self.name())
    }

    fn dead_queue(&self) -> String {
        format!("{}.dead", self.name())
    }

    /// The queue that records every delay queue declared, so `purge` and
    /// `delete` can find them (the broker cannot list queues over AMQP).
    fn registry_queue(&self) -> String {
        format!("{}.delays", self.name())
    }

    async fn timed<T>(
        &self,
        fut: impl Future<Output = std::result::Result<T, AmqpFailure>>,
    ) -> Result<T> {
        let limit = self.inner.config.operation_timeout;
        match tokio::time::timeout(limit, fut).await {
            Ok(result) => result.map_err(Error::from),
            Err(_) => {
                // A broker that does not answer in time is not trusted again:
                // an abandoned publish would also shift the channel's confirm
                // numbering. The next call reconnects.
                if let Ok(mut slot) = self.inner.link.try_lock()
                    && let Some(link) = slot.take()
                {
                    link.retire();
                }
                Err(Error::Timeout(limit))
            }
        }
    }

    fn queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        match self.inner.config.queue_type {
            AmqpQueueType::Quorum => {
                args.insert("x-queue-type".into(), text("quorum"));
            }
            AmqpQueueType::Classic => {
                args.insert("x-queue-type".into(), text("classic"));
            }
        }
        args
    }

    /// The current link, reconnecting if it is gone.
    async fn link(&self) -> Result<Arc<Link>> {
        let mut slot = self.inner.link.lock().await;
        if let Some(link) = slot.as_ref()
            && link.usable()
        {
            return Ok(link.clone());
        }
        if let Some(old) = slot.take() {
            old.retire();
        }
        let link = Arc::new(self.open_link().await?);
        *slot = Some(link.clone());
        Ok(link)
    }

    async fn open_link(&self) -> Result<Link> {
        let config = &self.inner.config;
        let levels = usize::from(config.queue.priority_levels);
        let generation = self.inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.timed(async {
            let connection = Connection::connect(
                &config.connect_url(),
                ConnectionProperties::default()
                    .with_connection_name(format!("keel-queue {}", self.name()).into()),
            )
            .await?;
            let publisher = connection.create_channel().await?;
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            // Topology, idempotent.
            let durable = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            let dlx = format!("{}.dlx", self.name());
            publisher
                .exchange_declare(
                    dlx.as_str().into(),
                    ExchangeKind::Fanout,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(AmqpFailure::Topology)?;
            publisher
                .queue_declare(
                    self.dead_queue().as_str().into(),
                    durable,
                    self.queue_args(),
                )
                .await
                .map_err(AmqpFailure::Topology)?;
            publisher
                .queue_bind(
                    self.dead_queue().as_str().into(),
                    dlx.as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let mut registry_args = FieldTable::default();
            registry_args.insert("x-queue-type".into(), text("classic"));
            publisher
                .queue_declare(
                    self.registry_queue().as_str().into(),
                    durable,
                    registry_args,
                )
                .await
                .map_err(AmqpFailure::Topology)?;
            for level in 0..levels {
                let mut args = self.queue_args();
                args.insert("x-dead-letter-exchange".into(), text(&dlx));
                args.insert("x-overflow".into(), text("reject-publish"));
                if let Some(capacity) = config.queue.capacity {
                    // A quorum queue enters its reject-publish state only
                    // once its length passes the limit, so it accepts one
                    // message beyond `x-max-length`; a classic queue does not.
                    let limit = match config.queue_type {
                        AmqpQueueType::Quorum => capacity - 1,
                        AmqpQueueType::Classic => capacity,
                    };
                    args.insert("x-max-length".into(), int(limit));
                }
                if config.queue_type == AmqpQueueType::Quorum {
                    args.insert(
                        "x-delivery-limit".into(),
                        int(u64::from(config.queue.max_attempts) + 5),
                    );
                }
                publisher
                    .queue_declare(self.ready_queue(level).as_str().into(), durable, args)
                    .await
                    .map_err(AmqpFailure::Topology)?;
            }
            Ok(Link {
                generation,
                connection: Arc::new(connection),
                publisher,
                declared_delays: Mutex::new(HashSet::new()),
                channels: tokio::sync::OnceCell::new(),
                consumers: tokio::sync::Mutex::new(Vec::new()),
                consuming: AtomicBool::new(false),
                waiting: AtomicUsize::new(0),
                last_demand: Mutex::new(Instant::now()),
                buffers: Mutex::new((0..levels).map(|_| VecDeque::new()).collect()),
                arrived: Notify::new(),
                broken: AtomicBool::new(false),
            })
        })
        .await
        .map_err(|err| match err {
            Error::Unavailable { message, source } => Error::Unavailable {
                message: format!(
                    "rabbitmq at {} does not answer ({message}); is it running?",
                    keel_core::redacted_url(&config.url)
                ),
                source,
            },
            other => other,
        })
    }

    /// Starts one consumer per level on this link unless they run, then
    /// waits briefly until messages already queued have arrived, so a
    /// `dequeue` sees every level and serves priorities in order.
    async fn ensure_consumers(&self, link: &Arc<Link>) -> Result<()> {
        if link.consuming.load(Ordering::Acquire) {
            return Ok(());
        }
        // In a task of its own, so a dequeue dropped mid-setup cannot leave
        // half the consumers started.
        let (this, link) = (self.clone(), link.clone());
        tokio::spawn(async move { this.start_consumers(&link).await })
            .await
            .map_err(|err| Error::Backend {
                message: "starting the consumers failed".into(),
                source: Some(err.into()),
            })?
    }

    async fn start_consumers(&self, link: &Arc<Link>) -> Result<()> {
        let mut running = link.consumers.lock().await;
        if !running.is_empty() {
            return Ok(());
        }
        let levels = usize::from(self.inner.config.queue.priority_levels);
        let channels = link
            .channels
            .get_or_try_init(|| async {
                let mut channels = Vec::with_capacity(levels);
                for _ in 0..levels {
                    let channel = self
                        .timed(async {
                            let channel = link.connection.create_channel().await?;
                            channel
                                .basic_qos(self.inner.config.prefetch, BasicQosOptions::default())
                                .await?;
                            Ok(channel)
                        })
                        .await?;
                    channels.push(channel);
                }
                Ok::<_, Error>(channels)
            })
            .await?;
        let mut expected = Vec::with_capacity(levels);
        link.consuming.store(true, Ordering::Release);
        for (level, channel) in channels.iter().enumerate() {
            let tag = format!(
                "keel-{}-p{level}-{}",
                self.inner.ids.prefix(),
                self.inner.ids.next()
            );
            let started = self
                .timed(async {
                    let declared = channel
                        .queue_declare(
                            self.ready_queue(level).as_str().into(),
                            QueueDeclareOptions {
                                passive: true,
                                ..QueueDeclareOptions::default()
                            },
                            FieldTable::default(),
                        )
                        .await?;
                    let consumer = channel
                        .basic_consume(
                            self.ready_queue(level).as_str().into(),
                            tag.as_str().into(),
                            BasicConsumeOptions::default(),
                            FieldTable::default(),
                        )
                        .await?;
                    Ok((declared.message_count(), consumer))
                })
                .await;
            let (count, consumer) = match started {
                Ok(started) => started,
                Err(err) => {
                    link.mark_broken();
                    return Err(err);
                }
            };
            running.push((
                tag,
                tokio::spawn(pump(Arc::downgrade(link), level, consumer)),
            ));
            expected.push(count.min(u32::from(self.inner.config.prefetch)) as usize);
        }
        let settle = Instant::now() + Duration::from_millis(500);
        while Instant::now() < settle {
            let arrived = link.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let ready = {
                let buffers = link.buffers.lock();
                buffers.iter().zip(&expected).all(|(b, e)| b.len() >= *e)
            };
            if ready {
                break;
            }
            let _ = tokio::time::timeout_at(settle, arrived).await;
        }
        Ok(())
    }

    /// Pauses consumption when no `dequeue` has asked for jobs for
    /// `release_idle_after`, giving prefetched jobs back to the queue, so an
    /// idle (or stuck) handle never hoards jobs other consumers could run.
    async fn release_if_idle(&self, link: &Arc<Link>) {
        let idle = self.inner.config.release_idle_after;
        let is_idle = || {
            link.waiting.load(Ordering::Acquire) == 0 && link.last_demand.lock().elapsed() >= idle
        };
        if !link.consuming.load(Ordering::Acquire) || !is_idle() {
            return;
        }
        let mut running = link.consumers.lock().await;
        if running.is_empty() || !is_idle() {
            return;
        }
        link.consuming.store(false, Ordering::Release);
        let channels = link.channels.get().cloned().unwrap_or_default();
        for ((tag, pump), channel) in running.drain(..).zip(&channels) {
            let _ = self
                .timed(async {
                    Ok(channel
                        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await?)
                })
                .await;
            let _ = tokio::time::timeout(self.inner.config.operation_timeout, pump).await;
        }
        let buffered: Vec<(usize, lapin::message::Delivery)> = {
            let mut buffers = link.buffers.lock();
            buffers
                .iter_mut()
                .enumerate()
                .flat_map(|(level, buffer)| buffer.drain(..).map(move |raw| (level, raw)))
                .collect()
        };
        if !buffered.is_empty() {
            tracing::debug!(
                count = buffered.len(),
                "idle handle: giving prefetched jobs back"
            );
        }
        for (level, raw) in buffered {
            let props = without_broker_headers(&raw.properties);
            let stored = self
                .store(link, level, None, &raw.data, props)
                .await
                .is_ok();
            let _ = self.settle_raw(link, level, raw.delivery_tag, stored).await;
        }
    }

    /// Publishes and waits for the broker's confirm.
    async fn publish(
        &self,
        link: &Link,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<lapin::PublisherConfirm> {
        self.timed(async {
            Ok(link
                .publisher
                .basic_publish(
                    "".into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    payload,
                    properties,
                )
                .await?)
        })
        .await
    }

    /// Waits for the broker's confirm of one publish.
    async fn confirmed(&self, confirm: lapin::PublisherConfirm) -> Result<Stored> {
        match self.timed(async { Ok(confirm.await?) }).await? {
            Confirmation::Ack(None) => Ok(Stored::Yes),
            Confirmation::Ack(Some(_)) => Ok(Stored::Unroutable),
            Confirmation::Nack(_) => {
                self.inner.metrics.full.increment(1);
                Err(Error::Full {
                    capacity: self.inner.config.queue.capacity.unwrap_or(0),
                })
            }
            Confirmation::NotRequested => Err(Error::Backend {
                message: "the broker did not confirm the publish".into(),
                source: None,
            }),
        }
    }

    /// Publishes to `target` and waits for the confirm; a delay queue that
    /// expired since it was declared is declared again and the publish
    /// retried once.
    async fn store(
        &self,
        link: &Link,
        level: usize,
        delay: Option<Duration>,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<()> {
        for first in [true, false] {
            let target = self.route(link, level, delay).await?;
            let confirm = self.publish(link, &target, payload, props.clone()).await?;
            match self.confirmed(confirm).await? {
                Stored::Yes => return Ok(()),
                Stored::Unroutable if first && target != self.ready_queue(level) => {
                    link.declared_delays.lock().remove(&target);
                }
                Stored::Unroutable => return Err(unroutable(&target)),
            }
        }
        Err(unroutable("delay queue"))
    }

    /// The queue a message with this delay goes to, declared once per link.
    async fn delay_queue(&self, link: &Link, level: usize, delay: Duration) -> Result<String> {
        let delay_ms = ms(delay).max(1);
        let name = format!("{}.delay.p{level}.{delay_ms}ms", self.name());
        if link.declared_delays.lock().contains(&name) {
            return Ok(name);
        }
        let mut args = self.queue_args();
        args.insert("x-message-ttl".into(), int(delay_ms));
        args.insert("x-dead-letter-exchange".into(), text(""));
        args.insert(
            "x-dead-letter-routing-key".into(),
            text(&self.ready_queue(level)),
        );
        args.insert("x-expires".into(), int(delay_ms.saturating_add(60_000)));
        if self.inner.config.queue_type == AmqpQueueType::Quorum {
            args.insert("x-overflow".into(), text("reject-publish"));
            args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        }
        self.timed(async {
            link.publisher
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    args,
                )
                .await
                .map_err(AmqpFailure::Topology)
        })
        .await?;
        // Recorded for `purge` and `delete`, for as long as the delay queue
        // can live (it expires a minute after its delay, unused).
        let record = BasicProperties::default()
            .with_delivery_mode(2)
            .with_expiration(delay_ms.saturating_add(120_000).to_string().as_str().into());
        let confirm = self
            .publish(link, &self.registry_queue(), name.as_bytes(), record)
            .await?;
        if let Stored::Unroutable = self.confirmed(confirm).await? {
            return Err(unroutable(&self.registry_queue()));
        }
        link.declared_delays.lock().insert(name.clone());
        Ok(name)
    }

    /// Every delay queue recorded in the registry (taking the records) and
    /// declared by this handle.
    async fn take_delay_queues(&self, link: &Link) -> Result<HashSet<String>> {
        let mut names: HashSet<String> = link.declared_delays.lock().drain().collect();
        let registry = self.registry_queue();
        let taken: Result<Vec<String>> = self
            .timed(async {
                let channel = link.connection.create_channel().await?;
                let mut out = Vec::new();
                while let Some(message) = channel
                    .basic_get(registry.as_str().into(), BasicGetOptions { no_ack: true })
                    .await?
                {
                    out.push(String::from_utf8_lossy(&message.delivery.data).into_owned());
                }
                let _ = channel.close(200, "registry read".into()).await;
                Ok(out)
            })
            .await;
        names.extend(taken?);
        Ok(names)
    }

    /// Deletes one queue on a channel of its own and answers how many
    /// messages it held; a queue that is not there counts as deleted.
    async fn delete_queue(&self, link: &Link, name: &str) -> Result<u64> {
        let deleted = self
            .timed(async {
                let channel = link.connection.create_channel().await?;
                let deleted = channel
                    .queue_delete(name.into(), QueueDeleteOptions::default())
                    .await;
                let _ = channel.close(200, "deleted".into()).await;
                Ok(deleted)
            })
            .await?;
        match deleted {
            Ok(count) => Ok(u64::from(count)),
            // The channel failed but the connection stands: the broker
            // refused on this queue alone, which means it is not there.
            Err(_) if link.usable() => Ok(0),
            Err(err) => Err(Error::from(AmqpFailure::from(err))),
        }
    }

    /// Where a job goes now: its ready queue, or a delay queue.
    async fn route(&self, link: &Link, level: usize, delay: Option<Duration>) -> Result<String> {
        match delay.filter(|d| !d.is_zero()) {
            Some(delay) => self.delay_queue(link, level, delay).await,
            None => Ok(self.ready_queue(level)),
        }
    }

    async fn publish_dead(
        &self,
        link: &Link,
        delivery: &Delivery,
        attempts: u32,
        reason: &str,
    ) -> Result<()> {
        let mut props = properties(
            &delivery.id,
            &delivery.headers,
            u64::from(attempts),
            epoch_ms(delivery.enqueued_at),
            None,
            delivery.priority.0,
        );
        let mut table = props.headers().clone().unwrap_or_default();
        table.insert(H_REASON.into(), text(reason));
        table.insert(H_FAILED.into(), int(now_ms()));
        props = props.with_headers(table);
        let dead = self.dead_queue();
        let confirm = self.publish(link, &dead, &delivery.payload, props).await?;
        if let Stored::Unroutable = self.confirmed(confirm).await? {
            return Err(unroutable(&dead));
        }
        self.inner.metrics.dead_lettered.increment(1);
        tracing::debug!(job = %delivery.id, %reason, "job dead-lettered");
        Ok(())
    }

    /// Turns a raw delivery into ours, or settles it at once when it must
    /// not be delivered (deadline passed, attempts used up).
    fn admit(
        &self,
        link: &Arc<Link>,
        level: usize,
        raw: lapin::message::Delivery,
    ) -> Option<(Delivery, u64)> {
        let meta = read_meta(&raw.properties);
        let redeliveries = meta.delivery_count.unwrap_or(u64::from(raw.redelivered));
        let attempt = (meta.previous_attempts + redeliveries + 1).min(u64::from(u32::MAX)) as u32;
        let delivery = Delivery {
            id: meta.id,
            payload: Bytes::from(raw.data),
            headers: meta.headers,
            receipt: Receipt::from_string(String::new()),
            attempt,
            enqueued_at: UNIX_EPOCH + Duration::from_millis(meta.enqueued_ms),
            priority: Priority(meta.priority),
            deadline: meta
                .deadline_ms
                .map(|d| UNIX_EPOCH + Duration::from_millis(d)),
        };
        let max = self.inner.config.queue.max_attempts;
        let reject = if meta.deadline_ms.is_some_and(|d| d <= now_ms()) {
            Some("deadline exceeded before delivery".to_owned())
        } else if attempt > max {
            Some(self.inner.config.queue.exhausted_reason(&format!(
                "redelivered {redeliveries} times after lease expiry or consumer crash"
            )))
        } else {
            None
        };
        let Some(reason) = reject else {
            return Some((delivery, raw.delivery_tag));
        };
        // Settle in the background so a dropped dequeue cannot strand it.
        let this = self.clone();
        let link = link.clone();
        let tag = raw.delivery_tag;
        tokio::spawn(async move {
            let attempts = attempt.saturating_sub(1);
            let result = this.publish_dead(&link, &delivery, attempts, &reason).await;
            let _ = this.settle_raw(&link, level, tag, result.is_ok()).await;
        });
        None
    }

    /// Acks (`true`) or requeues (`false`) a raw delivery on its level's channel.
    async fn settle_raw(&self, link: &Link, level: usize, tag: u64, ack: bool) -> Result<()> {
        let Some(channel) = link.channels.get().and_then(|c| c.get(level)) else {
            return Err(Error::InvalidReceipt(
                "no consumer channel for this delivery".into(),
            ));
        };
        self.timed(async {
            if ack {
                channel.basic_ack(tag, BasicAckOptions::default()).await?;
            } else {
                channel
                    .basic_nack(
                        tag,
                        BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        },
                    )
                    .await?;
            }
            Ok(())
        })
        .await
    }

    /// Puts a job whose lease expired back at the tail of its level as a
    /// fresh message counting the attempt, then drops the original; if that
    /// fails, hands the original back to the broker.
    async fn requeue_expired(&self, link: &Link, lease: Lease) {
        let d = &lease.delivery;
        let props = properties(
            &d.id,
            &d.headers,
            u64::from(d.attempt),
            epoch_ms(d.enqueued_at),
            d.deadline.map(epoch_ms),
            d.priority.0,
        );
        let stored = self
            .store(link, lease.level, None, &d.payload, props)
            .await
            .is_ok();
        let _ = self.settle_raw(link, lease.level, lease.tag, stored).await;
    }

    /// Removes a valid lease, or says why the receipt is not valid.
    fn take_lease(&self, receipt: &Receipt) -> Result<Lease> {
        let token = receipt
            .as_str()
            .strip_prefix("a:")
            .and_then(|t| t.parse::<u64>().ok())
            .ok_or_else(|| {
                Error::InvalidReceipt(format!(
                    "`{}` is not an amqp-queue receipt",
                    receipt.as_str()
                ))
            })?;
        let mut leases = self.inner.leases.lock();
        match leases.map.get(&token) {
            Some(lease) if lease.expires > Instant::now() => {
                Ok(leases.map.remove(&token).expect("just seen"))
            }
            Some(_) => Err(Error::InvalidReceipt(
                "the lease expired; the job is being redelivered".into(),
            )),
            None => Err(Error::InvalidReceipt(
                "the lease expired or the delivery was already settled".into(),
            )),
        }
    }

    /// The link a lease belongs to, if it is still the live one.
    async fn link_of(&self, lease: &Lease) -> Result<Arc<Link>> {
        let link = self.link().await?;
        if link.generation != lease.generation {
            return Err(Error::InvalidReceipt(
                "the connection was lost since this delivery; the broker requeued the job".into(),
            ));
        }
        Ok(link)
    }

    async fn nack_inner(&self, lease: Lease, action: Nack) -> Result<()> {
        let link = self.link_of(&lease).await?;
        let config = &self.inner.config.queue;
        let attempt = lease.delivery.attempt;
        let outcome = match action {
            Nack::DeadLetter { reason } => {
                self.publish_dead(&link, &lease.delivery, attempt, &reason)
                    .await
            }
            Nack::Retry { reason, .. } if attempt >= config.max_attempts => {
                self.publish_dead(
                    &link,
                    &lease.delivery,
                    attempt,
                    &config.exhausted_reason(&reason),
                )
                .await
            }
            Nack::Retry { after, .. } => {
                let delay = after.unwrap_or_else(|| config.backoff_for(attempt));
                let d = &lease.delivery;
                let props = properties(
                    &d.id,
                    &d.headers,
                    u64::from(attempt),
                    epoch_ms(d.enqueued_at),
                    d.deadline.map(epoch_ms),
                    d.priority.0,
                );
                let result = self
                    .store(&link, lease.level, Some(delay), &d.payload, props)
                    .await;
                if result.is_ok() {
                    self.inner.metrics.retried.increment(1);
                }
                result
            }
            Nack::Release { reason } => {
                // Untried: a fresh message at the tail of its ready queue
                // that does not count this delivery, so the next one
                // repeats its attempt number. Never dead-lettered.
                let d = &lease.delivery;
                let props = properties(
                    &d.id,
                    &d.headers,
                    u64::from(attempt.saturating_sub(1)),
                    epoch_ms(d.enqueued_at),
                    d.deadline.map(epoch_ms),
                    d.priority.0,
                );
                let result = self
                    .store(&link, lease.level, None, &d.payload, props)
                    .await;
                if result.is_ok() {
                    self.inner.metrics.released.increment(1);
                    tracing::debug!(job = %d.id, %reason, "job released");
                }
                result
            }
        };
        // The copy is safely stored: drop the original. If storing failed,
        // give the original back to the broker instead (never stranded).
        let settled = self
            .settle_raw(&link, lease.level, lease.tag, outcome.is_ok())
            .await;
        outcome.and(settled)
    }
}

/// How a confirmed publish ended.
enum Stored {
    Yes,
    /// `mandatory` publish with no queue to route to.
    Unroutable,
}

fn unroutable(target: &str) -> Error {
    Error::Backend {
        message: format!("message was unroutable: queue `{target}` does not exist"),
        source: None,
    }
}

#[async_trait]
impl Queue for AmqpQueue {
    async fn enqueue(&self, job: Job) -> Result<Enqueued> {
        let mut out = self.enqueue_batch(vec![job]).await?;
        out.pop().ok_or_else(|| Error::Backend {
            message: "empty enqueue answer".into(),
            source: None,
        })
    }

    async fn enqueue_batch(&self, jobs: Vec<Job>) -> Result<Vec<Enqueued>> {
        let config = &self.inner.config.queue;
        for job in &jobs {
            config.check_priority(job.priority)?;
            crate::types::check_job(job, &LIMITS)?;
            if job.idempotency_key.is_some() {
                return Err(Error::Unsupported {
                    backend: BACKEND,
                    what: "idempotency keys (RabbitMQ has no deduplication); enqueue without one or use the redis backend".into(),
                });
            }
        }
        let link = self.link().await?;
        let enqueued_ms = now_ms();
        // Publish the whole batch, then wait for the confirms.
        let mut pending = Vec::with_capacity(jobs.len());
        for job in &jobs {
            let id = job.id.clone().unwrap_or_else(|| self.inner.ids.next());
            let level = usize::from(job.priority.0);
            let target = self.route(&link, level, job.delay).await?;
            let props = properties(
                &id,
                &job.headers,
                0,
                enqueued_ms,
                job.deadline.map(epoch_ms),
                job.priority.0,
            );
            let confirm = self
                .publish(&link, &target, &job.payload, props.clone())
                .await?;
            pending.push((id, job, props, confirm));
        }
        let mut out = Vec::with_capacity(pending.len());
        for (id, job, props, confirm) in pending {
            if let Stored::Unroutable = self.confirmed(confirm).await? {
                let level = usize::from(job.priority.0);
                self.store(&link, level, job.delay, &job.payload, props)
                    .await?;
            }
            self.inner.metrics.enqueued.increment(1);
            out.push(Enqueued {
                id,
                duplicate: false,
            });
        }
        Ok(out)
    }

    async fn dequeue(&self, options: DequeueOptions) -> Result<Vec<Delivery>> {
        options.validate()?;
        let give_up = Instant::now() + options.wait;
        let link = self.link().await?;
        let _demand = Demand::new(&link);
        self.ensure_consumers(&link).await?;
        loop {
            let arrived = link.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let taken: Vec<(usize, lapin::message::Delivery)> = {
                let mut buffers = link.buffers.lock();
                let mut taken = Vec::new();
                for level in (0..buffers.len()).rev() {
                    while taken.len() < options.max {
                        match buffers[level].pop_front() {
                            Some(raw) => taken.push((level, raw)),
                            None => break,
                        }
                    }
                }
                taken
            };
            if !taken.is_empty() {
                let now = Instant::now();
                let mut out = Vec::with_capacity(taken.len());
                let mut leases = self.inner.leases.lock();
                for (level, raw) in taken {
                    let Some((mut delivery, tag)) = self.admit(&link, level, raw) else {
                        continue;
                    };
                    let token = leases.next;
                    leases.next += 1;
                    delivery.receipt = Receipt::from_string(format!("a:{token}"));
                    let expires = now + options.lease;
                    leases.expiry.push(Reverse((expires, token)));
                    leases.map.insert(
                        token,
                        Lease {
                            generation: link.generation,
                            level,
                            tag,
                            expires,
                            delivery: delivery.clone(),
                        },
                    );
                    out.push(delivery);
                }
                drop(leases);
                if !out.is_empty() {
                    self.inner.lease_changed.notify_waiters();
                    self.inner.metrics.delivered.increment(out.len() as u64);
                    return Ok(out);
                }
                continue;
            }
            if !link.usable() {
                return Err(Error::Unavailable {
                    message:
                        "the rabbitmq connection dropped while waiting; the next call reconnects"
                            .into(),
                    source: None,
                });
            }
            if Instant::now() >= give_up {
                return Ok(Vec::new());
            }
            let _ = tokio::time::timeout_at(give_up, arrived).await;
        }
    }

    async fn ack(&self, receipt: &Receipt) -> Result<()> {
        let lease = self.take_lease(receipt)?;
        let link = self.link_of(&lease).await?;
        self.settle_raw(&link, lease.level, lease.tag, true).await?;
        self.inner.metrics.acked.increment(1);
        Ok(())
    }

    async fn nack(&self, receipt: &Receipt, action: Nack) -> Result<()> {
        let lease = self.take_lease(receipt)?;
        let (generation, level, tag) = (lease.generation, lease.level, lease.tag);
        // Finish even if the caller stops waiting, so the delivery is never
        // left unsettled on the channel.
        let this = self.clone();
        match tokio::spawn(async move { this.nack_inner(lease, action).await }).await {
            Ok(result) => result,
            Err(err) => {
                // The task failed before settling: hand the original back
                // to the broker, so the job is never stranded.
                if let Some(link) = self.inner.link.lock().await.clone()
                    && link.generation == generation
                {
                    let _ = self.settle_raw(&link, level, tag, false).await;
                }
                Err(Error::Backend {
                    message: "the nack task failed; the job was handed back".into(),
                    source: Some(err.into()),
                })
            }
        }
    }

    async fn extend_lease(&self, receipt: &Receipt, lease: Duration) -> Result<()> {
        crate::types::check_lease(lease)?;
        let mut held = self.take_lease(receipt)?;
        let token = receipt.as_str()[2..]
            .parse::<u64>()
            .expect("validated by take_lease");
        held.expires = Instant::now() + lease;
        let mut leases = self.inner.leases.lock();
        leases.expiry.push(Reverse((held.expires, token)));
        leases.map.insert(token, held);
        drop(leases);
        self.inner.lease_changed.notify_waiters();
        Ok(())
    }

    async fn stats(&self) -> Result<QueueStats> {
        let link = self.link().await?;
        let levels = usize::from(self.inner.config.queue.priority_levels);
        let mut names: Vec<(String, bool)> =
            (0..levels).map(|l| (self.ready_queue(l), false)).collect();
        names.extend(
            link.declared_delays
                .lock()
                .iter()
                .map(|n| (n.clone(), true)),
        );
        let mut stats = QueueStats::default();
        for (name, delayed) in names {
            // A fresh channel per look: a missing (expired) delay queue
            // closes the channel it was asked on.
            let count = self
                .timed(async {
                    let channel = link.connection.create_channel().await?;
                    let declared = channel
                        .queue_declare(
                            name.as_str().into(),
                            QueueDeclareOptions {
                                passive: true,
                                ..QueueDeclareOptions::default()
                            },
                            FieldTable::default(),
                        )
                        .await;
                    let _ = channel.close(200, "stats".into()).await;
                    Ok(declared.map(|q| u64::from(q.message_count())).unwrap_or(0))
                })
                .await?;
            if delayed {
                stats.delayed += count;
            } else {
                stats.ready += count;
            }
        }
        stats.in_flight = self.inner.leases.lock().map.len() as u64
            + link
                .buffers
                .lock()
                .iter()
                .map(|b| b.len() as u64)
                .sum::<u64>();
        stats.dead = self
            .timed(async {
                let channel = link.connection.create_channel().await?;
                let declared = channel
                    .queue_declare(
                        self.dead_queue().as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                let _ = channel.close(200, "stats".into()).await;
                Ok(u64::from(declared.message_count()))
            })
            .await?;
        self.inner.metrics.record_stats(&stats);
        Ok(stats)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let link = self.link().await?;
        let dead = self.dead_queue();
        self.timed(async {
            // Read without acking, then close the channel: the broker puts
            // every message back.
            let channel = link.connection.create_channel().await?;
            let mut out = Vec::new();
            while out.len() < limit {
                let Some(message) = channel
                    .basic_get(dead.as_str().into(), BasicGetOptions::default())
                    .await?
                else {
                    break;
                };
                let delivery = message.delivery;
                let meta = read_meta(&delivery.properties);
                out.push(DeadLetter {
                    id: meta.id,
                    payload: Bytes::from(delivery.data),
                    headers: meta.headers,
                    reason: meta.reason.unwrap_or_else(|| "unknown".into()),
                    attempts: meta.previous_attempts.min(u64::from(u32::MAX)) as u32,
                    priority: Priority(meta.priority),
                    enqueued_at: UNIX_EPOCH + Duration::from_millis(meta.enqueued_ms),
                    failed_at: UNIX_EPOCH + Duration::from_millis(meta.failed_ms.unwrap_or(0)),
                });
            }
            let _ = channel.close(200, "listed".into()).await;
            Ok(out)
        })
        .await
    }

    async fn replay_dead_letters(&self, ids: &[JobId]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let link = self.link().await?;
        let dead = self.dead_queue();
        let wanted: HashSet<&JobId> = ids.iter().collect();
        let channel = self
            .timed(async { Ok(link.connection.create_channel().await?) })
            .await?;
        let mut replayed = 0u64;
        let mut scanned = 0usize;
        let result: Result<()> = async {
            while scanned < REPLAY_SCAN_LIMIT && (replayed as usize) < wanted.len() {
                let Some(message) = self
                    .timed(async {
                        Ok(channel
                            .basic_get(dead.as_str().into(), BasicGetOptions::default())
                            .await?)
                    })
                    .await?
                else {
                    break;
                };
                scanned += 1;
                let delivery = message.delivery;
                let meta = read_meta(&delivery.properties);
                if !wanted.contains(&meta.id) {
                    continue;
                }
                let level = usize::from(meta.priority)
                    .min(usize::from(self.inner.config.queue.priority_levels) - 1);
                let target = self.ready_queue(level);
                let props = properties(
                    &meta.id,
                    &meta.headers,
                    0,
                    meta.enqueued_ms,
                    None,
                    level as u8,
                );
                let confirm = self.publish(&link, &target, &delivery.data, props).await?;
                if let Stored::Unroutable = self.confirmed(confirm).await? {
                    return Err(unroutable(&target));
                }
                self.timed(async {
                    Ok(channel
                        .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                        .await?)
                })
                .await?;
                replayed += 1;
            }
            Ok(())
        }
        .await;
        let _ = channel.close(200, "replayed".into()).await;
        result.map(|()| replayed)
    }

    async fn purge_dead_letters(&self) -> Result<u64> {
        let link = self.link().await?;
        let dead = self.dead_queue();
        self.timed(async {
            let count = link
                .publisher
                .queue_purge(dead.as_str().into(), QueuePurgeOptions::default())
                .await?;
            Ok(u64::from(count))
        })
        .await
    }

    async fn purge(&self) -> Result<u64> {
        let link = self.link().await?;
        let levels = usize::from(self.inner.config.queue.priority_levels);
        let mut removed = 0u64;
        for level in 0..levels {
            let name = self.ready_queue(level);
            removed += self
                .timed(async {
                    Ok(u64::from(
                        link.publisher
                            .queue_purge(name.as_str().into(), QueuePurgeOptions::default())
                            .await?,
                    ))
                })
                .await?;
        }
        // What this handle prefetched but nobody dequeued is waiting too.
        let buffered: Vec<(usize, u64)> = {
            let mut buffers = link.buffers.lock();
            buffers
                .iter_mut()
                .enumerate()
                .flat_map(|(level, buffer)| {
                    buffer.drain(..).map(move |raw| (level, raw.delivery_tag))
                })
                .collect()
        };
        for (level, tag) in buffered {
            self.settle_raw(&link, level, tag, true).await?;
            removed += 1;
        }
        // Delay queues go altogether: a later delay declares its queue
        // again.
        for name in self.take_delay_queues(&link).await? {
            removed += self.delete_queue(&link, &name).await?;
        }
        Ok(removed)
    }

    async fn delete(&self) -> Result<()> {
        let link = self.link().await?;
        let levels = usize::from(self.inner.config.queue.priority_levels);
        let mut names: Vec<String> = (0..levels).map(|l| self.ready_queue(l)).collect();
        names.extend(self.take_delay_queues(&link).await?);
        names.push(self.dead_queue());
        names.push(self.registry_queue());
        for name in &names {
            self.delete_queue(&link, name).await?;
        }
        let dlx = format!("{}.dlx", self.name());
        self.timed(async {
            let channel = link.connection.create_channel().await?;
            let _ = channel
                .exchange_delete(dlx.as_str().into(), ExchangeDeleteOptions::default())
                .await;
            let _ = channel.close(200, "deleted".into()).await;
            Ok(())
        })
        .await?;
        // Nothing this handle held is valid any more; the next call
        // reconnects and declares the queue afresh.
        self.inner.leases.lock().map.clear();
        if let Some(link) = self.inner.link.lock().await.take() {
            link.retire();
        }
        Ok(())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
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
