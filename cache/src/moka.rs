//! The in-process backend on moka (feature `moka`, on by default).

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::cache::{Cache, CacheCapabilities, normalize_ttl};
use crate::error::Result;
use keel_core::validate;

/// Bytes charged per entry on top of its key and value, for the
/// bookkeeping moka and we keep per entry.
pub(crate) const ENTRY_OVERHEAD: u64 = 64;

/// The weight of one entry: key + value + [`ENTRY_OVERHEAD`], saturating.
pub(crate) fn weight(key: &str, value_len: usize) -> u32 {
    let total = (key.len() as u64)
        .saturating_add(value_len as u64)
        .saturating_add(ENTRY_OVERHEAD);
    u32::try_from(total).unwrap_or(u32::MAX)
}

/// Settings of [`MokaCache`].
///
/// ```
/// use keel_cache::MokaCacheConfig;
///
/// let config = MokaCacheConfig::default().max_capacity_bytes(16 << 20);
/// assert!(config.validate().is_ok());
/// assert!(MokaCacheConfig::default().max_capacity_bytes(0).validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct MokaCacheConfig {
    /// Total size the cache may hold, in bytes of keys and values plus 64
    /// bytes per entry. Beyond it moka evicts by its TinyLFU policy. Default
    /// 64 MiB.
    pub max_capacity_bytes: u64,
}

impl Default for MokaCacheConfig {
    fn default() -> Self {
        MokaCacheConfig {
            max_capacity_bytes: 64 << 20,
        }
    }
}

impl MokaCacheConfig {
    /// Sets [`max_capacity_bytes`](Self::max_capacity_bytes).
    #[must_use]
    pub fn max_capacity_bytes(mut self, bytes: u64) -> Self {
        self.max_capacity_bytes = bytes;
        self
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidConfig`](crate::CacheError::InvalidConfig) naming
    /// the field.
    pub fn validate(&self) -> Result<()> {
        validate::at_least("max_capacity_bytes", self.max_capacity_bytes, 1)?;
        Ok(())
    }
}

/// One stored value and the TTL it was stored with.
#[derive(Clone)]
struct Stored {
    value: Bytes,
    ttl: Duration,
}

/// Expires each entry after the TTL it was stored with.
struct PerEntryTtl;

// moka's `Expiry` names `std::time::Instant` in its signatures; we never read
// it, the TTL is relative.
#[allow(clippy::disallowed_types)]
impl moka::Expiry<String, Stored> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Stored,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Stored,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// An in-process cache on [moka](https://docs.rs/moka)'s synchronous cache
/// (a `get` is a plain call, no future to build and poll; keys hash with
/// seeded foldhash), with capacity bounded by size (bytes of keys and
/// values) and a TTL per entry. moka runs its housekeeping on the calling
/// thread; a write that finds moka's write log full waits on the thread
/// (moka retries every few microseconds).
///
/// Cloning is cheap and clones share the entries; separate `MokaCache`s never
/// share anything ([`CacheCapabilities::shared`] is `false`). moka keeps its
/// own clock, so its expiry follows real time even in tests that pause
/// Tokio's clock.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), keel_cache::CacheError> {
/// use std::time::Duration;
/// use keel_cache::{Cache, MokaCache, MokaCacheConfig};
///
/// let cache = MokaCache::new(MokaCacheConfig::default().max_capacity_bytes(1 << 20))?;
/// cache.set("k", "v".into(), Duration::from_secs(30)).await?;
/// assert_eq!(cache.get("k").await?.as_deref(), Some(&b"v"[..]));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MokaCache {
    inner: moka::sync::Cache<String, Stored, foldhash::quality::RandomState>,
    config: MokaCacheConfig,
}

impl fmt::Debug for MokaCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MokaCache")
            .field("config", &self.config)
            .field("entries", &self.inner.entry_count())
            .field("weighted_size", &self.inner.weighted_size())
            .finish()
    }
}

impl MokaCache {
    /// Builds the cache.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidConfig`](crate::CacheError::InvalidConfig) naming
    /// a bad field.
    pub fn new(config: MokaCacheConfig) -> Result<Self> {
        config.validate()?;
        let inner = moka::sync::Cache::builder()
            .max_capacity(config.max_capacity_bytes)
            .weigher(|key: &String, stored: &Stored| weight(key, stored.value.len()))
            .expire_after(PerEntryTtl)
            .build_with_hasher(foldhash::quality::RandomState::default());
        Ok(MokaCache { inner, config })
    }

    /// Entries held now (approximate: moka applies some writes lazily).
    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }

    /// Bytes held now, as weighed for the capacity (approximate).
    pub fn weighted_size(&self) -> u64 {
        self.inner.weighted_size()
    }
}

#[async_trait]
impl Cache for MokaCache {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(self.inner.get(key).map(|stored| stored.value))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        let ttl = normalize_ttl(ttl)?;
        self.inner.insert(key.to_owned(), Stored { value, ttl });
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.invalidate(key);
        Ok(())
    }

    fn capabilities(&self) -> CacheCapabilities {
        CacheCapabilities::default()
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_saturates() {
        assert_eq!(weight("ab", 10), 76);
        assert_eq!(weight("", usize::MAX), u32::MAX);
    }

    #[tokio::test]
    async fn capacity_is_by_size() {
        let cache =
            MokaCache::new(MokaCacheConfig::default().max_capacity_bytes(64 * 1024)).unwrap();
        let big = Bytes::from(vec![1u8; 4 * 1024]);
        for i in 0..100 {
            cache
                .set(&format!("k{i}"), big.clone(), Duration::from_secs(60))
                .await
                .unwrap();
        }
        cache.inner.run_pending_tasks();
        assert!(
            cache.weighted_size() <= 64 * 1024,
            "holds {} bytes over a 64 KiB capacity",
            cache.weighted_size()
        );
        assert!(cache.entry_count() < 100);
    }
}
