//! One Redis connection for every Keel crate (feature `redis`): one
//! validated [`RedisConfig`] (password redacted in `Debug`), one pooled
//! [`RedisPool`] handle that the queue, the cache and the rate limiter all
//! accept, and one classification of Redis failures ([`RedisError`]):
//! loading, failover and connection errors are retryable the same way
//! everywhere.

mod config;
mod error;
mod pool;

pub use crate::redacted_url;
pub use config::RedisConfig;
pub use error::{RedisError, RedisErrorKind};
pub use pool::RedisPool;
