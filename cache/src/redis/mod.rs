//! The Redis backend (feature `redis`).
//!
//! # Layout
//!
//! A key `k` of a cache whose prefix is `p` is the Redis string `p` + `k`,
//! stored with `SET … PX <ttl>`, so Redis expires it. Its value is a small
//! frame: two magic bytes (`0xCA 0xC4`), a format version (`1`), then the
//! bytes given to `set`. A value without that frame (written by another
//! program, truncated, or of a future version) reads as a miss and is
//! counted in `keel_cache_corrupt_total{backend="redis"}`: never an error,
//! never a panic.
//!
//! # Connections and failures
//!
//! The connection is a [`keel_core::redis::RedisPool`], the one every Keel
//! crate accepts: build it from [`RedisCacheConfig::redis`] with
//! [`RedisCache::new`], or share the application's with
//! [`RedisCache::with_pool`]. The cache multiplexes its operations over a
//! few of the pool's connections without taking them out of the pool, so
//! it does not pay a pool checkout (a health-check `PING`) per operation.
//!
//! Every operation (getting a connection included) is bounded by the
//! cache's own `operation_timeout`, 50 ms by default, on top of the pool's
//! looser one: a cache that answers slower than the origin is worse than
//! none. A connection that timed out, failed or had an operation dropped
//! mid-flight is not used again by the cache; the next operation takes one
//! from the pool (which checks it first).
//!
//! Failures are classified once, by [`keel_core::redis::RedisError`] (the
//! `#[source]` of the cache's [`CacheError`]): a refused, dropped or
//! timed-out connection and a server that is coming back (`LOADING`,
//! `TRYAGAIN`, `MASTERDOWN`, a failover's `READONLY`) are
//! [`CacheError::Unavailable`] (retryable), as in the queue and the rate
//! limiter; any other error reply is [`CacheError::Backend`].
//!
//! # Batches and Redis Cluster
//!
//! On a single server, batches are one round trip: `get_many` is one
//! `MGET`, `set_many` one pipeline of `SET PX`.
//!
//! On a Redis Cluster (a pool built from
//! [`RedisConfig::cluster`](keel_core::redis::RedisConfig::cluster), with
//! the `cluster` feature), each key goes to the master of its slot, so the
//! cache spreads over every shard. Batches are grouped per slot (the
//! cache computes each key's slot): `get_many` is one `MGET` per slot and
//! `set_many` one pipeline per slot, sent concurrently, so a batch of keys of one slot is still one round trip.
//! Keys carry a hash tag only if the prefix does: a prefix such as
//! `"{emb}:"` keeps every key of the cache in one slot, so every batch is
//! one round trip, at the price of putting the whole cache on one shard.

mod config;
mod error;
mod invalidation;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ::redis::FromRedisValue;
use async_trait::async_trait;
use bytes::Bytes;
use keel_core::redis::{RedisConnection, RedisError, RedisErrorKind, RedisPool, key_slot};
use parking_lot::Mutex;

pub use self::config::RedisCacheConfig;
pub use self::invalidation::{RedisInvalidationBus, RedisInvalidationConfig};
use crate::cache::{Cache, CacheCapabilities, normalize_ttl};
use crate::error::{CacheError, Result};

/// The frame's magic bytes.
const MAGIC: [u8; 2] = [0xCA, 0xC4];
/// The frame format this version writes and reads.
const VERSION: u8 = 1;
const HEADER: usize = 3;
/// Pairs per `set_many` pipeline.
const SET_CHUNK: usize = 512;

fn frame(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + value.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(value);
    out
}

/// The value inside a frame, or `None` for bytes that are not ours.
fn unframe(raw: Vec<u8>) -> Option<Bytes> {
    if raw.len() < HEADER || raw[..2] != MAGIC || raw[2] != VERSION {
        return None;
    }
    Some(Bytes::from(raw).slice(HEADER..))
}

fn ttl_ms(ttl: Duration) -> Result<u64> {
    Ok(normalize_ttl(ttl)?.as_millis() as u64)
}

/// Multiplexed connections shared by all operations, so an operation does
/// not pay a checkout (deadpool's health-check `PING`) each time. Each lane
/// holds a clone of a pooled connection (or of the cluster connection); the
/// connection itself stays in the pool, shared with the pool's other users.
struct Lanes {
    pool: RedisPool,
    lanes: Mutex<Vec<Option<RedisConnection>>>,
    next: AtomicUsize,
}

impl Lanes {
    fn new(pool: RedisPool) -> Self {
        let count = pool.config().pool_size.max(1);
        Lanes {
            pool,
            lanes: Mutex::new(vec![None; count]),
            next: AtomicUsize::new(0),
        }
    }

    async fn get(&self) -> std::result::Result<(usize, RedisConnection), RedisError> {
        let index = {
            let lanes = self.lanes.lock();
            self.next.fetch_add(1, Ordering::Relaxed) % lanes.len()
        };
        if let Some(conn) = self.lanes.lock()[index].clone() {
            return Ok((index, conn));
        }
        // A clone that shares the connection; the pooled handle went back.
        let conn = self.pool.connection().await?;
        self.lanes.lock()[index] = Some(conn.clone());
        Ok((index, conn))
    }

    fn forget(&self, index: usize) {
        self.lanes.lock()[index] = None;
    }
}

/// Forgets the lane's connection unless the operation completed normally.
struct LaneGuard<'a> {
    lanes: &'a Lanes,
    index: usize,
    done: bool,
}

impl Drop for LaneGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.lanes.forget(self.index);
        }
    }
}

/// A cache on Redis: shared by every process that uses the same server and
/// prefix.
///
/// # Layout
///
/// A key `k` of a cache whose prefix is `p` is the Redis string `p` + `k`,
/// stored with `SET … PX <ttl>`, so Redis expires it. Its value is a small
/// frame: two magic bytes (`0xCA 0xC4`), a format version (`1`), then the
/// bytes given to `set`. A value without that frame (written by another
/// program, truncated, or of a future version) reads as a miss and is
/// counted in `keel_cache_corrupt_total{backend="redis"}`: never an error,
/// never a panic.
///
/// # Connections and failures
///
/// On a [`RedisPool`] (its own, or one shared with the queue and the rate
/// limiter through [`with_pool`](Self::with_pool)); every operation bounded
/// by the cache's own [`operation_timeout`](RedisCacheConfig::operation_timeout)
/// (50 ms by default); failures classified by
/// [`keel_core::redis::RedisError`]: a `LOADING` server, a failover or a
/// lost connection is [`CacheError::Unavailable`], retryable. `get_many` is one
/// `MGET`, one per slot on a Redis Cluster (put a hash tag in the prefix,
/// `"{emb}:"`, to keep every key in one slot).
///
/// Cloning is cheap; clones share the connections.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use keel_cache::{Cache, RedisCache, RedisCacheConfig};
/// use keel_core::redis::{RedisConfig, RedisPool};
///
/// // One pool for the whole application (queue, rate limiter, cache).
/// let pool = RedisPool::connect(RedisConfig::new("redis://127.0.0.1:6379")).await?;
/// let cache = RedisCache::with_pool(pool.clone(), RedisCacheConfig::default().prefix("emb:"))?;
/// cache.set("k", "v".into(), Duration::from_secs(60)).await?;
/// assert_eq!(cache.get("k").await?.as_deref(), Some(&b"v"[..]));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisCache {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisCacheConfig,
    lanes: Lanes,
    corrupt: metrics::Counter,
}

impl fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCache")
            .field("redis", self.inner.lanes.pool.config())
            .field("prefix", &self.inner.config.prefix)
            .field("operation_timeout", &self.inner.config.operation_timeout)
            .finish_non_exhaustive()
    }
}

/// One request: a command or a pipeline.
enum Request<'a> {
    Cmd(&'a ::redis::Cmd),
    Pipe(&'a ::redis::Pipeline),
}

impl RedisCache {
    /// Builds the cache on its own pool (from
    /// [`config.redis`](RedisCacheConfig::redis)) without touching the
    /// network: connections are made on first use, so an application can
    /// start while Redis is down.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidConfig`] naming a bad field (including a URL the
    /// client cannot parse).
    pub fn new(config: RedisCacheConfig) -> Result<Self> {
        config.validate()?;
        let pool = RedisPool::new(config.redis.clone())?;
        Self::with_pool(pool, config)
    }

    /// Builds the cache on `pool`, shared with the other components that
    /// talk to the same server (the queue, the rate limiter, another
    /// cache): no connection of its own. `config.redis` is ignored; the
    /// pool's settings apply, and the cache's own
    /// [`operation_timeout`](RedisCacheConfig::operation_timeout) bounds
    /// each of its operations on top of them.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidConfig`] naming a bad field of the cache's own.
    pub fn with_pool(pool: RedisPool, config: RedisCacheConfig) -> Result<Self> {
        config.validate_own()?;
        Ok(RedisCache {
            inner: Arc::new(Inner {
                lanes: Lanes::new(pool),
                corrupt: metrics::counter!("keel_cache_corrupt_total", "backend" => "redis"),
                config,
            }),
        })
    }

    /// Builds the cache on its own pool and checks that Redis answers
    /// `PING` within [`RedisConfig::connect_timeout`](keel_core::redis::RedisConfig::connect_timeout).
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidConfig`] naming a bad field;
    /// [`CacheError::Unavailable`] naming the server (password redacted) when
    /// it does not answer.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is kept from a cancelled attempt.
    pub async fn connect(config: RedisCacheConfig) -> Result<Self> {
        let cache = Self::new(config)?;
        cache.inner.lanes.pool.ping().await?;
        Ok(cache)
    }

    /// The configuration the cache was built with (with
    /// [`with_pool`](Self::with_pool), its `redis` field is not the one in
    /// use: see [`pool`](Self::pool)).
    pub fn config(&self) -> &RedisCacheConfig {
        &self.inner.config
    }

    /// The pool the cache runs on.
    pub fn pool(&self) -> &RedisPool {
        &self.inner.lanes.pool
    }

    fn key(&self, key: &str) -> Vec<u8> {
        let prefix = self.inner.config.prefix.as_bytes();
        let mut full = Vec::with_capacity(prefix.len() + key.len());
        full.extend_from_slice(prefix);
        full.extend_from_slice(key.as_bytes());
        full
    }

    /// Runs one request under `limit`, on a lane that is forgotten unless
    /// the request completes normally.
    async fn request<T: FromRedisValue>(&self, request: Request<'_>, limit: Duration) -> Result<T> {
        let lanes = &self.inner.lanes;
        let run = async {
            let (index, mut conn) = lanes.get().await?;
            let mut guard = LaneGuard {
                lanes,
                index,
                done: false,
            };
            let result = match request {
                Request::Cmd(cmd) => cmd.query_async::<T>(&mut conn).await,
                Request::Pipe(pipe) => pipe.query_async::<T>(&mut conn).await,
            };
            match &result {
                Ok(_) => guard.done = true,
                // An error answer on a healthy connection keeps the lane.
                Err(err)
                    if !(err.is_timeout()
                        || err.is_io_error()
                        || err.is_connection_dropped()
                        || err.is_unrecoverable_error()) =>
                {
                    guard.done = true;
                }
                Err(_) => {}
            }
            Ok::<T, CacheError>(result?)
        };
        match tokio::time::timeout(limit, run).await {
            Ok(result) => result,
            Err(_) => Err(CacheError::Timeout(limit)),
        }
    }

    async fn query<T: FromRedisValue>(&self, request: Request<'_>) -> Result<T> {
        self.request(request, self.inner.config.operation_timeout)
            .await
    }

    fn decode(&self, raw: Option<Vec<u8>>) -> Option<Bytes> {
        let raw = raw?;
        let value = unframe(raw);
        if value.is_none() {
            self.inner.corrupt.increment(1);
            tracing::debug!(
                prefix = %self.inner.config.prefix,
                "redis cache: a value without our frame reads as a miss"
            );
        }
        value
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(self.key(key));
        let raw: Option<Vec<u8>> = self.query(Request::Cmd(&cmd)).await?;
        Ok(self.decode(raw))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        let ms = ttl_ms(ttl)?;
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(self.key(key)).arg(frame(&value)).arg("PX").arg(ms);
        self.query::<()>(Request::Cmd(&cmd)).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let mut cmd = ::redis::cmd("DEL");
        cmd.arg(self.key(key));
        self.query::<()>(Request::Cmd(&cmd)).await
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        if !self.inner.lanes.pool.is_cluster() {
            let mut cmd = ::redis::cmd("MGET");
            for key in keys {
                cmd.arg(self.key(key));
            }
            let raw: Vec<Option<Vec<u8>>> = self.query(Request::Cmd(&cmd)).await?;
            return Ok(raw.into_iter().map(|r| self.decode(r)).collect());
        }
        // One `MGET` per slot, sent concurrently, the answers put back in
        // the caller's order. (The cluster client can split an `MGET`
        // itself, but miscounts the parts when a failover moves slots
        // under it.)
        let mut slots: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        let full: Vec<Vec<u8>> = keys.iter().map(|key| self.key(key)).collect();
        for (index, key) in full.iter().enumerate() {
            slots.entry(key_slot(key)).or_default().push(index);
        }
        let cmds: Vec<(&Vec<usize>, ::redis::Cmd)> = slots
            .values()
            .map(|indices| {
                let mut cmd = ::redis::cmd("MGET");
                for &index in indices {
                    cmd.arg(&full[index]);
                }
                (indices, cmd)
            })
            .collect();
        let answers = futures::future::try_join_all(
            cmds.iter()
                .map(|(_, cmd)| self.query::<Vec<Option<Vec<u8>>>>(Request::Cmd(cmd))),
        )
        .await?;
        let mut out = vec![None; keys.len()];
        for ((indices, _), raw) in cmds.iter().zip(answers) {
            if raw.len() != indices.len() {
                return Err(RedisError::new(
                    RedisErrorKind::Protocol,
                    format!(
                        "MGET of {} keys answered {} values",
                        indices.len(),
                        raw.len()
                    ),
                )
                .into());
            }
            for (&index, value) in indices.iter().zip(raw) {
                out[index] = self.decode(value);
            }
        }
        Ok(out)
    }

    async fn set_many(&self, entries: &[(&str, Bytes)], ttl: Duration) -> Result<()> {
        let ms = ttl_ms(ttl)?;
        let keyed: Vec<(Vec<u8>, &Bytes)> = entries
            .iter()
            .map(|(key, value)| (self.key(key), value))
            .collect();
        if !self.inner.lanes.pool.is_cluster() {
            for chunk in keyed.chunks(SET_CHUNK) {
                self.query::<()>(Request::Pipe(&set_pipe(chunk, ms)))
                    .await?;
            }
            return Ok(());
        }
        // A cluster pipeline must stay in one slot: one per slot, sent
        // concurrently.
        let mut slots: BTreeMap<u16, Vec<(Vec<u8>, &Bytes)>> = BTreeMap::new();
        for (key, value) in keyed {
            slots.entry(key_slot(&key)).or_default().push((key, value));
        }
        let pipes: Vec<::redis::Pipeline> = slots
            .values()
            .flat_map(|entries| entries.chunks(SET_CHUNK))
            .map(|chunk| set_pipe(chunk, ms))
            .collect();
        futures::future::try_join_all(
            pipes
                .iter()
                .map(|pipe| self.query::<()>(Request::Pipe(pipe))),
        )
        .await?;
        Ok(())
    }

    fn capabilities(&self) -> CacheCapabilities {
        CacheCapabilities::default().shared(true).native_batch(true)
    }

    async fn ping(&self) -> Result<()> {
        self.query::<String>(Request::Cmd(&::redis::cmd("PING")))
            .await
            .map(drop)
    }
}

/// One pipeline of `SET key frame PX ms` for `entries`.
fn set_pipe(entries: &[(Vec<u8>, &Bytes)], ms: u64) -> ::redis::Pipeline {
    let mut pipe = ::redis::pipe();
    for (key, value) in entries {
        pipe.cmd("SET")
            .arg(key)
            .arg(frame(value))
            .arg("PX")
            .arg(ms)
            .ignore();
    }
    pipe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_foreign_bytes_are_refused() {
        let framed = frame(b"hello");
        assert_eq!(unframe(framed).as_deref(), Some(&b"hello"[..]));
        assert_eq!(unframe(frame(b"")).as_deref(), Some(&b""[..]));
        assert_eq!(unframe(b"hello".to_vec()), None);
        assert_eq!(unframe(vec![0xCA, 0xC4]), None);
        assert_eq!(unframe(vec![0xCA, 0xC4, 2, b'x']), None);
        assert_eq!(unframe(Vec::new()), None);
    }

    #[test]
    fn new_does_not_touch_the_network() {
        let cache = RedisCache::new(RedisCacheConfig::new("redis://:pw@127.0.0.1:1")).unwrap();
        assert!(cache.capabilities().shared);
        assert!(!format!("{cache:?}").contains("pw"));
        fn assert_send<T: Send>(_: &T) {}
        assert_send(&cache.get("k"));
        assert_send(&RedisCache::connect(RedisCacheConfig::default()));
        assert!(RedisCache::new(RedisCacheConfig::new("http://x")).is_err());
    }
}
