//! The conformance suite on the Redis backend, against the real server at
//! `REDIS_URL` (default `redis://127.0.0.1:6379`), and on `PrefixCache` over
//! one Redis cache.
#![cfg(feature = "redis")]

use std::time::Duration;

use keel_cache::conformance::Subject;
use keel_cache::{PrefixCache, RedisCache, RedisCacheConfig};
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
    Subject::new(cache).with_guard(cleanup)
});

keel_cache::cache_conformance!(redis_prefix, |namespace: String| async move {
    let (cache, cleanup) = redis_cache("keel-conf-shared-", &namespace).await;
    Subject::new(PrefixCache::new(cache, namespace)).with_guard(cleanup)
});
