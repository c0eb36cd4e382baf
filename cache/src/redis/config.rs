//! Settings of the Redis backend.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Settings of [`RedisCache`](crate::RedisCache).
///
/// Durations deserialize from human strings (`"50ms"`).
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
/// assert!(config.clone().pool_size(0).validate().unwrap_err().to_string().contains("pool_size"));
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RedisCacheConfig {
    /// The server, e.g. `redis://127.0.0.1:6379`. Default
    /// `redis://127.0.0.1:6379`.
    pub url: String,
    /// Prepended to every key, so several caches can share one Redis.
    /// Default `"keel:cache:"`.
    pub prefix: String,
    /// Multiplexed connections kept open and shared by all operations.
    /// Default 4.
    pub pool_size: usize,
    /// Longest one operation may take (checking out a connection included)
    /// before it fails with `Timeout`. A cache that answers slower than the
    /// origin is worse than none, so the default is low: 50 ms.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// Longest `connect` waits for the first `PING`. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for RedisCacheConfig {
    fn default() -> Self {
        RedisCacheConfig {
            url: "redis://127.0.0.1:6379".to_owned(),
            prefix: "keel:cache:".to_owned(),
            pool_size: 4,
            operation_timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

impl RedisCacheConfig {
    /// Defaults for this server.
    pub fn new(url: impl Into<String>) -> Self {
        RedisCacheConfig {
            url: url.into(),
            ..RedisCacheConfig::default()
        }
    }

    /// Sets [`prefix`](Self::prefix).
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets [`pool_size`](Self::pool_size).
    #[must_use]
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// Sets [`operation_timeout`](Self::operation_timeout).
    #[must_use]
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
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
        if self.operation_timeout < Duration::from_millis(1) {
            return Err(Error::config("operation_timeout", "must be at least 1 ms"));
        }
        if self.connect_timeout < Duration::from_millis(1) {
            return Err(Error::config("connect_timeout", "must be at least 1 ms"));
        }
        Ok(())
    }
}

impl fmt::Debug for RedisCacheConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCacheConfig")
            .field("url", &redacted_url(&self.url))
            .field("prefix", &self.prefix)
            .field("pool_size", &self.pool_size)
            .field("operation_timeout", &self.operation_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// `url` with any password replaced by `***` (an unparseable URL is shown
/// as such rather than risk printing a secret).
pub(crate) fn redacted_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<unparseable url>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_fields_by_name() {
        let base = RedisCacheConfig::new("redis://127.0.0.1");
        let err = RedisCacheConfig::new("http://x").validate().unwrap_err();
        assert!(err.to_string().contains("`url`"), "{err}");
        let err = base
            .clone()
            .operation_timeout(Duration::ZERO)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("operation_timeout"), "{err}");
    }

    #[test]
    fn hides_the_password() {
        assert_eq!(
            redacted_url("redis://user:pw@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redacted_url("redis://host"), "redis://host");
    }

    #[test]
    fn reads_human_durations() {
        let config: RedisCacheConfig =
            serde_json::from_str(r#"{"url": "redis://h", "operation_timeout": "20ms"}"#).unwrap();
        assert_eq!(config.operation_timeout, Duration::from_millis(20));
        assert_eq!(config.pool_size, 4);
    }
}
