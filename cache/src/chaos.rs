//! Seeded fault injection for any [`Cache`] (feature `chaos`).
//!
//! [`Chaos`] wraps a cache and, call by call, adds latency, fails with
//! [`CacheError::Unavailable`] or drops the reply, each at a configured rate and
//! decided by a seeded generator: the same seed and the same sequence of
//! calls give the same faults, so a failing run reproduces. With every rate
//! at zero it is a transparent decorator (it passes the conformance suite).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), keel_cache::CacheError> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use keel_cache::chaos::{Chaos, ChaosConfig};
//! use keel_cache::{Cache, MokaCache, Tiered, TieredConfig};
//!
//! // An L2 that fails every call: the tiered cache still answers, from the origin.
//! let l2 = Arc::new(Chaos::new(MokaCache::new(Default::default())?, ChaosConfig::new(42).error_rate(1.0))?);
//! let cache = Tiered::builder(TieredConfig::new("chaos-demo")).l2(l2.clone()).build()?;
//! let value = cache
//!     .get_or_load("k", || async { Ok::<_, std::convert::Infallible>("origin".into()) })
//!     .await
//!     .unwrap();
//! assert_eq!(value, "origin");
//! assert!(l2.stats().errors >= 1);
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::cache::{Cache, CacheCapabilities};
use crate::error::{CacheError, Result};

/// The faults [`Chaos`] injects, each a rate between 0 and 1 of the calls.
///
/// All rates default to 0 (faults off).
///
/// ```
/// use std::time::Duration;
/// use keel_cache::chaos::ChaosConfig;
///
/// let config = ChaosConfig::new(7).error_rate(0.1).latency(0.5, Duration::from_millis(200));
/// assert!(config.validate().is_ok());
/// assert!(ChaosConfig::new(7).drop_rate(1.5).validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ChaosConfig {
    /// Seeds the generator that decides each call's faults. Default 0.
    pub seed: u64,
    /// Calls that fail with [`CacheError::Unavailable`] without reaching the
    /// inner cache. Default 0.
    pub error_rate: f64,
    /// Calls whose reply is dropped: the call reaches the inner cache (a
    /// `set` may be stored), then never answers, as when the network loses
    /// the reply; the caller's own timeout must end it. Default 0.
    pub drop_rate: f64,
    /// Calls delayed by [`latency`](Self::latency) before anything else
    /// happens. Default 0.
    pub latency_rate: f64,
    /// The added latency of a delayed call. Default 0.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        ChaosConfig {
            seed: 0,
            error_rate: 0.0,
            drop_rate: 0.0,
            latency_rate: 0.0,
            latency: Duration::ZERO,
        }
    }
}

impl ChaosConfig {
    /// Faults off, with this seed.
    pub fn new(seed: u64) -> Self {
        ChaosConfig {
            seed,
            ..ChaosConfig::default()
        }
    }

    /// Sets [`error_rate`](Self::error_rate).
    #[must_use]
    pub fn error_rate(mut self, rate: f64) -> Self {
        self.error_rate = rate;
        self
    }

    /// Sets [`drop_rate`](Self::drop_rate).
    #[must_use]
    pub fn drop_rate(mut self, rate: f64) -> Self {
        self.drop_rate = rate;
        self
    }

    /// Sets [`latency_rate`](Self::latency_rate) and
    /// [`latency`](Self::latency).
    #[must_use]
    pub fn latency(mut self, rate: f64, latency: Duration) -> Self {
        self.latency_rate = rate;
        self.latency = latency;
        self
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidConfig`] naming a rate outside 0 to 1.
    pub fn validate(&self) -> Result<()> {
        for (field, rate) in [
            ("error_rate", self.error_rate),
            ("drop_rate", self.drop_rate),
            ("latency_rate", self.latency_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(CacheError::config(field, "must be between 0 and 1"));
            }
        }
        Ok(())
    }
}

/// What [`Chaos`] has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChaosStats {
    /// Calls received (every method but `capabilities`).
    pub calls: u64,
    /// Calls failed with an injected error.
    pub errors: u64,
    /// Calls whose reply was dropped.
    pub dropped: u64,
    /// Calls delayed.
    pub delayed: u64,
}

/// A [`Cache`] decorator that injects seeded faults; see the
/// [module docs](self).
///
/// Each call draws its faults from one generator, in call order: a
/// sequential run with the same seed injects the same faults; concurrent
/// calls draw in whatever order they arrive. Batches (`get_many`,
/// `set_many`) are one call. [`set_config`](Self::set_config) changes the
/// rates mid-test (an outage starts, an outage ends).
#[derive(Debug)]
pub struct Chaos<C> {
    inner: C,
    config: Mutex<ChaosConfig>,
    rng: Mutex<fastrand::Rng>,
    calls: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
    delayed: AtomicU64,
}

/// One call's faults.
struct Faults {
    delay: Option<Duration>,
    error: bool,
    drop: bool,
}

impl<C: Cache> Chaos<C> {
    /// Wraps `inner`.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidConfig`] naming a bad rate.
    pub fn new(inner: C, config: ChaosConfig) -> Result<Self> {
        config.validate()?;
        Ok(Chaos {
            inner,
            rng: Mutex::new(fastrand::Rng::with_seed(config.seed)),
            config: Mutex::new(config),
            calls: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
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
        config.validate()?;
        let mut current = self.config.lock();
        if current.seed != config.seed {
            *self.rng.lock() = fastrand::Rng::with_seed(config.seed);
        }
        *current = config;
        Ok(())
    }

    /// The current settings.
    pub fn config(&self) -> ChaosConfig {
        self.config.lock().clone()
    }

    /// What has been injected so far.
    pub fn stats(&self) -> ChaosStats {
        ChaosStats {
            calls: self.calls.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            delayed: self.delayed.load(Ordering::Relaxed),
        }
    }

    /// Draws this call's faults: three numbers per call, always, so one
    /// rate does not shift another's sequence.
    fn draw(&self) -> Faults {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let config = self.config.lock();
        let mut rng = self.rng.lock();
        let (delay, error, drop) = (rng.f64(), rng.f64(), rng.f64());
        Faults {
            delay: (delay < config.latency_rate).then_some(config.latency),
            error: error < config.error_rate,
            drop: drop < config.drop_rate,
        }
    }

    /// Runs `call` with this call's faults.
    async fn run<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        let faults = self.draw();
        if let Some(delay) = faults.delay {
            self.delayed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
        }
        if faults.error {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return Err(CacheError::Unavailable {
                message: "fault injected by `Chaos`".into(),
                source: None,
            });
        }
        let result = call.await;
        if faults.drop {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return std::future::pending().await;
        }
        result
    }
}

#[async_trait]
impl<C: Cache> Cache for Chaos<C> {
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
