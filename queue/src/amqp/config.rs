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
    /// Other nodes of the same RabbitMQ cluster, tried in order after
    /// `url` when it does not answer. Each reconnect starts with the node
    /// after the one the lost connection went to, so a handle whose node
    /// died moves to a live one on its next call. With quorum queues every
    /// node serves every queue, whichever node leads it. Default empty.
    pub fallback_urls: Vec<String>,
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
            fallback_urls: Vec::new(),
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

    /// Sets [`fallback_urls`](Self::fallback_urls): the other nodes of
    /// the cluster `url` belongs to.
    pub fn fallback_urls<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.fallback_urls = urls.into_iter().map(Into::into).collect();
        self
    }

    /// `url`, then `fallback_urls`: every node a connection may go to.
    pub(crate) fn all_urls(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.url.as_str()).chain(self.fallback_urls.iter().map(String::as_str))
    }

    /// How many nodes a connection may go to.
    pub(crate) fn url_count(&self) -> usize {
        1 + self.fallback_urls.len()
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

    /// `url` with the heartbeat applied (unless it sets one itself).
    pub(crate) fn connect_url(&self, url: &str) -> String {
        if url.contains("heartbeat=") {
            return url.to_owned();
        }
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}heartbeat={}", self.heartbeat.as_secs().max(1))
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
        if !is_amqp_url(&self.url) {
            return Err(QueueError::config(
                "url",
                "must be an amqp:// or amqps:// URL",
            ));
        }
        if let Some(position) = self.fallback_urls.iter().position(|url| !is_amqp_url(url)) {
            return Err(QueueError::config(
                "fallback_urls",
                format!("entry {position} must be an amqp:// or amqps:// URL"),
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
            .field(
                "fallback_urls",
                &self
                    .fallback_urls
                    .iter()
                    .map(|url| keel_core::redacted_url(url))
                    .collect::<Vec<_>>(),
            )
            .field("queue", &self.queue)
            .field("queue_type", &self.queue_type)
            .field("prefetch", &self.prefetch)
            .field("operation_timeout", &self.operation_timeout)
            .field("release_idle_after", &self.release_idle_after)
            .field("heartbeat", &self.heartbeat)
            .finish()
    }
}

fn is_amqp_url(url: &str) -> bool {
    url.starts_with("amqp://") || url.starts_with("amqps://")
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_testkit::assert_refused;

    fn config() -> AmqpQueueConfig {
        AmqpQueueConfig::new("amqp://u:secret@127.0.0.1:5672/%2f", QueueConfig::new("q"))
    }

    #[test]
    fn refuses_bad_fields_by_name() {
        assert_refused(
            AmqpQueueConfig::validate,
            [
                (
                    AmqpQueueConfig::new("http://127.0.0.1", QueueConfig::new("q")),
                    "url",
                ),
                (
                    config().fallback_urls(["amqp://127.0.0.1:5673", "127.0.0.1:5674"]),
                    "fallback_urls",
                ),
                (config().prefetch(0), "prefetch"),
                (config().heartbeat(Duration::ZERO), "heartbeat"),
            ],
        );
    }

    #[test]
    fn lists_every_node_and_hides_their_passwords() {
        let config = config().fallback_urls(["amqps://u:other@10.0.0.2:5671/%2f"]);
        assert!(config.validate().is_ok());
        assert_eq!(config.url_count(), 2);
        assert_eq!(
            config.all_urls().collect::<Vec<_>>(),
            [
                "amqp://u:secret@127.0.0.1:5672/%2f",
                "amqps://u:other@10.0.0.2:5671/%2f"
            ]
        );
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("secret") && !shown.contains("other"),
            "{shown}"
        );
        let parsed: AmqpQueueConfig = serde_json::from_str(
            r#"{"url":"amqp://a:1/%2f","fallback_urls":["amqp://b:2/%2f"],"queue":{"name":"q"}}"#,
        )
        .unwrap();
        assert_eq!(parsed.fallback_urls, ["amqp://b:2/%2f"]);
    }
}
