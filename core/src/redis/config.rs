//! Settings of a Redis connection pool.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::redacted_url;
use crate::validate;

/// How to reach one Redis server, or one Redis Cluster, shared by every
/// Keel component that talks to it.
///
/// A config with [`cluster_urls`](Self::cluster_urls) (made with
/// [`RedisConfig::cluster`]) describes a Redis Cluster: the pool follows its
/// redirections (`MOVED`, `ASK`) and failovers, and [`url`](Self::url) is
/// not used. That needs keel-core's `cluster` feature; without it such a
/// config is refused by [`validate`](Self::validate).
///
/// Durations deserialize from human strings (`"50ms"`).
///
/// ```
/// use std::time::Duration;
/// use keel_core::redis::RedisConfig;
///
/// let config = RedisConfig::new("redis://:secret@127.0.0.1:6379")
///     .pool_size(8)
///     .operation_timeout(Duration::from_millis(200));
/// assert!(config.validate().is_ok());
/// assert!(!format!("{config:?}").contains("secret"));
/// let err = config.clone().pool_size(0).validate().unwrap_err();
/// assert_eq!(err.field, "redis.pool_size");
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The server, e.g. `redis://127.0.0.1:6379` (`rediss://` for TLS).
    /// Default `redis://127.0.0.1:6379`.
    pub url: String,
    /// Seed nodes of a Redis Cluster, e.g. `["redis://10.0.0.1:6379",
    /// "redis://10.0.0.2:6379"]`: any nodes of it, the client discovers the
    /// rest. Empty (the default): [`url`](Self::url) is a single server.
    /// Needs keel-core's `cluster` feature.
    pub cluster_urls: Vec<String>,
    /// Multiplexed connections kept open and shared by all operations.
    /// Default 8. On a cluster the client keeps one multiplexed connection
    /// per node instead, and this only sizes the components' own lanes.
    pub pool_size: usize,
    /// Longest opening a connection (and waiting for one from the pool)
    /// may take. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest one command may wait for its answer before it fails as a
    /// timeout. Default 2 s. Components with tighter budgets (a cache
    /// tier) apply their own, shorter timeout on top.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".to_owned(),
            cluster_urls: Vec::new(),
            pool_size: 8,
            connect_timeout: Duration::from_secs(2),
            operation_timeout: Duration::from_secs(2),
        }
    }
}

impl RedisConfig {
    /// Defaults for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            ..RedisConfig::default()
        }
    }

    /// Defaults for the Redis Cluster that `seeds` belong to (any of its
    /// nodes; the client discovers the others). Needs keel-core's `cluster`
    /// feature.
    ///
    /// ```
    /// use keel_core::redis::RedisConfig;
    ///
    /// let config = RedisConfig::cluster(["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]);
    /// assert!(config.is_cluster());
    /// # #[cfg(feature = "cluster")]
    /// assert!(config.validate().is_ok());
    /// # #[cfg(not(feature = "cluster"))]
    /// # assert_eq!(config.validate().unwrap_err().field, "redis.cluster_urls");
    /// ```
    pub fn cluster<I, S>(seeds: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RedisConfig {
            cluster_urls: seeds.into_iter().map(Into::into).collect(),
            ..RedisConfig::default()
        }
    }

    /// Whether this config describes a Redis Cluster (its
    /// [`cluster_urls`](Self::cluster_urls) are not empty).
    pub fn is_cluster(&self) -> bool {
        !self.cluster_urls.is_empty()
    }

    /// Sets [`pool_size`](Self::pool_size).
    #[must_use]
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`operation_timeout`](Self::operation_timeout).
    #[must_use]
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// The URL with any password replaced by `***`, safe to log; for a
    /// cluster, its seed URLs so redacted, comma-separated.
    pub fn redacted_url(&self) -> String {
        if self.is_cluster() {
            let seeds: Vec<String> = self.cluster_urls.iter().map(|u| redacted_url(u)).collect();
            format!("cluster {}", seeds.join(","))
        } else {
            redacted_url(&self.url)
        }
    }

    /// Checks every field, naming the first bad one (`redis.url`,
    /// `redis.cluster_urls`, `redis.pool_size`, `redis.connect_timeout`,
    /// `redis.operation_timeout`).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the field and what is accepted.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.is_cluster() {
            if !cfg!(feature = "cluster") {
                return Err(ConfigError::new(
                    "redis.cluster_urls",
                    "Redis Cluster support is not compiled in; enable keel-core's `cluster` \
                     feature (or the `cluster` feature of the crate using it), or give a single \
                     server's `url` and no `cluster_urls`",
                ));
            }
            for url in &self.cluster_urls {
                usable_url("redis.cluster_urls", url)?;
            }
        } else {
            usable_url("redis.url", &self.url)?;
        }
        validate::at_least("redis.pool_size", self.pool_size, 1)?;
        validate::at_least_1ms("redis.connect_timeout", self.connect_timeout)?;
        validate::at_least_1ms("redis.operation_timeout", self.operation_timeout)
    }
}

/// Refuses a URL the client library cannot use (its own parser decides).
fn usable_url(field: &'static str, url: &str) -> Result<(), ConfigError> {
    match ::redis::IntoConnectionInfo::into_connection_info(url) {
        Ok(_) => Ok(()),
        Err(err) => Err(ConfigError::new(
            field,
            format!(
                "not a usable redis:// or rediss:// URL ({}): {err}",
                redacted_url(url)
            ),
        )),
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redacted_url(&self.url))
            .field(
                "cluster_urls",
                &self
                    .cluster_urls
                    .iter()
                    .map(|u| redacted_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .finish()
    }
}

impl fmt::Display for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted_url())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_fields_by_name() {
        for (config, field) in [
            (RedisConfig::new("http://x"), "redis.url"),
            (RedisConfig::default().pool_size(0), "redis.pool_size"),
            (
                RedisConfig::default().connect_timeout(Duration::ZERO),
                "redis.connect_timeout",
            ),
            (
                RedisConfig::default().operation_timeout(Duration::ZERO),
                "redis.operation_timeout",
            ),
        ] {
            assert_eq!(config.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn a_cluster_is_described_by_its_seeds() {
        let config = RedisConfig::cluster(["redis://:pw@127.0.0.1:7000", "redis://127.0.0.1:7001"]);
        assert!(config.is_cluster());
        assert!(!RedisConfig::default().is_cluster());
        assert_eq!(
            config.to_string(),
            "cluster redis://:***@127.0.0.1:7000,redis://127.0.0.1:7001"
        );
        assert!(!format!("{config:?}").contains("pw"));
        if cfg!(feature = "cluster") {
            assert!(config.validate().is_ok());
            let bad = RedisConfig::cluster(["redis://127.0.0.1:7000", "http://x"]);
            assert_eq!(bad.validate().unwrap_err().field, "redis.cluster_urls");
        } else {
            let err = config.validate().unwrap_err();
            assert_eq!(err.field, "redis.cluster_urls");
            assert!(err.reason.contains("`cluster` feature"), "{err}");
        }
        let parsed: RedisConfig =
            serde_json::from_str(r#"{"cluster_urls":["redis://h:1","redis://h:2"]}"#).unwrap();
        assert_eq!(parsed.cluster_urls.len(), 2);
    }

    #[test]
    fn a_bad_url_error_does_not_leak_the_password() {
        let err = RedisConfig::new("redis://:hunter2@[::1")
            .validate()
            .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn reads_human_durations_and_hides_the_password() {
        let config: RedisConfig =
            serde_json::from_str(r#"{"url":"redis://:pw@h:1","operation_timeout":"50ms"}"#)
                .unwrap();
        assert_eq!(config.operation_timeout, Duration::from_millis(50));
        assert_eq!(config.to_string(), "redis://:***@h:1");
        assert!(!format!("{config:?}").contains("pw"));
    }
}
