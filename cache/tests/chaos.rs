//! The `ChaosCache` decorator: transparent with faults off (the whole
//! conformance suite passes through it), reproducible by seed, and the
//! faults it injects are absorbed by `Tiered`.
#![cfg(all(feature = "chaos", feature = "moka"))]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use keel_cache::chaos::{ChaosCache, ChaosConfig};
use keel_cache::conformance::CacheSubject;
use keel_cache::{Cache, CacheError, MokaCache, Tiered, TieredConfig};
use tokio::time::Instant;

mod support;
use support::Counting;

fn moka() -> MokaCache {
    MokaCache::new(Default::default()).expect("valid config")
}

keel_cache::cache_conformance!(chaos_off, |_namespace: String| async move {
    CacheSubject::new(ChaosCache::new(moka(), ChaosConfig::new(7)).expect("valid config"))
});

keel_cache::cache_conformance!(tiered_over_chaos_off, |_namespace: String| async move {
    let l2 = ChaosCache::new(moka(), ChaosConfig::new(7)).expect("valid config");
    CacheSubject::new(
        Tiered::builder(TieredConfig::new("conformance"))
            .l2(l2)
            .build()
            .expect("valid config"),
    )
});

/// The outcome of each of `n` sequential `get`s: `true` for an error.
async fn error_pattern(seed: u64, n: usize) -> Vec<bool> {
    let chaos = ChaosCache::new(moka(), ChaosConfig::new(seed).error_rate(0.5)).unwrap();
    let mut pattern = Vec::with_capacity(n);
    for i in 0..n {
        pattern.push(chaos.get(&format!("k{i}")).await.is_err());
    }
    pattern
}

#[tokio::test]
async fn the_same_seed_injects_the_same_faults() {
    let a = error_pattern(42, 200).await;
    let b = error_pattern(42, 200).await;
    let c = error_pattern(43, 200).await;
    assert_eq!(a, b, "same seed, same faults");
    assert_ne!(a, c, "another seed, other faults");
    let errors = a.iter().filter(|e| **e).count();
    assert!((60..=140).contains(&errors), "{errors} errors at 50 %");
}

#[tokio::test(start_paused = true)]
async fn faults_are_what_they_say() {
    let chaos = ChaosCache::new(moka(), ChaosConfig::new(1).error_rate(1.0)).unwrap();
    let err = chaos
        .set("k", "v".into(), Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::Unavailable { .. }) && err.is_retryable());
    assert_eq!(
        chaos.inner().get("k").await.unwrap(),
        None,
        "an error never reaches the inner cache"
    );

    // A dropped reply: the write lands, the caller never hears back.
    chaos
        .set_config(ChaosConfig::new(1).drop_rate(1.0))
        .unwrap();
    let dropped = tokio::time::timeout(
        Duration::from_secs(5),
        chaos.set("k", "v".into(), Duration::from_secs(60)),
    )
    .await;
    assert!(dropped.is_err(), "no answer");
    assert_eq!(
        chaos.inner().get("k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );

    // Latency on every call.
    chaos
        .set_config(ChaosConfig::new(1).latency(Duration::from_millis(300)))
        .unwrap();
    let start = Instant::now();
    assert!(chaos.get("k").await.unwrap().is_some());
    assert_eq!(start.elapsed(), Duration::from_millis(300));

    let stats = chaos.injected();
    assert_eq!(
        (stats.calls, stats.errors, stats.dropped, stats.delayed),
        (3, 1, 1, 1)
    );
    assert!(
        chaos
            .set_config(ChaosConfig::new(1).error_rate(2.0))
            .is_err()
    );
    assert!(ChaosCache::new(moka(), ChaosConfig::new(1).latency_rate(-0.1)).is_err());
}

fn config() -> TieredConfig {
    TieredConfig::new("chaos")
        .ttl(Duration::from_secs(10))
        .l1_ttl(Duration::from_secs(10))
        .ttl_jitter(0.0)
        .l2_timeout(Duration::from_millis(50))
}

/// A loader that counts its calls and answers at once.
fn origin(
    calls: &Arc<AtomicUsize>,
) -> impl FnOnce() -> futures::future::BoxFuture<'static, Result<Bytes, Infallible>> + Send + 'static
{
    let calls = calls.clone();
    move || {
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(Bytes::from_static(b"origin"))
        })
    }
}

#[tokio::test(start_paused = true)]
async fn an_l2_failing_every_call_costs_no_request() {
    let counts = Counting::default();
    let l2 = Arc::new(ChaosCache::new(moka(), ChaosConfig::new(3).error_rate(1.0)).unwrap());
    // A breaker that never opens, so every request meets the failing L2.
    let cache = counts.install(|| {
        Tiered::builder(config().breaker(u32::MAX, Duration::from_secs(1)))
            .l2(l2.clone())
            .build()
            .unwrap()
    });
    let calls = Arc::new(AtomicUsize::new(0));
    for i in 0..100 {
        let got = cache
            .get_or_load(&format!("k{i}"), origin(&calls))
            .await
            .expect("an L2 outage never fails a request");
        assert_eq!(got, "origin");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        100,
        "every request from origin"
    );
    let stats = l2.injected();
    assert_eq!(stats.errors, 200, "a get and a set per request, all failed");
    let labels = |op| [("cache", "chaos"), ("op", op)];
    assert_eq!(
        counts.get("keel_cache_l2_errors_total", &labels("get")),
        100
    );
    assert_eq!(
        counts.get("keel_cache_l2_errors_total", &labels("set")),
        100
    );
    // Served from L1 afterwards: no more origin calls.
    cache.get_or_load("k0", origin(&calls)).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 100);
}

#[tokio::test(start_paused = true)]
async fn latency_spikes_on_half_the_l2_calls_stay_within_the_l2_timeout() {
    let l2 = Arc::new(
        ChaosCache::new(
            moka(),
            ChaosConfig::new(11)
                .latency(Duration::from_secs(2))
                .latency_rate(0.5),
        )
        .unwrap(),
    );
    let cache = Tiered::builder(config().breaker(u32::MAX, Duration::from_secs(1)))
        .l2(l2.clone())
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut slowest = Duration::ZERO;
    for i in 0..100 {
        let start = Instant::now();
        let got = cache
            .get_or_load(&format!("k{i}"), origin(&calls))
            .await
            .unwrap();
        assert_eq!(got, "origin");
        slowest = slowest.max(start.elapsed());
    }
    // At most two L2 calls (a get, then a set) each cut at 50 ms.
    assert!(slowest <= Duration::from_millis(100), "slowest {slowest:?}");
    assert!(
        slowest >= Duration::from_millis(50),
        "some calls were slowed"
    );
    let stats = l2.injected();
    assert!(
        (60..=140).contains(&stats.delayed),
        "{} of 200 delayed",
        stats.delayed
    );
    assert_eq!(calls.load(Ordering::SeqCst), 100);
}

#[tokio::test(start_paused = true)]
async fn dropped_replies_cost_one_l2_timeout_and_the_write_still_lands() {
    let l2 = Arc::new(ChaosCache::new(moka(), ChaosConfig::new(5).drop_rate(1.0)).unwrap());
    let cache = Tiered::builder(config().breaker(u32::MAX, Duration::from_secs(1)))
        .l2(l2.clone())
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    cache.get_or_load("k", origin(&calls)).await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(100),
        "two L2 timeouts"
    );
    assert!(
        l2.inner().get("k").await.unwrap().is_some(),
        "the set reached L2"
    );
    assert_eq!(l2.injected().dropped, 2);
}
