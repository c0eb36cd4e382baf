#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cache;
mod codec;
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

#[cfg(feature = "chaos")]
#[cfg_attr(docsrs, doc(cfg(feature = "chaos")))]
pub mod chaos;
#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;

pub use cache::{Cache, CacheCapabilities, MAX_TTL, normalize_ttl};
pub use codec::{BytesCodec, Codec, HttpCodec, JsonCodec};
pub use error::{BoxError, CacheError, CachedFailure, LoadFailed};
pub use ext::CacheExt;
pub use invalidation::{BusEvent, InvalidationBus, LocalBus};
pub use keys::InferenceKey;
#[cfg(feature = "moka")]
pub use layer::{CacheFuture, CacheLayer, CacheService, ServiceError};
#[cfg(feature = "moka")]
pub use moka::{MokaCache, MokaCacheConfig};
pub use prefix::PrefixCache;
#[cfg(feature = "redis")]
pub use redis::{RedisCache, RedisCacheConfig, RedisInvalidationBus, RedisInvalidationConfig};
#[cfg(feature = "moka")]
pub use tiered::{Tiered, TieredBuilder, TieredConfig};
