//! A decorator that puts every key under a namespace.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::cache::{Cache, CacheCapabilities};
use crate::error::Result;

/// A [`Cache`] that prefixes every key with a namespace before handing it to
/// the inner cache, so several tenants, models or services can share one
/// backend without seeing each other's keys.
///
/// The prefix is prepended verbatim: `PrefixCache::new(inner, "tenant-a:")`
/// stores `"k"` as `"tenant-a:k"`. Pick prefixes that are not prefixes of
/// each other (end them with a separator) so namespaces cannot overlap.
/// Batches stay batches: `get_many` is one `get_many` on the inner cache.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), keel_cache::CacheError> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use keel_cache::{Cache, MokaCache, PrefixCache};
///
/// let shared = Arc::new(MokaCache::new(Default::default())?);
/// let a = PrefixCache::new(shared.clone(), "tenant-a:");
/// let b = PrefixCache::new(shared.clone(), "tenant-b:");
/// a.set("k", "from a".into(), Duration::from_secs(60)).await?;
/// assert_eq!(b.get("k").await?, None);
/// assert_eq!(shared.get("tenant-a:k").await?.as_deref(), Some(&b"from a"[..]));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PrefixCache<C> {
    inner: C,
    prefix: String,
}

impl<C: Cache> PrefixCache<C> {
    /// Wraps `inner`, prefixing every key with `prefix`.
    pub fn new(inner: C, prefix: impl Into<String>) -> Self {
        PrefixCache {
            inner,
            prefix: prefix.into(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The wrapped cache.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    fn full(&self, key: &str) -> String {
        let mut full = String::with_capacity(self.prefix.len() + key.len());
        full.push_str(&self.prefix);
        full.push_str(key);
        full
    }
}

#[async_trait]
impl<C: Cache> Cache for PrefixCache<C> {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.inner.get(&self.full(key)).await
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        self.inner.set(&self.full(key), value, ttl).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(&self.full(key)).await
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        let full: Vec<String> = keys.iter().map(|k| self.full(k)).collect();
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        self.inner.get_many(&refs).await
    }

    async fn set_many(&self, entries: &[(&str, Bytes)], ttl: Duration) -> Result<()> {
        let full: Vec<(String, Bytes)> = entries
            .iter()
            .map(|(k, v)| (self.full(k), v.clone()))
            .collect();
        let refs: Vec<(&str, Bytes)> = full.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        self.inner.set_many(&refs, ttl).await
    }

    fn capabilities(&self) -> CacheCapabilities {
        self.inner.capabilities()
    }

    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
}
