//! The Redis Cluster side of the pool (feature `cluster`).

use std::fmt;
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use tokio::sync::OnceCell;

use super::config::RedisConfig;
use super::error::{RedisError, RedisErrorKind};
use crate::error::ConfigError;

/// Retries of one command inside the client (redirections, reconnections
/// after a failover), all within the operation timeout.
const RETRIES: u32 = 6;
/// Shortest and longest wait between those retries, in milliseconds.
const MIN_RETRY_WAIT_MS: u64 = 10;
const MAX_RETRY_WAIT_MS: u64 = 500;

/// One cluster client and its connection, made on first use and shared:
/// the connection multiplexes every command over one connection per node
/// and reconnects to nodes by itself.
pub(super) struct Cluster {
    client: ClusterClient,
    connection: OnceCell<ClusterConnection>,
    connect_timeout: Duration,
    seeds: String,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("seeds", &self.seeds)
            .field("connected", &self.connection.initialized())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The client for `config`'s seeds, without touching the network.
    pub(super) fn new(config: &RedisConfig) -> Result<Self, ConfigError> {
        let client = ClusterClientBuilder::new(config.cluster_urls.iter().map(String::as_str))
            .connection_timeout(config.connect_timeout)
            .response_timeout(config.operation_timeout)
            .retries(RETRIES)
            .min_retry_wait(MIN_RETRY_WAIT_MS)
            .max_retry_wait(MAX_RETRY_WAIT_MS)
            .build()
            .map_err(|err| {
                ConfigError::new(
                    "redis.cluster_urls",
                    format!(
                        "not a usable set of cluster seeds ({}): {err}",
                        config.redacted_url()
                    ),
                )
            })?;
        Ok(Cluster {
            client,
            connection: OnceCell::new(),
            connect_timeout: config.connect_timeout,
            seeds: config.redacted_url(),
        })
    }

    /// The shared connection, made now if this is the first use (or every
    /// earlier attempt failed), within `connect_timeout`.
    pub(super) async fn connection(&self) -> Result<ClusterConnection, RedisError> {
        let made = self
            .connection
            .get_or_try_init(|| async {
                match tokio::time::timeout(self.connect_timeout, self.client.get_async_connection())
                    .await
                {
                    Ok(Ok(connection)) => Ok(connection),
                    Ok(Err(err)) => Err(RedisError::from(err)),
                    Err(elapsed) => Err(RedisError::new(
                        RedisErrorKind::Unavailable,
                        format!(
                            "no redis cluster node answered within {:?}",
                            self.connect_timeout
                        ),
                    )
                    .with_source(elapsed)),
                }
            })
            .await?;
        Ok(made.clone())
    }
}
