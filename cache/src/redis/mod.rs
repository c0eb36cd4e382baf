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
//! # Failures
//!
//! Every operation (checking out a connection included) is bounded by
//! `operation_timeout`, 50 ms by default: a cache that answers slower than
//! the origin is worse than none. A connection that timed out, failed or had
//! an operation dropped mid-flight is never reused (a connection that lost
//! bytes could otherwise pair answers with the wrong requests); the next
//! operation takes a fresh one.
//!
//! Batches are one round trip: `get_many` is one `MGET`, `set_many` one
//! pipeline of `SET PX`. Keys carry no hash tag, so on a Redis Cluster an
//! `MGET` whose keys live in different slots fails; this backend targets a
//! single Redis (or a replicated primary), not a Cluster.

mod config;
mod error;
mod invalidation;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, FromRedisValue};
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

pub use self::config::RedisCacheConfig;
use self::config::redacted_url;
use self::error::RedisFailure;
pub use self::invalidation::{RedisInvalidationBus, RedisInvalidationConfig};
use crate::cache::{Cache, Capabilities, normalize_ttl};
use crate::error::{Error, Result};

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
/// not pay a checkout (deadpool's health-check `PING`) each time.
struct Lanes {
    pool: deadpool_redis::Pool,
    lanes: Mutex<Vec<Option<MultiplexedConnection>>>,
    next: AtomicUsize,
}

impl Lanes {
    async fn get(&self) -> std::result::Result<(usize, MultiplexedConnection), RedisFailure> {
        let index = {
            let lanes = self.lanes.lock();
            self.next.fetch_add(1, Ordering::Relaxed) % lanes.len()
        };
        if let Some(conn) = self.lanes.lock()[index].clone() {
            return Ok((index, conn));
        }
        let pooled = self.pool.get().await?;
        // Detach it from the pool: the lane owns it from now on.
        let conn = deadpool_redis::Connection::take(pooled);
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
/// prefix. See the [module docs](crate::RedisCache#layout) for the layout
/// and failure behaviour.
///
/// Cloning is cheap; clones share the connections.
///
/// ```no_run
/// # async fn demo() -> keel_cache::Result<()> {
/// use std::time::Duration;
/// use keel_cache::{Cache, RedisCache, RedisCacheConfig};
///
/// let cache = RedisCache::connect(RedisCacheConfig::new("redis://127.0.0.1:6379")).await?;
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
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// One request: a command or a pipeline.
enum Request<'a> {
    Cmd(&'a ::redis::Cmd),
    Pipe(&'a ::redis::Pipeline),
}

impl RedisCache {
    /// Builds the cache without touching the network: connections are made
    /// on first use, so an application can start while Redis is down.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming a bad field (including a URL the
    /// client cannot parse).
    pub fn new(config: RedisCacheConfig) -> Result<Self> {
        config.validate()?;
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.connect_timeout));
        let manager = deadpool_redis::Manager::new_with_config(config.url.as_str(), connection)
            .map_err(|err| Error::config("url", format!("not a usable redis URL: {err}")))?;
        let pool = deadpool_redis::Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(deadpool_redis::Runtime::Tokio1)
            .wait_timeout(Some(config.connect_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .build()
            .map_err(|err| {
                Error::config("pool_size", format!("could not build the pool: {err}"))
            })?;
        Ok(RedisCache {
            inner: Arc::new(Inner {
                lanes: Lanes {
                    pool,
                    lanes: Mutex::new(vec![None; config.pool_size]),
                    next: AtomicUsize::new(0),
                },
                corrupt: metrics::counter!("keel_cache_corrupt_total", "backend" => "redis"),
                config,
            }),
        })
    }

    /// Builds the cache and checks that Redis answers `PING` within
    /// `connect_timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming a bad field; [`Error::Unavailable`]
    /// or [`Error::Timeout`] when the server does not answer.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is kept from a cancelled attempt.
    pub async fn connect(config: RedisCacheConfig) -> Result<Self> {
        let cache = Self::new(config)?;
        let limit = cache.inner.config.connect_timeout;
        let ping = ::redis::cmd("PING");
        let answer = cache.request::<String>(Request::Cmd(&ping), limit).await;
        answer.map_err(|err| match err {
            Error::Unavailable { message, source } => Error::Unavailable {
                message: format!(
                    "redis at {} does not answer ({message}); is it running?",
                    redacted_url(&cache.inner.config.url)
                ),
                source,
            },
            other => other,
        })?;
        Ok(cache)
    }

    /// The configuration the cache was built with.
    pub fn config(&self) -> &RedisCacheConfig {
        &self.inner.config
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
            Ok::<T, RedisFailure>(result?)
        };
        match tokio::time::timeout(limit, run).await {
            Ok(result) => result.map_err(Error::from),
            Err(_) => Err(Error::Timeout(limit)),
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
        let mut cmd = ::redis::cmd("MGET");
        for key in keys {
            cmd.arg(self.key(key));
        }
        let raw: Vec<Option<Vec<u8>>> = self.query(Request::Cmd(&cmd)).await?;
        Ok(raw.into_iter().map(|r| self.decode(r)).collect())
    }

    async fn set_many(&self, entries: &[(&str, Bytes)], ttl: Duration) -> Result<()> {
        let ms = ttl_ms(ttl)?;
        for chunk in entries.chunks(SET_CHUNK) {
            let mut pipe = ::redis::pipe();
            for (key, value) in chunk {
                pipe.cmd("SET")
                    .arg(self.key(key))
                    .arg(frame(value))
                    .arg("PX")
                    .arg(ms)
                    .ignore();
            }
            self.query::<()>(Request::Pipe(&pipe)).await?;
        }
        Ok(())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default().shared(true).native_batch(true)
    }

    async fn ping(&self) -> Result<()> {
        self.query::<String>(Request::Cmd(&::redis::cmd("PING")))
            .await
            .map(drop)
    }
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
        let cache = RedisCache::new(RedisCacheConfig::new("redis://127.0.0.1:1")).unwrap();
        assert!(cache.capabilities().shared);
        fn assert_send<T: Send>(_: &T) {}
        assert_send(&cache.get("k"));
        assert_send(&RedisCache::connect(RedisCacheConfig::default()));
        assert!(RedisCache::new(RedisCacheConfig::new("http://x")).is_err());
    }
}
