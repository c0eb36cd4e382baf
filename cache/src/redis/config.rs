//! Settings of the Redis backend.

use std::time::Duration;

use keel_core::redis::RedisConfig;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use keel_core::validate;

/// Settings of [`RedisCache`](crate::RedisCache): the connection
/// ([`RedisConfig`], shared with every Keel crate), the key prefix, and the
/// cache's own tight operation timeout.
///
/// Durations deserialize from human strings (`"50ms"`); `Debug` hides the
/// password.
///
/// ```
/// use std::time::Duration;
/// use keel_cache::RedisCacheConfig;
///
/// let config = RedisCacheConfig::new("redis://:secret@127.0.0.1:6379")
///     .prefix("embeddings:")
///     .operation_timeout(Duration::from_millis(20));
/// assert!(config.validate().is_ok());
/// assert!(!format!("{config:?}").contains("secret"));
/// let err = config.clone().pool_size(0).validate().unwrap_err();
/// assert!(err.to_string().contains("redis.pool_size"), "{err}");
///
/// let from_file: RedisCacheConfig = serde_json::from_str(
///     r#"{"redis": {"url": "redis://cache:6379", "pool_size": 4}, "prefix": "emb:", "operation_timeout": "30ms"}"#,
/// ).unwrap();
/// assert_eq!(from_file.operation_timeout, Duration::from_millis(30));
/// assert_eq!(from_file.redis.pool_size, 4);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RedisCacheConfig {
    /// The connection: URL, pool size, connect timeout, and the pool's own
    /// (looser) operation timeout. Ignored by
    /// [`RedisCache::with_pool`](crate::RedisCache::with_pool), which uses
    /// the pool's. Default [`RedisConfig::default`]
    /// (`redis://127.0.0.1:6379`).
    pub redis: RedisConfig,
    /// Prepended to every key, so several caches can share one Redis.
    /// Default `"keel:cache:"`.
    pub prefix: String,
    /// Longest one cache operation may take (checking out a connection
    /// included) before it fails with `Timeout`, applied on top of the
    /// pool's own timeout. A cache that answers slower than the origin is
    /// worse than none, so the default is low: 50 ms.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
}

impl Default for RedisCacheConfig {
    fn default() -> Self {
        RedisCacheConfig {
            redis: RedisConfig::default(),
            prefix: "keel:cache:".to_owned(),
            operation_timeout: Duration::from_millis(50),
        }
    }
}

impl RedisCacheConfig {
    /// Defaults for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisCacheConfig {
            redis: RedisConfig::new(url),
            ..RedisCacheConfig::default()
        }
    }

    /// Sets [`redis`](Self::redis), the connection settings.
    #[must_use]
    pub fn redis(mut self, redis: RedisConfig) -> Self {
        self.redis = redis;
        self
    }

    /// Sets [`prefix`](Self::prefix).
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the pool size of [`redis`](Self::redis)
    /// ([`RedisConfig::pool_size`]).
    #[must_use]
    pub fn pool_size(mut self, size: usize) -> Self {
        self.redis.pool_size = size;
        self
    }

    /// Sets the connect timeout of [`redis`](Self::redis)
    /// ([`RedisConfig::connect_timeout`]).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.redis.connect_timeout = timeout;
        self
    }

    /// Sets [`operation_timeout`](Self::operation_timeout), the cache's own.
    #[must_use]
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Checks every field, naming the first bad one (`redis.url`,
    /// `redis.pool_size`, …, `operation_timeout`).
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidConfig`](crate::CacheError::InvalidConfig) naming
    /// the field.
    pub fn validate(&self) -> Result<()> {
        self.redis.validate()?;
        self.validate_own()
    }

    /// The fields that are the cache's own (what
    /// [`RedisCache::with_pool`](crate::RedisCache::with_pool) checks).
    pub(crate) fn validate_own(&self) -> Result<()> {
        validate::at_least_1ms("operation_timeout", self.operation_timeout)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_fields_by_name() {
        let err = RedisCacheConfig::new("http://x").validate().unwrap_err();
        assert!(err.to_string().contains("`redis.url`"), "{err}");
        let err = RedisCacheConfig::new("redis://127.0.0.1")
            .operation_timeout(Duration::ZERO)
            .validate()
            .unwrap_err();
        assert!(
            matches!(&err, crate::CacheError::InvalidConfig(e) if e.field == "operation_timeout"),
            "{err}"
        );
    }

    #[test]
    fn reads_human_durations() {
        let config: RedisCacheConfig =
            serde_json::from_str(r#"{"redis": {"url": "redis://h"}, "operation_timeout": "20ms"}"#)
                .unwrap();
        assert_eq!(config.operation_timeout, Duration::from_millis(20));
        assert_eq!(config.redis.url, "redis://h");
        assert_eq!(config.prefix, "keel:cache:");
    }
}
