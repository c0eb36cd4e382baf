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
//! | `keel:{q}:delayed` | sorted set | delayed and backing-off jobs by due time |
//! | `keel:{q}:d:<id>` | hash | the body of one delayed job |
//! | `keel:{q}:dead` | stream | dead letters with their reason |
//! | `keel:{q}:dead-index` | hash | job id → dead-letter entry, for replay |
//! | `keel:{q}:idem:<key>` | string with a TTL | idempotency keys (`SET NX PX`) |
//! | `keel:{q}:wake` | stream of one entry | touched when a read gives jobs back by rewinding its group, to wake waiting consumers |
//!
//! A job is always in exactly one place: a stream entry (ready, or leased
//! while it is in the group's pending list), a delayed hash, or a dead
//! letter. Every move between places is atomic: one `XREADGROUP` leases
//! (the entry joins the pending list), a `MULTI` enqueues plain jobs or acks
//! live leases, and a Lua script does everything else (delays, the bound,
//! nacks, expired leases).
//! Acked entries are deleted from their stream at once (`XACK` + `XDEL`),
//! so streams do not grow with history, and the jobs a queue holds (for the
//! capacity bound) are its streams' lengths plus its delayed jobs. Work on
//! due jobs and expired leases is bounded per call (256 of each), so a
//! backlog of any size never turns one call into a long blocking script.
//!
//! # What `Ok` from `enqueue` promises
//!
//! The Redis server has applied the write. Whether it survives a server
//! crash is the server's persistence setting: with `appendonly yes` and
//! `appendfsync always` it is on disk; with the defaults (`everysec`) up to
//! a second of writes can be lost on a crash; with persistence off (as in
//! our tests) a restart empties the queue.
//!
//! Replication is asynchronous: without
//! [`replica_acks`](RedisQueueConfig::replica_acks), `Ok` does not wait for
//! a replica, so when a master dies and a replica is promoted (Redis
//! Sentinel, or a Redis Cluster failover) the jobs whose writes had not
//! reached that replica are lost: typically the last few milliseconds of
//! enqueues, more while the replica lags. With `replica_acks: Some(n)`
//! every enqueue's write is followed in the same round trip, on the same
//! connection, by `WAIT n <replica_ack_timeout>`, and `Ok` means `n`
//! replicas hold the job; fewer in time fail the enqueue with a retryable
//! `Unavailable` (the job was written and may still be delivered). A job
//! confirmed so survives its master's loss when a confirming replica is
//! promoted, which is what Redis Cluster's failover picks (the replica
//! with the most data). The cost is one replication round trip per
//! enqueue call (batch with `enqueue_batch` to share it), and, while no
//! replica answers, failed enqueues; with one replica per master, a master
//! promoted after a failover has no replica until another joins, so
//! enqueues fail until then.
//!
//! # Leases and crashed consumers
//!
//! `dequeue` is plain `XREADGROUP`s, pipelined after a short housekeeping
//! script (due delayed jobs, and expired leases at most every 500 ms), so
//! the hot path runs no per-job Lua. Levels are read highest first; the
//! levels from the top down to the one that had jobs at the handle's last
//! read go in one round trip, and entries a higher level left no room for
//! are given back at once (the group is rewound when nobody read after
//! them, otherwise they go back to the tail untried). Plain jobs on an
//! unbounded queue are enqueued as `XADD`s in one `MULTI`; delays,
//! idempotency keys and the capacity bound go through a script. The lease
//! lives in the group's pending entries list (PEL):
//! a job read with a lease of `L` ms is pending under the consumer named
//! `L`, and its lease has run out once its idle time (kept by the
//! **server's** clock, so consumers with skewed clocks agree) reaches `L`.
//! `extend_lease` moves the entry to the consumer of the new length with
//! `XCLAIM`, which restarts its idle time. Expired leases are reclaimed
//! with `XAUTOCLAIM`, its idle threshold the lease length, when a level has
//! leases of one length pending (the usual case); with several lengths
//! pending one threshold would also catch longer leases, so each length is
//! scanned on its own with `XPENDING … IDLE L`. The job goes back to the tail of its
//! priority as a new entry with `attempt + 1`, or to the dead letters after
//! `max_attempts`. Each handle does that at most every 500 ms while it is
//! reading, and whenever a `dequeue` finds nothing; `stats` does it too.
//! Lease lengths are consumer names, so use a few distinct lengths, not one
//! per job; a length unused for ten minutes is removed from the group. A
//! `Nack::Release` moves the job back to the tail at once as a new entry
//! with its attempt count unchanged. A consumer that crashed holding jobs
//! therefore loses nothing: its jobs reach another consumer shortly after
//! their lease runs out.
//!
//! A receipt carries the lease's end as read from the server clock just
//! before the read. An `ack` of receipts whose leases surely run for
//! another 100 ms (by the server clock as last seen) is one `XACK` + `XDEL`
//! in a `MULTI`; others go through a script that checks the pending list
//! (the lease may have been extended). An `ack` after the lease ran out is
//! refused with `InvalidReceipt`, whether or not the job was taken back
//! yet; a lease *shortened* by `extend_lease` may still take an ack until
//! it is taken back.
//!
//! # Waiting
//!
//! An empty `dequeue` blocks on a dedicated connection with `XREAD BLOCK`
//! for entries newer than the group's last delivered ids, or a touch of the
//! wake stream (a read elsewhere gave jobs back by rewinding), a long poll,
//! never a busy loop, up to the next delayed job or lease expiry (looked
//! at again at least every second while jobs are leased). Blocking
//! connections come from their own small pool (to the master of the
//! queue's slot on a cluster), so waiting consumers never starve producers
//! of connections. A dropped `dequeue` future discards its
//! blocking connection rather than returning it mid-command.
//!
//! # Redis Cluster
//!
//! With the `cluster` feature, a [`RedisConfig::cluster`](keel_core::redis::RedisConfig::cluster)
//! config (or a cluster's [`RedisPool`]) is accepted. Every key of a queue
//! carries the hash tag `{name}`, so the whole queue lives in one slot:
//! each transaction, pipeline and script touches that slot only, and goes
//! through the cluster connection to its master, following `MOVED` and
//! `ASK` and finding a promoted replica after a failover by itself. Each
//! script declares the key `keel:{name}:delayed` (which routes it) and
//! builds every other key it touches from the same prefix, hence in the same
//! slot (`common.lua` refuses a call whose declared key is not the
//! prefix's). `delete` scans for the queue's keys inside a script, so the
//! scan runs on the node that holds them.
//!
//! Blocking reads (`XREAD BLOCK`) never go through the cluster connection,
//! where they would hold up every command to that node behind them: they
//! take dedicated connections to the master of the queue's slot, looked up
//! with `CLUSTER SLOTS` on first use and again after a read was redirected
//! (`MOVED`) or failed, so waiting consumers follow a failover too.
//!
//! One queue is bounded by one node's CPU; queues with different names
//! spread over the masters.
//!
//! # Entries it did not write
//!
//! A stream entry without Keel's fields (another program's `XADD`) is
//! dead-lettered with the reason "malformed stream entry" when a read meets
//! it, like a job found past its deadline; it never fails the read.
//!
//! # Failures
//!
//! Every operation is bounded by `operation_timeout`. A dropped connection
//! is reported as a retryable `Unavailable` and replaced on the next call
//! (the pool checks connections before reuse). If the server restarts and
//! loses its data, the consumer groups are recreated on the next `dequeue`
//! (and the scripts loaded again): a consumer never stays silently dead.

mod config;
mod error;
mod lanes;
mod read;
mod receipt;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::Script;
use async_trait::async_trait;
use bytes::Bytes;
use keel_core::redis::{RedisConnection, RedisPool};
use tokio::time::Instant;

pub use self::config::RedisQueueConfig;
use self::error::{RedisFailure, protocol_failure};
use self::lanes::Lanes;
use self::read::{Blocking, DEQUEUE_MAX};
use self::receipt::{Lease, invalid_receipt, parse_receipt};
use crate::error::{QueueError, Result};
use crate::ids::IdGen;
use crate::metrics::QueueMetrics;
use crate::queue::Queue;
use crate::types::{
    DeadLetter, Delivery, DequeueOptions, Enqueued, Headers, Job, JobId, Nack, Priority,
    QueueCapabilities, QueueStats, Receipt,
};

const BACKEND: &str = "redis";
/// The consumer group of every level's stream.
const GROUP: &str = "keel";
/// Jobs per enqueue script call.
const ENQUEUE_CHUNK: usize = 256;

macro_rules! lua {
    ($file:literal) => {
        concat!(include_str!("lua/common.lua"), include_str!($file))
    };
}

struct Scripts {
    enqueue: Script,
    maintain: Script,
    settle: Script,
    admin: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            enqueue: Script::new(lua!("lua/enqueue.lua")),
            maintain: Script::new(lua!("lua/maintain.lua")),
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
/// # async fn demo() -> Result<(), keel_queue::QueueError> {
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
    /// The key every script declares (routes it to the queue's slot).
    route_key: String,
    /// The stream of each priority level, lowest first.
    streams: Vec<String>,
    ids: IdGen,
    /// When this handle next takes back expired leases while reading (ms
    /// since `started`).
    next_reclaim_ms: AtomicU64,
    started: Instant,
    /// The highest level that had jobs at this handle's last read: reads
    /// start with every level from the top down to it in one round trip.
    read_down_to: AtomicUsize,
    /// How far the server's clock is at most ahead of ours (ms), from the
    /// last housekeeping answer; `i64::MAX` until known.
    server_ahead_ms: AtomicI64,
    lanes: Lanes,
    blocking: Blocking,
    scripts: Scripts,
    metrics: QueueMetrics,
}

impl fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisQueue")
            .field("config", &self.inner.config)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

/// What one job may hold: a Redis string (the payload, the headers' JSON)
/// is at most 512 MiB.
const LIMITS: crate::types::Limits = crate::types::Limits {
    backend: BACKEND,
    caller_ids: true,
    max_id: 64 * 1024,
    max_header_name: usize::MAX,
    max_headers: 256 * 1024 * 1024,
    max_payload: 512 * 1024 * 1024,
    reserved_header: |_| false,
};

/// Waiting jobs removed per `purge` script call.
const PURGE_CHUNK: u64 = 1_000;

/// `text` with the glob characters of `SCAN … MATCH` escaped.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Receipts per ack script call.
const ACK_CHUNK: usize = 1_000;
/// A receipt whose lease ends at least this long after our estimate of the
/// server's clock is acked with plain `XACK` + `XDEL`, without a script.
const ACK_MARGIN_MS: i64 = 100;

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
    serde_json::to_string(headers).map_err(|err| QueueError::Codec {
        message: "could not encode headers".into(),
        source: Some(err.into()),
    })
}

fn decode_headers(text: &[u8]) -> Result<Headers> {
    if text.is_empty() {
        return Ok(BTreeMap::new());
    }
    serde_json::from_slice(text).map_err(|err| QueueError::Codec {
        message: "stored headers are not valid JSON".into(),
        source: Some(err.into()),
    })
}

fn protocol(what: impl Into<String>) -> QueueError {
    protocol_failure(what).into()
}

impl RedisQueue {
    /// Connects to Redis (a pool of its own, built from `config.redis`)
    /// and checks that it answers.
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidConfig`] naming a bad field;
    /// [`QueueError::Unavailable`] or [`QueueError::Timeout`] when the server
    /// does not answer.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is written.
    pub async fn connect(config: RedisQueueConfig) -> Result<Self> {
        config.validate()?;
        let pool = RedisPool::new(config.redis.clone())?;
        let lanes = config.redis.pool_size;
        Self::open(pool, config, lanes).await
    }

    /// A queue over a shared [`RedisPool`] (one pool per server for the
    /// queue, the cache and the rate limiter of one process). The
    /// connection settings are the pool's: `config.redis` is replaced by
    /// [`RedisPool::config`]. The queue keeps at most half of the pool's
    /// connections (at least one) checked out for its commands, so give a
    /// shared pool at least two; its blocking reads use
    /// `blocking_connections` connections of their own.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), keel_queue::QueueError> {
    /// use keel_core::redis::{RedisConfig, RedisPool};
    /// use keel_queue::{QueueConfig, RedisQueue, RedisQueueConfig};
    ///
    /// let pool = RedisPool::new(RedisConfig::new("redis://127.0.0.1:6379"))?;
    /// let queue = RedisQueue::with_pool(
    ///     pool.clone(),
    ///     RedisQueueConfig::with_redis(pool.config().clone(), QueueConfig::new("embeddings")),
    /// )
    /// .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidConfig`] naming a bad field;
    /// [`QueueError::Unavailable`] or [`QueueError::Timeout`] when the server
    /// does not answer.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is written.
    pub async fn with_pool(pool: RedisPool, mut config: RedisQueueConfig) -> Result<Self> {
        config.redis = pool.config().clone();
        config.queue.validate()?;
        config.validate_own()?;
        let lanes = (config.redis.pool_size / 2).max(1);
        Self::open(pool, config, lanes).await
    }

    async fn open(pool: RedisPool, config: RedisQueueConfig, lanes: usize) -> Result<Self> {
        // Blocking reads take up to `max_block`; our own timeout bounds them.
        let blocking = Blocking::new(pool.clone(), config.blocking_connections);
        let ids = IdGen::new();
        let prefix = format!("keel:{{{}}}", config.queue.name);
        let queue = RedisQueue {
            inner: Arc::new(Inner {
                route_key: format!("{prefix}:delayed"),
                streams: (0..config.queue.priority_levels)
                    .map(|level| format!("{prefix}:p:{level}"))
                    .collect(),
                prefix,
                ids,
                next_reclaim_ms: AtomicU64::new(0),
                started: Instant::now(),
                server_ahead_ms: AtomicI64::new(i64::MAX),
                read_down_to: AtomicUsize::new(0),
                lanes: Lanes::new(&pool, lanes),
                blocking,
                scripts: Scripts::new(),
                metrics: QueueMetrics::new(BACKEND, &config.queue.name),
                config,
            }),
        };
        queue.ping().await.map_err(|err| match err {
            QueueError::Unavailable { message, source } => QueueError::Unavailable {
                message: format!(
                    "redis at {} does not answer ({message}); is it running?",
                    queue.inner.config.redis.redacted_url()
                ),
                source,
            },
            other => other,
        })?;
        Ok(queue)
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
        let limit = self.inner.config.redis.operation_timeout;
        match tokio::time::timeout(limit, fut).await {
            Ok(result) => result.map_err(QueueError::from),
            Err(_) => Err(QueueError::Timeout(limit)),
        }
    }

    /// Runs `op` on a lane's connection under the operation timeout; a lane
    /// whose connection failed or hung is emptied (and its connection taken
    /// out of the pool).
    async fn on_lane<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnOnce(RedisConnection) -> Fut,
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
        if let (Err(QueueError::Unavailable { .. } | QueueError::Timeout(_)), Some(index)) =
            (&result, used)
        {
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
        invocation
            .key(&self.inner.route_key)
            .arg(&self.inner.prefix);
        args(&mut invocation);
        let invocation = &invocation;
        self.on_lane(|mut conn| async move { Ok(invocation.invoke_async(&mut conn).await?) })
            .await
    }

    /// Runs `script` (the queue's key and prefix first, then `args`) as an
    /// `EVALSHA` in a pipeline, followed by `WAIT` for `replicas` on the
    /// same connection when set; answers the pipeline's replies (`(T,)`, or
    /// `(T, confirmations)` with `WAIT`). A server without the script gets
    /// it loaded, and the pipeline runs again.
    async fn eval_pipeline<R: ::redis::FromRedisValue>(
        &self,
        script: &Script,
        replicas: Option<u32>,
        args: impl FnOnce(&mut ::redis::Cmd),
    ) -> Result<R> {
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(script.get_hash())
            .arg(1)
            .arg(&self.inner.route_key)
            .arg(&self.inner.prefix);
        args(&mut cmd);
        let mut pipe = ::redis::pipe();
        pipe.add_command(cmd);
        if let Some(replicas) = replicas {
            self.add_wait(&mut pipe, replicas);
        }
        let pipe = &pipe;
        for first in [true, false] {
            let answer = self
                .on_lane(|mut conn| async move {
                    match pipe.query_async::<R>(&mut conn).await {
                        Ok(answer) => Ok(Some(answer)),
                        Err(err) if first && err.code() == Some("NOSCRIPT") => {
                            script.prepare_invoke().load_async(&mut conn).await?;
                            Ok(None)
                        }
                        Err(err) => Err(err.into()),
                    }
                })
                .await?;
            if let Some(answer) = answer {
                return Ok(answer);
            }
        }
        Err(protocol("NOSCRIPT right after loading the script"))
    }

    /// Appends `WAIT replicas timeout` to a pipeline of writes.
    fn add_wait(&self, pipe: &mut ::redis::Pipeline, replicas: u32) {
        pipe.cmd("WAIT")
            .arg(replicas)
            .arg(ms(self.inner.config.replica_ack_timeout));
    }

    /// Fails an enqueue of `jobs` jobs that fewer replicas than asked
    /// confirmed in time.
    fn check_replicas(&self, confirmed: u32, jobs: usize) -> Result<()> {
        let config = &self.inner.config;
        let wanted = config.replica_acks.unwrap_or(0);
        if confirmed >= wanted {
            return Ok(());
        }
        Err(QueueError::Unavailable {
            message: format!(
                "redis applied the enqueue of {jobs} job(s) but only {confirmed} of \
                 {wanted} replicas confirmed it within {:?}: the jobs may be delivered, or lost \
                 if the master fails before its replicas catch up; enqueue them again (with \
                 idempotency keys, so a copy that survived is answered as a duplicate), and \
                 check that the master's replicas are connected (`INFO replication`)",
                config.replica_ack_timeout
            ),
            source: None,
        })
    }

    async fn enqueue_chunk(&self, jobs: Vec<Job>) -> Result<Vec<Enqueued>> {
        let queue = &self.inner.config.queue;
        let mut encoded = Vec::with_capacity(jobs.len());
        for job in &jobs {
            queue.check_priority(job.priority)?;
            crate::types::check_job(job, &LIMITS)?;
        }
        for job in &jobs {
            let id = job.id.clone().unwrap_or_else(|| self.inner.ids.next());
            encoded.push((id, encode_headers(&job.headers)?));
        }
        // Nothing to check or schedule: the entries go straight into their
        // streams, atomically (MULTI/EXEC), without a script.
        if queue.capacity.is_none()
            && jobs
                .iter()
                .all(|job| job.delay.is_none() && job.idempotency_key.is_none())
        {
            return self.append_ready(&jobs, encoded).await;
        }
        let now = epoch_ms(SystemTime::now());
        let args = |cmd: &mut ::redis::Cmd| {
            cmd.arg(queue.capacity.unwrap_or(0))
                .arg(queue.priority_levels)
                .arg(ms(queue.dedup_window))
                .arg(now)
                .arg(jobs.len());
            for (job, (id, headers)) in jobs.iter().zip(&encoded) {
                let meta = format!("{id}|0|{now}|{}", job.priority.0);
                cmd.arg(id.as_str())
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
        };
        let script = &self.inner.scripts.enqueue;
        let rows: Vec<String> = match self.inner.config.replica_acks {
            None => {
                let (rows,) = self.eval_pipeline(script, None, args).await?;
                rows
            }
            Some(replicas) => {
                let (rows, confirmed): (Vec<String>, u32) =
                    self.eval_pipeline(script, Some(replicas), args).await?;
                self.check_replicas(confirmed, jobs.len())?;
                rows
            }
        };
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
                    return Err(QueueError::Full {
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

    /// Acks receipts whose leases are surely still running: `XACK` and
    /// `XDEL` per level in one transaction (why that is safe for every id:
    /// see the ack in `settle.lua`). Answers how many were pending.
    async fn ack_live(&self, leases: &[Lease<'_>]) -> Result<u64> {
        // A level this queue does not have acks nothing (counted invalid).
        let mut by_stream: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for lease in leases {
            if let Some(stream) = lease
                .level
                .parse::<usize>()
                .ok()
                .and_then(|level| self.inner.streams.get(level))
            {
                by_stream.entry(stream).or_default().push(lease.entry);
            }
        }
        if by_stream.is_empty() {
            return Ok(0);
        }
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        for (stream, entries) in &by_stream {
            pipe.cmd("XACK").arg(stream).arg(GROUP).arg(entries);
            pipe.cmd("XDEL").arg(stream).arg(entries).ignore();
        }
        let pipe = &pipe;
        let counts: Vec<u64> = self
            .on_lane(|mut conn| async move { Ok(pipe.query_async(&mut conn).await?) })
            .await?;
        Ok(counts.into_iter().sum())
    }

    /// Appends plain jobs (no delay, no idempotency key, no bound to check)
    /// to their streams in one transaction. The entry's fields are the ones
    /// `entry_fields` in `common.lua` writes.
    async fn append_ready(
        &self,
        jobs: &[Job],
        encoded: Vec<(JobId, String)>,
    ) -> Result<Vec<Enqueued>> {
        let now = epoch_ms(SystemTime::now());
        let mut pipe = ::redis::pipe();
        let replicas = self.inner.config.replica_acks;
        if replicas.is_some() {
            // MULTI/EXEC written out, so that WAIT can follow in the same
            // round trip on the same connection (inside a transaction it
            // would not wait).
            pipe.cmd("MULTI").ignore();
        } else {
            pipe.atomic();
        }
        for (job, (id, headers)) in jobs.iter().zip(&encoded) {
            let level = job.priority.0;
            let cmd = pipe
                .cmd("XADD")
                .arg(&self.inner.streams[usize::from(level)])
                .arg("*")
                .arg("m")
                .arg(format!("{id}|0|{now}|{level}"))
                .arg("p")
                .arg(&job.payload[..]);
            if !headers.is_empty() {
                cmd.arg("h").arg(headers.as_str());
            }
            if let Some(deadline) = job.deadline {
                cmd.arg("d").arg(epoch_ms(deadline));
            }
            cmd.ignore();
        }
        if let Some(replicas) = replicas {
            pipe.cmd("EXEC");
            self.add_wait(&mut pipe, replicas);
            let pipe = &pipe;
            let (applied, confirmed): (Vec<::redis::Value>, u32) = self
                .on_lane(|mut conn| async move { Ok(pipe.query_async(&mut conn).await?) })
                .await?;
            if let Some(::redis::Value::ServerError(err)) = applied
                .into_iter()
                .find(|reply| matches!(reply, ::redis::Value::ServerError(_)))
            {
                return Err(RedisFailure::from(::redis::RedisError::from(err)).into());
            }
            self.check_replicas(confirmed, jobs.len())?;
        } else {
            let pipe = &pipe;
            let () = self
                .on_lane(|mut conn| async move { Ok(pipe.query_async(&mut conn).await?) })
                .await?;
        }
        self.inner.metrics.enqueued.increment(jobs.len() as u64);
        Ok(encoded
            .into_iter()
            .map(|(id, _)| Enqueued {
                id,
                duplicate: false,
            })
            .collect())
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
        options.validate()?;
        let inner = &self.inner;
        let max = options.max.min(DEQUEUE_MAX);
        let give_up = Instant::now() + options.wait;
        let mut reclaim = self.reclaim_due();
        loop {
            let deliveries = self.read(max, options.lease, reclaim).await?;
            if !deliveries.is_empty() {
                inner.metrics.delivered.increment(deliveries.len() as u64);
                return Ok(deliveries);
            }
            // Nothing to read: take back expired leases, and learn how long
            // to wait and from where.
            let (_now, moved, wake, last_ids): (u64, u64, i64, Vec<String>) = self
                .invoke(&inner.scripts.maintain, |inv| {
                    inv.arg(inner.config.queue.max_attempts)
                        .arg(inner.config.queue.priority_levels)
                        .arg("1")
                        .arg("1");
                })
                .await?;
            reclaim = false;
            if moved > 0 {
                continue;
            }
            let now = Instant::now();
            if now >= give_up {
                return Ok(Vec::new());
            }
            let mut block = (give_up - now).min(inner.config.max_block);
            if wake >= 0 {
                block = block.min(Duration::from_millis(wake as u64));
            }
            self.block_for_new(&last_ids, block.max(Duration::from_millis(1)))
                .await?;
            // A lease may have run out while we waited.
            reclaim = wake >= 0;
        }
    }

    async fn ack(&self, receipt: &Receipt) -> Result<()> {
        self.ack_batch(std::slice::from_ref(receipt)).await
    }

    async fn ack_batch(&self, receipts: &[Receipt]) -> Result<()> {
        let mut leases = Vec::with_capacity(receipts.len());
        let mut malformed = 0usize;
        for receipt in receipts {
            match parse_receipt(receipt) {
                Ok(lease) => leases.push(lease),
                Err(_) => malformed += 1,
            }
        }
        let (mut acked, mut invalid) = (0u64, 0u64);
        let ahead = self.inner.server_ahead_ms.load(Ordering::Relaxed);
        let server_now_max = (epoch_ms(SystemTime::now()) as i64).saturating_add(ahead);
        if leases
            .iter()
            .all(|lease| lease.ends_ms as i64 > server_now_max.saturating_add(ACK_MARGIN_MS))
        {
            // Every lease is surely still running: acking is `XACK` (which
            // counts the entries still pending) and `XDEL`, atomically.
            acked = self.ack_live(&leases).await?;
            invalid = leases.len() as u64 - acked;
            leases.clear();
        }
        for chunk in leases.chunks(ACK_CHUNK) {
            let (a, i): (u64, u64) = self
                .invoke(&self.inner.scripts.settle, |inv| {
                    inv.arg("ack").arg(chunk.len());
                    for lease in chunk {
                        inv.arg(lease.level).arg(lease.entry).arg(lease.ends_ms);
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
            Err(QueueError::InvalidReceipt(format!(
                "{invalid} of {} receipts were not valid (the rest were acked): the lease expired or the delivery was already settled",
                receipts.len()
            )))
        }
    }

    async fn nack(&self, receipt: &Receipt, action: Nack) -> Result<()> {
        let lease = parse_receipt(receipt)?;
        let queue = &self.inner.config.queue;
        let status = match action {
            Nack::Retry { after, reason } => {
                let after = after.unwrap_or_else(|| queue.backoff_for(lease.attempt));
                self.settle_one(|inv| {
                    inv.arg("retry")
                        .arg(lease.level)
                        .arg(lease.entry)
                        .arg(ms(after))
                        .arg(reason)
                        .arg(queue.max_attempts);
                })
                .await?
            }
            Nack::DeadLetter { reason } => {
                self.settle_one(|inv| {
                    inv.arg("dead")
                        .arg(lease.level)
                        .arg(lease.entry)
                        .arg(reason);
                })
                .await?
            }
            Nack::Release { reason } => {
                let status = self
                    .settle_one(|inv| {
                        inv.arg("release").arg(lease.level).arg(lease.entry);
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
        crate::types::check_lease(lease)?;
        let held = parse_receipt(receipt)?;
        let status = self
            .settle_one(|inv| {
                inv.arg("extend")
                    .arg(held.level)
                    .arg(held.entry)
                    .arg(ms(lease).to_string());
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

    async fn purge(&self) -> Result<u64> {
        let levels = self.inner.config.queue.priority_levels;
        let mut removed = 0u64;
        loop {
            let n: u64 = self
                .invoke(&self.inner.scripts.admin, |inv| {
                    inv.arg("purge-waiting").arg(levels).arg(PURGE_CHUNK);
                })
                .await?;
            removed += n;
            if n < PURGE_CHUNK {
                return Ok(removed);
            }
        }
    }

    async fn delete(&self) -> Result<()> {
        // Every key of the queue starts with `keel:{name}:`; a prefix scan
        // finds them all, whatever made them (delayed bodies, idempotency
        // keys, the dead letters). Bounded batches, never one long command;
        // each a script, so on a cluster it runs on the queue's node.
        let pattern = format!("{}:*", glob_escape(&self.inner.prefix));
        let mut cursor = "0".to_owned();
        loop {
            let (next, _removed): (String, u64) = self
                .invoke(&self.inner.scripts.admin, |inv| {
                    inv.arg("delete-step").arg(&cursor).arg(&pattern).arg(1_000);
                })
                .await?;
            if next == "0" {
                break;
            }
            cursor = next;
        }
        self.inner.read_down_to.store(0, Ordering::Relaxed);
        Ok(())
    }

    fn capabilities(&self) -> QueueCapabilities {
        QueueCapabilities {
            backend: BACKEND,
            delay: true,
            priority_levels: self.inner.config.queue.priority_levels,
            idempotency: true,
            lease_expiry: true,
            capacity: true,
            exact_stats: true,
            dead_letter_admin: true,
            durable: true,
            caller_ids: true,
        }
    }

    async fn ping(&self) -> Result<()> {
        let _: String = self.command(&::redis::cmd("PING")).await?;
        Ok(())
    }
}
