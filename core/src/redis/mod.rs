//! One Redis connection for every Keel crate (feature `redis`): one
//! validated [`RedisConfig`] (password redacted in `Debug`), one pooled
//! [`RedisPool`] handle that the queue, the cache and the rate limiter all
//! accept, and one classification of Redis failures ([`RedisError`]):
//! loading, failover and connection errors are retryable the same way
//! everywhere.
//!
//! With the `cluster` feature, a config made with
//! [`RedisConfig::cluster`] describes a Redis Cluster by its seed nodes, and
//! the pool built from it hands out cluster connections that follow
//! redirections and failovers; [`key_slot`] is the slot of a key.

#[cfg(feature = "cluster")]
mod cluster;
mod config;
mod error;
mod pool;
mod slot;

pub use crate::redacted_url;
pub use config::RedisConfig;
pub use error::{RedisError, RedisErrorKind};
#[doc(hidden)]
pub use pool::RedisConnection;
pub use pool::RedisPool;
pub use slot::{SLOTS, key_slot};
