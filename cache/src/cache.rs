//! The [`Cache`] trait every backend and decorator implements.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{CacheError, Result};

/// The longest TTL any backend accepts: 10 years. Longer TTLs are refused
/// with [`CacheError::InvalidArgument`] rather than overflowing a clock.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What a backend can do, so the conformance suite and callers can adapt
/// instead of a backend emulating badly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheCapabilities {
    /// Writes through one handle are visible to other handles and other
    /// processes opened on the same namespace (Redis: yes; moka: only to
    /// clones of the same handle).
    pub shared: bool,
    /// [`Cache::get_many`] and [`Cache::set_many`] are one round trip
    /// (`MGET`, a pipeline) rather than a loop.
    pub native_batch: bool,
}

impl CacheCapabilities {
    /// Sets [`shared`](Self::shared).
    #[must_use]
    pub fn shared(mut self, shared: bool) -> Self {
        self.shared = shared;
        self
    }

    /// Sets [`native_batch`](Self::native_batch).
    #[must_use]
    pub fn native_batch(mut self, native_batch: bool) -> Self {
        self.native_batch = native_batch;
        self
    }
}

/// Checks a TTL the way every backend must: zero is an error, sub-millisecond
/// TTLs round up to 1 ms, TTLs above [`MAX_TTL`] are refused. Returns the TTL
/// to store, a whole number of milliseconds.
///
/// ```
/// use std::time::Duration;
/// use keel_cache::normalize_ttl;
///
/// assert!(normalize_ttl(Duration::ZERO).is_err());
/// assert_eq!(normalize_ttl(Duration::from_micros(10)).unwrap(), Duration::from_millis(1));
/// assert_eq!(normalize_ttl(Duration::from_micros(1500)).unwrap(), Duration::from_millis(2));
/// ```
///
/// # Errors
///
/// [`CacheError::InvalidArgument`] naming `ttl`.
pub fn normalize_ttl(ttl: Duration) -> Result<Duration> {
    if ttl.is_zero() {
        return Err(CacheError::argument(
            "ttl",
            "must be greater than zero (delete the key instead)",
        ));
    }
    if ttl > MAX_TTL {
        return Err(CacheError::argument(
            "ttl",
            format!("must be at most {}", humantime::format_duration(MAX_TTL)),
        ));
    }
    // u64 arithmetic only: this runs on every `get_or_load`. `ttl` is at
    // most 10 years here, so nothing overflows.
    let ms = ttl.as_secs() * 1000 + u64::from(ttl.subsec_nanos().div_ceil(1_000_000));
    Ok(Duration::from_millis(ms))
}

/// A key-value cache of [`Bytes`] with per-entry TTLs.
///
/// The trait is small and object safe (used as `Arc<dyn Cache>`); typed
/// (serde) conveniences live on [`CacheExt`](crate::CacheExt), which every
/// `Cache` gets for free. Decorators such as [`PrefixCache`](crate::PrefixCache)
/// and [`Tiered`](crate::Tiered) implement it too.
///
/// A cache is never the source of truth: a backend may drop any entry at any
/// time (capacity eviction, a restarted server), so callers must be able to
/// recompute every value.
///
/// # Keys
///
/// Keys are arbitrary UTF-8 strings, including the empty string, spaces,
/// newlines, braces and glob characters; backends store them verbatim (after
/// their namespace prefix) and never interpret them.
///
/// # TTLs
///
/// Every TTL goes through [`normalize_ttl`]: zero is an error, a
/// sub-millisecond TTL rounds up to 1 ms, and more than [`MAX_TTL`] is an
/// error.
///
/// # Cancel safety
///
/// Every method is cancel safe in the sense that dropping its future leaves
/// the cache usable and consistent: a dropped `set` may or may not have
/// stored its value, a dropped `delete` may or may not have deleted it.
#[async_trait]
pub trait Cache: Debug + Send + Sync + 'static {
    /// The value stored at `key`, if any and not expired.
    ///
    /// # Behavior
    ///
    /// Returns exactly the bytes last `set` at `key` while its TTL has not
    /// elapsed, and `None` after it has, after a `delete`, or when the
    /// backend evicted it. Bytes in the backend that this crate did not
    /// write (another program, a truncated or foreign value) read as `None`
    /// and are counted (`keel_cache_corrupt_total`), never a panic.
    ///
    /// # Errors
    ///
    /// [`CacheError::Unavailable`] or [`CacheError::Timeout`] when a remote
    /// backend cannot answer in time.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    async fn get(&self, key: &str) -> Result<Option<Bytes>>;

    /// Stores `value` at `key` for `ttl`, replacing any previous value.
    ///
    /// # Behavior
    ///
    /// A `get` after `Ok` returns `value` until `ttl` has elapsed (or the
    /// entry is evicted or deleted) and `None` after.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidArgument`] for a zero or too long TTL (see
    /// [`normalize_ttl`]); [`CacheError::Unavailable`] or
    /// [`CacheError::Timeout`] when a remote backend cannot answer in time
    /// (the value may or may not be stored).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the value may or may not be stored.
    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()>;

    /// Removes `key`. Removing a missing key is not an error.
    ///
    /// # Errors
    ///
    /// [`CacheError::Unavailable`] or [`CacheError::Timeout`] when a remote
    /// backend cannot answer in time (the key may or may not be removed).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the key may or may not be removed.
    async fn delete(&self, key: &str) -> Result<()>;

    /// The values at `keys`, in the same order, `None` where missing.
    ///
    /// # Behavior
    ///
    /// The same answers as one [`get`](Self::get) per key. Backends with
    /// [`CacheCapabilities::native_batch`] answer in one round trip; the
    /// default is a loop.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get); one failure fails the whole batch.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.get(key).await?);
        }
        Ok(out)
    }

    /// Stores every `(key, value)` pair for `ttl`.
    ///
    /// # Errors
    ///
    /// As [`set`](Self::set); the TTL is checked before anything is stored.
    /// A remote failure may leave some pairs stored and others not.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: any subset of the pairs may be stored.
    async fn set_many(&self, entries: &[(&str, Bytes)], ttl: Duration) -> Result<()> {
        normalize_ttl(ttl)?;
        for (key, value) in entries {
            self.set(key, value.clone(), ttl).await?;
        }
        Ok(())
    }

    /// What this backend can do.
    fn capabilities(&self) -> CacheCapabilities;

    /// Checks that the backend answers.
    ///
    /// # Errors
    ///
    /// [`CacheError::Unavailable`] or [`CacheError::Timeout`] when it does
    /// not.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    async fn ping(&self) -> Result<()>;
}

/// The future of a forwarded call: the pointee's own boxed future.
type Forwarded<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

// Written out rather than with `#[async_trait]`, which would box a second
// future around the pointee's on every call through `Arc<dyn Cache>`. The
// signatures are the ones `#[async_trait]` gives the trait's methods.
macro_rules! forward {
    ($ptr:ident) => {
        impl<T: Cache + ?Sized> Cache for $ptr<T> {
            fn get<'life0, 'life1, 'async_trait>(
                &'life0 self,
                key: &'life1 str,
            ) -> Forwarded<'async_trait, Option<Bytes>>
            where
                'life0: 'async_trait,
                'life1: 'async_trait,
                Self: 'async_trait,
            {
                (**self).get(key)
            }
            fn set<'life0, 'life1, 'async_trait>(
                &'life0 self,
                key: &'life1 str,
                value: Bytes,
                ttl: Duration,
            ) -> Forwarded<'async_trait, ()>
            where
                'life0: 'async_trait,
                'life1: 'async_trait,
                Self: 'async_trait,
            {
                (**self).set(key, value, ttl)
            }
            fn delete<'life0, 'life1, 'async_trait>(
                &'life0 self,
                key: &'life1 str,
            ) -> Forwarded<'async_trait, ()>
            where
                'life0: 'async_trait,
                'life1: 'async_trait,
                Self: 'async_trait,
            {
                (**self).delete(key)
            }
            fn get_many<'life0, 'life1, 'life2, 'async_trait>(
                &'life0 self,
                keys: &'life1 [&'life2 str],
            ) -> Forwarded<'async_trait, Vec<Option<Bytes>>>
            where
                'life0: 'async_trait,
                'life1: 'async_trait,
                'life2: 'async_trait,
                Self: 'async_trait,
            {
                (**self).get_many(keys)
            }
            fn set_many<'life0, 'life1, 'life2, 'async_trait>(
                &'life0 self,
                entries: &'life1 [(&'life2 str, Bytes)],
                ttl: Duration,
            ) -> Forwarded<'async_trait, ()>
            where
                'life0: 'async_trait,
                'life1: 'async_trait,
                'life2: 'async_trait,
                Self: 'async_trait,
            {
                (**self).set_many(entries, ttl)
            }
            fn capabilities(&self) -> CacheCapabilities {
                (**self).capabilities()
            }
            fn ping<'life0, 'async_trait>(&'life0 self) -> Forwarded<'async_trait, ()>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                (**self).ping()
            }
        }
    };
}

forward!(Arc);
forward!(Box);

#[cfg(test)]
mod tests {
    use keel_core::ArgumentError;

    use super::*;

    #[test]
    fn ttl_edges() {
        assert!(matches!(
            normalize_ttl(Duration::ZERO),
            Err(CacheError::InvalidArgument(ArgumentError {
                name: "ttl",
                ..
            }))
        ));
        assert_eq!(
            normalize_ttl(Duration::from_nanos(1)).unwrap(),
            Duration::from_millis(1)
        );
        assert_eq!(
            normalize_ttl(Duration::from_millis(7)).unwrap(),
            Duration::from_millis(7)
        );
        assert_eq!(normalize_ttl(MAX_TTL).unwrap(), MAX_TTL);
        assert!(normalize_ttl(MAX_TTL + Duration::from_millis(1)).is_err());
        assert!(normalize_ttl(Duration::MAX).is_err());
    }

    #[test]
    fn dyn_cache_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + ?Sized>() {}
        assert_send_sync::<dyn Cache>();
        assert_send_sync::<Arc<dyn Cache>>();
    }
}
