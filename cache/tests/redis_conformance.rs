//! The conformance suite on the Redis backend, against the real server at
//! `REDIS_URL` (default `redis://127.0.0.1:6379`), on `PrefixCache` over
//! one Redis cache, and on a cache built on an application's `RedisPool`.
#![cfg(feature = "redis")]

use std::time::Duration;

use futures::StreamExt;
use keel_cache::conformance::CacheSubject;
use keel_cache::{
    BusEvent, Cache, InvalidationBus, PrefixCache, RedisCache, RedisCacheConfig,
    RedisInvalidationBus, RedisInvalidationConfig,
};
use keel_core::redis::{RedisConfig, RedisPool};
use keel_testkit::{Namespace, redis_cleanup, require_redis};

/// A cache on the shared Redis whose keys start with `prefix`, with a guard
/// that deletes the keys containing `namespace` when the case ends.
async fn redis_cache(prefix: &str, namespace: &str) -> (RedisCache, Namespace) {
    let url = require_redis().await;
    let cleanup = Namespace::new("redis-cache-conformance");
    let (cleanup_url, namespace) = (url.clone(), namespace.to_owned());
    cleanup.on_drop(move || {
        let _ = redis_cleanup(&cleanup_url, &namespace);
    });
    // A loaded CI machine running many cases at once: keep the default's
    // spirit (fail fast) with room for scheduling noise.
    let config = RedisCacheConfig::new(url)
        .prefix(prefix)
        .operation_timeout(Duration::from_millis(500));
    let cache = RedisCache::connect(config).await.expect("connect to redis");
    (cache, cleanup)
}

keel_cache::cache_conformance!(redis, |namespace: String| async move {
    let (cache, cleanup) = redis_cache(&namespace, &namespace).await;
    CacheSubject::new(cache).with_guard(cleanup)
});

keel_cache::cache_conformance!(redis_prefix, |namespace: String| async move {
    let (cache, cleanup) = redis_cache("keel-conf-shared-", &namespace).await;
    CacheSubject::new(PrefixCache::new(cache, namespace)).with_guard(cleanup)
});

/// A cache on a pool built by the application (as a gateway shares one
/// with its queue and rate limiter), with the same clean-up guard.
async fn pooled_cache(namespace: &str) -> (RedisCache, Namespace) {
    let url = require_redis().await;
    let cleanup = Namespace::new("redis-cache-shared-pool");
    let (cleanup_url, prefix) = (url.clone(), namespace.to_owned());
    cleanup.on_drop(move || {
        let _ = redis_cleanup(&cleanup_url, &prefix);
    });
    let pool = RedisPool::connect(RedisConfig::new(url).pool_size(2))
        .await
        .expect("connect to redis");
    let config = RedisCacheConfig::default()
        .prefix(namespace)
        .operation_timeout(Duration::from_millis(500));
    let cache = RedisCache::with_pool(pool, config).expect("valid config");
    (cache, cleanup)
}

keel_cache::cache_conformance!(redis_shared_pool, |namespace: String| async move {
    let (cache, cleanup) = pooled_cache(&namespace).await;
    CacheSubject::new(cache).with_guard(cleanup)
});

#[tokio::test]
async fn one_pool_serves_two_caches_and_the_bus() {
    let url = require_redis().await;
    let ns = Namespace::new("shared-pool");
    let (cleanup_url, prefix) = (url.clone(), ns.prefix().to_owned());
    ns.on_drop(move || {
        let _ = redis_cleanup(&cleanup_url, &prefix);
    });
    let pool = RedisPool::connect(RedisConfig::new(url.clone()).pool_size(2))
        .await
        .unwrap();
    let config = |tenant: &str| {
        RedisCacheConfig::default()
            .prefix(format!("{}:{tenant}:", ns.prefix()))
            .operation_timeout(Duration::from_millis(500))
    };
    let a = RedisCache::with_pool(pool.clone(), config("a")).unwrap();
    let b = RedisCache::with_pool(pool.clone(), config("b")).unwrap();
    a.set("k", "from a".into(), Duration::from_secs(60))
        .await
        .unwrap();
    b.set("k", "from b".into(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(a.get("k").await.unwrap().as_deref(), Some(&b"from a"[..]));
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some(&b"from b"[..]));
    // The keys are where the prefix says, on the one server.
    let client = ::redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let raw: Option<Vec<u8>> = ::redis::cmd("GET")
        .arg(format!("{}:a:k", ns.prefix()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(raw.is_some_and(|v| v.ends_with(b"from a")));
    assert_eq!(a.pool().config().pool_size, 2);

    // The invalidation bus publishes on the same pool.
    let bus = RedisInvalidationBus::with_pool(
        pool.clone(),
        RedisInvalidationConfig::default()
            .channel(ns.name("channel"))
            .operation_timeout(Duration::from_millis(500)),
    )
    .unwrap();
    let mut events = bus.subscribe();
    assert_eq!(events.next().await, Some(BusEvent::Subscribed));
    bus.publish("instance-1", "k").await.unwrap();
    assert_eq!(
        events.next().await,
        Some(BusEvent::Invalidate {
            origin: "instance-1".into(),
            key: "k".into()
        })
    );
}
