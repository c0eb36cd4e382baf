//! Test support for Keel: a fault-injecting TCP proxy, a disposable
//! `redis-server`, per-test namespaces and checks for the shared servers.
//!
//! Keel's tests run against real Redis and RabbitMQ and break the network on
//! purpose. This crate holds the pieces every crate's tests share:
//!
//! - [`require_redis`] / [`require_amqp`]: call first in a test that needs a
//!   server. They return its URL (from `REDIS_URL` / `AMQP_URL`, or the local
//!   defaults) and panic with the command that starts it when it is missing,
//!   so a test never passes because its server was not there.
//! - [`Namespace`]: a unique prefix per test for keys, streams and queues,
//!   with clean-up on drop ([`Namespace::with_redis_cleanup`] deletes every
//!   key containing the prefix).
//! - [`FaultProxy`]: a TCP proxy in front of a server whose behaviour the test
//!   switches while traffic flows: [latency](FaultProxy::set_latency) per
//!   chunk, [`cut`](FaultProxy::cut) open connections,
//!   [`refuse`](FaultProxy::refuse) or [`blackhole`](FaultProxy::blackhole)
//!   new ones, then [`restore`](FaultProxy::restore).
//! - [`RedisServer`]: a `redis-server` of the test's own, on a free port, that
//!   it can [`kill`](RedisServer::kill) and
//!   [`restart`](RedisServer::restart): empty, or, started
//!   [with persistence on](RedisServer::start_with_args), with every write it
//!   acknowledged.
//! - [`RedisCluster`]: a Redis Cluster of the test's own (3 masters, 3
//!   replicas, on free ports) whose nodes it can
//!   [`kill`](RedisCluster::kill) to see a replica promoted, and
//!   [`restart`](RedisCluster::restart).
//! - [`RabbitCluster`]: a three-node RabbitMQ cluster of the test's own (on
//!   free ports, beside the system's RabbitMQ) whose nodes it can
//!   [`kill`](RabbitCluster::kill), for instance the
//!   [leader of a quorum queue](RabbitCluster::leader_of), and
//!   [`restart`](RabbitCluster::restart).
//! - [`assert_refused`]: the check of a config test that each bad field is
//!   refused by name.
//! - [`redis_error_reply`]: the client error a Redis error reply becomes,
//!   for tests of error classification.
//! - [`paused_runtime`]: a current-thread runtime with paused time, for
//!   property tests and other synchronous tests of time-driven code.
//!
//! Faults are deterministic: they happen exactly when the test calls for
//! them, never at random.
//!
//! # Example
//!
//! A Redis client that sees its connection cut, then reconnects:
//!
//! ```no_run
//! use std::time::Duration;
//! use keel_testkit::{require_redis, Direction, FaultProxy, Latency, Namespace};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let url = require_redis().await;
//! let ns = Namespace::new("reconnects_after_cut").with_redis_cleanup(url.clone());
//! let proxy = FaultProxy::start_for_url(&url).await?;
//! let client = redis::Client::open(proxy.url_for(&url))?;
//!
//! let mut con = client.get_multiplexed_async_connection().await?;
//! redis::cmd("SET").arg(ns.name("k")).arg("v").query_async::<()>(&mut con).await?;
//!
//! proxy.set_latency(Direction::Both, Latency::fixed(Duration::from_millis(20)));
//! proxy.cut();
//! assert!(redis::cmd("PING").query_async::<String>(&mut con).await.is_err());
//!
//! proxy.restore();
//! let mut con = client.get_multiplexed_async_connection().await?;
//! let value: String = redis::cmd("GET").arg(ns.name("k")).query_async(&mut con).await?;
//! assert_eq!(value, "v");
//! # Ok(()) }
//! ```
//!
//! The shared servers can be started with [`START_REDIS`] and
//! [`START_RABBITMQ`]; the repository's `.ci/run` starts both.

#[cfg(any(feature = "redis", feature = "amqp"))]
mod command;
mod config;
mod namespace;
mod proxy;
#[cfg(feature = "amqp")]
mod rabbit_cluster;
#[cfg(feature = "redis")]
mod redis_cluster;
#[cfg(feature = "redis")]
mod redis_reply;
#[cfg(feature = "redis")]
mod redis_server;
mod runtime;
mod servers;

pub use config::assert_refused;
#[cfg(feature = "redis")]
pub use keel_core::redis::{SLOTS, key_slot};
pub use namespace::Namespace;
#[cfg(feature = "redis")]
pub use namespace::redis_cleanup;
pub use proxy::{Direction, FaultProxy, Latency};
#[cfg(feature = "amqp")]
pub use rabbit_cluster::RabbitCluster;
#[cfg(feature = "redis")]
pub use redis_cluster::{Failover, RedisCluster, assert_replicated, set_marked};
#[cfg(feature = "redis")]
pub use redis_reply::redis_error_reply;
#[cfg(feature = "redis")]
pub use redis_server::RedisServer;
pub use runtime::{bench_runtime, paused_runtime, thread_list};
#[cfg(feature = "amqp")]
pub use servers::require_amqp;
#[cfg(feature = "redis")]
pub use servers::require_redis;
pub use servers::{
    DEFAULT_AMQP_URL, DEFAULT_REDIS_URL, START_RABBITMQ, START_REDIS, amqp_url, redis_url,
};
