//! The pooled connection handle every Keel crate accepts.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncConnectionConfig;

use super::config::RedisConfig;
use super::error::{RedisError, RedisErrorKind};
use crate::error::ConfigError;
use crate::validate;

/// A pool of multiplexed connections to one Redis server. Cheap to clone;
/// clones share the connections.
///
/// Build one per server and hand it to every component that talks to that
/// server (`RedisQueue::with_pool`, `RedisCache::with_pool`,
/// `RedisRateLimiter::with_pool`), so a gateway using all three opens one
/// pool, not three.
///
/// ```no_run
/// use keel_core::redis::{RedisConfig, RedisPool};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = RedisPool::connect(RedisConfig::new("redis://127.0.0.1:6379")).await?;
/// pool.ping().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RedisPool {
    pool: deadpool_redis::Pool,
    config: Arc<RedisConfig>,
}

impl RedisPool {
    /// Builds the pool without touching the network: connections are made
    /// on first use, so an application can start while Redis is down.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming a bad field (including a URL the client
    /// cannot parse).
    pub fn new(config: RedisConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let pool = build(&config, config.pool_size, Some(config.operation_timeout))?;
        Ok(RedisPool {
            pool,
            config: Arc::new(config),
        })
    }

    /// Builds the pool and checks that Redis answers `PING` within
    /// `connect_timeout`.
    ///
    /// # Errors
    ///
    /// [`RedisError`] of kind [`Unavailable`](RedisErrorKind::Unavailable)
    /// naming the server (password redacted) when it does not answer, or
    /// wrapping the [`ConfigError`] of a bad field.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is kept from a cancelled attempt.
    pub async fn connect(config: RedisConfig) -> Result<Self, RedisError> {
        let pool = RedisPool::new(config).map_err(|err| {
            RedisError::new(RedisErrorKind::Protocol, "invalid redis config").with_source(err)
        })?;
        pool.ping().await?;
        Ok(pool)
    }

    /// Sends `PING` and waits at most `connect_timeout` for `PONG`.
    ///
    /// # Errors
    ///
    /// [`RedisError`] saying which server did not answer and how to check.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn ping(&self) -> Result<(), RedisError> {
        let attempt = async {
            let mut connection = self.pool.get().await?;
            ::redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await?;
            Ok::<_, RedisError>(())
        };
        let answer = match tokio::time::timeout(self.config.connect_timeout, attempt).await {
            Ok(answer) => answer,
            Err(elapsed) => Err(RedisError::new(
                RedisErrorKind::Unavailable,
                format!("no answer within {:?}", self.config.connect_timeout),
            )
            .with_source(elapsed)),
        };
        answer.map_err(|err| {
            err.context(format!(
                "redis at {} does not answer; is it running? (start it with: redis-server --daemonize yes)",
                self.config.redacted_url()
            ))
        })
    }

    /// The configuration the pool was built with.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// A separate pool of `size` connections to the same server whose
    /// commands may block for longer than the operation timeout (blocking
    /// stream reads): a waiting consumer never holds a connection that
    /// ordinary commands need.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when `size` is 0.
    #[doc(hidden)]
    pub fn blocking_pool(&self, size: usize) -> Result<deadpool_redis::Pool, ConfigError> {
        validate::at_least("blocking_connections", size, 1)?;
        build(&self.config, size, None)
    }

    /// The underlying pool, for Keel's own backends. Not part of the stable
    /// API: its type follows the `deadpool-redis` release Keel builds with.
    #[doc(hidden)]
    pub fn deadpool(&self) -> &deadpool_redis::Pool {
        &self.pool
    }
}

fn build(
    config: &RedisConfig,
    size: usize,
    response_timeout: Option<Duration>,
) -> Result<deadpool_redis::Pool, ConfigError> {
    let connection = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(response_timeout);
    let manager = deadpool_redis::Manager::new_with_config(config.url.as_str(), connection)
        .map_err(|err| {
            ConfigError::new(
                "redis.url",
                format!("not a usable redis URL ({}): {err}", config.redacted_url()),
            )
        })?;
    deadpool_redis::Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_redis::Runtime::Tokio1)
        .wait_timeout(Some(config.connect_timeout))
        .create_timeout(Some(config.connect_timeout))
        // A health check that hangs means a dead connection: give up on it
        // quickly and make a new one.
        .recycle_timeout(Some(
            (config.operation_timeout / 4).max(Duration::from_millis(10)),
        ))
        .build()
        .map_err(|err| {
            ConfigError::new(
                "redis.pool_size",
                format!("could not build the pool: {err}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_server_names_itself_and_is_retryable() {
        let pool = RedisPool::new(
            RedisConfig::new("redis://:secret@127.0.0.1:1")
                .connect_timeout(Duration::from_millis(300)),
        )
        .unwrap();
        let err = pool.ping().await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("127.0.0.1:1") && !text.contains("secret"),
            "{text}"
        );
        assert!(err.is_retryable(), "{err:?}");
    }
}
