//! The Redis Streams backend (feature `redis`).
//!
//! # Layout
//!
//! Every key of a queue named `q` starts with `keel:{q}`, so the hash tag
//! `{q}` puts the whole queue in one slot of a Redis Cluster:
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `keel:{q}:p:<level>` | stream, consumer group `keel` | ready and leased jobs, one stream per priority level |
//! | `keel:{q}:leases` | sorted set | leased entries by lease expiry (server time) |
//! | `keel:{q}:delayed` | sorted set | delayed and backing-off jobs by due time |
//! | `keel:{q}:d:<id>` | hash | the body of one delayed job |
//! | `keel:{q}:dead` | stream | dead letters with their reason |
//! | `keel:{q}:dead-index` | hash | job id → dead-letter entry, for replay |
//! | `keel:{q}:idem:<key>` | string with a TTL | idempotency keys (`SET NX PX`) |
//! | `keel:{q}:size` | counter | jobs held, for the capacity bound |
//!
//! Every state change is one Lua script, so it is atomic: a job is always in
//! exactly one place. Acked entries are deleted from their stream at once
//! (`XACK` + `XDEL`), so streams do not grow with history. Work on due jobs
//! and expired leases is bounded per call (256 of each), so a backlog of any
//! size never turns one call into a long blocking script.
//!
//! # What `Ok` from `enqueue` promises
//!
//! The Redis server has applied the write. Whether it survives a server
//! crash is the server's persistence setting: with `appendonly yes` and
//! `appendfsync always` it is on disk; with the defaults (`everysec`) up to
//! a second of writes can be lost on a crash; with persistence off (as in
//! our tests) a restart empties the queue. Replication is asynchronous
//! unless you add `WAIT`.
//!
//! # Leases and crashed consumers
//!
//! A delivered job keeps its stream entry (in the group's pending list) and
//! gets a lease in `keel:{q}:leases`, timed by the **server's** clock so
//! consumers with skewed clocks agree. When the lease expires, the next
//! `dequeue` or `stats` call from any process moves the job back to the tail
//! of its priority (a new entry, `attempt + 1`) or to the dead letters after
//! `max_attempts`. A `Nack::Release` moves it back to the tail at once as a
//! new entry with its attempt count unchanged. A consumer that crashed
//! holding jobs therefore loses nothing: its jobs reach another consumer one
//! lease later. Leases are kept
//! in our own sorted set rather than reclaimed with `XAUTOCLAIM` because
//! every `dequeue` may ask for its own lease length, which one
//! `XAUTOCLAIM` idle threshold cannot express.
//!
//! # Waiting
//!
//! An empty `dequeue` blocks on a dedicated connection with `XREAD BLOCK`
//! for entries newer than the streams' last ids (a long poll, never a busy
//! loop), up to the next delayed job or lease expiry. Blocking connections
//! come from their own small pool, so waiting consumers never starve
//! producers of connections. A dropped `dequeue` future discards its
//! blocking connection rather than returning it mid-command.
//!
//! # Failures
//!
//! Every operation is bounded by `operation_timeout`. A dropped connection
//! is reported as a retryable `Unavailable` and replaced on the next call
//! (the pool checks connections before reuse). If the server restarts and
//! loses its data, the consumer group is recreated on the next `dequeue`:
//! a consumer never stays silently dead.

mod config;
mod error;
mod lanes;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::{AsyncConnectionConfig, Script};
use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

pub use self::config::RedisQueueConfig;
use self::error::RedisFailure;
use self::lanes::Lanes;
use crate::error::{Error, Result};
use crate::ids::IdGen;
use crate::metrics::QueueMetrics;
use crate::queue::Queue;
use crate::types::{
    Capabilities, DeadLetter, Delivery, DequeueOptions, Enqueued, Headers, Job, JobId, Nack,
    Priority, QueueStats, Receipt,
};

const BACKEND: &str = "redis";
/// Jobs per enqueue script call.
const ENQUEUE_CHUNK: usize = 256;

macro_rules! lua {
    ($file:literal) => {
        concat!(include_str!("lua/common.lua"), include_str!($file))
    };
}

struct Scripts {
    enqueue: Script,
    dequeue: Script,
    settle: Script,
    admin: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            enqueue: Script::new(lua!("lua/enqueue.lua")),
            dequeue: Script::new(lua!("lua/dequeue.lua")),
            settle: Script::new(lua!("lua/settle.lua")),
            admin: Script::new(lua!("lua/admin.lua")),
        }
    }
}

/// A durable queue on Redis Streams; see the [module docs](crate::RedisQueue#layout)
/// for the layout and promises.
///
/// Cloning is cheap; clones share the connection pools.
///
/// ```no_run
/// # async fn demo() -> keel_queue::Result<()> {
/// use keel_queue::{Job, Queue, QueueConfig, RedisQueue, RedisQueueConfig};
///
/// let queue = RedisQueue::connect(RedisQueueConfig::new(
///     "redis://127.0.0.1:6379",
///     QueueConfig::new("embeddings").capacity(100_000),
/// ))
/// .await?;
/// queue.enqueue(Job::new("hello")).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisQueue {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisQueueConfig,
    prefix: String,
    size_key: String,
    consumer: String,
    ids: IdGen,
    lanes: Lanes,
    blocking: deadpool_redis::Pool,
    scripts: Scripts,
    metrics: QueueMetrics,
}

impl fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisQueue")
            .field("config", &self.inner.config)
            .field("prefix", &self.inner.prefix)
            .field("consumer", &self.inner.consumer)
            .finish_non_exhaustive()
    }
}

/// One delivery row from `dequeue.lua`: the lease member and the raw entry
/// fields (`m` meta, `p` payload, optional `h` headers and `d` deadline).
type Row = (String, Vec<Vec<u8>>);
/// Deliveries per `dequeue` call at most (keeps each script call short).
const DEQUEUE_MAX: usize = 1_000;
/// Receipts per ack script call.
const ACK_CHUNK: usize = 1_000;

fn ms(d: Duration) -> u64 {
    // Round up so sub-millisecond delays and leases are never zero.
    d.as_micros().div_ceil(1000).min(u128::from(u64::MAX)) as u64
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_epoch_ms(text: &str) -> Option<SystemTime> {
    text.parse::<u64>()
        .ok()
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
}

fn encode_headers(headers: &Headers) -> Result<String> {
    if headers.is_empty() {
        return Ok(String::new());
    }
    serde_json::to_string(headers).map_err(|err| Error::Codec {
        message: "could not encode headers".into(),
        source: Some(err.into()),
    })
}

fn decode_headers(text: &[u8]) -> Result<Headers> {
    if text.is_empty() {
        return Ok(BTreeMap::new());
    }
    serde_json::from_slice(text).map_err(|err| Error::Codec {
        message: "stored headers are not valid JSON".into(),
        source: Some(err.into()),
    })
}

/// Receipt text: `<lease member>|<attempt>`.
fn parse_receipt(receipt: &Receipt) -> Result<(&str, u32)> {
    let bad = || {
        Error::InvalidReceipt(format!(
            "`{}` is not a redis-queue receipt",
            receipt.as_str()
        ))
    };
    let (member, attempt) = receipt.as_str().rsplit_once('|').ok_or_else(bad)?;
    Ok((member, attempt.parse().map_err(|_| bad())?))
}

fn protocol(what: impl Into<String>) -> Error {
    RedisFailure::Protocol(what.into()).into()
}

/// Takes a blocking connection out of its pool if the read is abandoned,
/// so no one reuses a connection with a blocking command in flight.
struct DetachOnDrop(Option<deadpool_redis::Connection>);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(deadpool_redis::Connection::take(conn));
        }
    }
}

impl RedisQueue {
    /// Connects to Redis and checks that it answers.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming a bad field; [`Error::Unavailable`]
    /// or [`Error::Timeout`] when the server does not answer.
    pub async fn connect(config: RedisQueueConfig) -> Result<Self> {
        config.validate()?;
        let pool = Self::pool(
            &config,
            config.pool_size,
            Some(config.operation_timeout + Duration::from_secs(1)),
        )?;
        // Blocking reads take up to `max_block`; our own timeout bounds them.
        let blocking = Self::pool(&config, config.blocking_connections, None)?;
        let ids = IdGen::new();
        let prefix = format!("keel:{{{}}}", config.queue.name);
        let queue = RedisQueue {
            inner: Arc::new(Inner {
                size_key: format!("{prefix}:size"),
                consumer: format!("c-{}", ids.prefix()),
                prefix,
                ids,
                lanes: Lanes::new(pool, config.pool_size),
                blocking,
                scripts: Scripts::new(),
                metrics: QueueMetrics::new(BACKEND, &config.queue.name),
                config,
            }),
        };
        queue.ping().await.map_err(|err| match err {
            Error::Unavailable { message, source } => Error::Unavailable {
                message: format!(
                    "redis at {} does not answer ({message}); is it running?",
                    crate::config::redacted_url(&queue.inner.config.url)
                ),
                source,
            },
            other => other,
        })?;
        Ok(queue)
    }

    fn pool(
        config: &RedisQueueConfig,
        size: usize,
        response_timeout: Option<Duration>,
    ) -> Result<deadpool_redis::Pool> {
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.operation_timeout))
            .set_response_timeout(response_timeout);
        let manager = deadpool_redis::Manager::new_with_config(config.url.as_str(), connection)
            .map_err(|err| Error::config("url", format!("not a usable redis URL: {err}")))?;
        deadpool_redis::Pool::builder(manager)
            .max_size(size)
            .runtime(deadpool_redis::Runtime::Tokio1)
            .wait_timeout(Some(config.operation_timeout))
            .create_timeout(Some(config.operation_timeout))
            // A health check that hangs means a dead connection: give up on
            // it quickly and make a new one within the operation's budget.
            .recycle_timeout(Some(
                (config.operation_timeout / 4).max(Duration::from_millis(10)),
            ))
            .build()
            .map_err(|err| Error::config("pool_size", format!("could not build the pool: {err}")))
    }

    /// The configuration the queue was built with.
    pub fn config(&self) -> &RedisQueueConfig {
        &self.inner.config
    }

    /// Runs `fut` under the operation timeout, classifying its failure.
    async fn timed<T>(
        &self,
        fut: impl Future<Output = std::result::Result<T, RedisFailure>>,
    ) -> Result<T> {
        let limit = self.inner.config.operation_timeout;
        match tokio::time::timeout(limit, fut).await {
            Ok(result) => result.map_err(Error::from),
            Err(_) => Err(Error::Timeout(limit)),
        }
    }

    /// Runs `op` on a lane's connection under the operation timeout; a lane
    /// whose connection failed or hung is emptied (and its connection taken
    /// out of the pool).
    async fn on_lane<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnOnce(::redis::aio::MultiplexedConnection) -> Fut,
        Fut: Future<Output = std::result::Result<T, RedisFailure>>,
    {
        let lanes = &self.inner.lanes;
        let mut used = None;
        let result = self
            .timed(async {
                let lane = lanes.get().await?;
                used = Some(lane.index);
                op(lane.conn).await
            })
            .await;
        if let (Err(Error::Unavailable { .. } | Error::Timeout(_)), Some(index)) = (&result, used) {
            lanes.forget(index);
        }
        result
    }

    /// Runs one plain command on a lane.
    async fn command<T: ::redis::FromRedisValue>(&self, cmd: &::redis::Cmd) -> Result<T> {
        self.on_lane(|mut conn| async move { Ok(cmd.query_async(&mut conn).await?) })
            .await
    }

    /// Invokes one of our scripts with the queue's key and prefix first.
    async fn invoke<T: ::redis::FromRedisValue>(
        &self,
        script: &Script,
        args: impl FnOnce(&mut ::redis::ScriptInvocation<'_>),
    ) -> Result<T> {
        let mut invocation = script.prepare_invoke();
        invocation.key(&self.inner.size_key).arg(&self.inner.prefix);
        args(&mut invocation);
        let invocation = &invocation;
        self.on_lane(|mut conn| async move { Ok(invocation.invoke_async(&mut conn).await?) })
            .await
    }

    async fn enqueue_chunk(&self, jobs: Vec<Job>) -> Result<Vec<Enqueued>> {
        let queue = &self.inner.config.queue;
        let mut encoded = Vec::with_capacity(jobs.len());
        for job in &jobs {
            queue.check_priority(job.priority)?;
            encoded.push((self.inner.ids.next(), encode_headers(&job.headers)?));
        }
        let rows: Vec<String> = self
            .invoke(&self.inner.scripts.enqueue, |inv| {
                let now = epoch_ms(SystemTime::now());
                inv.arg(queue.capacity.unwrap_or(0))
                    .arg(ms(queue.dedup_window))
                    .arg(now)
                    .arg(jobs.len());
                for (job, (id, headers)) in jobs.iter().zip(&encoded) {
                    let meta = format!("{id}|0|{now}|{}", job.priority.0);
                    inv.arg(id.as_str())
                        .arg(job.priority.0)
                        .arg(job.delay.map_or(0, ms))
                        .arg(job.idempotency_key.as_deref().unwrap_or(""))
                        .arg(&job.payload[..])
                        .arg(headers.as_str())
                        .arg(
                            job.deadline
                                .map(|d| epoch_ms(d).to_string())
                                .unwrap_or_default(),
                        )
                        .arg(meta);
                }
            })
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (status, (id, _)) in rows.into_iter().zip(encoded) {
            match status.as_str() {
                "" => {
                    self.inner.metrics.enqueued.increment(1);
                    out.push(Enqueued {
                        id,
                        duplicate: false,
                    });
                }
                "!" => {
                    self.inner.metrics.full.increment(1);
                    return Err(Error::Full {
                        capacity: queue.capacity.unwrap_or(0),
                    });
                }
                existing => {
                    self.inner.metrics.duplicates.increment(1);
                    out.push(Enqueued {
                        id: JobId::from_string(existing),
                        duplicate: true,
                    });
                }
            }
        }
        Ok(out)
    }

    fn delivery(&self, (member, fields): Row) -> Result<Delivery> {
        let mut meta = None;
        let mut payload = Vec::new();
        let mut headers = Headers::new();
        let mut deadline = None;
        let mut it = fields.into_iter();
        while let (Some(name), Some(value)) = (it.next(), it.next()) {
            match name.as_slice() {
                b"m" => {
                    meta =
                        Some(String::from_utf8(value).map_err(|_| protocol("meta is not UTF-8"))?)
                }
                b"p" => payload = value,
                b"h" => headers = decode_headers(&value)?,
                b"d" => deadline = from_epoch_ms(&String::from_utf8_lossy(&value)),
                _ => {}
            }
        }
        let meta = meta.ok_or_else(|| protocol("entry without meta"))?;
        let mut parts = meta.rsplitn(4, '|');
        let (level, enqueued, previous, id) =
            (parts.next(), parts.next(), parts.next(), parts.next());
        let (Some(level), Some(enqueued), Some(previous), Some(id)) =
            (level, enqueued, previous, id)
        else {
            return Err(protocol(format!("entry meta `{meta}`")));
        };
        let attempt = previous
            .parse::<u32>()
            .map_err(|_| protocol(format!("attempt count `{previous}`")))?
            + 1;
        Ok(Delivery {
            id: JobId::from_string(id),
            payload: Bytes::from(payload),
            headers,
            receipt: Receipt::from_string(format!("{member}|{attempt}")),
            attempt,
            enqueued_at: from_epoch_ms(enqueued).unwrap_or(UNIX_EPOCH),
            priority: Priority(level.parse().unwrap_or(0)),
            deadline,
        })
    }

    /// Waits up to `block` for an entry newer than `last_ids` in any level.
    async fn block_for_new(&self, last_ids: &[String], block: Duration) -> Result<()> {
        let inner = &self.inner;
        let conn = match tokio::time::timeout(inner.config.operation_timeout, inner.blocking.get())
            .await
        {
            Ok(Ok(conn)) => conn,
            // Every blocking connection is busy (or Redis is unreachable):
            // wait without one; the next look at the queue reports errors.
            _ => {
                tokio::time::sleep(block).await;
                return Ok(());
            }
        };
        let mut guard = DetachOnDrop(Some(conn));
        let mut cmd = ::redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(ms(block).max(1))
            .arg("STREAMS");
        for level in 0..last_ids.len() {
            cmd.arg(format!("{}:p:{level}", inner.prefix));
        }
        cmd.arg(last_ids);
        let limit = block + inner.config.operation_timeout;
        let conn = guard.0.as_mut().expect("just set");
        match tokio::time::timeout(limit, cmd.query_async::<::redis::Value>(&mut **conn)).await {
            Ok(Ok(_)) => {
                guard.0.take(); // healthy: back to the pool
                Ok(())
            }
            Ok(Err(err)) => Err(RedisFailure::Redis(err).into()),
            Err(_) => Err(Error::Timeout(limit)),
        }
    }

    /// Runs one settle action on one lease and answers its status.
    async fn settle_one(
        &self,
        args: impl FnOnce(&mut ::redis::ScriptInvocation<'_>),
    ) -> Result<String> {
        let status: Vec<String> = self.invoke(&self.inner.scripts.settle, args).await?;
        status
            .into_iter()
            .next()
            .ok_or_else(|| protocol("empty settle answer"))
    }
}

fn invalid_receipt() -> Error {
    Error::InvalidReceipt("the lease expired or the delivery was already settled".into())
}

#[async_trait]
impl Queue for RedisQueue {
    async fn enqueue(&self, job: Job) -> Result<Enqueued> {
        let mut out = self.enqueue_chunk(vec![job]).await?;
        out.pop().ok_or_else(|| protocol("empty enqueue answer"))
    }

    async fn enqueue_batch(&self, mut jobs: Vec<Job>) -> Result<Vec<Enqueued>> {
        let mut out = Vec::with_capacity(jobs.len());
        while !jobs.is_empty() {
            let rest = jobs.split_off(jobs.len().min(ENQUEUE_CHUNK));
            out.extend(self.enqueue_chunk(jobs).await?);
            jobs = rest;
        }
        Ok(out)
    }

    async fn dequeue(&self, options: DequeueOptions) -> Result<Vec<Delivery>> {
        if options.max == 0 {
            return Err(Error::InvalidArgument {
                name: "max",
                reason: "must be at least 1".into(),
            });
        }
        let inner = &self.inner;
        let give_up = Instant::now() + options.wait;
        loop {
            let (wake, last_ids, rows): (String, Vec<String>, Vec<Row>) = self
                .invoke(&inner.scripts.dequeue, |inv| {
                    inv.arg(&inner.consumer)
                        .arg(options.max.min(DEQUEUE_MAX))
                        .arg(ms(options.lease))
                        .arg(inner.config.queue.max_attempts)
                        .arg(inner.config.queue.priority_levels);
                })
                .await?;
            if !rows.is_empty() {
                inner.metrics.delivered.increment(rows.len() as u64);
                return rows.into_iter().map(|row| self.delivery(row)).collect();
            }
            let now = Instant::now();
            if now >= give_up {
                return Ok(Vec::new());
            }
            let mut block = (give_up - now).min(inner.config.max_block);
            if let Ok(wake_ms) = wake.parse::<i64>()
                && wake_ms >= 0
            {
                block = block.min(Duration::from_millis(wake_ms as u64));
            }
            self.block_for_new(&last_ids, block.max(Duration::from_millis(1)))
                .await?;
        }
    }

    async fn ack(&self, receipt: &Receipt) -> Result<()> {
        self.ack_batch(std::slice::from_ref(receipt)).await
    }

    async fn ack_batch(&self, receipts: &[Receipt]) -> Result<()> {
        let mut members = Vec::with_capacity(receipts.len());
        let mut malformed = 0usize;
        for receipt in receipts {
            match parse_receipt(receipt).ok().and_then(|(member, _)| {
                member
                    .split_once(':')
                    .map(|(level, eid)| (member, level, eid))
            }) {
                Some(parts) => members.push(parts),
                None => malformed += 1,
            }
        }
        let (mut acked, mut invalid) = (0u64, 0u64);
        for chunk in members.chunks(ACK_CHUNK) {
            let (a, i): (u64, u64) = self
                .invoke(&self.inner.scripts.settle, |inv| {
                    inv.arg("ack").arg(chunk.len());
                    for (member, _, _) in chunk {
                        inv.arg(*member);
                    }
                    for (_, level, _) in chunk {
                        inv.arg(*level);
                    }
                    for (_, _, eid) in chunk {
                        inv.arg(*eid);
                    }
                })
                .await?;
            acked += a;
            invalid += i;
        }
        self.inner.metrics.acked.increment(acked);
        let invalid = invalid as usize + malformed;
        if invalid == 0 {
            Ok(())
        } else if receipts.len() == 1 {
            Err(invalid_receipt())
        } else {
            Err(Error::InvalidReceipt(format!(
                "{invalid} of {} receipts were not valid (the rest were acked): the lease expired or the delivery was already settled",
                receipts.len()
            )))
        }
    }

    async fn nack(&self, receipt: &Receipt, action: Nack) -> Result<()> {
        let (member, attempt) = parse_receipt(receipt)?;
        let queue = &self.inner.config.queue;
        let status = match action {
            Nack::Retry { after, reason } => {
                let after = after.unwrap_or_else(|| queue.backoff_for(attempt));
                self.settle_one(|inv| {
                    inv.arg("retry")
                        .arg(member)
                        .arg(ms(after))
                        .arg(reason)
                        .arg(queue.max_attempts);
                })
                .await?
            }
            Nack::DeadLetter { reason } => {
                self.settle_one(|inv| {
                    inv.arg("dead").arg(member).arg(reason);
                })
                .await?
            }
            Nack::Release { reason } => {
                let status = self
                    .settle_one(|inv| {
                        inv.arg("release").arg(member);
                    })
                    .await?;
                if status == "released" {
                    tracing::debug!(receipt = receipt.as_str(), %reason, "job released");
                }
                status
            }
        };
        match status.as_str() {
            "retry" => {
                self.inner.metrics.retried.increment(1);
                Ok(())
            }
            "released" => {
                self.inner.metrics.released.increment(1);
                Ok(())
            }
            "dead" => {
                self.inner.metrics.dead_lettered.increment(1);
                Ok(())
            }
            "invalid" => Err(invalid_receipt()),
            other => Err(protocol(format!("nack status `{other}`"))),
        }
    }

    async fn extend_lease(&self, receipt: &Receipt, lease: Duration) -> Result<()> {
        let (member, _) = parse_receipt(receipt)?;
        let status = self
            .settle_one(|inv| {
                inv.arg("extend").arg(member).arg(ms(lease));
            })
            .await?;
        match status.as_str() {
            "ok" => Ok(()),
            "invalid" => Err(invalid_receipt()),
            other => Err(protocol(format!("extend status `{other}`"))),
        }
    }

    async fn stats(&self) -> Result<QueueStats> {
        let queue = &self.inner.config.queue;
        let (ready, delayed, in_flight, dead, oldest): (u64, u64, u64, u64, i64) = self
            .invoke(&self.inner.scripts.admin, |inv| {
                inv.arg("stats")
                    .arg(queue.priority_levels)
                    .arg(queue.max_attempts);
            })
            .await?;
        let stats = QueueStats {
            ready,
            delayed,
            in_flight,
            dead,
            oldest_ready_age: (oldest >= 0).then(|| Duration::from_millis(oldest as u64)),
        };
        self.inner.metrics.record_stats(&stats);
        Ok(stats)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let key = format!("{}:dead", self.inner.prefix);
        let entries: Vec<(String, Vec<Vec<u8>>)> = self
            .command(
                ::redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(limit.max(1)),
            )
            .await?;
        let mut out = Vec::with_capacity(entries.len());
        for (_, fields) in entries.into_iter().take(limit) {
            let mut map: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            let mut it = fields.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                map.insert(String::from_utf8_lossy(&k).into_owned(), v);
            }
            let text = |k: &str| {
                map.get(k)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            out.push(DeadLetter {
                id: JobId::from_string(text("id")),
                payload: Bytes::from(map.get("p").cloned().unwrap_or_default()),
                headers: decode_headers(map.get("h").map_or(&[][..], Vec::as_slice))?,
                reason: text("reason"),
                attempts: text("a").parse().unwrap_or(0),
                priority: Priority(text("r").parse().unwrap_or(0)),
                enqueued_at: from_epoch_ms(&text("t")).unwrap_or(UNIX_EPOCH),
                failed_at: from_epoch_ms(&text("f")).unwrap_or(UNIX_EPOCH),
            });
        }
        Ok(out)
    }

    async fn replay_dead_letters(&self, ids: &[JobId]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let replayed: u64 = self
            .invoke(&self.inner.scripts.admin, |inv| {
                inv.arg("replay");
                for id in ids {
                    inv.arg(id.as_str());
                }
            })
            .await?;
        Ok(replayed)
    }

    async fn purge_dead_letters(&self) -> Result<u64> {
        self.invoke(&self.inner.scripts.admin, |inv| {
            inv.arg("purge");
        })
        .await
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            backend: BACKEND,
            delay: true,
            priority_levels: self.inner.config.queue.priority_levels,
            idempotency: true,
            lease_expiry: true,
            capacity: true,
            exact_stats: true,
            dead_letter_admin: true,
            durable: true,
        }
    }

    async fn ping(&self) -> Result<()> {
        let _: String = self.command(&::redis::cmd("PING")).await?;
        Ok(())
    }
}
