//! The Redis backend on a Redis Cluster of the tests' own: the conformance
//! suite (keys spread over the shards, keys all in one slot through a
//! hash-tagged prefix, `PrefixCache` over it, and `Tiered` with the
//! cluster as L2), the invalidation bus across nodes and between two
//! `Tiered` instances, and a master's failover.
#![cfg(feature = "cluster")]

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keel_cache::conformance::CacheSubject;
use keel_cache::{
    BusEvent, Cache, CacheError, InvalidationBus, PrefixCache, RedisCache, RedisCacheConfig,
    RedisInvalidationBus, RedisInvalidationConfig,
};
use keel_core::redis::{RedisConfig, RedisPool, key_slot};
use keel_testkit::RedisCluster;
use tokio::time::Instant;

mod support;

/// The longest a failover may take here: the nodes notice a dead master
/// after one second, the election takes a second or two more.
const FAILOVER_WITHIN: Duration = Duration::from_secs(20);

fn cluster_config(cluster: &RedisCluster) -> RedisConfig {
    RedisConfig::cluster(cluster.urls())
        .connect_timeout(Duration::from_secs(2))
        .operation_timeout(Duration::from_secs(1))
}

/// A cache on the shared cluster whose keys start with `prefix`; the
/// cluster lives as long as the returned handle.
async fn cluster_cache(prefix: &str) -> (RedisCache, Arc<RedisCluster>) {
    let cluster = RedisCluster::shared().await.expect("start a redis cluster");
    let pool = RedisPool::connect(cluster_config(&cluster))
        .await
        .expect("connect to the redis cluster");
    // Room for scheduling noise on a loaded machine, as on one server.
    let config = RedisCacheConfig::default()
        .prefix(prefix)
        .operation_timeout(Duration::from_millis(500));
    let cache = RedisCache::with_pool(pool, config).expect("valid config");
    (cache, cluster)
}

// Keys spread over every shard: batches are grouped per slot.
keel_cache::cache_conformance!(redis_cluster, |namespace: String| async move {
    let (cache, cluster) = cluster_cache(&namespace).await;
    CacheSubject::new(cache).with_guard(cluster)
});

// Every key of the cache in one slot: a hash tag in the prefix.
keel_cache::cache_conformance!(redis_cluster_tagged, |namespace: String| async move {
    let (cache, cluster) = cluster_cache(&format!("{{{namespace}}}")).await;
    CacheSubject::new(cache).with_guard(cluster)
});

keel_cache::cache_conformance!(redis_cluster_prefix, |namespace: String| async move {
    let (cache, cluster) = cluster_cache("keel-conf-cluster-").await;
    CacheSubject::new(PrefixCache::new(cache, namespace)).with_guard(cluster)
});

#[tokio::test]
async fn a_batch_spans_every_shard() {
    let (cache, cluster) = cluster_cache("spans:").await;
    let keys: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
    let entries: Vec<(&str, bytes::Bytes)> = keys
        .iter()
        .map(|k| (k.as_str(), bytes::Bytes::from(k.clone())))
        .collect();
    cache
        .set_many(&entries, Duration::from_secs(60))
        .await
        .unwrap();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let got = cache.get_many(&refs).await.unwrap();
    for (key, value) in keys.iter().zip(&got) {
        assert_eq!(value.as_deref(), Some(key.as_bytes()));
    }
    // The keys are on all three masters.
    let mut masters = Vec::new();
    for key in &keys {
        let master = cluster
            .master_for_slot(key_slot(format!("spans:{key}").as_bytes()))
            .await
            .unwrap();
        if !masters.contains(&master) {
            masters.push(master);
        }
    }
    assert_eq!(masters.len(), 3, "{masters:?}");
}

/// A bus on `pool` whose subscriptions start at `seeds[0]`.
fn bus_on(pool: RedisPool, channel: &str) -> RedisInvalidationBus {
    RedisInvalidationBus::with_pool(
        pool,
        RedisInvalidationConfig::default()
            .channel(channel)
            .operation_timeout(Duration::from_millis(500))
            .health_check_interval(Duration::from_millis(200))
            .reconnect(Duration::from_millis(50), Duration::from_millis(200)),
    )
    .unwrap()
}

/// The next event, bounded.
async fn next_event(events: &mut futures::stream::BoxStream<'static, BusEvent>) -> BusEvent {
    tokio::time::timeout(FAILOVER_WITHIN, events.next())
        .await
        .expect("an event within the bound")
        .expect("the stream does not end")
}

#[tokio::test]
async fn an_invalidation_reaches_subscribers_on_other_nodes() {
    let cluster = RedisCluster::shared().await.unwrap();
    let urls = cluster.urls();
    // Two instances whose subscriptions sit on different nodes.
    let mut rotated = urls.clone();
    rotated.rotate_left(3);
    let first = RedisPool::new(cluster_config(&cluster)).unwrap();
    let second = RedisPool::new(
        RedisConfig::cluster(rotated)
            .connect_timeout(Duration::from_secs(2))
            .operation_timeout(Duration::from_secs(1)),
    )
    .unwrap();
    let channel = format!("keel-cluster-bus-{}", uuid::Uuid::new_v4().simple());
    let (a, b) = (bus_on(first, &channel), bus_on(second, &channel));
    let (mut from_a, mut from_b) = (a.subscribe(), b.subscribe());
    assert_eq!(next_event(&mut from_a).await, BusEvent::Subscribed);
    assert_eq!(next_event(&mut from_b).await, BusEvent::Subscribed);
    a.publish("instance-a", "k1").await.unwrap();
    b.publish("instance-b", "k2").await.unwrap();
    for events in [&mut from_a, &mut from_b] {
        let mut seen = vec![next_event(events).await, next_event(events).await];
        seen.sort_by_key(|event| format!("{event:?}"));
        assert_eq!(
            seen,
            vec![
                BusEvent::Invalidate {
                    origin: "instance-a".into(),
                    key: "k1".into()
                },
                BusEvent::Invalidate {
                    origin: "instance-b".into(),
                    key: "k2".into()
                },
            ]
        );
    }
}

#[tokio::test]
async fn a_master_failover_is_retryable_and_the_bus_moves_to_another_node() {
    let mut cluster = RedisCluster::start().await.unwrap();
    let pool = RedisPool::connect(cluster_config(&cluster)).await.unwrap();
    let cache = RedisCache::with_pool(
        pool.clone(),
        RedisCacheConfig::default()
            .prefix("failover:")
            .operation_timeout(Duration::from_millis(500)),
    )
    .unwrap();
    // The bus subscribes at the first seed, node 0: the victim.
    let bus = bus_on(pool.clone(), "keel-cluster-failover");
    let mut events = bus.subscribe();
    assert_eq!(next_event(&mut events).await, BusEvent::Subscribed);

    // Keys on every master, the victim's among them.
    let keys: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
    let entries: Vec<(&str, bytes::Bytes)> = keys
        .iter()
        .map(|k| (k.as_str(), bytes::Bytes::from(k.clone())))
        .collect();
    cache
        .set_many(&entries, Duration::from_secs(600))
        .await
        .unwrap();
    // Acknowledged by every master's replica, so the failover keeps them.
    keel_testkit::assert_replicated(
        &mut pool.connection().await.unwrap(),
        Duration::from_millis(900),
    )
    .await;
    let victim = 0;
    let mut on_victim = None;
    for key in &keys {
        if cluster
            .master_for_key(format!("failover:{key}"))
            .await
            .unwrap()
            == victim
        {
            on_victim = Some(key.clone());
            break;
        }
    }
    let on_victim = on_victim.expect("node 0 is a master with some of the keys");

    cluster.kill(victim);
    let started = Instant::now();
    let mut failures = 0;
    loop {
        match cache.get(&on_victim).await {
            Ok(value) => {
                assert_eq!(value.as_deref(), Some(on_victim.as_bytes()));
                break;
            }
            Err(err) => {
                assert!(err.is_retryable(), "a failover must be retryable: {err:?}");
                assert!(matches!(
                    err,
                    CacheError::Unavailable { .. } | CacheError::Timeout(_)
                ));
                failures += 1;
            }
        }
        assert!(
            started.elapsed() < FAILOVER_WITHIN,
            "{on_victim} still unreadable after {FAILOVER_WITHIN:?} ({failures} failures)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let got = cache.get_many(&refs).await.unwrap();
    for (key, value) in keys.iter().zip(&got) {
        assert_eq!(value.as_deref(), Some(key.as_bytes()), "{key}");
    }

    // The subscription noticed its node was gone and moved to the next
    // seed; invalidations flow again.
    assert_eq!(next_event(&mut events).await, BusEvent::Subscribed);
    bus.publish("instance-1", "k").await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        BusEvent::Invalidate {
            origin: "instance-1".into(),
            key: "k".into()
        }
    );
}

#[cfg(feature = "moka")]
mod tiered {
    use super::*;
    use keel_cache::{Tiered, TieredConfig};

    fn config(name: &str) -> TieredConfig {
        TieredConfig::new(name)
            .ttl(Duration::from_secs(30))
            .l1_ttl(Duration::from_secs(30))
            .ttl_jitter(0.0)
            .l2_timeout(Duration::from_millis(600))
    }

    keel_cache::cache_conformance!(tiered_redis_cluster, |namespace: String| async move {
        let (l2, cluster) = cluster_cache(&namespace).await;
        let tiered = Tiered::builder(config("conformance"))
            .l2(l2)
            .build()
            .unwrap();
        CacheSubject::new(tiered).with_guard(cluster)
    });

    /// Waits (in real time, bounded) until `check` holds.
    /// Two instances (their subscriptions on different nodes) share the
    /// cluster as L2 and invalidate each other's L1.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_tiered_instances_share_the_cluster_and_its_invalidations() {
        let cluster = RedisCluster::shared().await.unwrap();
        let prefix = format!("tiered-{}:", uuid::Uuid::new_v4().simple());
        let channel = format!("{prefix}channel");
        let instance = |rotate: usize| {
            let mut seeds = cluster.urls();
            seeds.rotate_left(rotate);
            let pool = RedisPool::new(
                RedisConfig::cluster(seeds)
                    .connect_timeout(Duration::from_secs(2))
                    .operation_timeout(Duration::from_secs(1)),
            )
            .unwrap();
            let l2 = RedisCache::with_pool(
                pool.clone(),
                RedisCacheConfig::default()
                    .prefix(&prefix)
                    .operation_timeout(Duration::from_millis(500)),
            )
            .unwrap();
            Tiered::builder(config("instances"))
                .l2(l2)
                .invalidation(bus_on(pool, &channel))
                .build()
                .unwrap()
        };
        let (a, b) = (instance(0), instance(3));
        // Let both subscriptions come up, so the updates below travel as
        // invalidations (one that came up late would flush its L1 instead,
        // and the checks would hold all the same).
        tokio::time::sleep(Duration::from_millis(300)).await;

        a.set("k", "v1".into(), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(b.get("k").await.unwrap().as_deref(), Some(&b"v1"[..]));
        // B now holds v1 in its L1; an update through A reaches it.
        support::update_and_invalidation_reach(&a, &b, "k").await;
    }
}
