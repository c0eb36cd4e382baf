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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keel_core::redis::{RedisConfig, RedisPool};
use keel_queue::conformance::{QueueSubject, namespace};
use keel_queue::{
    DequeueOptions, Job, Queue, QueueConfig, QueueError, RedisQueue, RedisQueueConfig,
};
use keel_testkit::{RedisCluster, RedisServer};
use parking_lot::Mutex;
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

/// With `replica_acks` set and no replica to confirm, an enqueue fails
/// (retryable, saying what to check) instead of returning `Ok` for a write
/// only the master holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_acks_without_replicas_fail_the_enqueue() {
    let server = RedisServer::start().await.expect("start a redis-server");
    for job in [Job::new("plain"), Job::new("keyed").idempotency_key("k")] {
        let queue = RedisQueue::connect(
            RedisQueueConfig::new(server.url(), QueueConfig::new(namespace("no-replica")))
                .replica_acks(1, Duration::from_millis(50)),
        )
        .await
        .unwrap();
        let err = queue.enqueue(job).await.unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("only 0 of 1 replicas confirmed") && text.contains("INFO replication"),
            "{text}"
        );
    }
}

/// Jobs the failover test enqueues in all.
const FAILOVER_JOBS: u64 = 1_000;
/// Jobs confirmed before the master is killed.
const KILL_AFTER: u64 = 300;
/// The longest a failover (and the old master's return as a replica) may
/// take here.
const FAILOVER_WITHIN: Duration = Duration::from_secs(30);

/// `enqueue` with `replica_acks` returns `Ok` only for jobs a replica
/// holds: the queue's slot master is killed (`SIGKILL`) under a producer
/// and a consumer, its replica takes over, and every job whose enqueue
/// returned `Ok` is delivered, none lost. Neither the producer nor the
/// consumer is rebuilt: they retry retryable errors and carry on against
/// the promoted replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_acked_jobs_survive_a_master_failover() {
    let mut cluster = RedisCluster::start().await.expect("start a redis cluster");
    let name = namespace("cluster-failover");
    let master = cluster.master_for_key(queue_key(&name)).await.unwrap();
    let queue = RedisQueue::connect(
        RedisQueueConfig::with_redis(cluster_config(&cluster), QueueConfig::new(&name))
            .replica_acks(1, Duration::from_millis(500))
            .max_block(Duration::from_millis(500)),
    )
    .await
    .unwrap();

    let confirmed = Arc::new(Mutex::new(BTreeSet::<u64>::new()));
    let enqueue_errors = Arc::new(AtomicU64::new(0));
    let producer = {
        let (queue, confirmed, errors) = (queue.clone(), confirmed.clone(), enqueue_errors.clone());
        tokio::spawn(async move {
            let give_up = Instant::now() + Duration::from_secs(90);
            for i in 0..FAILOVER_JOBS {
                // Half the jobs go through the enqueue script (idempotency
                // key), half through the plain transaction.
                let job = || {
                    let job = Job::new(i.to_string());
                    if i % 2 == 0 {
                        job.idempotency_key(format!("job-{i}"))
                    } else {
                        job
                    }
                };
                loop {
                    match queue.enqueue(job()).await {
                        Ok(_) => {
                            confirmed.lock().insert(i);
                            break;
                        }
                        Err(err) => {
                            assert!(err.is_retryable(), "enqueue failed for good: {err:?}");
                            errors.fetch_add(1, Ordering::Relaxed);
                            assert!(Instant::now() < give_up, "enqueues failed for 90 s: {err}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        })
    };

    let delivered = Arc::new(Mutex::new(BTreeSet::<u64>::new()));
    let deliveries = Arc::new(AtomicU64::new(0));
    let consumer_errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (queue, delivered, deliveries, errors, stop) = (
            queue.clone(),
            delivered.clone(),
            deliveries.clone(),
            consumer_errors.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let options = DequeueOptions::new(32)
                .wait(Duration::from_millis(500))
                .lease(Duration::from_secs(5));
            while !stop.load(Ordering::Relaxed) {
                let batch = match queue.dequeue(options).await {
                    Ok(batch) => batch,
                    Err(err) => {
                        assert!(err.is_retryable(), "dequeue failed for good: {err:?}");
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                for delivery in &batch {
                    let i: u64 = std::str::from_utf8(&delivery.payload)
                        .unwrap()
                        .parse()
                        .unwrap();
                    delivered.lock().insert(i);
                    deliveries.fetch_add(1, Ordering::Relaxed);
                }
                let receipts: Vec<_> = batch.into_iter().map(|d| d.receipt).collect();
                match queue.ack_batch(&receipts).await {
                    // A lost ack only means a second delivery.
                    Ok(()) | Err(QueueError::InvalidReceipt(_)) => {}
                    Err(err) => {
                        assert!(err.is_retryable(), "ack failed for good: {err:?}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    // Kill the queue's master once enough jobs are confirmed.
    let wait_for = Instant::now() + Duration::from_secs(60);
    while (confirmed.lock().len() as u64) < KILL_AFTER {
        assert!(
            Instant::now() < wait_for,
            "the producer is stuck before the kill"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let confirmed_at_kill = confirmed.lock().len();
    // Until the old master rejoins (as a replica of the promoted one),
    // every enqueue fails: nothing confirms it.
    let failover = cluster
        .fail_over(master, FAILOVER_WITHIN)
        .await
        .expect("a replica takes over and the old master rejoins");
    let promoted_after = failover.promoted_at - failover.killed_at;
    assert_ne!(
        cluster.master_for_key(queue_key(&name)).await.unwrap(),
        master,
        "the slot moved to the promoted replica"
    );

    tokio::time::timeout(Duration::from_secs(120), producer)
        .await
        .expect("the producer finishes")
        .expect("the producer did not panic");
    let confirmed = confirmed.lock().clone();
    let drain_until = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = confirmed.difference(&delivered.lock()).count();
        if missing == 0 || Instant::now() >= drain_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    consumer.await.expect("the consumer did not panic");
    let delivered = delivered.lock().clone();
    let lost: Vec<u64> = confirmed.difference(&delivered).copied().collect();
    println!(
        "failover: enqueued Ok {} (of {FAILOVER_JOBS}; {} before the kill), enqueue errors {}, \
         delivered {} distinct in {} deliveries, lost {}, consumer errors retried {}, \
         replica promoted after {promoted_after:?}",
        confirmed.len(),
        confirmed_at_kill,
        enqueue_errors.load(Ordering::Relaxed),
        delivered.len(),
        deliveries.load(Ordering::Relaxed),
        lost.len(),
        consumer_errors.load(Ordering::Relaxed),
    );
    assert_eq!(confirmed.len() as u64, FAILOVER_JOBS);
    assert!(
        lost.is_empty(),
        "jobs confirmed by a replica were lost: {lost:?}"
    );
    queue.delete().await.unwrap();
}

/// A sharded queue over three Redis queues (`name#0` … `name#2`, three
/// slots): jobs spread evenly, each is delivered once, keyed jobs dedup
/// across handles, and stats and `delete` cover every shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_queue_spreads_over_slots() {
    use keel_queue::ShardedQueue;

    let cluster = RedisCluster::shared().await.expect("start a redis cluster");
    let name = namespace("cluster-sharded");
    let open = || async {
        let mut shards = Vec::new();
        for i in 0..3 {
            shards.push(cluster_queue(&cluster, QueueConfig::new(format!("{name}#{i}"))).await);
        }
        ShardedQueue::new(shards).unwrap()
    };
    let (producer, consumer) = (open().await, open().await);
    for i in 0..30 {
        producer
            .enqueue(Job::new(format!("single-{i}")))
            .await
            .unwrap();
    }
    for b in 0..27 {
        let jobs = (0..10)
            .map(|i| Job::new(format!("batch-{b}-{i}")))
            .collect();
        producer.enqueue_batch(jobs).await.unwrap();
    }
    let first = producer
        .enqueue(Job::new("keyed").idempotency_key("k"))
        .await
        .unwrap();
    let again = consumer
        .enqueue(Job::new("keyed").idempotency_key("k"))
        .await
        .unwrap();
    assert!(again.duplicate && again.id == first.id, "{again:?}");
    for shard in producer.shards() {
        let ready = shard.stats().await.unwrap().ready;
        assert!(
            (90..=101).contains(&ready),
            "round-robin spreads jobs: {ready}"
        );
    }
    assert_eq!(consumer.stats().await.unwrap().ready, 301);
    let mut seen = BTreeSet::new();
    while seen.len() < 301 {
        let batch = consumer
            .dequeue(DequeueOptions::new(64).wait(Duration::from_secs(2)))
            .await
            .unwrap();
        assert!(
            !batch.is_empty(),
            "jobs missing: {} of 301 seen",
            seen.len()
        );
        for delivery in &batch {
            let payload = String::from_utf8(delivery.payload.to_vec()).unwrap();
            assert!(seen.insert(payload), "a job was delivered twice");
        }
        let receipts: Vec<_> = batch.into_iter().map(|d| d.receipt).collect();
        consumer.ack_batch(&receipts).await.unwrap();
    }
    let stats = consumer.stats().await.unwrap();
    assert_eq!((stats.ready, stats.in_flight), (0, 0));
    // A waiting dequeue wakes on a job in any shard.
    let waiter = {
        let consumer = consumer.clone();
        tokio::spawn(async move {
            consumer
                .dequeue(DequeueOptions::new(1).wait(Duration::from_secs(5)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    producer.enqueue(Job::new("late")).await.unwrap();
    let got = waiter.await.unwrap().unwrap();
    assert_eq!(got.len(), 1);
    consumer.ack(&got[0].receipt).await.unwrap();
    producer.delete().await.unwrap();
}
