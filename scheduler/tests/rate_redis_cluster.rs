//! The Redis-shared rate limiter on a Redis Cluster of the tests' own:
//! tenants on every shard keep their limits across two instances, a
//! settlement is exact across replicas, and a master's failover fails
//! closed (when so configured) and keeps the tenant's state.
#![cfg(feature = "cluster")]

use std::time::Duration;

use keel_core::redis::{RedisConfig, RedisPool, key_slot};
use keel_scheduler::{
    Rate, RateDecision, RateLimit, RateLimitConfig, RedisRateLimitConfig, RedisRateLimiter,
    SchedulerError, TenantId, TenantRates,
};
use keel_testkit::RedisCluster;
use tokio::time::{Instant, timeout};

/// The longest a failover may take here: the nodes notice a dead master
/// after one second, the election takes a second or two more.
const FAILOVER_WITHIN: Duration = Duration::from_secs(20);

fn cluster_config(cluster: &RedisCluster) -> RedisConfig {
    RedisConfig::cluster(cluster.urls())
        .connect_timeout(Duration::from_secs(2))
        .operation_timeout(Duration::from_secs(1))
}

async fn limiter(cluster: &RedisCluster, limits: RateLimitConfig) -> RedisRateLimiter {
    RedisRateLimiter::connect(
        RedisRateLimitConfig::with_redis(cluster_config(cluster), limits)
            .operation_timeout(Duration::from_millis(500))
            .fail_open(false),
    )
    .await
    .expect("connect the limiter to the cluster")
}

/// A tenant of limit `name` whose keys (`keel:rl:{<name>:<tenant>}:…`)
/// live on each master, in master order.
async fn tenant_per_master(cluster: &RedisCluster, name: &str) -> Vec<(usize, TenantId)> {
    let mut found: Vec<(usize, TenantId)> = Vec::new();
    for i in 0.. {
        let tenant = format!("tenant-{i}");
        let slot = key_slot(format!("{name}:{tenant}").as_bytes());
        let master = cluster.master_for_slot(slot).await.unwrap();
        if !found.iter().any(|(m, _)| *m == master) {
            found.push((master, TenantId::new(tenant)));
        }
        if found.len() == 3 {
            break;
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_across_two_instances_for_tenants_on_every_shard() {
    timeout(Duration::from_secs(60), async {
        let cluster = RedisCluster::shared().await.expect("start a redis cluster");
        // The cluster is this process's own: fixed names do not collide.
        let name = "limits";
        let limits = RateLimitConfig::new(name)
            .default_rates(TenantRates::default().requests(Rate::per_minute(3).burst(3)));
        let (a, b) = (
            limiter(&cluster, limits.clone()).await,
            limiter(&cluster, limits).await,
        );
        for (master, tenant) in tenant_per_master(&cluster, name).await {
            // Three between the two instances, then both are limited.
            for (i, instance) in [&a, &b, &a].into_iter().enumerate() {
                assert_eq!(
                    instance.acquire(&tenant, 1).await.unwrap(),
                    RateDecision::Allow,
                    "request {i} of {tenant:?} on master {master}"
                );
            }
            for instance in [&a, &b] {
                assert!(
                    matches!(
                        instance.acquire(&tenant, 1).await.unwrap(),
                        RateDecision::Limited { .. }
                    ),
                    "{tenant:?} on master {master} is over its limit"
                );
            }
        }
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlements_are_exact_across_replicas_on_a_cluster() {
    timeout(Duration::from_secs(60), async {
        let cluster = RedisCluster::shared().await.expect("start a redis cluster");
        let name = "settle";
        let limits = RateLimitConfig::new(name)
            .default_rates(TenantRates::default().cost(Rate::per_minute(6_000).burst(1_000)));
        let (a, b) = (
            limiter(&cluster, limits.clone()).await,
            limiter(&cluster, limits).await,
        );
        for (master, tenant) in tenant_per_master(&cluster, name).await {
            assert_eq!(a.acquire(&tenant, 600).await.unwrap(), RateDecision::Allow);
            assert!(
                matches!(
                    b.acquire(&tenant, 600).await.unwrap(),
                    RateDecision::Limited { .. }
                ),
                "400 left for B ({tenant:?} on master {master})"
            );
            // A used 100 of its 600: 500 come back, B fits now.
            a.settle(&tenant, 600, 100).await.unwrap();
            assert_eq!(b.acquire(&tenant, 600).await.unwrap(), RateDecision::Allow);
        }
    })
    .await
    .expect("bounded in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_fails_closed_and_keeps_the_tenant_state() {
    timeout(Duration::from_secs(90), async {
        let mut cluster = RedisCluster::start().await.expect("start a redis cluster");
        let name = "failover";
        let limits = RateLimitConfig::new(name)
            .default_rates(TenantRates::default().requests(Rate::per_minute(2).burst(2)));
        let limiter = limiter(&cluster, limits).await;
        let (victim, tenant) = tenant_per_master(&cluster, name).await.remove(0);
        assert_eq!(
            limiter.acquire(&tenant, 1).await.unwrap(),
            RateDecision::Allow
        );
        assert_eq!(
            limiter.acquire(&tenant, 1).await.unwrap(),
            RateDecision::Allow
        );
        // The replica has the tenant's state before its master dies.
        let pool = RedisPool::connect(cluster_config(&cluster)).await.unwrap();
        keel_testkit::assert_replicated(
            &mut pool.connection().await.unwrap(),
            Duration::from_millis(900),
        )
        .await;

        cluster.kill(victim);
        let started = Instant::now();
        let mut failures = 0;
        let decision = loop {
            match limiter.acquire(&tenant, 1).await {
                Ok(decision) => break decision,
                Err(err) => {
                    assert!(matches!(err, SchedulerError::RateLimiter { .. }), "{err:?}");
                    assert!(err.is_retryable(), "{err:?}");
                    failures += 1;
                }
            }
            assert!(
                started.elapsed() < FAILOVER_WITHIN,
                "no decision {FAILOVER_WITHIN:?} after the kill ({failures} failures)"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // The promoted replica remembers the two requests.
        assert!(
            matches!(decision, RateDecision::Limited { .. }),
            "{decision:?}"
        );
        cluster.wait_healthy(FAILOVER_WITHIN).await.unwrap();
        assert_ne!(
            cluster
                .master_for_slot(key_slot(format!("{name}:{}", tenant.as_str()).as_bytes()))
                .await
                .unwrap(),
            victim
        );
    })
    .await
    .expect("bounded in time");
}
