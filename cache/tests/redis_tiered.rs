//! `Tiered` over real Redis: the conformance suite, a stampede, foreign
//! bytes, outages through `FaultProxy` (blackhole, cut) and a killed
//! `RedisServer`, and invalidation over pub/sub with resubscribe-and-flush.
#![cfg(all(feature = "redis", feature = "moka"))]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use keel_cache::conformance::CacheSubject;
use keel_cache::{
    Cache, RedisCache, RedisCacheConfig, RedisInvalidationBus, RedisInvalidationConfig, Tiered,
    TieredConfig,
};
use keel_testkit::{FaultProxy, Namespace, RedisServer, redis_cleanup, require_redis};
use tokio::time::Instant;

mod support;
use support::{Counting, eventually};

fn config() -> TieredConfig {
    TieredConfig::new("redis-test")
        .ttl(Duration::from_secs(30))
        .l1_ttl(Duration::from_secs(30))
        .ttl_jitter(0.0)
}

/// A namespace whose Redis keys are deleted when it drops.
fn namespace(url: &str, test: &str) -> Namespace {
    let ns = Namespace::new(test);
    let (url, prefix) = (url.to_owned(), ns.prefix().to_owned());
    ns.on_drop(move || {
        let _ = redis_cleanup(&url, &prefix);
    });
    ns
}

fn redis_l2(url: &str, ns: &Namespace, timeout: Duration) -> RedisCache {
    RedisCache::new(
        RedisCacheConfig::new(url)
            .prefix(format!("{}:", ns.prefix()))
            .operation_timeout(timeout),
    )
    .unwrap()
}

fn counting_loader(
    calls: &Arc<AtomicUsize>,
    value: &'static str,
    delay: Duration,
) -> impl FnOnce() -> futures::future::BoxFuture<'static, Result<Bytes, Infallible>> + Send + 'static
{
    let calls = calls.clone();
    move || {
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            Ok(Bytes::from_static(value.as_bytes()))
        })
    }
}

keel_cache::cache_conformance!(tiered_redis, |namespace: String| async move {
    let url = require_redis().await;
    let ns = self::namespace(&url, &namespace);
    // A generous L2 bound: CI machines are loaded.
    let tiered =
        Tiered::builder(TieredConfig::new("conformance").l2_timeout(Duration::from_millis(600)))
            .l2(redis_l2(&url, &ns, Duration::from_millis(500)))
            .build()
            .unwrap();
    CacheSubject::new(tiered).with_guard(ns)
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_over_redis_costs_one_origin_call() {
    let url = require_redis().await;
    let ns = namespace(&url, "stampede");
    let cache = Tiered::builder(config().l2_timeout(Duration::from_millis(500)))
        .l2(redis_l2(&url, &ns, Duration::from_millis(500)))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..1_000 {
        let cache = cache.clone();
        let loader = counting_loader(&calls, "expensive", Duration::from_millis(50));
        tasks.push(tokio::spawn(async move {
            cache.get_or_load("cold", loader).await
        }));
    }
    for task in tasks {
        assert_eq!(&task.await.unwrap().unwrap()[..], b"expensive");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The value reached L2: a second instance reads it without loading.
    let other = Tiered::builder(config().l2_timeout(Duration::from_millis(500)))
        .l2(redis_l2(&url, &ns, Duration::from_millis(500)))
        .build()
        .unwrap();
    let got = other
        .get_or_load("cold", counting_loader(&calls, "again", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(&got[..], b"expensive");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bytes_not_ours_in_redis_are_misses() {
    let url = require_redis().await;
    let ns = namespace(&url, "foreign-bytes");
    let counts = Counting::default();
    let (l2, cache) = counts.install(|| {
        let l2 = redis_l2(&url, &ns, Duration::from_millis(500));
        let cache = Tiered::builder(config().l2_timeout(Duration::from_millis(500)))
            .l2(l2.clone())
            .build()
            .unwrap();
        (l2, cache)
    });
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{}:k", ns.prefix());
    let foreign: [&[u8]; 5] = [
        b"written by another program",
        b"",
        b"\xCA\xC4",            // our frame, truncated
        b"\xCA\xC4\x09payload", // our frame, a future version
        b"\xCA\xC4\x01KT\x01",  // our frame around a truncated Tiered envelope
    ];
    let calls = Arc::new(AtomicUsize::new(0));
    for bytes in foreign {
        redis::cmd("SET")
            .arg(&key)
            .arg(bytes)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        cache.flush_l1();
        if bytes.starts_with(b"\xCA\xC4\x01") {
            assert!(
                l2.get("k").await.unwrap().is_some(),
                "framed: a value to RedisCache"
            );
        } else {
            assert_eq!(l2.get("k").await.unwrap(), None, "{bytes:?}");
        }
        assert_eq!(cache.get("k").await.unwrap(), None, "{bytes:?}");
        let got = cache
            .get_or_load("k", counting_loader(&calls, "origin", Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(&got[..], b"origin");
    }
    assert_eq!(calls.load(Ordering::SeqCst), foreign.len());
    // Counted: unframed bytes by the Redis backend (read by `l2.get` and by
    // `cache.get`, `get_or_load`), a framed non-envelope by `Tiered`.
    let by_redis = counts.get("keel_cache_corrupt_total", &[("backend", "redis")]);
    let by_tiered = counts.get("keel_cache_corrupt_total", &[("backend", "tiered")]);
    assert_eq!(by_redis, 4 * 3, "redis corrupt count");
    assert_eq!(by_tiered, 2, "tiered corrupt count");
    // The last load replaced the foreign bytes with a real entry.
    cache.flush_l1();
    assert_eq!(
        cache.get("k").await.unwrap().as_deref(),
        Some(&b"origin"[..])
    );
}

/// Runs `n` loads of distinct keys and checks each succeeds with origin
/// data within `bound`.
async fn loads_succeed(
    cache: &Tiered,
    calls: &Arc<AtomicUsize>,
    tag: &str,
    n: usize,
    bound: Duration,
) {
    for i in 0..n {
        let start = Instant::now();
        let got = cache
            .get_or_load(
                &format!("{tag}-{i}"),
                counting_loader(calls, "origin", Duration::ZERO),
            )
            .await
            .expect("a cache outage never fails a request");
        assert_eq!(&got[..], b"origin");
        let took = start.elapsed();
        assert!(took <= bound, "request {i} took {took:?} (bound {bound:?})");
    }
}

/// Waits (in real time, bounded) until a load leaves the breaker closed.
async fn breaker_closes(cache: &Tiered, calls: &Arc<AtomicUsize>) {
    let start = Instant::now();
    let mut i = 0;
    while cache.l2_breaker_open() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "breaker still open 10 s after redis came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        i += 1;
        cache
            .get_or_load(
                &format!("probe-{i}"),
                counting_loader(calls, "origin", Duration::ZERO),
            )
            .await
            .unwrap();
    }
}

/// Once Redis is back: the breaker closes, and a value written through
/// the cache is read back from L2 (L1 flushed).
async fn recovers(cache: &Tiered, calls: &Arc<AtomicUsize>) {
    breaker_closes(cache, calls).await;
    cache
        .set("after", "v".into(), Duration::from_secs(30))
        .await
        .unwrap();
    cache.flush_l1();
    assert_eq!(
        cache.get("after").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
}

fn outage_config() -> TieredConfig {
    config()
        .l2_timeout(Duration::from_millis(150))
        .breaker(3, Duration::from_millis(300))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_blackholed_then_back() {
    let url = require_redis().await;
    let ns = namespace(&url, "blackhole");
    let proxy = FaultProxy::start_for_url(&url).await.unwrap();
    let counts = Counting::default();
    let cache = counts.install(|| {
        Tiered::builder(outage_config())
            .l2(redis_l2(
                &proxy.url_for(&url),
                &ns,
                Duration::from_millis(100),
            ))
            .build()
            .unwrap()
    });
    let calls = Arc::new(AtomicUsize::new(0));
    loads_succeed(&cache, &calls, "warm", 5, Duration::from_secs(1)).await;
    assert!(!cache.l2_breaker_open());

    proxy.blackhole();
    // Each request waits at most two L2 timeouts (a get and a set) before
    // the breaker opens, then none.
    loads_succeed(
        &cache,
        &calls,
        "dark",
        30,
        Duration::from_millis(100) * 2 + Duration::from_millis(400),
    )
    .await;
    assert!(cache.l2_breaker_open(), "the breaker opened");
    let start = Instant::now();
    loads_succeed(&cache, &calls, "dark-open", 20, Duration::from_millis(100)).await;
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "an open breaker skips L2"
    );
    let labels = |op| [("cache", "redis-test"), ("op", op)];
    let errors = counts.get("keel_cache_l2_errors_total", &labels("get"))
        + counts.get("keel_cache_l2_errors_total", &labels("set"));
    assert!((3..=10).contains(&errors), "{errors} l2 errors counted");
    assert!(counts.get("keel_cache_l2_skipped_total", &[("cache", "redis-test")]) >= 20);
    assert_eq!(
        counts.get(
            "keel_cache_l2_breaker_opened_total",
            &[("cache", "redis-test")]
        ),
        1
    );

    proxy.restore();
    recovers(&cache, &calls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connections_cut() {
    let url = require_redis().await;
    let ns = namespace(&url, "cut");
    let proxy = FaultProxy::start_for_url(&url).await.unwrap();
    let cache = Tiered::builder(outage_config())
        .l2(redis_l2(
            &proxy.url_for(&url),
            &ns,
            Duration::from_millis(100),
        ))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    loads_succeed(&cache, &calls, "warm", 5, Duration::from_secs(1)).await;
    for round in 0..5 {
        proxy.cut();
        loads_succeed(
            &cache,
            &calls,
            &format!("cut-{round}"),
            5,
            Duration::from_millis(600),
        )
        .await;
    }
    // Refused connections: fail fast, the breaker opens, and it closes again.
    proxy.refuse();
    proxy.cut();
    loads_succeed(&cache, &calls, "refused", 20, Duration::from_millis(600)).await;
    assert!(cache.l2_breaker_open());
    proxy.restore();
    recovers(&cache, &calls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_server_killed_and_restarted() {
    let mut server = RedisServer::start().await.expect("spawn redis-server");
    let ns = Namespace::new("killed");
    let cache = Tiered::builder(outage_config())
        .l2(redis_l2(&server.url(), &ns, Duration::from_millis(100)))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    loads_succeed(&cache, &calls, "warm", 5, Duration::from_secs(1)).await;
    let warm_calls = calls.load(Ordering::SeqCst);
    cache.flush_l1();
    loads_succeed(&cache, &calls, "warm", 5, Duration::from_secs(1)).await;
    assert_eq!(calls.load(Ordering::SeqCst), warm_calls, "served from L2");

    server.kill();
    loads_succeed(&cache, &calls, "dead", 30, Duration::from_millis(600)).await;
    assert!(cache.l2_breaker_open());

    server.restart().await.expect("restart redis-server");
    recovers(&cache, &calls).await;
}

/// Waits (in real time, bounded) until `check` holds.
fn bus(url: &str, channel: &str) -> RedisInvalidationBus {
    RedisInvalidationBus::new(
        RedisInvalidationConfig::new(url)
            .channel(channel)
            .operation_timeout(Duration::from_millis(500))
            .health_check_interval(Duration::from_millis(200))
            .reconnect(Duration::from_millis(50), Duration::from_millis(200)),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_reaches_another_instance_and_resubscribes_after_a_cut() {
    let url = require_redis().await;
    let ns = namespace(&url, "invalidation");
    let channel = ns.name("channel");
    let proxy = FaultProxy::start_for_url(&url).await.unwrap();
    let a = Tiered::builder(config().l2_timeout(Duration::from_millis(500)))
        .l2(redis_l2(&url, &ns, Duration::from_millis(500)))
        .invalidation(bus(&url, &channel))
        .build()
        .unwrap();
    // B hears invalidations through the proxy; its L2 is direct.
    let b = Tiered::builder(config().l2_timeout(Duration::from_millis(500)))
        .l2(redis_l2(&url, &ns, Duration::from_millis(500)))
        .invalidation(bus(&proxy.url_for(&url), &channel))
        .build()
        .unwrap();
    eventually("b subscribed", async || proxy.open_connections() > 0).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let calls = Arc::new(AtomicUsize::new(0));
    a.get_or_load("k", counting_loader(&calls, "v1", Duration::ZERO))
        .await
        .unwrap();
    let got = b
        .get_or_load("k", counting_loader(&calls, "unused", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(&got[..], b"v1");

    // An update through A reaches B's L1.
    a.set("k", "v2".into(), Duration::from_secs(30))
        .await
        .unwrap();
    eventually("b sees v2", async || {
        b.get("k").await.unwrap().as_deref() == Some(&b"v2"[..])
    })
    .await;

    // B's subscription is cut and cannot come back: it misses an update.
    proxy.refuse();
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.set("k", "v3".into(), Duration::from_secs(30))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        b.get("k").await.unwrap().as_deref(),
        Some(&b"v2"[..]),
        "without its subscription B keeps its L1 copy"
    );

    // It resubscribes and, having possibly missed messages, flushes L1.
    proxy.restore();
    eventually("b flushed its L1 and reads v3", async || {
        b.get("k").await.unwrap().as_deref() == Some(&b"v3"[..])
    })
    .await;

    // And it hears invalidations again.
    a.invalidate("k").await.unwrap();
    eventually("b misses after invalidate", async || {
        b.get("k").await.unwrap().is_none()
    })
    .await;
}
