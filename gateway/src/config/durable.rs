//! Durable mode: where queued requests and their results live.

use std::time::Duration;

use keel_core::ConfigError;
use serde::{Deserialize, Serialize};

/// Which keel-queue backend carries queued requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DurableBackend {
    /// In this process (lost on restart), served by a worker inside the
    /// gateway: for development and demos.
    #[default]
    Memory,
    /// Redis Streams (feature `redis`); results in Redis under `redis_url`.
    Redis,
    /// RabbitMQ quorum queues (feature `amqp`); results in Redis under
    /// `redis_url`.
    Amqp,
}

/// Settings of durable mode. `Debug` hides the broker's password.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct DurableConfig {
    /// The backend. Default `memory`.
    pub backend: DurableBackend,
    /// The queue's name. Default `keel-gateway-jobs`.
    pub queue: String,
    /// The broker URL for `amqp` (`amqp://…`); `redis` uses `redis_url`.
    /// Env: `KEEL_AMQP_URL`.
    pub url: Option<String>,
    /// How long a job's status and result can be read after it ends.
    /// Default 1 h.
    #[serde(with = "humantime_serde")]
    pub result_ttl: Duration,
    /// Jobs a worker runs at once. Default 32.
    pub concurrency: usize,
    /// How long a worker holds a job before the queue hands it to another
    /// worker (renewed while the job runs; a killed worker's jobs come back
    /// after it). Default 30 s.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Whether the gateway runs a worker itself (always for `memory`; for
    /// the others, run `keel-worker` processes instead). Default false.
    pub embedded_worker: bool,
}

impl std::fmt::Debug for DurableConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableConfig")
            .field("backend", &self.backend)
            .field("queue", &self.queue)
            .field("url", &self.url.as_deref().map(keel_core::redacted_url))
            .field("result_ttl", &self.result_ttl)
            .field("concurrency", &self.concurrency)
            .field("lease", &self.lease)
            .field("embedded_worker", &self.embedded_worker)
            .finish()
    }
}

impl Default for DurableConfig {
    fn default() -> Self {
        DurableConfig {
            backend: DurableBackend::Memory,
            queue: "keel-gateway-jobs".to_owned(),
            url: None,
            result_ttl: Duration::from_secs(3_600),
            concurrency: 32,
            lease: Duration::from_secs(30),
            embedded_worker: false,
        }
    }
}

impl DurableConfig {
    pub(crate) fn validate(&self, has_redis: bool) -> Result<(), ConfigError> {
        if self.queue.trim().is_empty() {
            return Err(ConfigError::new("durable.queue", "must not be empty"));
        }
        if self.concurrency == 0 {
            return Err(ConfigError::new(
                "durable.concurrency",
                "must be at least 1",
            ));
        }
        if self.lease < Duration::from_secs(1) {
            return Err(ConfigError::new("durable.lease", "must be at least 1s"));
        }
        if self.result_ttl < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "durable.result_ttl",
                "must be at least 1s",
            ));
        }
        match self.backend {
            DurableBackend::Memory => Ok(()),
            DurableBackend::Redis | DurableBackend::Amqp if !has_redis => Err(ConfigError::new(
                "durable.backend",
                "the redis and amqp backends keep job results in Redis: set redis_url",
            )),
            DurableBackend::Amqp if self.url.is_none() => Err(ConfigError::new(
                "durable.url",
                "the amqp backend needs the broker URL (amqp://user:pass@host:5672/%2f)",
            )),
            DurableBackend::Redis | DurableBackend::Amqp => Ok(()),
        }
    }
}
