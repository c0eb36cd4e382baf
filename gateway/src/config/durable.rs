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
    /// Redis Streams (feature `redis`) on the shared Redis (`redis_url`, or
    /// `redis_cluster_urls` with feature `cluster`: the queue lives in one
    /// slot); results there too.
    Redis,
    /// RabbitMQ quorum queues (feature `amqp`); results in the shared Redis
    /// (`redis_url` or `redis_cluster_urls`).
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
    /// The broker URL for `amqp` (`amqp://…`); `redis` uses the shared
    /// Redis (`redis_url` or `redis_cluster_urls`). Env: `KEEL_AMQP_URL`.
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
    /// For the `redis` backend: replicas that must hold a job before its
    /// enqueue is answered 202 (Redis `WAIT` after the write, on the same
    /// connection). 0 (the default): 202 once the master has applied the
    /// write. Replication is asynchronous, so without replica acks, when a
    /// master dies and its replica is promoted (a Redis Cluster failover,
    /// or Sentinel), the jobs answered 202 in the last moments before the
    /// crash that had not reached the replica yet are lost: typically a
    /// few milliseconds of enqueues, more while the replica lags. With
    /// `replica_acks = 1`, a 202 means a replica holds the job, and an
    /// enqueue no replica confirmed within
    /// [`replica_ack_timeout`](Self::replica_ack_timeout) is answered 503
    /// (the job may still run). The cost is one replication round trip per
    /// enqueue; and with one replica per master, a master promoted by a
    /// failover has none until another joins, so enqueues are answered 503
    /// until then.
    pub replica_acks: u32,
    /// How long an enqueue waits for [`replica_acks`](Self::replica_acks)
    /// confirmations; below the Redis operation timeout (2 s). Default
    /// 500 ms.
    #[serde(with = "humantime_serde")]
    pub replica_ack_timeout: Duration,
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
            .field("replica_acks", &self.replica_acks)
            .field("replica_ack_timeout", &self.replica_ack_timeout)
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
            replica_acks: 0,
            replica_ack_timeout: Duration::from_millis(500),
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
        if self.replica_acks > 0 && self.backend != DurableBackend::Redis {
            return Err(ConfigError::new(
                "durable.replica_acks",
                "only the redis backend waits for replicas (RabbitMQ's quorum queues confirm \
                 on a majority already); set backend = \"redis\" or leave replica_acks at 0",
            ));
        }
        match self.backend {
            DurableBackend::Memory => Ok(()),
            DurableBackend::Redis | DurableBackend::Amqp if !has_redis => Err(ConfigError::new(
                "durable.backend",
                "the redis and amqp backends keep job results in Redis: set redis_url (or \
                 redis_cluster_urls for a Redis Cluster)",
            )),
            DurableBackend::Amqp if self.url.is_none() => Err(ConfigError::new(
                "durable.url",
                "the amqp backend needs the broker URL (amqp://user:pass@host:5672/%2f)",
            )),
            DurableBackend::Redis | DurableBackend::Amqp => Ok(()),
        }
    }
}

/// The Redis queue's settings for `durable` on `redis`.
#[cfg(feature = "redis")]
pub(crate) fn redis_queue_config(
    durable: &DurableConfig,
    redis: keel_core::redis::RedisConfig,
) -> keel_queue::RedisQueueConfig {
    let settings = keel_queue::RedisQueueConfig::with_redis(
        redis,
        keel_queue::QueueConfig::new(durable.queue.clone()),
    );
    if durable.replica_acks == 0 {
        settings
    } else {
        settings.replica_acks(durable.replica_acks, durable.replica_ack_timeout)
    }
}

/// A refusal of the Redis queue's settings, named as the gateway's field.
#[cfg(feature = "redis")]
pub(crate) fn queue_config_error(err: &keel_queue::QueueError) -> ConfigError {
    match err {
        keel_queue::QueueError::InvalidConfig(invalid) => {
            let field = match invalid.field {
                "replica_acks" => "durable.replica_acks",
                "replica_ack_timeout" => "durable.replica_ack_timeout",
                _ => "durable.queue",
            };
            ConfigError::new(field, invalid.reason.clone())
        }
        other => ConfigError::new("durable.queue", other.to_string()),
    }
}
