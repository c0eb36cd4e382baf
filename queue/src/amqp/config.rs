//! Settings of the RabbitMQ backend.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::QueueConfig;
use crate::error::{QueueError, Result};
use keel_core::validate;

/// The longest queue name the RabbitMQ backend takes: every name it derives
/// (`<name>.delay.p<level>.<ms>ms` is the longest, with up to 2 digits of
/// level and 20 of milliseconds) must fit AMQP's 255-byte short strings.
pub(crate) const MAX_NAME: usize = 255 - ".delay.p".len() - 2 - ".".len() - 20 - "ms".len();

/// The RabbitMQ queue type for a queue's ready and dead-letter queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum AmqpQueueType {
    /// Replicated Raft queues: the durable choice, and the faster one with
    /// confirms and persistent messages on RabbitMQ 3.10. The default.
    #[default]
    Quorum,
    /// Classic durable queues, for brokers without quorum queues.
    Classic,
}

/// Settings of [`AmqpQueue`](crate::AmqpQueue).
///
/// ```
/// use keel_queue::{AmqpQueueConfig, QueueConfig};
///
/// let config = AmqpQueueConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f", QueueConfig::new("jobs"));
/// assert!(config.validate().is_ok());
/// assert!(!format!("{config:?}").contains("guest:guest"));
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct AmqpQueueConfig {
    /// The broker, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: String,
    /// Settings shared by every backend.
    pub queue: QueueConfig,
    /// Quorum (default) or classic queues.
    pub queue_type: AmqpQueueType,
    /// Unacked messages the broker pushes ahead to this handle, per priority
    /// level. Higher is faster; those messages wait in this process until a
    /// `dequeue` takes them (and return to the broker if the process dies).
    /// Default 64.
    pub prefetch: u16,
    /// Longest any one broker operation (connect, publish and confirm,
    /// declare) may take before it fails with `Timeout`. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// When no `dequeue` has asked for jobs for this long, the handle stops
    /// consuming and gives its prefetched jobs back to the queue, so an idle
    /// or stuck process never hoards work. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub release_idle_after: Duration,
    /// AMQP heartbeat, unless the URL sets `heartbeat=`: how soon a silently
    /// dead connection (a half-open TCP connection, a blackholed network) is
    /// noticed by both sides, so the broker requeues what it had delivered
    /// on it. Whole seconds. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
}

impl Default for AmqpQueueConfig {
    fn default() -> Self {
        AmqpQueueConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            queue: QueueConfig::default(),
            queue_type: AmqpQueueType::Quorum,
            prefetch: 64,
            operation_timeout: Duration::from_secs(5),
            release_idle_after: Duration::from_secs(1),
            heartbeat: Duration::from_secs(10),
        }
    }
}

impl AmqpQueueConfig {
    /// Defaults for this broker and queue.
    pub fn new(url: impl Into<String>, queue: QueueConfig) -> Self {
        AmqpQueueConfig {
            url: url.into(),
            queue,
            ..AmqpQueueConfig::default()
        }
    }

    /// Sets [`queue_type`](Self::queue_type).
    pub fn queue_type(mut self, queue_type: AmqpQueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// Sets [`prefetch`](Self::prefetch).
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Sets [`heartbeat`](Self::heartbeat).
    pub fn heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// The URL with the heartbeat applied (unless it sets one itself).
    pub(crate) fn connect_url(&self) -> String {
        if self.url.contains("heartbeat=") {
            return self.url.clone();
        }
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!(
            "{}{sep}heartbeat={}",
            self.url,
            self.heartbeat.as_secs().max(1)
        )
    }

    /// Sets [`operation_timeout`](Self::operation_timeout).
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        self.queue.validate()?;
        let name = &self.queue.name;
        if name.len() > MAX_NAME {
            return Err(QueueError::config(
                "queue.name",
                format!(
                    "is {} bytes; RabbitMQ names are at most 255 bytes, and the longest name \
                     this queue derives from it (`<name>.delay.p<level>.<ms>ms`) adds {} bytes, \
                     so the name may have at most {MAX_NAME}",
                    name.len(),
                    255 - MAX_NAME
                ),
            ));
        }
        if name.starts_with("amq.") {
            return Err(QueueError::config(
                "queue.name",
                "must not start with `amq.` (RabbitMQ reserves those names)",
            ));
        }
        if !(self.url.starts_with("amqp://") || self.url.starts_with("amqps://")) {
            return Err(QueueError::config(
                "url",
                "must be an amqp:// or amqps:// URL",
            ));
        }
        validate::at_least("prefetch", self.prefetch, 1)?;
        validate::at_least_1ms("operation_timeout", self.operation_timeout)?;
        if self.heartbeat < Duration::from_secs(1) || self.heartbeat > Duration::from_secs(3600) {
            return Err(QueueError::config(
                "heartbeat",
                "must be between 1 s and 1 h",
            ));
        }
        validate::at_least_1ms("release_idle_after", self.release_idle_after)?;
        Ok(())
    }
}

impl fmt::Debug for AmqpQueueConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpQueueConfig")
            .field("url", &keel_core::redacted_url(&self.url))
            .field("queue", &self.queue)
            .field("queue_type", &self.queue_type)
            .field("prefetch", &self.prefetch)
            .field("operation_timeout", &self.operation_timeout)
            .field("release_idle_after", &self.release_idle_after)
            .field("heartbeat", &self.heartbeat)
            .finish()
    }
}
