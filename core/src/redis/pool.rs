//! The pooled connection handle every Keel crate accepts.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncConnectionConfig;

use super::config::RedisConfig;
use super::error::{RedisError, RedisErrorKind};
use crate::error::ConfigError;
use crate::validate;

/// A pool of multiplexed connections to one Redis server, or (feature
/// `cluster`, from a [`RedisConfig::cluster`] config) a cluster client's
/// connections to every node of a Redis Cluster. Cheap to clone; clones
/// share the connections.
///
/// Build one per server and hand it to every component that talks to that
/// server (`RedisQueue::with_pool`, `RedisCache::with_pool`,
/// `RedisRateLimiter::with_pool`), so a gateway using all three opens one
/// pool, not three.
///
/// On a cluster, each command goes to the master of its key's slot; the
/// client follows `MOVED` and `ASK` redirections and, after a failover,
/// finds the promoted replica by itself (a command that still fails is
/// [`Unavailable`](RedisErrorKind::Unavailable), retryable). Components
/// that do not run on a cluster yet refuse such a pool when built, naming
/// `redis.cluster_urls`.
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
    backend: Backend,
    config: Arc<RedisConfig>,
}

/// What the pool's connections go to.
#[derive(Clone, Debug)]
enum Backend {
    Single(deadpool_redis::Pool),
    #[cfg(feature = "cluster")]
    Cluster(Arc<super::cluster::Cluster>),
}

/// A connection handed out by [`RedisPool::connection`]: a clone of a
/// multiplexed connection that stays shared with the pool, to one server or
/// (feature `cluster`) to a whole cluster. Not part of the stable API: it
/// exposes the `redis` release Keel builds with.
#[doc(hidden)]
#[derive(Clone)]
#[non_exhaustive]
pub enum RedisConnection {
    /// One server.
    Single(::redis::aio::MultiplexedConnection),
    /// A Redis Cluster.
    #[cfg(feature = "cluster")]
    Cluster(::redis::cluster_async::ClusterConnection),
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisConnection::Single(_) => f.write_str("RedisConnection::Single"),
            #[cfg(feature = "cluster")]
            RedisConnection::Cluster(_) => f.write_str("RedisConnection::Cluster"),
        }
    }
}

impl ::redis::aio::ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a ::redis::Cmd,
    ) -> ::redis::RedisFuture<'a, ::redis::Value> {
        match self {
            RedisConnection::Single(connection) => connection.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            RedisConnection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a ::redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> ::redis::RedisFuture<'a, Vec<::redis::Value>> {
        match self {
            RedisConnection::Single(connection) => {
                connection.req_packed_commands(cmd, offset, count)
            }
            #[cfg(feature = "cluster")]
            RedisConnection::Cluster(connection) => {
                connection.req_packed_commands(cmd, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(connection) => connection.get_db(),
            #[cfg(feature = "cluster")]
            RedisConnection::Cluster(connection) => connection.get_db(),
        }
    }
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
        let backend = if config.is_cluster() {
            cluster_backend(&config)?
        } else {
            Backend::Single(build(
                &config,
                config.pool_size,
                Some(config.operation_timeout),
            )?)
        };
        Ok(RedisPool {
            backend,
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

    /// Sends `PING` (on a cluster, to every master) and waits at most
    /// `connect_timeout` for `PONG`.
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
            let mut connection = self.connection().await?;
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
            if self.is_cluster() {
                err.context(format!(
                    "the redis {} does not answer; are its masters running and is \
                     `CLUSTER INFO` on them `cluster_state:ok`?",
                    self.config.redacted_url()
                ))
            } else {
                err.context(format!(
                    "redis at {} does not answer; is it running? (start it with: redis-server --daemonize yes)",
                    self.config.redacted_url()
                ))
            }
        })
    }

    /// The configuration the pool was built with.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// Whether the pool talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        match self.backend {
            Backend::Single(_) => false,
            #[cfg(feature = "cluster")]
            Backend::Cluster(_) => true,
        }
    }

    /// A connection shared with the pool: a clone of a pooled multiplexed
    /// connection (taken and given back at once, so the caller does not
    /// hold a pool slot), or of the cluster connection. For Keel's own
    /// backends; not part of the stable API.
    ///
    /// # Errors
    ///
    /// [`RedisError`] (retryable) when no connection could be had within
    /// `connect_timeout`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    #[doc(hidden)]
    pub async fn connection(&self) -> Result<RedisConnection, RedisError> {
        match &self.backend {
            Backend::Single(pool) => {
                let pooled = pool.get().await?;
                Ok(RedisConnection::Single(
                    ::redis::aio::MultiplexedConnection::clone(&pooled),
                ))
            }
            #[cfg(feature = "cluster")]
            Backend::Cluster(cluster) => cluster.connection().await.map(RedisConnection::Cluster),
        }
    }

    /// A separate pool of `size` connections to the same server whose
    /// commands may block for longer than the operation timeout (blocking
    /// stream reads): a waiting consumer never holds a connection that
    /// ordinary commands need.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when `size` is 0, or naming `redis.cluster_urls`
    /// when the pool is a cluster's.
    #[doc(hidden)]
    pub fn blocking_pool(&self, size: usize) -> Result<deadpool_redis::Pool, ConfigError> {
        self.single_server("a blocking reader")?;
        validate::at_least("blocking_connections", size, 1)?;
        build(&self.config, size, None)
    }

    /// A separate pool of `size` connections for commands that block (as
    /// [`blocking_pool`](Self::blocking_pool)) on `key`: to the server, or,
    /// on a cluster, to the master that serves `key`'s slot as the cluster
    /// sees it now (`CLUSTER SLOTS`), with the first seed's credentials and
    /// TLS settings. A blocking command must not share the cluster
    /// connection: it would hold up every command to that node behind it.
    /// After a failover or a resharding (a `MOVED` answer, a refused or
    /// dropped connection) the pool points at the wrong node: ask again.
    ///
    /// # Errors
    ///
    /// [`RedisError`] of kind [`Protocol`](RedisErrorKind::Protocol)
    /// wrapping the [`ConfigError`] of a bad `size`;
    /// [`Unavailable`](RedisErrorKind::Unavailable) (retryable) when no
    /// node answers or no master serves the slot (a failover under way).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is kept from a cancelled call.
    #[doc(hidden)]
    pub async fn blocking_pool_for_key(
        &self,
        #[cfg_attr(not(feature = "cluster"), allow(unused_variables))] key: &[u8],
        size: usize,
    ) -> Result<deadpool_redis::Pool, RedisError> {
        let invalid = |err: ConfigError| {
            RedisError::new(RedisErrorKind::Protocol, "invalid redis config").with_source(err)
        };
        match &self.backend {
            Backend::Single(_) => self.blocking_pool(size).map_err(invalid),
            #[cfg(feature = "cluster")]
            Backend::Cluster(cluster) => {
                validate::at_least("blocking_connections", size, 1).map_err(invalid)?;
                let info = cluster.master_info(super::key_slot(key)).await?;
                build_to(&self.config, info, "redis.cluster_urls", size, None).map_err(invalid)
            }
        }
    }

    /// The underlying pool of a single server, for Keel's own backends that
    /// do not run on a cluster: `None` for a cluster's pool. Not part of the
    /// stable API: its type follows the `deadpool-redis` release Keel builds
    /// with.
    #[doc(hidden)]
    pub fn deadpool(&self) -> Option<&deadpool_redis::Pool> {
        match &self.backend {
            Backend::Single(pool) => Some(pool),
            #[cfg(feature = "cluster")]
            Backend::Cluster(_) => None,
        }
    }

    /// The single server's pool, or, on a cluster, the refusal of
    /// `component`, which does not run on one, naming `redis.cluster_urls`.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for `redis.cluster_urls` when the pool is a
    /// cluster's.
    #[doc(hidden)]
    pub fn single_server(&self, component: &str) -> Result<&deadpool_redis::Pool, ConfigError> {
        self.deadpool().ok_or_else(|| {
            ConfigError::new(
                "redis.cluster_urls",
                format!(
                    "{component} does not run on a Redis Cluster yet; give it a pool for a \
                     single server (a `url` and no `cluster_urls`)"
                ),
            )
        })
    }
}

#[cfg(feature = "cluster")]
fn cluster_backend(config: &RedisConfig) -> Result<Backend, ConfigError> {
    super::cluster::Cluster::new(config).map(|cluster| Backend::Cluster(Arc::new(cluster)))
}

#[cfg(not(feature = "cluster"))]
fn cluster_backend(_config: &RedisConfig) -> Result<Backend, ConfigError> {
    // `validate` refuses cluster configs without the feature.
    Err(ConfigError::new(
        "redis.cluster_urls",
        "Redis Cluster support is not compiled in; enable keel-core's `cluster` feature",
    ))
}

fn build(
    config: &RedisConfig,
    size: usize,
    response_timeout: Option<Duration>,
) -> Result<deadpool_redis::Pool, ConfigError> {
    build_to(
        config,
        config.url.as_str(),
        "redis.url",
        size,
        response_timeout,
    )
}

/// A pool of `size` connections to `server` with `config`'s timeouts; a
/// server the client cannot use is blamed on `field`.
fn build_to(
    config: &RedisConfig,
    server: impl ::redis::IntoConnectionInfo,
    field: &'static str,
    size: usize,
    response_timeout: Option<Duration>,
) -> Result<deadpool_redis::Pool, ConfigError> {
    let connection = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(response_timeout);
    let manager = deadpool_redis::Manager::new_with_config(server, connection).map_err(|err| {
        ConfigError::new(
            field,
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

    #[cfg(feature = "cluster")]
    #[tokio::test]
    async fn an_unreachable_cluster_names_its_seeds_and_is_retryable() {
        let config =
            RedisConfig::cluster(["redis://:secret@127.0.0.1:1", "redis://:secret@127.0.0.1:2"])
                .connect_timeout(Duration::from_millis(300));
        let err = RedisPool::connect(config).await.unwrap_err();
        let text = err.to_string();
        assert_eq!(
            text.matches("127.0.0.1:2").count(),
            1,
            "the seeds once: {text}"
        );
        assert!(
            text.contains("127.0.0.1:1")
                && text.contains("127.0.0.1:2")
                && !text.contains("secret"),
            "{text}"
        );
        assert!(err.is_retryable(), "{err:?}");
    }
}
