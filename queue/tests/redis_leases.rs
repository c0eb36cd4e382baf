//! Behaviour particular to the Redis backend: leases in the consumer group's
//! pending list, several priority levels read in one round trip, the
//! capacity bound, entries the library did not write. Checked against the
//! real server at `REDIS_URL` (default `redis://127.0.0.1:6379`).
#![cfg(feature = "redis")]

use std::time::Duration;

use keel_queue::{DequeueOptions, Job, Priority, Queue, QueueConfig, RedisQueue, RedisQueueConfig};
use keel_testkit::{Namespace, redis_cleanup, require_redis};

/// A queue in its own namespace, deleted when the guard drops.
async fn queue(test: &str) -> (RedisQueue, Namespace, String) {
    queue_with(test, |config| config).await
}

async fn queue_with(
    test: &str,
    tune: impl FnOnce(QueueConfig) -> QueueConfig,
) -> (RedisQueue, Namespace, String) {
    let url = require_redis().await;
    let ns = Namespace::new(test);
    let name = ns.name("q");
    let (cleanup_url, cleanup_name) = (url.clone(), name.clone());
    ns.on_drop(move || {
        let _ = redis_cleanup(&cleanup_url, &cleanup_name);
    });
    let queue = RedisQueue::connect(RedisQueueConfig::new(
        url.clone(),
        tune(QueueConfig::new(&name)),
    ))
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
    let (queue, _ns, url) = queue("redis-read-ahead").await;
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
    // The read took normal-2 and normal-3 too and gave them back by
    // rewinding the group, which touches the wake stream for waiters.
    let mut conn = raw(&url).await;
    let wake: u64 = redis::cmd("XLEN")
        .arg(format!("keel:{{{}}}:wake", queue.config().queue.name))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(wake, 1, "the rewind did not touch the wake stream");

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
    assert!(matches!(
        queue.ack(&short[0].receipt).await,
        Err(keel_queue::QueueError::InvalidReceipt(_))
    ));
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

/// A replayed dead letter can leave a bounded queue over its capacity; it
/// then refuses every enqueue until consumers bring it back under.
#[tokio::test]
async fn over_capacity_refuses_until_back_under() {
    let (queue, _ns, _url) = queue_with("redis-over-capacity", |c| c.capacity(2)).await;
    queue.enqueue(Job::new("a")).await.unwrap();
    queue.enqueue(Job::new("b")).await.unwrap();
    let a = queue
        .dequeue(options(1, Duration::from_secs(30)))
        .await
        .unwrap();
    queue
        .nack(&a[0].receipt, keel_queue::Nack::dead_letter("bad input"))
        .await
        .unwrap();
    queue.enqueue(Job::new("c")).await.unwrap();
    assert_eq!(
        queue.replay_dead_letters(&[a[0].id.clone()]).await.unwrap(),
        1
    );
    for _ in 0..3 {
        match queue.enqueue(Job::new("d")).await {
            Err(keel_queue::QueueError::Full { capacity: 2 }) => {}
            other => panic!("a queue over its bound took a job: {other:?}"),
        }
    }
    let drained = queue
        .dequeue(options(10, Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(drained.len(), 3);
    let receipts: Vec<_> = drained.iter().map(|d| d.receipt.clone()).collect();
    queue.ack_batch(&receipts).await.unwrap();
    queue.enqueue(Job::new("d")).await.unwrap();
}

/// An entry some other program wrote into a level's stream is dead-lettered
/// with a reason instead of failing every read.
#[tokio::test]
async fn foreign_entries_are_dead_lettered() {
    let (queue, _ns, url) = queue("redis-foreign-entry").await;
    queue.enqueue(Job::new("before")).await.unwrap();
    let mut conn = raw(&url).await;
    let stream = format!("keel:{{{}}}:p:1", queue.config().queue.name);
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("foo")
        .arg("bar")
        .query_async(&mut conn)
        .await
        .unwrap();
    queue.enqueue(Job::new("after")).await.unwrap();
    let got = queue
        .dequeue(options(10, Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(payloads(&got), ["before", "after"]);
    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.contains("malformed"), "{:?}", dead[0].reason);
    let receipts: Vec<_> = got.iter().map(|d| d.receipt.clone()).collect();
    queue.ack_batch(&receipts).await.unwrap();
}

/// A consumer waiting on an empty queue wakes when another read gives jobs
/// back by rewinding the group (their ids are older than what it waits
/// after), not only when its next look at leases comes round (a second).
#[tokio::test]
async fn a_rewind_wakes_waiting_consumers() {
    let (queue, _ns, url) = queue("redis-rewind-wakes").await;
    // Create the groups, then stand in for a reader that takes a job and
    // then gives it back by rewinding.
    assert!(
        queue
            .dequeue(options(1, Duration::from_secs(30)).wait(Duration::ZERO))
            .await
            .unwrap()
            .is_empty()
    );
    queue.enqueue(Job::new("job")).await.unwrap();
    let name = queue.config().queue.name.clone();
    let stream = format!("keel:{{{name}}}:p:1");
    let mut conn = raw(&url).await;
    type Read = Vec<(String, Vec<(String, Vec<(String, String)>)>)>;
    let read: Read = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("keel")
        .arg("30000")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let entry = read[0].1[0].0.clone();

    let waiter = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let got = queue
                .dequeue(options(1, Duration::from_secs(30)).wait(Duration::from_secs(5)))
                .await
                .unwrap();
            (got, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (ms, seq) = entry.split_once('-').unwrap();
    let before = match seq.parse::<u64>().unwrap() {
        0 => format!("{}-{}", ms.parse::<u64>().unwrap() - 1, u64::MAX),
        n => format!("{ms}-{}", n - 1),
    };
    let _: () = redis::pipe()
        .atomic()
        .cmd("XACK")
        .arg(&stream)
        .arg("keel")
        .arg(&entry)
        .ignore()
        .cmd("XGROUP")
        .arg("SETID")
        .arg(&stream)
        .arg("keel")
        .arg(&before)
        .ignore()
        .cmd("XADD")
        .arg(format!("keel:{{{name}}}:wake"))
        .arg("MAXLEN")
        .arg(1)
        .arg("*")
        .arg("w")
        .arg("1")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let (got, waited) = waiter.await.unwrap();
    assert_eq!(payloads(&got), ["job"]);
    assert!(
        waited < Duration::from_millis(900),
        "the waiting consumer noticed the rewind only after {waited:?}"
    );
    queue.ack(&got[0].receipt).await.unwrap();
}

/// Receipts in another shape (an earlier build's `<level>:<id>|<attempt>`,
/// or not ours at all) are refused as invalid, not sent to the server.
#[tokio::test]
async fn receipts_of_other_shapes_are_invalid() {
    let (queue, _ns, _url) = queue("redis-receipt-shapes").await;
    for text in [
        "1:1700000000000-0|1",
        "1:1700000000000-0|1|x",
        "x:1700000000000-0|1|1700000000000",
        "1:not-an-id|1|1700000000000",
        "m:3:4",
        "",
    ] {
        let receipt = keel_queue::Receipt::from_string(text);
        for result in [
            queue.ack(&receipt).await,
            queue
                .nack(&receipt, keel_queue::Nack::dead_letter("x"))
                .await,
            queue.extend_lease(&receipt, Duration::from_secs(1)).await,
        ] {
            assert!(
                matches!(result, Err(keel_queue::QueueError::InvalidReceipt(_))),
                "`{text}` answered {result:?}"
            );
        }
    }
    // A well-formed receipt for an entry that was never delivered.
    let stale = keel_queue::Receipt::from_string("1:1700000000000-0|1|1700000000000");
    assert!(matches!(
        queue.ack(&stale).await,
        Err(keel_queue::QueueError::InvalidReceipt(_))
    ));
}
