//! The Redis Streams backend on a Redis Cluster of the tests' own (3
//! masters, 3 replicas, started by `keel_testkit::RedisCluster`; the test
//! fails with the install command when `redis-server` or `redis-cli` is
//! missing): the conformance suite, waiting consumers that must not hold up
//! the commands of others on the same node, and a master killed under a
//! producer and a consumer.
//!
//! Every test uses queue names of its own. The conformance cases share one
//! cluster while any of them runs (it is stopped, its data gone, when the
//! last one ends); the tests that kill a node start their own.
#![cfg(feature = "cluster")]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use keel_core::redis::{RedisConfig, RedisPool};
use keel_queue::conformance::{QueueSubject, namespace};
use keel_queue::{DequeueOptions, Job, Queue, QueueConfig, RedisQueue, RedisQueueConfig};
use keel_testkit::RedisCluster;
use tokio::time::Instant;

fn cluster_config(cluster: &RedisCluster) -> RedisConfig {
    RedisConfig::cluster(cluster.urls())
        .connect_timeout(Duration::from_secs(2))
        .operation_timeout(Duration::from_secs(2))
}

/// A queue on `cluster` with `config`.
async fn cluster_queue(cluster: &RedisCluster, config: QueueConfig) -> RedisQueue {
    RedisQueue::connect(RedisQueueConfig::with_redis(
        cluster_config(cluster),
        config,
    ))
    .await
    .expect("connect to the redis cluster")
}

keel_queue::queue_conformance!(redis_cluster, |config: QueueConfig| async move {
    let cluster = RedisCluster::shared().await.expect("start a redis cluster");
    let queue = cluster_queue(&cluster, config).await;
    // The cluster (and every key of the case) goes when the last case
    // holding it ends.
    QueueSubject::new(queue).with_guard(cluster)
});

/// The slot key of queue `name` (every key of it shares the hash tag).
fn queue_key(name: &str) -> String {
    format!("keel:{{{name}}}:delayed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_pool_serves_the_queue() {
    let cluster = RedisCluster::shared().await.expect("start a redis cluster");
    let pool = RedisPool::connect(cluster_config(&cluster))
        .await
        .expect("connect to the redis cluster");
    let name = namespace("cluster-pool");
    let queue = RedisQueue::with_pool(
        pool.clone(),
        RedisQueueConfig::with_redis(pool.config().clone(), QueueConfig::new(&name)),
    )
    .await
    .expect("a cluster pool is accepted");
    queue.enqueue(Job::new("hello")).await.unwrap();
    let got = queue
        .dequeue(DequeueOptions::new(1).wait(Duration::from_secs(2)))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].payload[..], b"hello");
    queue.ack(&got[0].receipt).await.unwrap();
    queue.delete().await.unwrap();
}

/// Consumers blocked waiting on one queue take dedicated connections: a
/// queue on the same master, used meanwhile through the shared cluster
/// connection, answers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_consumers_do_not_hold_up_the_node() {
    let cluster = RedisCluster::shared().await.expect("start a redis cluster");
    let idle_name = namespace("cluster-idle");
    let master = cluster.master_for_key(queue_key(&idle_name)).await.unwrap();
    // A busy queue whose slot the same master serves.
    let mut busy_name = String::new();
    for i in 0.. {
        busy_name = format!("{idle_name}-busy-{i}");
        if cluster.master_for_key(queue_key(&busy_name)).await.unwrap() == master {
            break;
        }
    }
    let pool = RedisPool::connect(cluster_config(&cluster)).await.unwrap();
    let idle = RedisQueue::with_pool(
        pool.clone(),
        RedisQueueConfig::with_redis(pool.config().clone(), QueueConfig::new(&idle_name))
            .max_block(Duration::from_secs(3)),
    )
    .await
    .unwrap();
    let busy = RedisQueue::with_pool(
        pool.clone(),
        RedisQueueConfig::with_redis(pool.config().clone(), QueueConfig::new(&busy_name)),
    )
    .await
    .unwrap();
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let idle = idle.clone();
            tokio::spawn(async move {
                idle.dequeue(DequeueOptions::new(1).wait(Duration::from_secs(3)))
                    .await
            })
        })
        .collect();
    // Let them reach their blocking read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    for i in 0..20 {
        busy.enqueue(Job::new(format!("job-{i}"))).await.unwrap();
        let got = busy
            .dequeue(DequeueOptions::new(1).wait(Duration::from_secs(1)))
            .await
            .unwrap();
        assert_eq!(got.len(), 1, "round {i}");
        busy.ack(&got[0].receipt).await.unwrap();
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "20 enqueue/dequeue/ack rounds took {took:?} while consumers waited on the same node"
    );
    for waiter in waiters {
        assert!(waiter.await.unwrap().unwrap().is_empty());
    }
    // A job for the idle queue wakes a waiting consumer promptly.
    let waiter = {
        let idle = idle.clone();
        tokio::spawn(async move {
            idle.dequeue(DequeueOptions::new(1).wait(Duration::from_secs(5)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = Instant::now();
    idle.enqueue(Job::new("wake")).await.unwrap();
    let got = waiter.await.unwrap().unwrap();
    assert_eq!(got.len(), 1);
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "{:?}",
        sent.elapsed()
    );
    idle.delete().await.unwrap();
    busy.delete().await.unwrap();
}

/// `delete` removes every key of the queue (delayed bodies, idempotency
/// keys, dead letters), whichever node holds its slot, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_finds_the_queue_on_its_node() {
    let cluster = RedisCluster::shared().await.expect("start a redis cluster");
    let names: Vec<String> = (0..6)
        .map(|i| namespace(&format!("cluster-del-{i}")))
        .collect();
    let mut queues = Vec::new();
    for name in &names {
        let queue = cluster_queue(&cluster, QueueConfig::new(name)).await;
        queue
            .enqueue(Job::new("later").delay(Duration::from_secs(60)))
            .await
            .unwrap();
        queue
            .enqueue(Job::new("once").idempotency_key("k"))
            .await
            .unwrap();
        queue.enqueue(Job::new("now")).await.unwrap();
        queues.push(queue);
    }
    let (first, rest) = queues.split_first().unwrap();
    first.delete().await.unwrap();
    let stats = first.stats().await.unwrap();
    assert_eq!((stats.ready, stats.delayed), (0, 0));
    let again = first
        .enqueue(Job::new("once").idempotency_key("k"))
        .await
        .unwrap();
    assert!(!again.duplicate, "the idempotency key went with the queue");
    let mut seen = BTreeSet::new();
    for queue in rest {
        let stats = queue.stats().await.unwrap();
        assert_eq!(
            (stats.ready, stats.delayed),
            (2, 1),
            "other queues untouched"
        );
        seen.insert(queue.config().queue.name.clone());
        queue.delete().await.unwrap();
    }
    first.delete().await.unwrap();
    assert_eq!(seen.len(), rest.len());
    let _keep: Arc<RedisCluster> = cluster;
}
