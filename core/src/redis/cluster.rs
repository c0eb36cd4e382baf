//! The Redis Cluster side of the pool (feature `cluster`).

use std::fmt;
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Value};
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
    /// The first seed's connection settings (credentials, TLS), used for
    /// connections to one node of the cluster.
    first_seed: ConnectionInfo,
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
        let first_seed = config
            .cluster_urls
            .first()
            .map(String::as_str)
            .unwrap_or_default()
            .into_connection_info()
            .map_err(|err| {
                ConfigError::new(
                    "redis.cluster_urls",
                    format!(
                        "the first seed is not a usable URL ({}): {err}",
                        config.redacted_url()
                    ),
                )
            })?;
        Ok(Cluster {
            client,
            first_seed,
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

impl Cluster {
    /// How to connect to the master that serves `slot` as a node of the
    /// cluster sees it now (`CLUSTER SLOTS`), with the first seed's
    /// credentials and TLS settings.
    pub(super) async fn master_info(&self, slot: u16) -> Result<ConnectionInfo, RedisError> {
        let mut connection = self.connection().await?;
        let ranges: Vec<Vec<Value>> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut connection)
            .await?;
        for range in ranges {
            let mut items = range.into_iter();
            let (Some(start), Some(end), Some(master)) = (items.next(), items.next(), items.next())
            else {
                continue;
            };
            let (start, end): (u16, u16) = (
                redis::from_redis_value(start)?,
                redis::from_redis_value(end)?,
            );
            if !(start..=end).contains(&slot) {
                continue;
            }
            let mut master = redis::from_redis_value::<Vec<Value>>(master)?.into_iter();
            let (Some(host), Some(port)) = (master.next(), master.next()) else {
                break;
            };
            let (host, port): (String, u16) = (
                redis::from_redis_value(host)?,
                redis::from_redis_value(port)?,
            );
            let addr = match self.first_seed.addr().clone() {
                // A node that does not know its own address answers `?` or
                // nothing: it is then the seed's host.
                ConnectionAddr::Tcp(seed_host, _) => {
                    ConnectionAddr::Tcp(usable_host(host, seed_host), port)
                }
                ConnectionAddr::TcpTls {
                    host: seed_host,
                    insecure,
                    tls_params,
                    ..
                } => ConnectionAddr::TcpTls {
                    host: usable_host(host, seed_host),
                    port,
                    insecure,
                    tls_params,
                },
                other => other,
            };
            return Ok(self.first_seed.clone().set_addr(addr));
        }
        Err(RedisError::new(
            RedisErrorKind::Unavailable,
            format!(
                "no master of the redis {} serves slot {slot} now (a failover may be under way)",
                self.seeds
            ),
        ))
    }
}

fn usable_host(host: String, seed_host: String) -> String {
    if host.is_empty() || host == "?" {
        seed_host
    } else {
        host
    }
}
