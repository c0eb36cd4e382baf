//! The Redis-shared limiter (feature `redis`): one GCRA Lua script, so
//! every process sharing the Redis enforces one limit.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

use super::config::{Rate, RateLimitConfig};
use super::{RateDecision, RateLimit};
use crate::error::{BoxError, Error, Result};
use crate::metrics::LimiterMetrics;
use crate::ticket::TenantId;

/// Settings of [`RedisRateLimiter`].
///
/// ```
/// use keel_scheduler::{Rate, RateLimitConfig, RedisRateLimitConfig, TenantRates};
///
/// let config = RedisRateLimitConfig::new(
///     "redis://:secret@127.0.0.1:6379",
///     RateLimitConfig::new("gateway").default_rates(TenantRates::default().requests(Rate::per_second(100))),
/// );
/// assert!(config.validate().is_ok());
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RedisRateLimitConfig {
    /// The server, e.g. `redis://127.0.0.1:6379`. Default
    /// `redis://127.0.0.1:6379`.
    pub url: String,
    /// The rates. Its `name` is the key namespace: instances with the same
    /// name share their limits.
    pub limits: RateLimitConfig,
    /// Longest one check may take before it counts as a failure. Default
    /// 250 ms.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// What a check answers when Redis cannot be reached: `true` (the
    /// default) allows the request (an outage of the limiter must not
    /// become an outage of the service; failures are counted in
    /// `keel_rate_limiter_errors_total`), `false` answers
    /// [`Error::RateLimiter`].
    pub fail_open: bool,
}

impl Default for RedisRateLimitConfig {
    fn default() -> Self {
        RedisRateLimitConfig {
            url: "redis://127.0.0.1:6379".to_owned(),
            limits: RateLimitConfig::default(),
            operation_timeout: Duration::from_millis(250),
            fail_open: true,
        }
    }
}

impl RedisRateLimitConfig {
    /// Defaults for this server and these rates.
    pub fn new(url: impl Into<String>, limits: RateLimitConfig) -> Self {
        RedisRateLimitConfig {
            url: url.into(),
            limits,
            ..RedisRateLimitConfig::default()
        }
    }

    /// Sets [`operation_timeout`](Self::operation_timeout).
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Sets [`fail_open`](Self::fail_open).
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.fail_open = fail_open;
        self
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        self.limits.validate()?;
        // The client library's own parser decides what a usable URL is.
        if let Err(err) = ::redis::IntoConnectionInfo::into_connection_info(self.url.as_str()) {
            return Err(Error::config(
                "url",
                format!("not a usable redis:// or rediss:// URL: {err}"),
            ));
        }
        if self.operation_timeout < Duration::from_millis(1) {
            return Err(Error::config("operation_timeout", "must be at least 1 ms"));
        }
        Ok(())
    }
}

impl fmt::Debug for RedisRateLimitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimitConfig")
            .field("url", &redacted_url(&self.url))
            .field("limits", &self.limits)
            .field("operation_timeout", &self.operation_timeout)
            .field("fail_open", &self.fail_open)
            .finish()
    }
}

/// `url` with any password replaced by `***` (an unparseable URL is shown
/// as such rather than risk printing a secret).
fn redacted_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<unparseable url>".to_owned(),
    }
}

/// Per-tenant GCRA rate limits shared through Redis, so several gateway
/// processes enforce one limit.
///
/// # How
///
/// Each check is one Lua script call that reads the server's clock
/// (`TIME`, so instances with skewed clocks agree), tests every limit of
/// the tenant (requests and cost units) and charges all of them or none.
/// State is one small string per tenant and limit,
/// `keel:rl:{<name>:<tenant>}:r` and `…:c` (one hash slot per tenant, so
/// Redis Cluster works), with a TTL of the time its bucket takes to
/// refill: idle tenants cost no memory.
///
/// # Failures
///
/// A check is bounded by `operation_timeout`. When Redis cannot be reached
/// the answer follows [`fail_open`](RedisRateLimitConfig::fail_open); the
/// connection is re-established in the background.
///
/// ```no_run
/// use keel_scheduler::{Rate, RateLimitConfig, RedisRateLimitConfig, RedisRateLimiter, TenantRates};
///
/// # async fn demo() -> keel_scheduler::Result<()> {
/// let limiter = RedisRateLimiter::connect(RedisRateLimitConfig::new(
///     "redis://127.0.0.1:6379",
///     RateLimitConfig::new("gateway").default_rates(TenantRates::default().requests(Rate::per_second(100))),
/// ))
/// .await?;
/// # Ok(()) }
/// ```
pub struct RedisRateLimiter {
    config: RedisRateLimitConfig,
    connection: ConnectionManager,
    script: redis::Script,
    metrics: LimiterMetrics,
}

impl fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RedisRateLimiter {
    /// Connects to Redis.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming a bad field;
    /// [`Error::RateLimiter`] when the server does not answer.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is charged.
    pub async fn connect(config: RedisRateLimitConfig) -> Result<Self> {
        config.validate()?;
        let client = redis::Client::open(config.url.as_str())
            .map_err(|err| Error::config("url", format!("not a usable redis URL: {err}")))?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.operation_timeout))
            .set_response_timeout(Some(config.operation_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connection = tokio::time::timeout(
            config.operation_timeout * 4,
            ConnectionManager::new_with_config(client, manager),
        )
        .await
        .map_err(|_| {
            unavailable(
                format!("redis at {} did not answer", redacted_url(&config.url)),
                None,
            )
        })?
        .map_err(|err| {
            unavailable(
                format!("redis at {} does not answer", redacted_url(&config.url)),
                Some(err.into()),
            )
        })?;
        Ok(RedisRateLimiter {
            metrics: LimiterMetrics::new(&config.limits.name),
            script: redis::Script::new(include_str!("lua/gcra.lua")),
            connection,
            config,
        })
    }

    /// The configuration the limiter was built with.
    pub fn config(&self) -> &RedisRateLimitConfig {
        &self.config
    }

    async fn run(&self, tenant: &TenantId, cost: u64) -> Result<Option<RateDecision>> {
        let rates = self.config.limits.rates_of(tenant.as_str());
        let limits: Vec<(&str, &Rate, u64)> = rates
            .requests
            .iter()
            .map(|r| ("r", r, 1))
            .chain(rates.cost.iter().map(|r| ("c", r, cost)))
            .collect();
        if limits.is_empty() {
            return Ok(None);
        }
        let mut invocation = self.script.prepare_invoke();
        for (suffix, rate, units) in &limits {
            let interval = micros(rate.emission_interval());
            let units = (*units).clamp(1, u64::from(rate.burst));
            invocation
                .key(format!(
                    "keel:rl:{{{}:{}}}:{suffix}",
                    self.config.limits.name,
                    tenant.as_str()
                ))
                .arg(interval)
                .arg(interval.saturating_mul(u64::from(rate.burst)))
                .arg(units);
        }
        let mut connection = self.connection.clone();
        let answer: (i64, i64) = tokio::time::timeout(
            self.config.operation_timeout,
            invocation.invoke_async(&mut connection),
        )
        .await
        .map_err(|_| {
            unavailable(
                format!("no answer within {:?}", self.config.operation_timeout),
                None,
            )
        })?
        .map_err(|err| unavailable("the rate limit script failed", Some(err.into())))?;
        Ok(Some(match answer {
            (1, _) => RateDecision::Allow,
            (_, wait_us) => RateDecision::Limited {
                retry_after: Duration::from_micros(wait_us.max(1) as u64),
            },
        }))
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().clamp(1, u128::from(u64::MAX)) as u64
}

fn unavailable(message: impl Into<String>, source: Option<BoxError>) -> Error {
    Error::RateLimiter {
        message: message.into(),
        source,
    }
}

#[async_trait]
impl RateLimit for RedisRateLimiter {
    async fn acquire(&self, tenant: &TenantId, cost: u64) -> Result<RateDecision> {
        match self.run(tenant, cost).await {
            Ok(None) => Ok(RateDecision::Allow),
            Ok(Some(decision)) => {
                if matches!(decision, RateDecision::Limited { .. }) {
                    self.metrics.limited.increment(1);
                }
                Ok(decision)
            }
            Err(err) => {
                self.metrics.errors.increment(1);
                if self.config.fail_open {
                    tracing::warn!(limiter = %self.config.limits.name, error = %err, "rate limiter unavailable; allowing (fail open)");
                    Ok(RateDecision::Allow)
                } else {
                    Err(err)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_fields_by_name() {
        let bad = RedisRateLimitConfig::new("http://x", RateLimitConfig::new("r"));
        assert!(bad.validate().unwrap_err().to_string().contains("`url`"));
        let bad = RedisRateLimitConfig::new("redis://x", RateLimitConfig::new("r"))
            .operation_timeout(Duration::ZERO);
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("operation_timeout")
        );
    }

    #[test]
    fn hides_passwords() {
        assert_eq!(redacted_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redacted_url("redis://h:1"), "redis://h:1");
    }
}
