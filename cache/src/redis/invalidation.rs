//! Cross-instance invalidation over Redis pub/sub.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use keel_core::redis::{RedisConfig, RedisPool};

use super::{RedisCache, RedisCacheConfig, Request};
use crate::error::{CacheError, Result};
use crate::invalidation::{BusEvent, InvalidationBus};
use keel_core::validate;

/// Settings of [`RedisInvalidationBus`]: the connection ([`RedisConfig`],
/// shared with every Keel crate) and the bus's own.
///
/// ```
/// use keel_cache::RedisInvalidationConfig;
///
/// let config = RedisInvalidationConfig::new("redis://:secret@127.0.0.1:6379").channel("keel:cache:inv:embeddings");
/// assert!(config.validate().is_ok());
/// assert!(!format!("{config:?}").contains("secret"));
/// assert!(config.clone().channel("").validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RedisInvalidationConfig {
    /// The connection; its `connect_timeout` also bounds (re)subscribing.
    /// Ignored by [`RedisInvalidationBus::with_pool`], which uses the
    /// pool's. Default [`RedisConfig::default`] (`redis://127.0.0.1:6379`).
    pub redis: RedisConfig,
    /// The pub/sub channel; every instance of one cache must use the same.
    /// Default `"keel:cache:invalidations"`.
    pub channel: String,
    /// Longest a `PUBLISH` may take. Default 50 ms.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// How often the subscription connection is checked with a `PING`, so a
    /// silently dead connection is noticed. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    /// First wait before resubscribing after a failure; doubles up to
    /// [`reconnect_max`](Self::reconnect_max). Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest wait between resubscription attempts. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
}

impl Default for RedisInvalidationConfig {
    fn default() -> Self {
        RedisInvalidationConfig {
            redis: RedisConfig::default(),
            channel: "keel:cache:invalidations".to_owned(),
            operation_timeout: Duration::from_millis(50),
            health_check_interval: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

impl RedisInvalidationConfig {
    /// Defaults for this server.
    pub fn new(url: impl Into<String>) -> Self {
        RedisInvalidationConfig {
            redis: RedisConfig::new(url),
            ..RedisInvalidationConfig::default()
        }
    }

    /// Sets [`redis`](Self::redis), the connection settings.
    #[must_use]
    pub fn redis(mut self, redis: RedisConfig) -> Self {
        self.redis = redis;
        self
    }

    /// Sets [`channel`](Self::channel).
    #[must_use]
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = channel.into();
        self
    }

    /// Sets [`operation_timeout`](Self::operation_timeout).
    #[must_use]
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Sets the connect timeout of [`redis`](Self::redis)
    /// ([`RedisConfig::connect_timeout`]).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.redis.connect_timeout = timeout;
        self
    }

    /// Sets [`health_check_interval`](Self::health_check_interval).
    #[must_use]
    pub fn health_check_interval(mut self, interval: Duration) -> Self {
        self.health_check_interval = interval;
        self
    }

    /// Sets [`reconnect_min`](Self::reconnect_min) and
    /// [`reconnect_max`](Self::reconnect_max).
    #[must_use]
    pub fn reconnect(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max;
        self
    }

    /// Checks every field, naming the first bad one (`redis.url`, …,
    /// `channel`, `reconnect_max`).
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        self.redis.validate()?;
        self.validate_own()
    }

    fn validate_own(&self) -> Result<()> {
        validate::at_least_1ms("operation_timeout", self.operation_timeout)?;
        validate::non_empty("channel", &self.channel)?;
        validate::at_least_1ms("health_check_interval", self.health_check_interval)?;
        validate::at_least_1ms("reconnect_min", self.reconnect_min)?;
        if self.reconnect_max < self.reconnect_min {
            return Err(CacheError::config(
                "reconnect_max",
                "must not be below `reconnect_min`",
            ));
        }
        Ok(())
    }
}

/// An [`InvalidationBus`] on Redis pub/sub.
///
/// `publish` is one `PUBLISH` (bounded by `operation_timeout`); each
/// `subscribe` holds its own subscription connection, checks it with a
/// `PING` every `health_check_interval`, and when it is lost (cut, server
/// restart, silence) resubscribes with backoff and reports
/// [`BusEvent::Subscribed`], so the cache drops its whole L1: messages sent
/// while it was away are lost, as pub/sub does not keep them.
///
/// On a Redis Cluster (a [`RedisConfig::cluster`](keel_core::redis::RedisConfig::cluster)
/// config, feature `cluster`), a `PUBLISH` on any node reaches the
/// subscribers of every node, so a subscription holds one connection to
/// one node; when it is lost, the next attempt goes to the next seed node,
/// so a dead node does not keep the bus down.
///
/// ```no_run
/// # async fn demo() -> Result<(), keel_cache::CacheError> {
/// use keel_cache::{
///     RedisCache, RedisCacheConfig, RedisInvalidationBus, RedisInvalidationConfig, Tiered,
///     TieredConfig,
/// };
///
/// let url = "redis://127.0.0.1:6379";
/// let cache = Tiered::builder(TieredConfig::new("completions"))
///     .l2(RedisCache::new(RedisCacheConfig::new(url))?)
///     .invalidation(RedisInvalidationBus::new(RedisInvalidationConfig::new(url))?)
///     .build()?;
/// cache.invalidate("some-key").await?; // every instance drops it
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisInvalidationBus {
    config: RedisInvalidationConfig,
    /// Where subscriptions go: the server, or each seed node of a cluster
    /// in turn.
    clients: Arc<[::redis::Client]>,
    publisher: RedisCache,
}

impl fmt::Debug for RedisInvalidationBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisInvalidationBus")
            .field("redis", self.publisher.pool().config())
            .field("channel", &self.config.channel)
            .finish_non_exhaustive()
    }
}

impl RedisInvalidationBus {
    /// Builds the bus on a pool of its own (one connection to publish,
    /// from [`config.redis`](RedisInvalidationConfig::redis)) without
    /// touching the network.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidConfig`] naming a bad field.
    pub fn new(config: RedisInvalidationConfig) -> Result<Self> {
        config.validate()?;
        let pool = RedisPool::new(config.redis.clone().pool_size(1))?;
        Self::with_pool(pool, config)
    }

    /// Builds the bus on `pool`, shared with the application's other
    /// components: it publishes on the pool's connections, and each
    /// subscription opens one connection of its own to the pool's server
    /// (pub/sub needs a dedicated one). `config.redis` is ignored.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidConfig`] naming a bad field of the bus's own.
    pub fn with_pool(pool: RedisPool, config: RedisInvalidationConfig) -> Result<Self> {
        config.validate_own()?;
        let (field, urls) = if pool.is_cluster() {
            ("redis.cluster_urls", pool.config().cluster_urls.clone())
        } else {
            ("redis.url", vec![pool.config().url.clone()])
        };
        let clients = urls
            .iter()
            .map(|url| {
                ::redis::Client::open(url.as_str()).map_err(|err| {
                    CacheError::config(
                        field,
                        format!(
                            "not a usable redis URL ({}): {err}",
                            keel_core::redacted_url(url)
                        ),
                    )
                })
            })
            .collect::<Result<Arc<[_]>>>()?;
        let publisher = RedisCache::with_pool(
            pool,
            RedisCacheConfig::default().operation_timeout(config.operation_timeout),
        )?;
        Ok(RedisInvalidationBus {
            config,
            clients,
            publisher,
        })
    }
}

/// `origin` has no newline, so the first one splits it from the key.
fn encode(origin: &str, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(origin.len() + 1 + key.len());
    out.extend_from_slice(origin.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(key.as_bytes());
    out
}

fn decode(payload: &[u8]) -> Option<BusEvent> {
    let text = std::str::from_utf8(payload).ok()?;
    let (origin, key) = text.split_once('\n')?;
    Some(BusEvent::Invalidate {
        origin: origin.to_owned(),
        key: key.to_owned(),
    })
}

#[async_trait]
impl InvalidationBus for RedisInvalidationBus {
    async fn publish(&self, origin: &str, key: &str) -> Result<()> {
        if origin.contains('\n') {
            return Err(CacheError::argument("origin", "must not contain a newline"));
        }
        let mut cmd = ::redis::cmd("PUBLISH");
        cmd.arg(&self.config.channel).arg(encode(origin, key));
        self.publisher
            .request::<i64>(Request::Cmd(&cmd), self.config.operation_timeout)
            .await
            .map(drop)
    }

    fn subscribe(&self) -> BoxStream<'static, BusEvent> {
        let (sender, receiver) = mpsc::channel(1024);
        tokio::spawn(subscription(
            Arc::clone(&self.clients),
            self.config.clone(),
            self.publisher.pool().config().connect_timeout,
            sender,
        ));
        futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|event| (event, receiver))
        })
        .boxed()
    }
}

/// Keeps one subscription alive until the receiving side is dropped.
async fn subscription(
    clients: Arc<[::redis::Client]>,
    config: RedisInvalidationConfig,
    connect_timeout: Duration,
    sender: mpsc::Sender<BusEvent>,
) {
    let mut backoff = config.reconnect_min;
    for attempt in 0.. {
        let client = &clients[attempt % clients.len()];
        let connect = async {
            let pubsub = client.get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            sink.subscribe(&config.channel).await?;
            Ok::<_, ::redis::RedisError>((sink, stream))
        };
        match tokio::time::timeout(connect_timeout, connect).await {
            Ok(Ok((mut sink, mut stream))) => {
                backoff = config.reconnect_min;
                tracing::info!(channel = %config.channel, "invalidation subscription established");
                if sender.send(BusEvent::Subscribed).await.is_err() {
                    return;
                }
                let mut health = tokio::time::interval(config.health_check_interval);
                health.tick().await;
                loop {
                    tokio::select! {
                        () = sender.closed() => return,
                        message = stream.next() => match message {
                            Some(message) => match decode(message.get_payload_bytes()) {
                                Some(event) => {
                                    if sender.send(event).await.is_err() {
                                        return;
                                    }
                                }
                                None => tracing::debug!("ignoring a malformed invalidation"),
                            },
                            None => break,
                        },
                        _ = health.tick() => {
                            let ping = sink.ping::<::redis::Value>();
                            match tokio::time::timeout(connect_timeout, ping).await {
                                Ok(Ok(_)) => {}
                                _ => break,
                            }
                        }
                    }
                }
                tracing::warn!(
                    channel = %config.channel,
                    "invalidation subscription lost; resubscribing (L1 will be flushed)"
                );
            }
            Ok(Err(error)) => {
                tracing::warn!(channel = %config.channel, %error, "invalidation subscribe failed");
            }
            Err(_) => {
                tracing::warn!(channel = %config.channel, "invalidation subscribe timed out");
            }
        }
        tokio::select! {
            () = sender.closed() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(config.reconnect_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_keys_with_newlines() {
        let payload = encode("abc", "key\nwith\nnewlines");
        assert_eq!(
            decode(&payload),
            Some(BusEvent::Invalidate {
                origin: "abc".into(),
                key: "key\nwith\nnewlines".into()
            })
        );
        assert_eq!(decode(b"no separator"), None);
        assert_eq!(decode(b"\xff\n"), None);
    }

    #[test]
    fn refuses_bad_fields_by_name() {
        let err = RedisInvalidationConfig::default()
            .reconnect(Duration::from_secs(2), Duration::from_secs(1))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("reconnect_max"), "{err}");
    }
}
