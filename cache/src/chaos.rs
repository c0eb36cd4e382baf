//! Seeded fault injection for any [`Cache`] (feature `chaos`).
//!
//! [`ChaosCache`] wraps a cache and, call by call, adds latency, fails with
//! [`CacheError::Unavailable`] or drops the reply, each at a configured rate
//! and decided by keel-core's seeded [`FaultInjector`]: the same seed and
//! the same sequence of calls give the same faults, so a failing run
//! reproduces. With every rate at zero it is a transparent decorator (it
//! passes the conformance suite).
//!
//! A dropped reply never answers: the call reached the inner cache (a `set`
//! may be stored), then hangs, as when the network loses the reply; the
//! caller's own timeout must end it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), keel_cache::CacheError> {
//! use std::sync::Arc;
//! use keel_cache::chaos::{ChaosCache, ChaosConfig};
//! use keel_cache::{Cache, MokaCache, Tiered, TieredConfig};
//!
//! // An L2 that fails every call: the tiered cache still answers, from the origin.
//! let l2 = Arc::new(ChaosCache::new(MokaCache::new(Default::default())?, ChaosConfig::new(42).error_rate(1.0))?);
//! let cache = Tiered::builder(TieredConfig::new("chaos-demo")).l2(l2.clone()).build()?;
//! let value = cache
//!     .get_or_load("k", || async { Ok::<_, std::convert::Infallible>("origin".into()) })
//!     .await
//!     .unwrap();
//! assert_eq!(value, "origin");
//! assert!(l2.injected().errors >= 1);
//! # Ok(()) }
//! ```

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
pub use keel_core::chaos::{ChaosConfig, ChaosStats};
use keel_core::chaos::{FaultInjector, Injected};

use crate::cache::{Cache, CacheCapabilities};
use crate::error::{CacheError, Result};

/// A [`Cache`] decorator that injects seeded faults; see the
/// [module docs](self).
///
/// Each call draws its faults in call order: a sequential run with the
/// same seed injects the same faults; concurrent calls draw in whatever
/// order they arrive. Batches (`get_many`, `set_many`) are one call;
/// `capabilities` is never faulted. [`set_config`](Self::set_config)
/// changes the rates mid-test (an outage starts, an outage ends).
#[derive(Debug)]
pub struct ChaosCache<C> {
    inner: C,
    faults: FaultInjector,
}

impl<C: Cache> ChaosCache<C> {
    /// Wraps `inner`.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidConfig`] naming a bad rate.
    pub fn new(inner: C, config: ChaosConfig) -> Result<Self> {
        Ok(ChaosCache {
            inner,
            faults: FaultInjector::new(config)?,
        })
    }

    /// The wrapped cache (to check what reached it, bypassing the faults).
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// Replaces the rates (and latency) from the next call on. The
    /// generator is reseeded only if `config.seed` differs from the
    /// current seed.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidConfig`] naming a bad rate; the old rates stay.
    pub fn set_config(&self, config: ChaosConfig) -> Result<()> {
        Ok(self.faults.set_config(config)?)
    }

    /// The current settings.
    pub fn config(&self) -> ChaosConfig {
        self.faults.config()
    }

    /// What has been injected so far.
    pub fn injected(&self) -> ChaosStats {
        self.faults.stats()
    }

    /// Runs `call` with this call's faults.
    async fn run<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        match self.faults.run(call).await {
            Ok(result) => result,
            Err(Injected::Failure) => Err(CacheError::Unavailable {
                message: "fault injected by `ChaosCache`".into(),
                source: None,
            }),
            Err(Injected::LostReply(_)) => std::future::pending().await,
        }
    }
}

#[async_trait]
impl<C: Cache> Cache for ChaosCache<C> {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.run(self.inner.get(key)).await
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        self.run(self.inner.set(key, value, ttl)).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.run(self.inner.delete(key)).await
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        self.run(self.inner.get_many(keys)).await
    }

    async fn set_many(&self, entries: &[(&str, Bytes)], ttl: Duration) -> Result<()> {
        self.run(self.inner.set_many(entries, ttl)).await
    }

    fn capabilities(&self) -> CacheCapabilities {
        self.inner.capabilities()
    }

    async fn ping(&self) -> Result<()> {
        self.run(self.inner.ping()).await
    }
}
