//! Settings of the Redis Streams backend.

use std::time::Duration;

use keel_core::redis::RedisConfig;
use serde::{Deserialize, Serialize};

use crate::config::QueueConfig;
use crate::error::Result;
use keel_core::validate;

/// Settings of [`RedisQueue`](crate::RedisQueue): the connection (a
/// [`keel_core::redis::RedisConfig`], validated and redacted in one place
/// for every Keel crate), the queue, and the blocking reads.
///
/// ```
/// use std::time::Duration;
/// use keel_queue::{QueueConfig, RedisQueueConfig};
///
/// let config = RedisQueueConfig::new("redis://:secret@127.0.0.1:6379", QueueConfig::new("jobs"))
///     .operation_timeout(Duration::from_millis(500));
/// assert!(config.validate().is_ok());
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RedisQueueConfig {
    /// The server and its connection pool. Its `operation_timeout` bounds
    /// every queue operation (an operation that takes longer fails with
    /// [`QueueError::Timeout`](crate::QueueError::Timeout)). Default:
    /// [`RedisConfig::default`].
    pub redis: RedisConfig,
    /// Settings shared by every backend.
    pub queue: QueueConfig,
    /// Dedicated connections for blocking reads (`XREAD BLOCK`), so waiting
    /// consumers never starve the pool: at most this many `dequeue` calls
    /// wait at once per queue handle; more poll again after their wait.
    /// Default 16.
    pub blocking_connections: usize,
    /// Longest one blocking read waits before the consumer looks again
    /// (bounds how long a dropped connection can go unnoticed). Default 5 s.
    #[serde(with = "humantime_serde")]
    pub max_block: Duration,
}

impl Default for RedisQueueConfig {
    fn default() -> Self {
        RedisQueueConfig {
            redis: RedisConfig::default(),
            queue: QueueConfig::default(),
            blocking_connections: 16,
            max_block: Duration::from_secs(5),
        }
    }
}

impl RedisQueueConfig {
    /// Defaults for this server and queue.
    pub fn new(url: impl Into<String>, queue: QueueConfig) -> Self {
        RedisQueueConfig {
            redis: RedisConfig::new(url),
            queue,
            ..RedisQueueConfig::default()
        }
    }

    /// Defaults for this connection and queue.
    pub fn with_redis(redis: RedisConfig, queue: QueueConfig) -> Self {
        RedisQueueConfig {
            redis,
            queue,
            ..RedisQueueConfig::default()
        }
    }

    /// Sets the connection's
    /// [`operation_timeout`](RedisConfig::operation_timeout).
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.redis.operation_timeout = timeout;
        self
    }

    /// Sets the connection's [`pool_size`](RedisConfig::pool_size).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.redis.pool_size = size;
        self
    }

    /// Sets [`blocking_connections`](Self::blocking_connections).
    pub fn blocking_connections(mut self, connections: usize) -> Self {
        self.blocking_connections = connections;
        self
    }

    /// Sets [`max_block`](Self::max_block).
    pub fn max_block(mut self, max_block: Duration) -> Self {
        self.max_block = max_block;
        self
    }

    /// Checks every field, naming the first bad one (`redis.url`,
    /// `redis.pool_size`, … for the connection).
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidConfig`](crate::QueueError::InvalidConfig) naming
    /// the field.
    pub fn validate(&self) -> Result<()> {
        self.queue.validate()?;
        self.redis.validate()?;
        self.validate_own()
    }

    /// The fields of this config that are not the connection's.
    pub(crate) fn validate_own(&self) -> Result<()> {
        validate::at_least("blocking_connections", self.blocking_connections, 1)?;
        Ok(validate::at_least_1ms("max_block", self.max_block)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_fields_by_name() {
        let base = RedisQueueConfig::new("redis://127.0.0.1", QueueConfig::new("q"));
        let err = RedisQueueConfig::new("http://x", QueueConfig::new("q"))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("`redis.url`"), "{err}");
        let err = base.clone().pool_size(0).validate().unwrap_err();
        assert!(err.to_string().contains("redis.pool_size"), "{err}");
        let err = base.blocking_connections(0).validate().unwrap_err();
        assert!(err.to_string().contains("blocking_connections"), "{err}");
    }

    #[test]
    fn reads_a_nested_connection() {
        let config: RedisQueueConfig = serde_json::from_str(
            r#"{"redis":{"url":"redis://:pw@h:1","operation_timeout":"250ms"},"queue":{"name":"q"},"max_block":"1s"}"#,
        )
        .unwrap();
        assert_eq!(config.redis.operation_timeout, Duration::from_millis(250));
        assert_eq!(config.max_block, Duration::from_secs(1));
        assert!(!format!("{config:?}").contains("pw"));
    }
}
