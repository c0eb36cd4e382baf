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
    /// Replicas that must confirm every enqueued job before `enqueue`
    /// returns `Ok`: the write is followed, in the same round trip and on
    /// the same connection, by Redis `WAIT <replica_acks>
    /// <replica_ack_timeout>`, and fewer confirmations in time fail the
    /// enqueue with a retryable [`QueueError::Unavailable`](crate::QueueError::Unavailable)
    /// (the job was written and may still be delivered: retry with an
    /// idempotency key to avoid a second copy).
    ///
    /// Without it (`None`, the default), `Ok` means the master applied the
    /// write: replication is asynchronous, so a master that dies before its
    /// replicas received the write (typically the last few milliseconds of
    /// writes, more while a replica lags) loses those jobs when a replica
    /// is promoted in its place. With it, a job whose enqueue returned `Ok`
    /// survives the loss of its master as long as a confirming replica is
    /// promoted (on a Redis Cluster, the replicas of the queue's slot
    /// master). `WAIT` blocks the connection it runs on: while replicas lag,
    /// the commands behind it on that connection wait too, so keep the
    /// timeout short.
    pub replica_acks: Option<u32>,
    /// How long an enqueue waits for [`replica_acks`](Self::replica_acks)
    /// confirmations; shorter than the connection's `operation_timeout`,
    /// which bounds the whole enqueue. Default 500 ms.
    #[serde(with = "humantime_serde")]
    pub replica_ack_timeout: Duration,
}

impl Default for RedisQueueConfig {
    fn default() -> Self {
        RedisQueueConfig {
            redis: RedisConfig::default(),
            queue: QueueConfig::default(),
            blocking_connections: 16,
            max_block: Duration::from_secs(5),
            replica_acks: None,
            replica_ack_timeout: Duration::from_millis(500),
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

    /// Sets [`replica_acks`](Self::replica_acks) and
    /// [`replica_ack_timeout`](Self::replica_ack_timeout): every enqueue
    /// returns `Ok` only after `replicas` replicas confirmed it within
    /// `timeout`.
    pub fn replica_acks(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replica_acks = Some(replicas);
        self.replica_ack_timeout = timeout;
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
        validate::at_least_1ms("max_block", self.max_block)?;
        if let Some(replicas) = self.replica_acks {
            validate::at_least("replica_acks", replicas, 1)?;
            validate::at_least_1ms("replica_ack_timeout", self.replica_ack_timeout)?;
            if self.replica_ack_timeout >= self.redis.operation_timeout {
                return Err(keel_core::ConfigError::new(
                    "replica_ack_timeout",
                    format!(
                        "{:?} is not shorter than redis.operation_timeout ({:?}), which bounds \
                         the whole enqueue; shorten it or raise the operation timeout",
                        self.replica_ack_timeout, self.redis.operation_timeout
                    ),
                )
                .into());
            }
        }
        Ok(())
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
        let err = base.clone().blocking_connections(0).validate().unwrap_err();
        assert!(err.to_string().contains("blocking_connections"), "{err}");
        let err = base
            .clone()
            .replica_acks(0, Duration::from_millis(100))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("`replica_acks`"), "{err}");
        let err = base
            .clone()
            .operation_timeout(Duration::from_millis(500))
            .replica_acks(1, Duration::from_millis(500))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("`replica_ack_timeout`"), "{err}");
        assert!(
            base.replica_acks(1, Duration::from_millis(100))
                .validate()
                .is_ok()
        );
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
