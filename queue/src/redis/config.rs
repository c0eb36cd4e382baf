//! Settings of the Redis Streams backend.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::QueueConfig;
use crate::error::{Error, Result};

/// Settings of [`RedisQueue`](crate::RedisQueue).
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
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RedisQueueConfig {
    /// The server, e.g. `redis://127.0.0.1:6379`. Default from the
    /// `REDIS_URL` convention: `redis://127.0.0.1:6379`.
    pub url: String,
    /// Settings shared by every backend.
    pub queue: QueueConfig,
    /// Pooled connections for ordinary commands. Default 8.
    pub pool_size: usize,
    /// Dedicated connections for blocking reads (`XREAD BLOCK`), so waiting
    /// consumers never starve the pool: at most this many `dequeue` calls
    /// wait at once per queue handle; more poll again after their wait.
    /// Default 16.
    pub blocking_connections: usize,
    /// Longest any one Redis operation may take before it fails with
    /// `Timeout`. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// Longest one blocking read waits before the consumer looks again
    /// (bounds how long a dropped connection can go unnoticed). Default 5 s.
    #[serde(with = "humantime_serde")]
    pub max_block: Duration,
}

impl Default for RedisQueueConfig {
    fn default() -> Self {
        RedisQueueConfig {
            url: "redis://127.0.0.1:6379".to_owned(),
            queue: QueueConfig::default(),
            pool_size: 8,
            blocking_connections: 16,
            operation_timeout: Duration::from_secs(2),
            max_block: Duration::from_secs(5),
        }
    }
}

impl RedisQueueConfig {
    /// Defaults for this server and queue.
    pub fn new(url: impl Into<String>, queue: QueueConfig) -> Self {
        RedisQueueConfig {
            url: url.into(),
            queue,
            ..RedisQueueConfig::default()
        }
    }

    /// Sets [`operation_timeout`](Self::operation_timeout).
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Sets [`pool_size`](Self::pool_size).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        self.queue.validate()?;
        // The client library's own parser decides what a usable URL is.
        if let Err(err) = ::redis::IntoConnectionInfo::into_connection_info(self.url.as_str()) {
            return Err(Error::config(
                "url",
                format!("not a usable redis:// or rediss:// URL: {err}"),
            ));
        }
        if self.pool_size == 0 {
            return Err(Error::config("pool_size", "must be at least 1"));
        }
        if self.blocking_connections == 0 {
            return Err(Error::config("blocking_connections", "must be at least 1"));
        }
        if self.operation_timeout < Duration::from_millis(1) {
            return Err(Error::config("operation_timeout", "must be at least 1 ms"));
        }
        if self.max_block < Duration::from_millis(1) {
            return Err(Error::config("max_block", "must be at least 1 ms"));
        }
        Ok(())
    }
}

impl fmt::Debug for RedisQueueConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisQueueConfig")
            .field("url", &crate::config::redacted_url(&self.url))
            .field("queue", &self.queue)
            .field("pool_size", &self.pool_size)
            .field("blocking_connections", &self.blocking_connections)
            .field("operation_timeout", &self.operation_timeout)
            .field("max_block", &self.max_block)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_fields_by_name() {
        let base = RedisQueueConfig::new("redis://127.0.0.1", QueueConfig::new("q"));
        let err = RedisQueueConfig {
            url: "http://x".into(),
            ..base.clone()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("`url`"), "{err}");
        let err = base.clone().pool_size(0).validate().unwrap_err();
        assert!(err.to_string().contains("pool_size"), "{err}");
    }
}
