//! `Tiered`: an in-process L1 (moka) over an optional shared L2 (any
//! [`Cache`], typically Redis), with coalesced loads, stale-while-revalidate,
//! negative caching, an L2 breaker and cross-instance invalidation.

mod breaker;
mod config;
mod entry;
mod flight;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::Instrument;

use self::breaker::Breaker;
pub use self::config::TieredConfig;
use self::entry::{Clock, Entry, Freshness};
use self::flight::{Failure, Flights, Landing, Loaded, Outcome};
use crate::cache::{Cache, CacheCapabilities, MAX_TTL, normalize_ttl};
use crate::codec::{Codec, JsonCodec};
use crate::error::{CacheError, CachedFailure, LoadFailed, Result, chain_message};
use crate::invalidation::{BusEvent, InvalidationBus};
use crate::metrics::TieredMetrics;
use crate::moka::weight;

/// What a loader passed to `Tiered` fails with: any error, kept typed (the
/// bounds of the public methods, spelled once for the private ones).
pub(crate) trait LoaderError: std::error::Error + Send + Sync + 'static {}

impl<E: std::error::Error + Send + Sync + 'static> LoaderError for E {}

/// Wraps a caller's loader into the internal one: its error is shared as
/// `Arc<E>`, its value is stored.
fn raw_loader<F, Fut, E>(
    load: F,
) -> impl FnOnce() -> futures::future::BoxFuture<'static, std::result::Result<Loaded, Failure<E>>>
+ Send
+ 'static
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<Bytes, E>> + Send + 'static,
    E: LoaderError,
{
    move || {
        async move {
            match load().await {
                Ok(bytes) => Ok(Loaded { bytes, store: true }),
                Err(err) => Err(Failure::Load(Arc::new(err))),
            }
        }
        .boxed()
    }
}

/// Aborts the invalidation listener when the last handle is dropped.
struct Listener(tokio::task::AbortHandle);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// L1: moka's synchronous cache. Its `get` is a plain call (no future to
/// build and poll), which keeps the hit path within a few percent of a raw
/// `moka::future::Cache::get`; moka runs its housekeeping on the calling
/// thread either way. A write finding moka's write log full waits on the
/// thread (moka retries every few microseconds) where the future cache
/// would yield; writes are fills and invalidations, not hits. Keys hash
/// with foldhash (seeded per instance) rather than SipHash, the largest
/// part of a hit's own work.
type L1 = moka::sync::Cache<String, Entry, foldhash::quality::RandomState>;

struct Inner {
    config: TieredConfig,
    /// This instance's id on the invalidation bus.
    id: String,
    clock: Clock,
    l1: L1,
    l2: Option<Arc<dyn Cache>>,
    bus: Option<Arc<dyn InvalidationBus>>,
    breaker: Breaker,
    flights: Arc<Flights>,
    metrics: TieredMetrics,
    _listener: Option<Listener>,
}

/// A two-tier cache: an in-process L1 (moka) over an optional shared L2
/// (any [`Cache`], typically [`RedisCache`](crate::RedisCache)), that never
/// turns a cache problem into a failed request.
///
/// # Reads
///
/// [`get_or_load`](Self::get_or_load) reads L1, then L2, then calls the
/// loader (the origin), and fills upward. Concurrent misses for one key in
/// one process share one L2 lookup and one loader call (coalescing). Every
/// entry carries a fresh-until and a stale-until: a fresh hit returns at
/// once; a stale hit (within [`stale_for`](TieredConfig::stale_for)) returns
/// at once and starts one background refresh, or waits up to
/// [`soft_timeout`](TieredConfig::soft_timeout) for it; past stale-until the
/// entry is a miss. Loaded TTLs get [jitter](TieredConfig::ttl_jitter), and
/// an optional probabilistic early refresh
/// ([XFetch](TieredConfig::early_refresh_beta)) renews hot keys before they
/// expire.
///
/// # Writes
///
/// [`set`](Cache::set) writes through L1 and L2 and publishes an
/// invalidation; [`invalidate`](Self::invalidate) (and
/// [`delete`](Cache::delete)) removes the key from L1 and L2 and publishes.
/// Every instance subscribed to the same
/// [`InvalidationBus`](crate::InvalidationBus) drops the key from its L1;
/// after its subscription is re-established it drops its whole L1, since it
/// may have missed messages.
///
/// # Outages
///
/// An L2 error or timeout (each L2 call is bounded by
/// [`l2_timeout`](TieredConfig::l2_timeout)) is counted and treated as a
/// miss on reads and as a dropped write on writes. After
/// [`breaker_failures`](TieredConfig::breaker_failures) consecutive failures
/// a breaker skips L2 for [`breaker_cooldown`](TieredConfig::breaker_cooldown),
/// then lets one probe through. Callers of `get_or_load` see only their
/// loader's errors (typed), or the cache's own when it could not produce a
/// value (a hard load timeout), never an L2 failure.
///
/// # Races
///
/// A load that was already running when `set` or `invalidate` ran for the
/// same key may still write its (older) value afterwards; that value lives
/// at most its TTL. Invalidations are delivered at most once: an instance
/// that misses one (its subscription was down) flushes its whole L1 when
/// it resubscribes, and `l1_ttl` bounds the rest.
///
/// # Clock
///
/// Freshness is timed by Tokio's clock anchored to the wall clock once at
/// build time, so tests can pause time. L1 evicts every entry `l1_ttl` after
/// it was written, by moka's own real-time clock; an entry is served only
/// while it is also fresh (or stale) by ours.
///
/// Cloning is cheap; clones share everything.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), keel_cache::BoxError> {
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::time::Duration;
/// use keel_cache::{MokaCache, Tiered, TieredConfig};
///
/// // In production L2 is a `RedisCache`; any `Cache` will do.
/// let cache = Tiered::builder(TieredConfig::new("completions").stale_for(Duration::from_secs(60)))
///     .l2(MokaCache::new(Default::default())?)
///     .build()?;
///
/// let calls = Arc::new(AtomicUsize::new(0));
/// for _ in 0..3 {
///     let calls = calls.clone();
///     let value = cache
///         .get_or_load("prompt-hash", move || async move {
///             calls.fetch_add(1, Ordering::SeqCst);
///             Ok::<_, std::convert::Infallible>("completion".into())
///         })
///         .await?;
///     assert_eq!(&value[..], b"completion");
/// }
/// assert_eq!(calls.load(Ordering::SeqCst), 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Tiered {
    inner: Arc<Inner>,
}

impl fmt::Debug for Tiered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tiered")
            .field("config", &self.inner.config)
            .field("id", &self.inner.id)
            .field("l1_entries", &self.inner.l1.entry_count())
            .field("l2", &self.inner.l2)
            .field("bus", &self.inner.bus)
            .field("l2_breaker_open", &self.inner.breaker.is_open())
            .finish()
    }
}

/// Builds a [`Tiered`]: L2 and the invalidation bus are optional.
#[derive(Debug)]
#[must_use]
pub struct TieredBuilder {
    config: TieredConfig,
    l2: Option<Arc<dyn Cache>>,
    bus: Option<Arc<dyn InvalidationBus>>,
}

impl TieredBuilder {
    /// Uses `cache` as L2.
    pub fn l2(mut self, cache: impl Cache) -> Self {
        self.l2 = Some(Arc::new(cache));
        self
    }

    /// Publishes and receives invalidations on `bus`.
    pub fn invalidation(mut self, bus: impl InvalidationBus) -> Self {
        self.bus = Some(Arc::new(bus));
        self
    }

    /// Builds the cache; with an invalidation bus, starts listening on it.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidConfig`] naming a bad field, or naming
    /// `invalidation` when a bus is set outside a Tokio runtime.
    pub fn build(self) -> Result<Tiered> {
        let TieredBuilder { config, l2, bus } = self;
        config.validate()?;
        let clock = Clock::new();
        let metrics = TieredMetrics::new(&config.name);
        let l1 = moka::sync::Cache::builder()
            .max_capacity(config.l1_capacity_bytes)
            .weigher(|key: &String, entry: &Entry| {
                let negative = entry.negative.as_ref().map_or(0, |n| n.message.len());
                weight(key, entry.value.len() + negative)
            })
            // One TTL for all of L1 (cheaper per read than a per-entry
            // expiry); each read checks the entry's own freshness too.
            .time_to_live(config.l1_ttl)
            .build_with_hasher(foldhash::quality::RandomState::default());
        let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let listener = match &bus {
            Some(bus) => {
                let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
                    CacheError::config(
                        "invalidation",
                        "building a cache with an invalidation bus needs a Tokio runtime",
                    )
                })?;
                let task = runtime.spawn(listen(
                    bus.subscribe(),
                    l1.clone(),
                    id.clone(),
                    metrics.clone(),
                ));
                Some(Listener(task.abort_handle()))
            }
            None => None,
        };
        Ok(Tiered {
            inner: Arc::new(Inner {
                breaker: Breaker::new(
                    config.breaker_failures,
                    config.breaker_cooldown,
                    metrics.clone(),
                ),
                config,
                id,
                clock,
                l1,
                l2,
                bus,
                flights: Arc::new(Flights::default()),
                metrics,
                _listener: listener,
            }),
        })
    }
}

/// Applies invalidations from other instances to L1 until the bus ends.
async fn listen(
    mut events: futures::stream::BoxStream<'static, BusEvent>,
    l1: L1,
    id: String,
    metrics: TieredMetrics,
) {
    while let Some(event) = events.next().await {
        match event {
            BusEvent::Invalidate { origin, key } => {
                if origin != id {
                    l1.invalidate(&key);
                    metrics.invalidations_received.increment(1);
                }
            }
            BusEvent::Subscribed => {
                l1.invalidate_all();
                metrics.l1_flushes.increment(1);
                tracing::info!(
                    instance = %id,
                    "invalidation subscription (re)established: L1 flushed"
                );
            }
        }
    }
    tracing::warn!(instance = %id, "invalidation bus ended: L1 relies on l1_ttl alone");
}

impl Tiered {
    /// A builder for a cache with these settings.
    pub fn builder(config: TieredConfig) -> TieredBuilder {
        TieredBuilder {
            config,
            l2: None,
            bus: None,
        }
    }

    /// The configuration the cache was built with.
    pub fn config(&self) -> &TieredConfig {
        &self.inner.config
    }

    /// The value at `key`: from L1, else L2, else from `load` (once for
    /// all concurrent callers in this process), with the configured
    /// [`ttl`](TieredConfig::ttl).
    ///
    /// `load` runs in a spawned task, so it must be `'static`: move clones
    /// of what it needs into it. A caller that stops waiting does not stop
    /// the load; the other callers still get its result.
    ///
    /// The loader's error type `E` is yours and comes back typed
    /// ([`LoadFailed::Loader`]), shared as an `Arc<E>` with every caller
    /// coalesced onto the same load, as moka's `try_get_with` does. Loads
    /// coalesce per key and error type: two concurrent callers of one key
    /// with different error types load separately.
    ///
    /// # Behavior
    ///
    /// - Fresh in L1 or L2: returned at once (filling L1 from L2).
    /// - Stale (within `stale_for`): returned at once, or after waiting up
    ///   to `soft_timeout` for the fresh value; one background refresh
    ///   starts. If the refresh fails, the stale value is served until it
    ///   expires.
    /// - Missing or expired: one loader call per key in this process;
    ///   concurrent callers wait for it. Its value is written to L1 and L2
    ///   with a jittered TTL. Its error is returned to every waiter and is
    ///   cached only when its [`ErrorKind`](keel_core::ErrorKind) (what
    ///   [`keel_core::find_kind`] finds in it) has a
    ///   [`negative_ttl`](TieredConfig::negative_ttl).
    /// - L2 errors, timeouts and an open breaker are misses, never errors.
    ///
    /// # Errors
    ///
    /// [`LoadFailed::Loader`] with the loader's own error;
    /// [`LoadFailed::Cached`] with a remembered one (negative caching);
    /// [`LoadFailed::Cache`] with [`CacheError::LoadTimeout`] when the loader
    /// exceeded `load_timeout` and nothing stale was there, or
    /// [`CacheError::LoaderPanicked`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the load continues for the other callers and fills the
    /// cache.
    pub async fn get_or_load<F, Fut, E>(
        &self,
        key: &str,
        load: F,
    ) -> std::result::Result<Bytes, LoadFailed<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Bytes, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        self.inner
            .get_or_load(key, self.inner.config.ttl, raw_loader(load))
            .await
    }

    /// [`get_or_load`](Self::get_or_load) with a fresh TTL of `ttl` (before
    /// jitter) for a loaded value.
    ///
    /// # Errors
    ///
    /// As [`get_or_load`](Self::get_or_load), and [`LoadFailed::Cache`] with
    /// [`CacheError::InvalidArgument`] for a zero or too long `ttl`.
    ///
    /// # Cancel safety
    ///
    /// As [`get_or_load`](Self::get_or_load).
    pub async fn get_or_load_with_ttl<F, Fut, E>(
        &self,
        key: &str,
        ttl: Duration,
        load: F,
    ) -> std::result::Result<Bytes, LoadFailed<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Bytes, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let ttl = normalize_ttl(ttl).map_err(LoadFailed::Cache)?;
        self.inner.get_or_load(key, ttl, raw_loader(load)).await
    }

    /// [`get_or_load`](Self::get_or_load) for a value of type `T`, stored
    /// as the bytes `codec` encodes it to: raw bytes
    /// ([`BytesCodec`](crate::BytesCodec)), an HTTP response
    /// ([`HttpCodec`](crate::HttpCodec)), JSON ([`JsonCodec`]) or your own
    /// [`Codec`].
    ///
    /// A value the codec declines to cache ([`Codec::cacheable`], e.g. an
    /// HTTP error response) is handed to every caller waiting on that load
    /// and not stored.
    ///
    /// # Errors
    ///
    /// As [`get_or_load`](Self::get_or_load), and [`LoadFailed::Cache`] with
    /// [`CacheError::Codec`] when the value does not encode, or the cached
    /// bytes do not decode, as `T`.
    ///
    /// # Cancel safety
    ///
    /// As [`get_or_load`](Self::get_or_load).
    pub async fn get_or_load_with_codec<T, C, F, Fut, E>(
        &self,
        key: &str,
        codec: &C,
        load: F,
    ) -> std::result::Result<T, LoadFailed<E>>
    where
        C: Codec<T>,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
        T: Send + 'static,
    {
        let encoder = codec.clone();
        let raw = move || {
            async move {
                let value = load().await.map_err(|err| Failure::Load(Arc::new(err)))?;
                let store = encoder.cacheable(&value);
                let bytes = encoder
                    .encode(&value)
                    .map_err(|err| Failure::Codec(Arc::new(err)))?;
                Ok(Loaded { bytes, store })
            }
            .boxed()
        };
        let bytes = self
            .inner
            .get_or_load(key, self.inner.config.ttl, raw)
            .await?;
        codec.decode(bytes).map_err(LoadFailed::Cache)
    }

    /// [`get_or_load`](Self::get_or_load) for a serde type, stored as JSON
    /// ([`get_or_load_with_codec`](Self::get_or_load_with_codec) with
    /// [`JsonCodec`]).
    ///
    /// # Errors
    ///
    /// As [`get_or_load_with_codec`](Self::get_or_load_with_codec).
    ///
    /// # Cancel safety
    ///
    /// As [`get_or_load`](Self::get_or_load).
    pub async fn get_or_load_json<T, F, Fut, E>(
        &self,
        key: &str,
        load: F,
    ) -> std::result::Result<T, LoadFailed<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        self.get_or_load_with_codec(key, &JsonCodec, load).await
    }

    /// Removes `key` from L1 and L2 and tells every other instance on the
    /// invalidation bus to drop it from its L1. Same as
    /// [`delete`](Cache::delete).
    ///
    /// # Errors
    ///
    /// L1 is always cleared. [`CacheError::Unavailable`] or
    /// [`CacheError::Timeout`] when L2 or the bus did not take the deletion
    /// (other instances may serve their L1 copy for up to `l1_ttl`, and L2
    /// may keep it until its TTL); retry if that matters.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: L1 is cleared first; L2 and the bus may or may not be
    /// reached.
    pub async fn invalidate(&self, key: &str) -> Result<()> {
        let inner = &self.inner;
        inner.l1.invalidate(key);
        let mut result = Ok(());
        if let Some(l2) = &inner.l2 {
            // A deletion is worth trying even through an open breaker.
            let outcome = tokio::time::timeout(inner.config.l2_timeout, l2.delete(key)).await;
            if let Err(err) = inner.l2_outcome(outcome, &inner.metrics.l2_delete_errors) {
                result = Err(err);
            }
        }
        if let Err(err) = inner.publish(key).await {
            result = result.and(Err(err));
        }
        result
    }

    /// Drops every entry from this instance's L1 (L2 is untouched).
    pub fn flush_l1(&self) {
        self.inner.l1.invalidate_all();
    }

    /// Whether the L2 breaker is open or probing (L2 is being skipped).
    pub fn l2_breaker_open(&self) -> bool {
        self.inner.breaker.is_open()
    }

    /// This instance's id on the invalidation bus.
    pub fn instance_id(&self) -> &str {
        &self.inner.id
    }
}

impl Inner {
    /// The read path of every `get_or_load`: L1, then one flight per key
    /// (L2, then the loader).
    async fn get_or_load<F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        ttl: Duration,
        load: F,
    ) -> std::result::Result<Bytes, LoadFailed<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded, Failure<E>>> + Send + 'static,
        E: LoaderError,
    {
        let now = self.clock.now_ms();
        if let Some(entry) = self.l1.get(key) {
            match entry.freshness(now) {
                Freshness::Fresh => {
                    self.metrics.l1_hits.increment(1);
                    if self.refresh_early(&entry, now) {
                        drop(Inner::start_refresh(self, key, ttl, load));
                    }
                    if entry.negative.is_none() {
                        return Ok(entry.value);
                    }
                    return self.answer(&entry);
                }
                Freshness::Stale => {
                    self.metrics.l1_stale_hits.increment(1);
                    return self.serve_stale(key, &entry, ttl, load).await;
                }
                Freshness::Expired => {}
            }
        }
        self.metrics.l1_misses.increment(1);
        let lookup_inner = Arc::clone(self);
        let owned_key = key.to_owned();
        let (flight, started) = self.flights.join_or_start(key, move |landing| {
            lookup_inner.lookup(owned_key, ttl, load, landing)
        });
        if !started {
            self.metrics.coalesced.increment(1);
        }
        let entry = flight.await.map_err(Failure::into_load_failed)?;
        if entry.freshness(self.clock.now_ms()) == Freshness::Stale
            && !self.config.soft_timeout.is_zero()
        {
            // The lookup found a stale value in L2 and started a refresh.
            if let Some(refresh) = self.flights.get::<E>(key) {
                if let Ok(Ok(fresh)) = tokio::time::timeout(self.config.soft_timeout, refresh).await
                {
                    return self.answer(&fresh);
                }
                self.metrics.stale_on_error.increment(1);
            }
        }
        self.answer(&entry)
    }

    /// The value of an entry, or its cached error.
    fn answer<E>(&self, entry: &Entry) -> std::result::Result<Bytes, LoadFailed<E>> {
        match &entry.negative {
            None => Ok(entry.value.clone()),
            Some(negative) => {
                self.metrics.negative_hits.increment(1);
                Err(LoadFailed::Cached(CachedFailure::new(
                    negative.kind,
                    negative.message.clone(),
                )))
            }
        }
    }

    /// XFetch: refresh a fresh entry early with a probability that grows as
    /// expiry nears, scaled by its last load time.
    fn refresh_early(&self, entry: &Entry, now: u64) -> bool {
        let beta = self.config.early_refresh_beta;
        if beta == 0.0 || entry.load_ms == 0 || entry.negative.is_some() {
            return false;
        }
        let gap = -(f64::from(entry.load_ms)) * beta * fastrand::f64().max(f64::MIN_POSITIVE).ln();
        now as f64 + gap >= entry.fresh_until as f64
    }

    fn jittered(&self, ttl: Duration) -> Duration {
        let jitter = self.config.ttl_jitter;
        if jitter == 0.0 {
            return ttl;
        }
        ttl.mul_f64(1.0 - jitter * fastrand::f64())
            .max(Duration::from_millis(1))
    }

    /// Starts (or joins) a refresh of `key` in the background.
    fn start_refresh<F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        ttl: Duration,
        load: F,
    ) -> flight::Flight<E>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded, Failure<E>>> + Send + 'static,
        E: LoaderError,
    {
        let me = Arc::clone(self);
        let owned_key = key.to_owned();
        self.flights
            .join_or_start(key, move |landing| async move {
                let _landing = landing;
                me.load(&owned_key, ttl, load).await
            })
            .0
    }

    async fn serve_stale<F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        stale: &Entry,
        ttl: Duration,
        load: F,
    ) -> std::result::Result<Bytes, LoadFailed<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded, Failure<E>>> + Send + 'static,
        E: LoaderError,
    {
        let refresh = Self::start_refresh(self, key, ttl, load);
        if self.config.soft_timeout.is_zero() {
            return self.answer(stale);
        }
        match tokio::time::timeout(self.config.soft_timeout, refresh).await {
            Ok(Ok(fresh)) => self.answer(&fresh),
            Ok(Err(_)) | Err(_) => {
                self.metrics.stale_on_error.increment(1);
                self.answer(stale)
            }
        }
    }

    /// The flight of a miss: L1 again (a flight may have just landed), L2,
    /// then the loader.
    async fn lookup<F, Fut, E>(
        self: Arc<Self>,
        key: String,
        ttl: Duration,
        load: F,
        landing: Landing,
    ) -> Outcome<E>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded, Failure<E>>> + Send + 'static,
        E: LoaderError,
    {
        let now = self.clock.now_ms();
        if let Some(entry) = self.l1.get(&key)
            && entry.freshness(now) == Freshness::Fresh
        {
            return Ok(Arc::new(entry));
        }
        if let Some(entry) = self.l2_get(&key, now).await {
            self.l1.insert(key.clone(), Entry::clone(&entry));
            if entry.freshness(now) == Freshness::Stale {
                // Hand the key over to a refresh flight; waiters of this
                // lookup get the stale value now.
                landing.land();
                drop(Self::start_refresh(&self, &key, ttl, load));
            }
            return Ok(entry);
        }
        let outcome = self.load(&key, ttl, load).await;
        drop(landing);
        outcome
    }

    /// Calls the loader under the hard timeout and fills both tiers.
    async fn load<F, Fut, E>(&self, key: &str, ttl: Duration, load: F) -> Outcome<E>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded, Failure<E>>> + Send + 'static,
        E: LoaderError,
    {
        self.metrics.loads.increment(1);
        let started = Instant::now();
        let span = tracing::debug_span!("keel_cache.load", cache = %self.config.name, key);
        let call = std::panic::AssertUnwindSafe(async move { load().await })
            .catch_unwind()
            .instrument(span);
        let result = tokio::time::timeout(self.config.load_timeout, call).await;
        let took = started.elapsed();
        self.metrics.load_seconds.record(took.as_secs_f64());
        let now = self.clock.now_ms();
        match result {
            Ok(Ok(Ok(loaded))) => {
                let mut entry =
                    Entry::value(loaded.bytes, now, self.jittered(ttl), self.config.stale_for);
                entry.load_ms = u32::try_from(took.as_millis()).unwrap_or(u32::MAX);
                let entry = Arc::new(entry);
                if loaded.store {
                    self.fill(key, &entry, now).await;
                }
                Ok(entry)
            }
            Ok(Ok(Err(failure))) => {
                self.metrics.load_errors.increment(1);
                if let Failure::Load(err) = &failure {
                    let kind = keel_core::find_kind(err.as_ref());
                    let negative_ttl = kind.and_then(|kind| self.config.negative_ttl_of(kind));
                    if let (Some(kind), Some(negative_ttl)) = (kind, negative_ttl) {
                        let message = chain_message(err.as_ref());
                        let entry = Arc::new(Entry::negative(kind, message, now, negative_ttl));
                        self.fill(key, &entry, now).await;
                    }
                    tracing::debug!(cache = %self.config.name, ?kind, error = %err, "load failed");
                } else {
                    tracing::debug!(cache = %self.config.name, "loaded value did not encode");
                }
                Err(failure)
            }
            Ok(Err(_panic)) => {
                self.metrics.load_panics.increment(1);
                tracing::error!(cache = %self.config.name, "loader panicked");
                Err(Failure::Panicked)
            }
            Err(_elapsed) => {
                self.metrics.load_timeouts.increment(1);
                tracing::warn!(
                    cache = %self.config.name,
                    timeout = ?self.config.load_timeout,
                    "load exceeded the hard timeout"
                );
                Err(Failure::Timeout(self.config.load_timeout))
            }
        }
    }

    /// Writes an entry to L1 and (best effort) L2.
    async fn fill(&self, key: &str, entry: &Arc<Entry>, now: u64) {
        self.l1.insert(key.to_owned(), Entry::clone(entry));
        self.l2_set(key, entry, now).await;
    }

    /// Records an L2 call's outcome with the breaker and metrics.
    fn l2_outcome<T>(
        &self,
        outcome: std::result::Result<Result<T>, tokio::time::error::Elapsed>,
        errors: &metrics::Counter,
    ) -> Result<T> {
        let result = outcome.unwrap_or(Err(CacheError::Timeout(self.config.l2_timeout)));
        match &result {
            Ok(_) => self.breaker.success(),
            Err(err) => {
                errors.increment(1);
                tracing::debug!(cache = %self.config.name, error = %err, "l2 call failed");
                if !matches!(
                    err,
                    CacheError::InvalidArgument(_) | CacheError::Codec { .. }
                ) {
                    self.breaker.failure();
                }
            }
        }
        result
    }

    async fn l2_set(&self, key: &str, entry: &Entry, now: u64) {
        let Some(l2) = &self.l2 else { return };
        if !self.breaker.allow() {
            self.metrics.l2_skipped.increment(1);
            return;
        }
        let call = l2.set(key, entry.encode(), entry.remaining(now).min(MAX_TTL));
        let outcome = tokio::time::timeout(self.config.l2_timeout, call).await;
        let _dropped = self.l2_outcome(outcome, &self.metrics.l2_set_errors);
    }

    /// The live entry at `key` in L2, if any; failures are misses.
    async fn l2_get(&self, key: &str, now: u64) -> Option<Arc<Entry>> {
        let l2 = self.l2.as_ref()?;
        if !self.breaker.allow() {
            self.metrics.l2_skipped.increment(1);
            return None;
        }
        let outcome = tokio::time::timeout(self.config.l2_timeout, l2.get(key)).await;
        let bytes = self
            .l2_outcome(outcome, &self.metrics.l2_get_errors)
            .ok()
            .flatten();
        self.decode_l2(bytes, now)
    }

    /// `Cache::get` after an L1 miss: L2, filling L1.
    async fn get_from_l2(&self, key: &str, now: u64) -> Result<Option<Bytes>> {
        let Some(entry) = self.l2_get(key, now).await else {
            return Ok(None);
        };
        self.l1.insert(key.to_owned(), Entry::clone(&entry));
        let fresh = entry.freshness(now) == Freshness::Fresh && entry.negative.is_none();
        Ok(fresh.then(|| entry.value.clone()))
    }

    fn decode_l2(&self, bytes: Option<Bytes>, now: u64) -> Option<Arc<Entry>> {
        let Some(bytes) = bytes else {
            self.metrics.l2_misses.increment(1);
            return None;
        };
        let Some(entry) = Entry::decode(bytes) else {
            self.metrics.corrupt.increment(1);
            self.metrics.l2_misses.increment(1);
            return None;
        };
        match entry.freshness(now) {
            Freshness::Fresh => self.metrics.l2_hits.increment(1),
            Freshness::Stale => self.metrics.l2_stale_hits.increment(1),
            Freshness::Expired => {
                self.metrics.l2_misses.increment(1);
                return None;
            }
        }
        Some(Arc::new(entry))
    }

    async fn publish(&self, key: &str) -> Result<()> {
        let Some(bus) = &self.bus else {
            return Ok(());
        };
        let sent = tokio::time::timeout(self.config.l2_timeout, bus.publish(&self.id, key)).await;
        match sent.unwrap_or(Err(CacheError::Timeout(self.config.l2_timeout))) {
            Ok(()) => {
                self.metrics.invalidations_sent.increment(1);
                Ok(())
            }
            Err(err) => {
                self.metrics.invalidation_errors.increment(1);
                tracing::warn!(cache = %self.config.name, error = %err, "invalidation not published");
                Err(err)
            }
        }
    }
}

#[async_trait]
impl Cache for Tiered {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let inner = &self.inner;
        let now = inner.clock.now_ms();
        if let Some(entry) = inner.l1.get(key)
            && entry.freshness(now) == Freshness::Fresh
        {
            inner.metrics.l1_hits.increment(1);
            return Ok(entry.negative.is_none().then_some(entry.value));
        }
        inner.metrics.l1_misses.increment(1);
        // Boxed so the L1-hit path's future stays small.
        Box::pin(inner.get_from_l2(key, now)).await
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        let ttl = normalize_ttl(ttl)?;
        let inner = &self.inner;
        let now = inner.clock.now_ms();
        let entry = Arc::new(Entry::value(value, now, ttl, inner.config.stale_for));
        inner.fill(key, &entry, now).await;
        // Others drop their copy; a failed publish is counted and logged.
        let _ = inner.publish(key).await;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.invalidate(key).await
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        let inner = &self.inner;
        let now = inner.clock.now_ms();
        let mut out = vec![None; keys.len()];
        let mut missing = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match inner.l1.get(*key) {
                Some(entry) if entry.freshness(now) == Freshness::Fresh => {
                    inner.metrics.l1_hits.increment(1);
                    out[i] = entry.negative.is_none().then(|| entry.value.clone());
                }
                _ => {
                    inner.metrics.l1_misses.increment(1);
                    missing.push(i);
                }
            }
        }
        let Some(l2) = &inner.l2 else {
            return Ok(out);
        };
        if missing.is_empty() {
            return Ok(out);
        }
        if !inner.breaker.allow() {
            inner.metrics.l2_skipped.increment(1);
            return Ok(out);
        }
        let wanted: Vec<&str> = missing.iter().map(|i| keys[*i]).collect();
        let outcome = tokio::time::timeout(inner.config.l2_timeout, l2.get_many(&wanted)).await;
        let Ok(found) = inner.l2_outcome(outcome, &inner.metrics.l2_get_errors) else {
            return Ok(out);
        };
        for (i, bytes) in missing.into_iter().zip(found) {
            if let Some(entry) = inner.decode_l2(bytes, now) {
                inner.l1.insert(keys[i].to_owned(), Entry::clone(&entry));
                if entry.freshness(now) == Freshness::Fresh && entry.negative.is_none() {
                    out[i] = Some(entry.value.clone());
                }
            }
        }
        Ok(out)
    }

    async fn set_many(&self, entries: &[(&str, Bytes)], ttl: Duration) -> Result<()> {
        let ttl = normalize_ttl(ttl)?;
        let inner = &self.inner;
        let now = inner.clock.now_ms();
        let mut encoded = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            let entry = Entry::value(value.clone(), now, ttl, inner.config.stale_for);
            encoded.push((*key, entry.encode()));
            inner.l1.insert((*key).to_owned(), entry);
        }
        if let Some(l2) = &inner.l2 {
            if inner.breaker.allow() {
                let l2_ttl = (ttl + inner.config.stale_for).min(MAX_TTL);
                let call = l2.set_many(&encoded, l2_ttl);
                let outcome = tokio::time::timeout(inner.config.l2_timeout, call).await;
                let _dropped = inner.l2_outcome(outcome, &inner.metrics.l2_set_errors);
            } else {
                inner.metrics.l2_skipped.increment(1);
            }
        }
        // Concurrently, so a slow bus costs one timeout, not one per key;
        // failures are counted and logged by `publish`.
        futures::future::join_all(entries.iter().map(|(key, _)| inner.publish(key))).await;
        Ok(())
    }

    /// Never [`shared`](CacheCapabilities::shared): another instance's L1 may
    /// serve its copy until an invalidation reaches it (or `l1_ttl`).
    /// Batches are native when L2's are.
    fn capabilities(&self) -> CacheCapabilities {
        let native_batch = self
            .inner
            .l2
            .as_ref()
            .is_some_and(|l2| l2.capabilities().native_batch);
        CacheCapabilities::default().native_batch(native_batch)
    }

    async fn ping(&self) -> Result<()> {
        match &self.inner.l2 {
            Some(l2) => tokio::time::timeout(self.inner.config.l2_timeout, l2.ping())
                .await
                .unwrap_or(Err(CacheError::Timeout(self.inner.config.l2_timeout))),
            None => Ok(()),
        }
    }
}
