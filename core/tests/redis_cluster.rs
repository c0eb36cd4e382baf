//! A `RedisPool` on a Redis Cluster of the test's own: commands reach the
//! master of their slot, and a master's failover is retryable while it
//! lasts, then invisible.
#![cfg(feature = "cluster")]

use std::time::Duration;

use keel_core::redis::{RedisConfig, RedisError, RedisPool};
use keel_testkit::RedisCluster;
use tokio::time::Instant;

/// The longest a failover may take here: the nodes notice a dead master
/// after one second, the election takes a second or two more.
const FAILOVER_WITHIN: Duration = Duration::from_secs(20);

fn keys() -> Vec<String> {
    (0..64).map(|i| format!("key:{i}")).collect()
}

#[tokio::test]
async fn a_cluster_pool_follows_slots_and_failovers() {
    let mut cluster = RedisCluster::start().await.unwrap();
    let config = RedisConfig::cluster(cluster.urls())
        .connect_timeout(Duration::from_secs(2))
        .operation_timeout(Duration::from_secs(1));
    let pool = RedisPool::connect(config).await.unwrap();
    assert!(pool.is_cluster());
    assert!(pool.deadpool().is_none());
    assert_eq!(
        pool.single_server("the test").unwrap_err().field,
        "redis.cluster_urls"
    );

    // Keys of every master, through one connection.
    let mut con = pool.connection().await.unwrap();
    for key in keys() {
        keel_testkit::set_marked(&mut con, &key).await;
    }
    // Every master's replica has them (`WAIT` goes to every master and
    // answers the smallest count), so the failover keeps them.
    keel_testkit::assert_replicated(&mut con, Duration::from_millis(900)).await;
    let mut masters: Vec<usize> = Vec::new();
    for key in keys() {
        let master = cluster.master_for_key(&key).await.unwrap();
        if !masters.contains(&master) {
            masters.push(master);
        }
    }
    assert_eq!(masters.len(), 3, "the keys reach every master");

    let victim = cluster.master_for_key("key:0").await.unwrap();
    cluster.kill(victim);
    let started = Instant::now();
    let mut failures = 0;
    loop {
        let mut con = pool.connection().await.unwrap();
        let answer = redis::cmd("GET")
            .arg("key:0")
            .query_async::<Option<String>>(&mut con)
            .await;
        match answer {
            Ok(value) => {
                assert_eq!(value.as_deref(), Some("v-key:0"));
                break;
            }
            Err(err) => {
                let err = RedisError::from(err);
                assert!(err.is_retryable(), "a failover must be retryable: {err:?}");
                failures += 1;
            }
        }
        assert!(
            started.elapsed() < FAILOVER_WITHIN,
            "key:0 still unreadable after {FAILOVER_WITHIN:?} ({failures} failures)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.wait_healthy(FAILOVER_WITHIN).await.unwrap();
    assert_ne!(cluster.master_for_key("key:0").await.unwrap(), victim);

    // Every key, the failed-over ones included, through the same pool.
    let mut con = pool.connection().await.unwrap();
    for key in keys() {
        let value: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(value, Some(format!("v-{key}")));
    }
    pool.ping().await.unwrap();
}
