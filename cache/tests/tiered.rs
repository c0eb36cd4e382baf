//! `Tiered` behaviour: coalescing, stale-while-revalidate, timeouts,
//! negative caching, jitter, early refresh, L2 fill, invalidation and
//! outages of L2, under paused time where we own the clock.
#![cfg(feature = "moka")]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use keel_cache::chaos::{ChaosCache, ChaosConfig};
use keel_cache::{Cache, CacheError, LoadFailed, LocalBus, MokaCache, Tiered, TieredConfig};
use keel_core::{ErrorKind, KeelError};
use tokio::time::Instant;

mod support;
use support::Counting;

/// The origin's own error: a message, and (through its source) a Keel
/// error kind when it has one.
#[derive(Debug, thiserror::Error)]
#[error("model does not exist")]
struct OriginError {
    #[source]
    kind: Option<Kinded>,
}

/// A registered Keel error of a given kind.
#[derive(Debug, thiserror::Error)]
#[error("kind {0}")]
struct Kinded(ErrorKind);

impl KeelError for Kinded {
    fn kind(&self) -> ErrorKind {
        self.0
    }
}
keel_core::register_error_kind!(Kinded);

type Loader<E> =
    Box<dyn FnOnce() -> futures::future::BoxFuture<'static, Result<Bytes, E>> + Send + 'static>;

/// Counts loader calls and answers `value` after `delay`.
#[derive(Clone, Default)]
struct Origin {
    calls: Arc<AtomicUsize>,
}

impl Origin {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn loader(&self, value: &'static str, delay: Duration) -> Loader<OriginError> {
        let calls = self.calls.clone();
        Box::new(move || {
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                Ok(Bytes::from_static(value.as_bytes()))
            })
        })
    }

    /// Loads `key` through `cache` with [`loader`](Self::loader)`(value,
    /// delay)`; the load must succeed.
    async fn load(&self, cache: &Tiered, key: &str, value: &'static str, delay: Duration) -> Bytes {
        cache
            .get_or_load(key, self.loader(value, delay))
            .await
            .expect("the load succeeds")
    }

    fn failing(&self, kind: Option<ErrorKind>) -> Loader<OriginError> {
        let calls = self.calls.clone();
        Box::new(move || {
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                Err(OriginError {
                    kind: kind.map(Kinded),
                })
            })
        })
    }
}

fn config() -> TieredConfig {
    TieredConfig::new("test")
        .ttl(Duration::from_secs(10))
        .l1_ttl(Duration::from_secs(10))
        .ttl_jitter(0.0)
}

fn tiered(config: TieredConfig) -> Tiered {
    Tiered::builder(config)
        .l2(MokaCache::new(Default::default()).unwrap())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_of_1000_costs_one_origin_call() {
    let counts = Counting::default();
    let cache = counts.install(|| tiered(config()));
    let origin = Origin::default();
    let mut tasks = Vec::new();
    for _ in 0..1_000 {
        let cache = cache.clone();
        let loader = origin.loader("expensive", Duration::from_millis(50));
        tasks.push(tokio::spawn(async move {
            cache.get_or_load("cold", loader).await
        }));
    }
    for task in tasks {
        assert_eq!(&task.await.unwrap().unwrap()[..], b"expensive");
    }
    assert_eq!(origin.calls(), 1);
    let c = [("cache", "test")];
    assert_eq!(counts.get("keel_cache_loads_total", &c), 1);
    let coalesced = counts.get("keel_cache_coalesced_waits_total", &c);
    let l1_hits = counts.get(
        "keel_cache_hits_total",
        &[("cache", "test"), ("tier", "l1")],
    );
    assert_eq!(coalesced + l1_hits, 999, "every other caller waited or hit");
}

#[tokio::test(start_paused = true)]
async fn stampede_under_paused_time_and_errors_are_shared() {
    let cache = tiered(config());
    let origin = Origin::default();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let cache = cache.clone();
        let loader = origin.failing(None);
        tasks.push(tokio::spawn(
            async move { cache.get_or_load("k", loader).await },
        ));
    }
    let mut errors = Vec::new();
    for task in tasks {
        let err = task.await.unwrap().unwrap_err();
        // Every waiter gets the loader's own error, typed, not a string.
        let own: Arc<OriginError> = err.into_loader_error().expect("the loader's error");
        assert!(own.kind.is_none());
        errors.push(own);
    }
    assert_eq!(origin.calls(), 1, "one load for 100 waiters");
    assert!(
        errors.iter().all(|e| Arc::ptr_eq(e, &errors[0])),
        "coalesced waiters share the one error"
    );
    // Not cached: the next call loads again.
    let _ = cache.get_or_load("k", origin.failing(None)).await;
    assert_eq!(origin.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let cache = tiered(config().stale_for(Duration::from_secs(60)));
    let origin = Origin::default();
    origin.load(&cache, "k", "v1", Duration::ZERO).await;
    tokio::time::advance(Duration::from_secs(11)).await;

    // Stale: every caller gets v1 at once; one refresh runs.
    let start = Instant::now();
    for _ in 0..10 {
        let got = origin.load(&cache, "k", "v2", Duration::from_secs(1)).await;
        assert_eq!(&got[..], b"v1");
    }
    assert_eq!(start.elapsed(), Duration::ZERO, "stale hits do not wait");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(origin.calls(), 2, "one refresh for ten stale hits");
    let got = origin.load(&cache, "k", "v3", Duration::ZERO).await;
    assert_eq!(&got[..], b"v2");

    // Past stale-until it is a miss: the caller waits for the load.
    tokio::time::advance(Duration::from_secs(75)).await;
    let start = Instant::now();
    let got = origin.load(&cache, "k", "v4", Duration::from_secs(1)).await;
    assert_eq!(&got[..], b"v4");
    assert!(start.elapsed() >= Duration::from_secs(1));
    assert_eq!(origin.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn soft_timeout_waits_a_little_for_fresh_data() {
    let cache = tiered(
        config()
            .stale_for(Duration::from_secs(60))
            .soft_timeout(Duration::from_millis(100)),
    );
    let origin = Origin::default();
    origin.load(&cache, "k", "v1", Duration::ZERO).await;
    tokio::time::advance(Duration::from_secs(11)).await;

    // A quick refresh arrives within the soft timeout: fresh data.
    let got = origin
        .load(&cache, "k", "v2", Duration::from_millis(50))
        .await;
    assert_eq!(&got[..], b"v2");

    // A slow refresh: stale data after the soft timeout, refresh goes on.
    tokio::time::advance(Duration::from_secs(11)).await;
    let start = Instant::now();
    let got = origin.load(&cache, "k", "v3", Duration::from_secs(5)).await;
    assert_eq!(&got[..], b"v2");
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let got = cache.get("k").await.unwrap();
    assert_eq!(got.as_deref(), Some(&b"v3"[..]));
}

#[tokio::test(start_paused = true)]
async fn hard_timeout_bounds_a_miss_and_stale_survives_a_hung_refresh() {
    let cache = tiered(
        config()
            .stale_for(Duration::from_secs(60))
            .soft_timeout(Duration::from_millis(200))
            .load_timeout(Duration::from_secs(1)),
    );
    let origin = Origin::default();
    let start = Instant::now();
    let err = cache
        .get_or_load("k", origin.loader("never", Duration::from_secs(3600)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, LoadFailed::Cache(CacheError::LoadTimeout(_))),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    assert_eq!(start.elapsed(), Duration::from_secs(1));

    origin.load(&cache, "k", "v1", Duration::ZERO).await;
    tokio::time::advance(Duration::from_secs(11)).await;
    let got = origin
        .load(&cache, "k", "hung", Duration::from_secs(3600))
        .await;
    assert_eq!(&got[..], b"v1");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The hung refresh was abandoned at the hard timeout; stale still serves.
    let got = origin.load(&cache, "k", "v2", Duration::ZERO).await;
    assert!(&got[..] == b"v1" || &got[..] == b"v2");
}

#[tokio::test(start_paused = true)]
async fn negative_caching_only_for_configured_kinds() {
    let cache = tiered(config().negative_ttl(ErrorKind::NotFound, Duration::from_secs(5)));
    let origin = Origin::default();

    let err = cache
        .get_or_load("missing", origin.failing(Some(ErrorKind::NotFound)))
        .await
        .unwrap_err();
    assert!(matches!(&err, LoadFailed::Loader(_)), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = cache
        .get_or_load("missing", origin.failing(Some(ErrorKind::NotFound)))
        .await
        .unwrap_err();
    match &err {
        LoadFailed::Cached(cached) => {
            assert_eq!(cached.kind(), ErrorKind::NotFound);
            assert!(
                cached.message().starts_with("model does not exist"),
                "{cached}"
            );
        }
        other => panic!("expected a cached load error, got {other:?}"),
    }
    assert!(!err.is_retryable());
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let boxed: keel_cache::BoxError = Box::new(err);
    assert_eq!(keel_core::kind_of(boxed.as_ref()), ErrorKind::NotFound);
    assert_eq!(origin.calls(), 1);
    assert_eq!(cache.get("missing").await.unwrap(), None);

    tokio::time::advance(Duration::from_secs(6)).await;
    let got = origin
        .load(&cache, "missing", "now exists", Duration::ZERO)
        .await;
    assert_eq!(&got[..], b"now exists");
    assert_eq!(origin.calls(), 2);

    // Other kinds, and errors without a kind, are never cached.
    for kind in [Some(ErrorKind::Overloaded { retry_after: None }), None] {
        let before = origin.calls();
        for _ in 0..2 {
            let _ = cache
                .get_or_load("flaky", origin.failing(kind))
                .await
                .unwrap_err();
        }
        assert_eq!(origin.calls(), before + 2, "{kind:?} was cached");
    }
}

#[tokio::test(start_paused = true)]
async fn ttl_jitter_spreads_expiry() {
    let cache = tiered(
        config()
            .ttl(Duration::from_secs(100))
            .l1_ttl(Duration::from_secs(100))
            .ttl_jitter(0.2),
    );
    let origin = Origin::default();
    for i in 0..100 {
        origin
            .load(&cache, &format!("k{i}"), "v", Duration::ZERO)
            .await;
    }
    // TTLs are spread over 80..100 s: at 90 s about half are gone.
    tokio::time::advance(Duration::from_secs(90)).await;
    let mut reloaded = 0;
    for i in 0..100 {
        let before = origin.calls();
        origin
            .load(&cache, &format!("k{i}"), "v", Duration::ZERO)
            .await;
        reloaded += origin.calls() - before;
    }
    assert!(
        (15..=85).contains(&reloaded),
        "{reloaded} of 100 keys expired at 90 s"
    );
}

#[tokio::test(start_paused = true)]
async fn early_refresh_renews_a_hot_key_before_it_expires() {
    let cache = tiered(config().early_refresh_beta(1.0));
    let origin = Origin::default();
    origin
        .load(&cache, "hot", "v1", Duration::from_secs(1))
        .await;
    // 0.5 s before expiry, a load of 1 s: most hits trigger a refresh.
    tokio::time::advance(Duration::from_millis(9_500)).await;
    for _ in 0..20 {
        let got = origin
            .load(&cache, "hot", "v2", Duration::from_secs(1))
            .await;
        assert_eq!(&got[..], b"v1", "an early refresh never makes a hit wait");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(origin.calls(), 2, "one early refresh");
    // The key never went missing: it was renewed before its expiry.
    let got = origin.load(&cache, "hot", "v3", Duration::ZERO).await;
    assert_eq!(&got[..], b"v2");
}

#[tokio::test(start_paused = true)]
async fn a_second_instance_reads_what_the_first_loaded_through_l2() {
    let l2 = Arc::new(MokaCache::new(Default::default()).unwrap());
    let a = Tiered::builder(config()).l2(l2.clone()).build().unwrap();
    let b = Tiered::builder(config()).l2(l2.clone()).build().unwrap();
    let origin = Origin::default();
    origin.load(&a, "k", "from a", Duration::ZERO).await;
    let got = origin.load(&b, "k", "from b", Duration::ZERO).await;
    assert_eq!(&got[..], b"from a");
    assert_eq!(origin.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn foreign_bytes_in_l2_are_a_counted_miss() {
    let l2 = Arc::new(MokaCache::new(Default::default()).unwrap());
    let cache = Tiered::builder(config()).l2(l2.clone()).build().unwrap();
    let origin = Origin::default();
    for garbage in [
        &b""[..],
        b"plain text",
        b"KT\x01",
        b"KT\x09garbage-version-000000000",
    ] {
        l2.set(
            "k",
            Bytes::copy_from_slice(garbage),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        cache.flush_l1();
        assert_eq!(cache.get("k").await.unwrap(), None, "{garbage:?}");
    }
    let got = origin.load(&cache, "k", "fresh", Duration::ZERO).await;
    assert_eq!(&got[..], b"fresh");
    assert_eq!(origin.calls(), 1);
}

fn loader_bug() -> Bytes {
    panic!("a loader bug")
}

#[tokio::test(start_paused = true)]
async fn a_panicking_loader_is_a_load_error_and_the_key_recovers() {
    let cache = tiered(config());
    let err = cache
        .get_or_load("k", || async { Ok::<_, Infallible>(loader_bug()) })
        .await
        .unwrap_err();
    assert!(
        matches!(err, LoadFailed::Cache(CacheError::LoaderPanicked)),
        "{err:?}"
    );
    let origin = Origin::default();
    let got = origin.load(&cache, "k", "ok", Duration::ZERO).await;
    assert_eq!(&got[..], b"ok");
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_caller_does_not_cancel_the_load() {
    let cache = tiered(config());
    let origin = Origin::default();
    let caller = cache.get_or_load("k", origin.loader("v", Duration::from_secs(1)));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), caller)
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cache.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(origin.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn typed_loads_round_trip() {
    let cache = tiered(config());
    let got: Vec<u32> = cache
        .get_or_load_json("v", || async { Ok::<_, Infallible>(vec![1, 2, 3]) })
        .await
        .unwrap();
    assert_eq!(got, vec![1, 2, 3]);
    assert_eq!(
        cache.get("v").await.unwrap().as_deref(),
        Some(&b"[1,2,3]"[..])
    );
    let again: Vec<u32> = cache
        .get_or_load_json("v", || async { Ok::<_, Infallible>(vec![9]) })
        .await
        .unwrap();
    assert_eq!(again, vec![1, 2, 3]);
}

/// Waits (in small real-time steps) until `check` holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_reaches_a_second_instance() {
    let l2 = Arc::new(MokaCache::new(Default::default()).unwrap());
    let bus = LocalBus::new(1024).unwrap();
    let a = Tiered::builder(config())
        .l2(l2.clone())
        .invalidation(bus.clone())
        .build()
        .unwrap();
    let b = Tiered::builder(config())
        .l2(l2.clone())
        .invalidation(bus.clone())
        .build()
        .unwrap();
    // Let both listeners subscribe (their first event flushes L1).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let origin = Origin::default();
    origin.load(&a, "k", "v1", Duration::ZERO).await;
    origin.load(&b, "k", "unused", Duration::ZERO).await;
    assert_eq!(origin.calls(), 1, "b filled its L1 from L2");

    support::update_and_invalidation_reach(&a, &b, "k").await;
    let got = origin.load(&b, "k", "v3", Duration::ZERO).await;
    assert_eq!(&got[..], b"v3");
}

/// An L2 behind a chaos decorator with faults off; tests turn them on.
fn chaotic_l2() -> Arc<ChaosCache<MokaCache>> {
    Arc::new(
        ChaosCache::new(
            MokaCache::new(Default::default()).unwrap(),
            ChaosConfig::new(1),
        )
        .unwrap(),
    )
}

/// Sets the decorator's faults, keeping its seed.
fn faults(l2: &ChaosCache<MokaCache>, configure: impl FnOnce(ChaosConfig) -> ChaosConfig) {
    let seed = l2.config().seed;
    l2.set_config(configure(ChaosConfig::new(seed))).unwrap();
}

#[tokio::test(start_paused = true)]
async fn l2_outage_falls_through_to_origin_and_the_breaker_comes_back() {
    let l2 = chaotic_l2();
    let cache = Tiered::builder(
        config()
            .l2_timeout(Duration::from_millis(50))
            .breaker(3, Duration::from_secs(5)),
    )
    .l2(l2.clone())
    .build()
    .unwrap();
    let origin = Origin::default();

    // L2 hangs: every request still succeeds, each within the L2 timeout
    // (a get and a set per load until the breaker opens).
    faults(&l2, |c| c.drop_rate(1.0));
    for i in 0..10 {
        let start = Instant::now();
        let got = origin
            .load(&cache, &format!("k{i}"), "origin", Duration::ZERO)
            .await;
        assert_eq!(&got[..], b"origin");
        assert!(
            start.elapsed() <= Duration::from_millis(100),
            "{:?}",
            start.elapsed()
        );
    }
    assert_eq!(origin.calls(), 10);
    assert!(cache.l2_breaker_open());
    let calls_when_open = l2.injected().calls;
    assert!(
        calls_when_open <= 3,
        "{calls_when_open} l2 calls before opening"
    );

    // Open: L2 is skipped entirely.
    for i in 10..20 {
        origin
            .load(&cache, &format!("k{i}"), "origin", Duration::ZERO)
            .await;
    }
    assert_eq!(l2.injected().calls, calls_when_open);

    // L2 fails fast instead: after the cooldown the probe fails, it stays open.
    faults(&l2, |c| c.error_rate(1.0));
    tokio::time::advance(Duration::from_secs(5)).await;
    origin
        .load(&cache, "probe-1", "origin", Duration::ZERO)
        .await;
    assert!(cache.l2_breaker_open());

    // L2 is back: the next probe closes the breaker and L2 fills again.
    faults(&l2, |c| c);
    tokio::time::advance(Duration::from_secs(5)).await;
    origin
        .load(&cache, "probe-2", "origin", Duration::ZERO)
        .await;
    assert!(!cache.l2_breaker_open());
    cache
        .set("after", "v".into(), Duration::from_secs(10))
        .await
        .unwrap();
    let stored = l2.inner().get("after").await.unwrap();
    assert!(stored.is_some(), "writes reach L2 again");
}

#[tokio::test(start_paused = true)]
async fn writes_to_a_dead_l2_are_dropped_not_failed() {
    let l2 = chaotic_l2();
    faults(&l2, |c| c.error_rate(1.0));
    let cache = Tiered::builder(config()).l2(l2.clone()).build().unwrap();
    cache
        .set("k", "v".into(), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(cache.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    // Deletion reports that L2 did not take it, after clearing L1.
    let err = cache.invalidate("k").await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(cache.get("k").await.unwrap(), None);
}

#[test]
fn public_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let cache = tiered(config());
    let origin = Origin::default();
    assert_send(&cache.get_or_load("k", origin.loader("v", Duration::ZERO)));
    assert_send(&cache.get_or_load_json::<u32, _, _, Infallible>("k", || async { Ok(1) }));
    assert_send(
        &cache.get_or_load_with_codec("k", &keel_cache::HttpCodec, || async {
            Ok::<http::Response<Bytes>, Infallible>(http::Response::new(Bytes::new()))
        }),
    );
    assert_send(&cache.invalidate("k"));
    assert_send(&cache.get("k"));
    let dyn_cache: Arc<dyn Cache> = Arc::new(cache.clone());
    assert_send(&dyn_cache.get("k"));
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tiered>();
    assert_send_sync::<MokaCache>();
    assert_send_sync::<LocalBus>();
}

#[tokio::test(start_paused = true)]
async fn a_failure_remembered_by_another_instance_comes_back_by_kind() {
    let l2 = Arc::new(MokaCache::new(Default::default()).unwrap());
    let config = || config().negative_ttl(ErrorKind::InvalidInput, Duration::from_secs(5));
    let a = Tiered::builder(config()).l2(l2.clone()).build().unwrap();
    let b = Tiered::builder(config()).l2(l2.clone()).build().unwrap();
    let origin = Origin::default();
    let err = a
        .get_or_load("bad", origin.failing(Some(ErrorKind::InvalidInput)))
        .await
        .unwrap_err();
    assert!(err.loader_error().is_some());
    // B never ran the loader: it reads the remembered failure from L2.
    let err = b
        .get_or_load("bad", origin.loader("unused", Duration::ZERO))
        .await
        .unwrap_err();
    match &err {
        LoadFailed::Cached(cached) => assert_eq!(cached.kind(), ErrorKind::InvalidInput),
        other => panic!("{other:?}"),
    }
    assert_eq!(origin.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn each_caller_gets_its_own_error_type() {
    let cache = tiered(config());
    let origin = Origin::default();
    let slow_failure = origin.failing(None);
    let typed = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.get_or_load("k", slow_failure).await })
    };
    let io = cache
        .get_or_load("k", || async {
            Err::<Bytes, _>(std::io::Error::other("io, not OriginError"))
        })
        .await
        .unwrap_err();
    let io: Arc<std::io::Error> = io.into_loader_error().unwrap();
    assert_eq!(io.to_string(), "io, not OriginError");
    let typed: Arc<OriginError> = typed
        .await
        .unwrap()
        .unwrap_err()
        .into_loader_error()
        .unwrap();
    assert!(typed.kind.is_none());
}
