//! The Redis-shared limiter (feature `redis`): one GCRA Lua script, so
//! every process sharing the Redis enforces one limit.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::redis::{RedisConfig, RedisError, RedisErrorKind, RedisPool};
use serde::{Deserialize, Serialize};

use super::config::{Rate, RateLimitConfig};
use super::{RateDecision, RateLimit};
use crate::error::{Result, SchedulerError};
use crate::metrics::LimiterMetrics;
use crate::ticket::TenantId;
use keel_core::validate;

/// Settings of [`RedisRateLimiter`]: the connection (a
/// [`keel_core::redis::RedisConfig`], validated and redacted in one place
/// for every Keel crate), the rates, and the limiter's own timeout.
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RedisRateLimitConfig {
    /// The server and its connection pool. Default:
    /// [`RedisConfig::default`].
    pub redis: RedisConfig,
    /// The rates. Its `name` is the key namespace: instances with the same
    /// name share their limits.
    pub limits: RateLimitConfig,
    /// Longest one check may take (waiting for a pooled connection
    /// included) before it counts as a failure; applied on top of the
    /// connection's own `operation_timeout`, since a rate check must be
    /// quicker than most commands. Default 250 ms.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// What a check answers when Redis cannot be reached: `true` (the
    /// default) allows the request (an outage of the limiter must not
    /// become an outage of the service; failures are counted in
    /// `keel_rate_limiter_errors_total`), `false` answers
    /// [`SchedulerError::RateLimiter`].
    pub fail_open: bool,
}

impl Default for RedisRateLimitConfig {
    fn default() -> Self {
        RedisRateLimitConfig {
            redis: RedisConfig::default(),
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
            redis: RedisConfig::new(url),
            limits,
            ..RedisRateLimitConfig::default()
        }
    }

    /// Defaults for this connection and these rates.
    pub fn with_redis(redis: RedisConfig, limits: RateLimitConfig) -> Self {
        RedisRateLimitConfig {
            redis,
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

    /// Checks every field, naming the first bad one (`redis.url`, … for
    /// the connection).
    ///
    /// # Errors
    ///
    /// [`SchedulerError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        self.redis.validate()?;
        self.validate_own()
    }

    fn validate_own(&self) -> Result<()> {
        self.limits.validate()?;
        validate::at_least_1ms("operation_timeout", self.operation_timeout)?;
        Ok(())
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
/// the answer follows [`fail_open`](RedisRateLimitConfig::fail_open); a
/// connection that failed or hung is taken out of the pool, and the next
/// check makes a new one. On a Redis Cluster (a pool from
/// [`RedisConfig::cluster`](keel_core::redis::RedisConfig::cluster),
/// feature `cluster`) each check goes to the master of the tenant's slot;
/// while a master fails over, that master's tenants get the `fail_open`
/// answer, and their state survives on the promoted replica as far as
/// replication had carried it. Failures are classified by
/// [`keel_core::redis::RedisError`] (the same rules as the queue and the
/// cache: `LOADING` or a dropped connection is retryable), kept as the
/// source of [`SchedulerError::RateLimiter`].
///
/// ```no_run
/// use keel_scheduler::{Rate, RateLimitConfig, RedisRateLimitConfig, RedisRateLimiter, TenantRates};
///
/// # async fn demo() -> Result<(), keel_scheduler::SchedulerError> {
/// let limiter = RedisRateLimiter::connect(RedisRateLimitConfig::new(
///     "redis://127.0.0.1:6379",
///     RateLimitConfig::new("gateway").default_rates(TenantRates::default().requests(Rate::per_second(100))),
/// ))
/// .await?;
/// # Ok(()) }
/// ```
pub struct RedisRateLimiter {
    config: RedisRateLimitConfig,
    pool: RedisPool,
    script: redis::Script,
    metrics: LimiterMetrics,
    settle_script: redis::Script,
}

impl fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RedisRateLimiter {
    /// Connects to Redis (a pool of its own, built from `config.redis`)
    /// and checks that it answers.
    ///
    /// # Errors
    ///
    /// [`SchedulerError::InvalidConfig`] naming a bad field;
    /// [`SchedulerError::RateLimiter`] when the server does not answer.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is charged.
    pub async fn connect(config: RedisRateLimitConfig) -> Result<Self> {
        config.validate()?;
        let pool = RedisPool::new(config.redis.clone())?;
        pool.ping()
            .await
            .map_err(|err| unavailable("redis does not answer", err))?;
        Ok(Self::build(pool, config))
    }

    /// A limiter over a shared [`RedisPool`] (one pool per server for the
    /// queue, the cache and the rate limiter of one process). The
    /// connection settings are the pool's: `config.redis` is replaced by
    /// [`RedisPool::config`]. Nothing touches the network until the first
    /// check.
    ///
    /// ```no_run
    /// use keel_core::redis::{RedisConfig, RedisPool};
    /// use keel_scheduler::{Rate, RateLimitConfig, RedisRateLimitConfig, RedisRateLimiter, TenantRates};
    ///
    /// # fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = RedisPool::new(RedisConfig::new("redis://127.0.0.1:6379"))?;
    /// let limits = RateLimitConfig::new("gateway")
    ///     .default_rates(TenantRates::default().requests(Rate::per_second(100)));
    /// let limiter = RedisRateLimiter::with_pool(
    ///     pool.clone(),
    ///     RedisRateLimitConfig::with_redis(pool.config().clone(), limits),
    /// )?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`SchedulerError::InvalidConfig`] naming a bad field.
    pub fn with_pool(pool: RedisPool, mut config: RedisRateLimitConfig) -> Result<Self> {
        config.redis = pool.config().clone();
        config.validate_own()?;
        Ok(Self::build(pool, config))
    }

    fn build(pool: RedisPool, config: RedisRateLimitConfig) -> Self {
        RedisRateLimiter {
            metrics: LimiterMetrics::new(&config.limits.name),
            script: redis::Script::new(include_str!("lua/gcra.lua")),
            settle_script: redis::Script::new(include_str!("lua/settle.lua")),
            pool,
            config,
        }
    }

    /// The configuration the limiter was built with.
    pub fn config(&self) -> &RedisRateLimitConfig {
        &self.config
    }

    /// The key of one of `tenant`'s limits (`r` requests, `c` cost); the
    /// hash tag keeps a tenant's limits in one cluster slot.
    fn key(&self, tenant: &TenantId, suffix: &str) -> String {
        format!(
            "keel:rl:{{{}:{}}}:{suffix}",
            self.config.limits.name,
            tenant.as_str()
        )
    }

    /// Runs `invocation` under the operation timeout on a pooled
    /// connection, dropping a connection that failed or hung.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let limit = self.config.operation_timeout;
        let mut taken = None;
        let attempt = async {
            let answer: T = match self.pool.deadpool() {
                Some(pool) => {
                    let connection = taken.insert(pool.get().await?);
                    invocation.invoke_async(&mut **connection).await?
                }
                // A cluster connection multiplexes and reconnects to each
                // node by itself: nothing to take out of a pool.
                None => {
                    let mut connection = self.pool.connection().await?;
                    invocation.invoke_async(&mut connection).await?
                }
            };
            Ok::<_, RedisError>(answer)
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(Ok(answer)) => Ok(answer),
            failed => {
                // A connection that failed or hung may still owe a reply:
                // take it out of the pool rather than hand it to the next
                // caller.
                if let Some(connection) = taken.take() {
                    drop(deadpool_redis::Connection::take(connection));
                }
                let err = match failed {
                    Ok(Err(err)) => err,
                    _ => RedisError::new(
                        RedisErrorKind::Unavailable,
                        format!("no answer within {limit:?}"),
                    ),
                };
                Err(unavailable("the rate limit call failed", err))
            }
        }
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
                .key(self.key(tenant, suffix))
                .arg(interval)
                .arg(interval.saturating_mul(u64::from(rate.burst)))
                .arg(units);
        }
        let answer: (i64, i64) = self.invoke(&invocation).await?;
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

/// The limiter's error, with the shared classification as its source.
fn unavailable(message: &str, err: RedisError) -> SchedulerError {
    SchedulerError::RateLimiter {
        message: format!("{message} ({err})"),
        source: Some(err.into()),
    }
}

impl From<RedisError> for SchedulerError {
    /// [`SchedulerError::RateLimiter`] with the core error as its source:
    /// retryable when the core classification says waiting helps (`LOADING`,
    /// a dropped connection), not for a script error.
    fn from(err: RedisError) -> Self {
        unavailable("redis failed", err)
    }
}

impl RedisRateLimiter {
    async fn apply_settlement(&self, tenant: &TenantId, reserved: u64, actual: u64) -> Result<()> {
        let Some(rate) = self.config.limits.rates_of(tenant.as_str()).cost else {
            return Ok(());
        };
        let delta = super::settlement(reserved, actual, rate.burst);
        if delta == 0 {
            return Ok(());
        }
        let mut invocation = self.settle_script.prepare_invoke();
        invocation
            .key(self.key(tenant, "c"))
            .arg(micros(rate.emission_interval()))
            .arg(delta);
        let _: i64 = self.invoke(&invocation).await?;
        Ok(())
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

    /// One script call, on the server's clock: exact however many
    /// processes share the limit. A failed settlement is counted and
    /// returned (with `fail_open`, logged and dropped).
    async fn settle(&self, tenant: &TenantId, reserved: u64, actual: u64) -> Result<()> {
        match self.apply_settlement(tenant, reserved, actual).await {
            Ok(()) => Ok(()),
            Err(err) => {
                self.metrics.errors.increment(1);
                if self.config.fail_open {
                    tracing::warn!(limiter = %self.config.limits.name, error = %err, "rate limit settlement dropped (fail open)");
                    Ok(())
                } else {
                    Err(err)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use keel_core::{ErrorKind, KeelError};

    use super::*;

    #[test]
    fn refuses_bad_fields_by_name() {
        let bad = RedisRateLimitConfig::new("http://x", RateLimitConfig::new("r"));
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("`redis.url`")
        );
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
        let config = RedisRateLimitConfig::new("redis://:pw@h:1/0", RateLimitConfig::new("r"));
        let shown = format!("{config:?}");
        assert!(!shown.contains("pw") && shown.contains("***"), "{shown}");
    }

    #[test]
    fn loading_is_retryable_and_a_script_error_is_not() {
        let loading = SchedulerError::from(RedisError::new(
            RedisErrorKind::Unavailable,
            "LOADING Redis is loading the dataset in memory",
        ));
        assert!(loading.is_retryable(), "{loading:?}");
        assert_eq!(loading.kind(), ErrorKind::Unavailable { retry_after: None });
        let script = SchedulerError::from(RedisError::new(RedisErrorKind::Server, "ERR script"));
        assert!(!script.is_retryable(), "{script:?}");
        assert_eq!(script.kind(), ErrorKind::Internal);
    }
}
