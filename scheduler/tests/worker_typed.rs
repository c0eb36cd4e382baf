//! Typed jobs: a handler takes a decoded job; a payload that does not
//! decode is dead-lettered at once with the decode error, counted as
//! dead-lettered and never retried. On memory and on Redis. Also: a
//! worker handle is shared, and every `shutdown(&self)` gets the report.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keel_queue::{Job, MemoryQueue, Queue, QueueConfig};
use keel_scheduler::{JobOutcome, TypedItem, Worker, WorkerConfig, json_jobs};
use serde::Deserialize;
use tokio::time::{sleep, timeout};

#[derive(Debug, Deserialize)]
struct Embed {
    text: String,
}

/// Runs one good and one poison job through a typed worker on `queue`.
async fn poison_is_dead_lettered_once(queue: impl Queue + Clone) {
    timeout(Duration::from_secs(30), async {
        queue
            .enqueue(Job::json(&serde_json::json!({"text": "hello"})).unwrap())
            .await
            .unwrap();
        queue.enqueue(Job::new("{not json")).await.unwrap();
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let handler = json_jobs(tower::service_fn(move |item: TypedItem<Embed>| {
            let seen = seen.clone();
            async move {
                assert_eq!(item.job.text, "hello");
                assert_eq!(item.item.attempt, 1);
                seen.fetch_add(1, Ordering::Relaxed);
                Ok::<_, Infallible>(JobOutcome::Ack)
            }
        }));
        let worker = Worker::new(
            queue.clone(),
            WorkerConfig::new("typed").poll_wait(Duration::from_millis(100)),
            handler,
        )
        .unwrap()
        .spawn();
        while worker.stats().acked + worker.stats().dead_lettered < 2 {
            sleep(Duration::from_millis(10)).await;
        }
        // Long enough for a retry to have come back, were there one.
        sleep(Duration::from_millis(300)).await;
        let stats = worker.stats();
        assert_eq!(
            (
                stats.acked,
                stats.dead_lettered,
                stats.retried,
                stats.started
            ),
            (1, 1, 0, 2),
            "{stats:?}"
        );
        assert_eq!(
            calls.load(Ordering::Relaxed),
            1,
            "the poison job never reached the handler"
        );
        let dead = queue.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].attempts, 1, "dead-lettered on its first delivery");
        assert!(
            dead[0].reason.contains("undecodable payload") && dead[0].reason.contains("Embed"),
            "{}",
            dead[0].reason
        );
        worker.shutdown().await;
        queue.delete().await.unwrap();
    })
    .await
    .expect("the test took too long");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_payload_is_dead_lettered_at_once_on_memory() {
    let queue = MemoryQueue::new(
        QueueConfig::new("typed").backoff(Duration::from_millis(10), Duration::from_millis(20)),
    )
    .unwrap();
    poison_is_dead_lettered_once(queue).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_payload_is_dead_lettered_at_once_on_redis() {
    use keel_queue::{RedisQueue, RedisQueueConfig};
    let url = keel_testkit::require_redis().await;
    let ns = keel_testkit::Namespace::new("worker_typed").with_redis_cleanup(url.clone());
    let queue = RedisQueue::connect(RedisQueueConfig::new(
        url,
        QueueConfig::new(ns.name("q"))
            .backoff(Duration::from_millis(10), Duration::from_millis(20)),
    ))
    .await
    .unwrap();
    poison_is_dead_lettered_once(queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_handle_shuts_down_once_for_every_caller() {
    let queue = MemoryQueue::new(QueueConfig::new("shared-handle")).unwrap();
    for i in 0..4 {
        queue.enqueue(Job::new(format!("{i}"))).await.unwrap();
    }
    let handler = tower::service_fn(|_: keel_scheduler::WorkItem| async {
        sleep(Duration::from_millis(200)).await;
        Ok::<_, Infallible>(JobOutcome::Ack)
    });
    let worker = Arc::new(
        Worker::new(
            queue.clone(),
            WorkerConfig::new("shared").concurrency(4).dequeue_batch(4),
            handler,
        )
        .unwrap()
        .spawn(),
    );
    while worker.stats().started < 4 {
        sleep(Duration::from_millis(5)).await;
    }
    let (a, b) = {
        let (w1, w2) = (worker.clone(), worker.clone());
        tokio::join!(
            tokio::spawn(async move { w1.shutdown().await }),
            tokio::spawn(async move { w2.shutdown().await })
        )
    };
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b, "both callers see the same drain");
    assert_eq!(a.finished, 4);
    // After the fact, it answers at once with the same report.
    assert_eq!(
        timeout(Duration::from_secs(1), worker.shutdown())
            .await
            .unwrap(),
        a
    );
    assert_eq!(worker.stats().acked, 4, "acks went out before the report");
    assert_eq!(queue.stats().await.unwrap().in_flight, 0);
}
