//! How the Redis backend keeps leases in the consumer group's pending list
//! and reads several priority levels in one round trip, checked against the
//! real server at `REDIS_URL` (default `redis://127.0.0.1:6379`).
#![cfg(feature = "redis")]

use std::time::Duration;

use keel_queue::{DequeueOptions, Job, Priority, Queue, QueueConfig, RedisQueue, RedisQueueConfig};
use keel_testkit::{Namespace, redis_cleanup, require_redis};

/// A queue in its own namespace, deleted when the guard drops.
async fn queue(test: &str) -> (RedisQueue, Namespace, String) {
    let url = require_redis().await;
    let ns = Namespace::new(test);
    let name = ns.name("q");
    let (cleanup_url, cleanup_name) = (url.clone(), name.clone());
    ns.on_drop(move || {
        let _ = redis_cleanup(&cleanup_url, &cleanup_name);
    });
    let queue = RedisQueue::connect(RedisQueueConfig::new(url.clone(), QueueConfig::new(&name)))
        .await
        .expect("connect to redis");
    (queue, ns, url)
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw redis connection")
}

/// The group's pending entries of `stream`: (entry id, consumer, idle ms,
/// deliveries).
async fn pending(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<(String, String, u64, u64)> {
    redis::cmd("XPENDING")
        .arg(stream)
        .arg("keel")
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(conn)
        .await
        .expect("XPENDING")
}

fn options(max: usize, lease: Duration) -> DequeueOptions {
    DequeueOptions::new(max)
        .wait(Duration::from_millis(500))
        .lease(lease)
}

fn payloads(deliveries: &[keel_queue::Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
        .collect()
}

/// After a read found jobs at the normal level, the next read takes the
/// high and normal levels in one round trip. When high-priority jobs fill
/// the batch, the normal jobs read ahead are given back in their place:
/// the next read gets them in order, still on their first attempt.
#[tokio::test]
async fn jobs_read_ahead_are_given_back_in_place() {
    let (queue, _ns, _url) = queue("redis-read-ahead").await;
    let lease = Duration::from_secs(30);
    queue.enqueue(Job::new("warm-up")).await.unwrap();
    let warm = queue.dequeue(options(10, lease)).await.unwrap();
    queue.ack(&warm[0].receipt).await.unwrap();

    for n in 1..=3 {
        queue
            .enqueue(Job::new(format!("normal-{n}")))
            .await
            .unwrap();
    }
    queue
        .enqueue(Job::new("high").priority(Priority::HIGH))
        .await
        .unwrap();
    let first = queue.dequeue(options(2, lease)).await.unwrap();
    assert_eq!(payloads(&first), ["high", "normal-1"]);

    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.ready, stats.in_flight), (2, 2), "{stats:?}");

    let rest = queue.dequeue(options(10, lease)).await.unwrap();
    assert_eq!(payloads(&rest), ["normal-2", "normal-3"]);
    assert!(rest.iter().all(|d| d.attempt == 1), "{rest:?}");
    let receipts: Vec<_> = first
        .iter()
        .chain(&rest)
        .map(|d| d.receipt.clone())
        .collect();
    queue.ack_batch(&receipts).await.unwrap();
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.ready, stats.in_flight), (0, 0), "{stats:?}");
}

/// Leases of different lengths run side by side: the short one runs out
/// and its job comes back (attempt 2) while the long one is untouched.
#[tokio::test]
async fn each_lease_length_expires_on_its_own() {
    let (queue, _ns, url) = queue("redis-lease-classes").await;
    queue.enqueue(Job::new("short")).await.unwrap();
    let short = queue
        .dequeue(options(1, Duration::from_millis(300)))
        .await
        .unwrap();
    queue.enqueue(Job::new("long")).await.unwrap();
    let long = queue
        .dequeue(options(1, Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(payloads(&short), ["short"]);
    assert_eq!(payloads(&long), ["long"]);

    // The leases are pending entries under consumers named by their length.
    let mut conn = raw(&url).await;
    let stream = format!("keel:{{{}}}:p:1", queue.config().queue.name);
    let pending = pending(&mut conn, &stream).await;
    let mut holders: Vec<&str> = pending.iter().map(|p| p.1.as_str()).collect();
    holders.sort_unstable();
    assert_eq!(holders, ["300", "30000"]);

    tokio::time::sleep(Duration::from_millis(400)).await;
    let again = queue
        .dequeue(options(10, Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(payloads(&again), ["short"]);
    assert_eq!(again[0].attempt, 2);
    assert!(queue.ack(&short[0].receipt).await.is_err());
    queue.ack(&long[0].receipt).await.unwrap();
    queue.ack(&again[0].receipt).await.unwrap();
}

/// Extending a lease moves the entry to the lease class of the new length;
/// acked entries leave the stream at once, so it does not grow.
#[tokio::test]
async fn extend_moves_the_lease_and_ack_deletes_the_entry() {
    let (queue, _ns, url) = queue("redis-extend-class").await;
    queue.enqueue(Job::new("job")).await.unwrap();
    let got = queue
        .dequeue(options(1, Duration::from_millis(500)))
        .await
        .unwrap();
    queue
        .extend_lease(&got[0].receipt, Duration::from_secs(20))
        .await
        .unwrap();
    let mut conn = raw(&url).await;
    let stream = format!("keel:{{{}}}:p:1", queue.config().queue.name);
    let pending = pending(&mut conn, &stream).await;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].1, "20000");
    assert_eq!(pending[0].3, 1, "extending is not a new delivery");

    queue.ack(&got[0].receipt).await.unwrap();
    let len: u64 = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 0, "acked entries are deleted from the stream");
}

/// When the server loses the queue's keys (a restart without persistence),
/// the next reads recreate the consumer groups and carry on.
#[tokio::test]
async fn lost_consumer_groups_are_recreated() {
    let (queue, _ns, url) = queue("redis-lost-groups").await;
    queue.enqueue(Job::new("before")).await.unwrap();
    let got = queue
        .dequeue(options(1, Duration::from_secs(30)))
        .await
        .unwrap();
    queue.ack(&got[0].receipt).await.unwrap();

    let name = queue.config().queue.name.clone();
    redis_cleanup(&url, &name).expect("delete the queue's keys");
    queue.enqueue(Job::new("after")).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let got = queue
            .dequeue(options(1, Duration::from_secs(30)))
            .await
            .unwrap();
        if let Some(d) = got.first() {
            seen.push(String::from_utf8_lossy(&d.payload).into_owned());
            queue.ack(&d.receipt).await.unwrap();
            break;
        }
    }
    assert_eq!(seen, ["after"]);
}

/// Jobs spread over all three levels, four producers and four consumers
/// with small batches: reads often take more than they can hand out and
/// give the rest back (rewinding, or releasing when another consumer read
/// on). Every job is delivered exactly once (the leases never run out) and
/// nothing is lost.
#[tokio::test]
async fn read_ahead_under_contention_delivers_each_job_once() {
    const JOBS: u64 = 4_000;
    const PRODUCERS: u64 = 4;
    let (queue, _ns, _url) = queue("redis-read-ahead-contention").await;
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mine: Vec<u64> = (0..JOBS).filter(|n| n % PRODUCERS == p).collect();
                for chunk in mine.chunks(16) {
                    let jobs = chunk
                        .iter()
                        .map(|n| Job::new(n.to_string()).priority(Priority((n % 3) as u8)))
                        .collect();
                    queue.enqueue_batch(jobs).await.unwrap();
                }
            })
        })
        .collect();
    let consumers: Vec<_> = (0..4)
        .map(|_| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut idle = 0;
                while idle < 3 {
                    let got = queue
                        .dequeue(
                            DequeueOptions::new(5)
                                .wait(Duration::from_millis(300))
                                .lease(Duration::from_secs(60)),
                        )
                        .await
                        .unwrap();
                    if got.is_empty() {
                        idle += 1;
                        continue;
                    }
                    idle = 0;
                    assert!(got.iter().all(|d| d.attempt == 1), "{got:?}");
                    let receipts: Vec<_> = got.iter().map(|d| d.receipt.clone()).collect();
                    queue.ack_batch(&receipts).await.unwrap();
                    seen.extend(
                        got.iter()
                            .map(|d| String::from_utf8_lossy(&d.payload).parse::<u64>().unwrap()),
                    );
                }
                seen
            })
        })
        .collect();
    for producer in producers {
        producer.await.unwrap();
    }
    let mut all = Vec::new();
    for consumer in consumers {
        all.extend(consumer.await.unwrap());
    }
    let delivered = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(delivered, all.len(), "some jobs were delivered twice");
    assert_eq!(all, (0..JOBS).collect::<Vec<_>>(), "some jobs were lost");
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.ready, stats.in_flight), (0, 0), "{stats:?}");
}
