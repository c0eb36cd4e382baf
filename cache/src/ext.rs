//! Conveniences every [`Cache`] gets for free: typed JSON values.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cache::Cache;
use crate::error::{CacheError, Result};

/// Encodes `value` as JSON bytes.
pub(crate) fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Bytes> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|err| CacheError::codec("could not encode the value as JSON", err))
}

/// Decodes JSON bytes as `T`.
pub(crate) fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|err| CacheError::codec("could not decode the cached value as JSON", err))
}

/// Typed conveniences over any [`Cache`].
///
/// Implemented for every `Cache` (including `dyn Cache`); never implement
/// it by hand.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), keel_cache::CacheError> {
/// use std::time::Duration;
/// use keel_cache::{CacheExt, MokaCache};
///
/// let cache = MokaCache::new(Default::default())?;
/// cache.set_json("user:1", &vec![1, 2, 3], Duration::from_secs(60)).await?;
/// let got: Option<Vec<u32>> = cache.get_json("user:1").await?;
/// assert_eq!(got, Some(vec![1, 2, 3]));
/// # Ok(()) }
/// ```
#[async_trait]
pub trait CacheExt: Cache {
    /// The value at `key` decoded from JSON as `T`.
    ///
    /// # Errors
    ///
    /// As [`Cache::get`], and [`CacheError::Codec`] when the stored bytes are
    /// not JSON of type `T`.
    ///
    /// # Cancel safety
    ///
    /// As [`Cache::get`].
    async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.get(key).await? {
            Some(bytes) => from_json(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Stores `value` as JSON at `key` for `ttl`.
    ///
    /// # Errors
    ///
    /// [`CacheError::Codec`] when `value` cannot be serialized, else as
    /// [`Cache::set`].
    ///
    /// # Cancel safety
    ///
    /// As [`Cache::set`].
    async fn set_json<T: Serialize + Sync + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<()> {
        let bytes = to_json(value)?;
        self.set(key, bytes, ttl).await
    }
}

impl<C: Cache + ?Sized> CacheExt for C {}
