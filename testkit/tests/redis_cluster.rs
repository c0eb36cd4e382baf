//! A spawned Redis Cluster: start, write across slots, kill a master, see
//! its replica promoted with the keys intact.
#![cfg(feature = "redis")]

use std::time::Duration;

use keel_testkit::{RedisCluster, key_slot};
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

/// The longest a failover may take here: the node timeout is one second,
/// the election a second or two more.
const FAILOVER_WITHIN: Duration = Duration::from_secs(20);

async fn connect(url: &str) -> MultiplexedConnection {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// One key per master at least: keys whose slots spread over the range.
fn keys() -> Vec<String> {
    (0..64).map(|i| format!("key:{i}")).collect()
}

#[tokio::test]
async fn a_killed_master_is_replaced_by_its_replica_with_its_keys() {
    let mut cluster = RedisCluster::start().await.unwrap();
    assert_eq!(cluster.len(), 6);
    let urls = cluster.urls();
    assert_eq!(urls.len(), 6);

    // The kit's slots are Redis's.
    let mut con = connect(&urls[0]).await;
    for key in ["foo", "somekey", "{user1000}.following", "{}x", "a{b}c"] {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(key_slot(key.as_bytes()), slot, "{key}");
    }

    // Write each key on its master; the keys land on all three.
    let mut masters = Vec::new();
    for key in keys() {
        let master = cluster.master_for_key(&key).await.unwrap();
        let mut con = connect(&urls[master]).await;
        keel_testkit::set_marked(&mut con, &key).await;
        // Acknowledged by the replica too, so the failover keeps it.
        keel_testkit::assert_replicated(&mut con, Duration::from_millis(4000)).await;
        if !masters.contains(&master) {
            masters.push(master);
        }
    }
    assert_eq!(masters.len(), 3, "keys landed on {masters:?} only");

    // A wrong node answers MOVED: this is a real cluster.
    let victim = cluster.master_for_key("key:0").await.unwrap();
    let wrong = masters.iter().copied().find(|&m| m != victim).unwrap();
    let err = redis::cmd("GET")
        .arg("key:0")
        .query_async::<Option<String>>(&mut connect(&urls[wrong]).await)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("MOVED"), "{err}");

    let started = Instant::now();
    cluster.kill(victim);
    assert!(!cluster.is_running(victim));
    cluster.wait_healthy(FAILOVER_WITHIN).await.unwrap();
    let took = started.elapsed();
    let promoted = cluster.master_for_key("key:0").await.unwrap();
    assert_ne!(promoted, victim);
    assert!(cluster.is_running(promoted));

    // Every key is readable on its (possibly new) master.
    for key in keys() {
        let master = cluster.master_for_key(&key).await.unwrap();
        let value: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut connect(&urls[master]).await)
            .await
            .unwrap();
        assert_eq!(value, Some(format!("v-{key}")), "{key} on node {master}");
    }

    // The old master comes back as a replica; the cluster stays whole.
    cluster.restart(victim).await.unwrap();
    cluster.wait_healthy(FAILOVER_WITHIN).await.unwrap();
    assert_eq!(cluster.master_for_key("key:0").await.unwrap(), promoted);
    let role: Vec<redis::Value> = redis::cmd("ROLE")
        .query_async(&mut connect(&urls[victim]).await)
        .await
        .unwrap();
    assert_eq!(
        role.first(),
        Some(&redis::Value::BulkString(b"slave".to_vec())),
        "{role:?}"
    );
    eprintln!("failover took {took:?}");
}

#[tokio::test]
async fn dropping_the_cluster_kills_every_node() {
    let cluster = RedisCluster::start().await.unwrap();
    let addrs: Vec<_> = (0..cluster.len()).map(|i| cluster.node(i).addr()).collect();
    let dirs: Vec<_> = (0..cluster.len())
        .map(|i| cluster.node(i).dir().to_owned())
        .collect();
    drop(cluster);
    for (addr, dir) in addrs.iter().zip(&dirs) {
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "{addr} still accepts connections"
        );
        assert!(!dir.exists(), "{} was not removed", dir.display());
    }
}

#[tokio::test]
async fn a_shared_cluster_lives_while_a_handle_does() {
    let (a, b) = tokio::join!(RedisCluster::shared(), RedisCluster::shared());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    let addr = a.node(0).addr();
    drop(a);
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    drop(b);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "{addr} still accepts connections after the last handle was dropped"
    );
}
