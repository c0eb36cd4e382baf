//! The gateway's configuration: a TOML file, with environment overrides,
//! validated at start with errors naming the field.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! # State shared by replicas and workers (limits, durable queue, job
//! # results, the cache's L2): one server (feature `redis`) ...
//! # redis_url = "redis://10.0.0.5:6379"
//! # ... or a Redis Cluster's seed nodes (feature `cluster`), not both.
//! # redis_cluster_urls = ["redis://10.0.0.5:6379", "redis://10.0.0.6:6379"]
//!
//! # [durable]
//! # backend = "redis"        # keel-worker processes run the jobs
//! # replica_acks = 1         # 202 only once a replica holds the job
//!
//! [[models]]
//! name = "llama-3-8b"
//! upstreams = ["http://10.0.0.7:8000", "http://10.0.0.8:8000"]
//! slots = 16                 # requests each upstream serves at once
//! cache_deterministic = true # cache chat/completions when temperature is 0
//!
//! [[tenants]]
//! name = "acme"
//! priority = "high"
//! weight = 2.0
//! requests_per_minute = 600
//! tokens_per_minute = 200000
//! models = ["llama-3-8b"]    # empty: every model
//!
//! [[keys]]
//! # sha256 of the API key, hex (`keel-gateway hash-key <key>` prints it)
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! tenant = "acme"
//! ```

mod durable;
mod model;
mod tenant;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use keel_core::ConfigError;
use serde::{Deserialize, Serialize};

pub use durable::{DurableBackend, DurableConfig};
#[cfg(feature = "redis")]
pub(crate) use durable::{queue_config_error, redis_queue_config};
pub use model::ModelConfig;
pub use tenant::{KeyConfig, PriorityClass, Tenant, hash_key};

/// Everything the gateway needs to start. `Debug` shows URLs with their
/// passwords replaced by `***`; keys are stored hashed.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// Address to listen on. Default `127.0.0.1:8080`. Env: `KEEL_LISTEN`.
    pub listen: SocketAddr,
    /// Largest request body accepted; larger is answered 413. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Deadline of a request that names none (`x-keel-timeout-ms`). Default 60 s.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// Longest deadline a client may ask for. Default 10 min.
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// On SIGTERM, how long in-flight requests and streams may take to
    /// finish before they are cut. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Completion tokens assumed for a request that sets no `max_tokens`
    /// (its token reservation). Default 256.
    pub default_max_tokens: u32,
    /// Requests waiting in admission at most (then 503). Default 1,024.
    pub max_queued: usize,
    /// Requests in flight to upstreams at most, all models. Default 512.
    pub max_in_flight: usize,
    /// Retries allowed per request over the budget window (0.1 = one retry
    /// per ten requests). Default 0.1.
    pub retry_ratio: f64,
    /// Memory of the response cache (deterministic requests), in bytes.
    /// Default 64 MiB.
    pub cache_bytes: u64,
    /// How long a cached answer is served. Default 10 min.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// Active health check interval per upstream. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// How long an upstream ejected for failing stays out before probes
    /// may re-admit it; doubles for each ejection in a row, up to ten times
    /// this. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub ejection_time: Duration,
    /// Redis for the state gateway replicas and workers share (`redis://…`):
    /// token limits, the durable queue and job results, and the response
    /// cache's second tier; unset (and no
    /// [`redis_cluster_urls`](Self::redis_cluster_urls)): limits and the
    /// cache are this process's own. Feature `redis`. Env: `KEEL_REDIS_URL`.
    pub redis_url: Option<String>,
    /// The same shared state on a Redis Cluster: seed nodes of it
    /// (`["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]`, any nodes; the
    /// client finds the rest and follows failovers). Each tenant's limits,
    /// the durable queue and each cached answer live in one slot, on that
    /// slot's master. Set this or [`redis_url`](Self::redis_url), not both.
    /// Feature `cluster`. Default empty. Env: `KEEL_REDIS_CLUSTER_URLS`
    /// (comma-separated).
    pub redis_cluster_urls: Vec<String>,
    /// What a tenant's or key's limit check answers when the shared Redis
    /// cannot answer it in time (250 ms): an outage, or the seconds of a
    /// Redis Cluster failover, during which the cluster client holds back
    /// commands for every slot while it relearns the topology. `true` (the
    /// default) admits the request, so an outage of the limiter is not an
    /// outage of the gateway, and limits are exceeded while it lasts;
    /// `false` refuses it (503) instead, so limits hold through it. Either
    /// way `keel_rate_limiter_errors_total` counts it. No effect on limits
    /// kept in this process (no shared Redis).
    pub limits_fail_open: bool,
    /// Durable mode: requests sent with `x-keel-mode: queue` (or to
    /// `POST /v1/jobs`) go through a keel-queue and are answered 202 with a
    /// job id. Default: an in-memory queue served by a worker inside the
    /// gateway.
    pub durable: DurableConfig,
    /// The models and their upstreams.
    pub models: Vec<ModelConfig>,
    /// The tenants.
    pub tenants: Vec<Tenant>,
    /// API keys (stored hashed), each mapped to a tenant.
    pub keys: Vec<KeyConfig>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 1 << 20,
            default_timeout: Duration::from_secs(60),
            max_timeout: Duration::from_secs(600),
            drain_timeout: Duration::from_secs(30),
            default_max_tokens: 256,
            max_queued: 1_024,
            max_in_flight: 512,
            retry_ratio: 0.1,
            cache_bytes: 64 << 20,
            cache_ttl: Duration::from_secs(600),
            probe_interval: Duration::from_secs(2),
            ejection_time: Duration::from_secs(30),
            redis_url: None,
            redis_cluster_urls: Vec::new(),
            limits_fail_open: true,
            durable: DurableConfig::default(),
            models: Vec::new(),
            tenants: Vec::new(),
            keys: Vec::new(),
        }
    }
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("listen", &self.listen)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("default_timeout", &self.default_timeout)
            .field("max_timeout", &self.max_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("default_max_tokens", &self.default_max_tokens)
            .field("max_queued", &self.max_queued)
            .field("max_in_flight", &self.max_in_flight)
            .field("retry_ratio", &self.retry_ratio)
            .field("cache_bytes", &self.cache_bytes)
            .field("cache_ttl", &self.cache_ttl)
            .field("probe_interval", &self.probe_interval)
            .field("ejection_time", &self.ejection_time)
            .field(
                "redis_url",
                &self.redis_url.as_deref().map(keel_core::redacted_url),
            )
            .field(
                "redis_cluster_urls",
                &self
                    .redis_cluster_urls
                    .iter()
                    .map(|url| keel_core::redacted_url(url))
                    .collect::<Vec<_>>(),
            )
            .field("limits_fail_open", &self.limits_fail_open)
            .field("durable", &self.durable)
            .field("models", &self.models)
            .field("tenants", &self.tenants)
            .field("keys", &self.keys)
            .finish()
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped fields.
    #[error("config file {path} is not valid: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (it names the line and field).
        message: String,
    },
    /// A field was refused.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

impl GatewayConfig {
    /// Reads `path` (TOML), applies environment overrides and validates.
    ///
    /// # Errors
    ///
    /// [`LoadError`] saying which file, line or field is wrong.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = GatewayConfig::from_toml(&text).map_err(|err| match err {
            LoadError::Parse { message, .. } => LoadError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })?;
        config.apply_env(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (no environment, no validation).
    ///
    /// # Errors
    ///
    /// [`LoadError::Parse`] naming the line and field.
    pub fn from_toml(text: &str) -> Result<Self, LoadError> {
        toml::from_str(text).map_err(|err| LoadError::Parse {
            path: "<text>".to_owned(),
            message: err.to_string(),
        })
    }

    /// Applies `KEEL_LISTEN`, `KEEL_REDIS_URL`, `KEEL_REDIS_CLUSTER_URLS`
    /// (comma-separated seed nodes) and `KEEL_AMQP_URL` (the durable
    /// queue's broker) from `env`. An empty value unsets the field.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the variable when its value does not parse.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(listen) = env("KEEL_LISTEN") {
            self.listen = listen.parse().map_err(|err| {
                ConfigError::new("KEEL_LISTEN", format!("not a socket address: {err}"))
            })?;
        }
        if let Some(url) = env("KEEL_REDIS_URL") {
            self.redis_url = Some(url).filter(|url| !url.is_empty());
        }
        if let Some(urls) = env("KEEL_REDIS_CLUSTER_URLS") {
            self.redis_cluster_urls = urls
                .split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if let Some(url) = env("KEEL_AMQP_URL") {
            self.durable.url = Some(url).filter(|url| !url.is_empty());
        }
        Ok(())
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the field (`models[1].upstreams`, …).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_body_bytes == 0 {
            return Err(ConfigError::new("max_body_bytes", "must be at least 1"));
        }
        if self.default_timeout.is_zero() || self.default_timeout > self.max_timeout {
            return Err(ConfigError::new(
                "default_timeout",
                "must be above zero and at most max_timeout",
            ));
        }
        if self.ejection_time.is_zero() {
            return Err(ConfigError::new("ejection_time", "must be above zero"));
        }
        if self.max_queued == 0 || self.max_in_flight == 0 {
            return Err(ConfigError::new(
                "max_queued",
                "max_queued and max_in_flight must be at least 1",
            ));
        }
        if !(self.retry_ratio.is_finite() && (0.0..=1.0).contains(&self.retry_ratio)) {
            return Err(ConfigError::new(
                "retry_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        if self.redis_url.is_some() && !self.redis_cluster_urls.is_empty() {
            return Err(ConfigError::new(
                "redis_cluster_urls",
                "set either redis_url (one Redis server) or redis_cluster_urls (the seed nodes \
                 of a Redis Cluster), not both",
            ));
        }
        if let Some(url) = &self.redis_url {
            validate_redis_url(url)?;
        }
        if !self.redis_cluster_urls.is_empty() {
            validate_redis_cluster_urls(&self.redis_cluster_urls)?;
        }
        self.durable.validate(self.has_shared_redis())?;
        self.validate_durable_redis()?;
        if self.models.is_empty() {
            return Err(ConfigError::new("models", "name at least one model"));
        }
        let mut names = HashSet::new();
        for (index, model) in self.models.iter().enumerate() {
            model.validate(index)?;
            if !names.insert(model.name.as_str()) {
                return Err(ConfigError::new(
                    "models",
                    format!("model `{}` is listed twice", model.name),
                ));
            }
        }
        let mut tenants = HashSet::new();
        for (index, tenant) in self.tenants.iter().enumerate() {
            tenant.validate(index, &names)?;
            if !tenants.insert(tenant.name.as_str()) {
                return Err(ConfigError::new(
                    "tenants",
                    format!("tenant `{}` is listed twice", tenant.name),
                ));
            }
        }
        let mut hashes = HashSet::new();
        for (index, key) in self.keys.iter().enumerate() {
            key.validate(index, &tenants)?;
            if !hashes.insert(key.sha256.as_str()) {
                return Err(ConfigError::new(
                    "keys",
                    format!("keys[{index}] is listed twice"),
                ));
            }
        }
        Ok(())
    }
}

impl GatewayConfig {
    /// Whether replicas share state through Redis (`redis_url` or
    /// `redis_cluster_urls` is set).
    pub fn has_shared_redis(&self) -> bool {
        self.redis_url.is_some() || !self.redis_cluster_urls.is_empty()
    }

    /// The field that names the shared Redis, for errors about it.
    #[cfg(feature = "redis")]
    pub(crate) fn redis_field(&self) -> &'static str {
        if self.redis_cluster_urls.is_empty() {
            "redis_url"
        } else {
            "redis_cluster_urls"
        }
    }

    /// The connection settings of the shared Redis (a single server or a
    /// cluster), if there is one.
    #[cfg(feature = "redis")]
    pub(crate) fn redis_config(&self) -> Option<keel_core::redis::RedisConfig> {
        if !self.redis_cluster_urls.is_empty() {
            return Some(keel_core::redis::RedisConfig::cluster(
                self.redis_cluster_urls.iter().cloned(),
            ));
        }
        self.redis_url
            .as_ref()
            .map(|url| keel_core::redis::RedisConfig::new(url.clone()))
    }

    /// What the Redis queue would refuse at start (replica acks against
    /// the connection's timeout), refused now with the gateway's names.
    #[cfg(feature = "redis")]
    fn validate_durable_redis(&self) -> Result<(), ConfigError> {
        let Some(redis) = self.redis_config() else {
            return Ok(());
        };
        if self.durable.backend != DurableBackend::Redis {
            return Ok(());
        }
        durable::redis_queue_config(&self.durable, redis)
            .validate()
            .map_err(|err| durable::queue_config_error(&err))
    }

    #[cfg(not(feature = "redis"))]
    fn validate_durable_redis(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

#[cfg(feature = "redis")]
fn validate_redis_url(url: &str) -> Result<(), ConfigError> {
    keel_core::redis::RedisConfig::new(url)
        .validate()
        .map_err(|err| ConfigError::new("redis_url", err.reason))
}

#[cfg(not(feature = "redis"))]
fn validate_redis_url(_: &str) -> Result<(), ConfigError> {
    Err(ConfigError::new(
        "redis_url",
        "this build has no Redis support; rebuild with `--features redis` or leave it unset",
    ))
}

#[cfg(feature = "cluster")]
fn validate_redis_cluster_urls(urls: &[String]) -> Result<(), ConfigError> {
    keel_core::redis::RedisConfig::cluster(urls.iter().cloned())
        .validate()
        .map_err(|err| ConfigError::new("redis_cluster_urls", err.reason))
}

#[cfg(not(feature = "cluster"))]
fn validate_redis_cluster_urls(_: &[String]) -> Result<(), ConfigError> {
    Err(ConfigError::new(
        "redis_cluster_urls",
        "this build has no Redis Cluster support; rebuild keel-gateway with `--features \
         cluster`, or give one server's redis_url instead",
    ))
}

#[cfg(test)]
mod tests;
