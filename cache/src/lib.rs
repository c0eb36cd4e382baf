#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cache;
mod error;
mod ext;
mod invalidation;
mod keys;
pub mod metrics;
mod prefix;

#[cfg(feature = "moka")]
mod layer;
#[cfg(feature = "moka")]
mod moka;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "moka")]
mod tiered;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use cache::{Cache, Capabilities, MAX_TTL, normalize_ttl};
pub use error::{BoxError, Error, LoadError, Result};
pub use ext::CacheExt;
pub use invalidation::{BusEvent, InvalidationBus, LocalBus};
pub use keys::InferenceKey;
#[cfg(feature = "moka")]
pub use layer::{CacheLayer, CacheService, ResponseFuture};
#[cfg(feature = "moka")]
pub use moka::{MokaCache, MokaCacheConfig};
pub use prefix::PrefixCache;
#[cfg(feature = "redis")]
pub use redis::{RedisCache, RedisCacheConfig, RedisInvalidationBus, RedisInvalidationConfig};
#[cfg(feature = "moka")]
pub use tiered::{Tiered, TieredBuilder, TieredConfig};
