//! The `ChaosQueue` decorator: the whole conformance suite through it with no
//! faults, and at-least-once delivery through it with faults on.

use std::collections::HashSet;
use std::time::Duration;

use keel_queue::chaos::{ChaosConfig, ChaosQueue, Operation};
use keel_queue::conformance::QueueSubject;
use keel_queue::{DequeueOptions, Job, MemoryQueue, Queue, QueueConfig, QueueError};
use tokio::time::Instant;

keel_queue::queue_conformance!(memory_through_chaos, |config| async move {
    QueueSubject::new(
        ChaosQueue::new(
            MemoryQueue::new(config).expect("valid config"),
            ChaosConfig::new(1),
        )
        .expect("no faults is valid"),
    )
});

const JOBS: usize = 200;
const LEASE: Duration = Duration::from_millis(200);

/// Consumes every job through `queue` until the wrapped queue holds none,
/// answering the ids seen (each at least once) and how many deliveries
/// there were.
async fn drain(queue: &ChaosQueue<MemoryQueue>) -> (HashSet<String>, usize) {
    let mut seen = HashSet::new();
    let mut deliveries = 0;
    let give_up = Instant::now() + Duration::from_secs(600);
    loop {
        assert!(Instant::now() < give_up, "jobs were lost: {seen:?}");
        let stats = queue.inner().stats().await.unwrap();
        if stats.ready + stats.delayed + stats.in_flight == 0 {
            return (seen, deliveries);
        }
        let got = match queue
            .dequeue(
                DequeueOptions::new(16)
                    .wait(Duration::from_millis(50))
                    .lease(LEASE),
            )
            .await
        {
            Ok(got) => got,
            // A lost dequeue reply: its jobs come back when their lease ends.
            Err(err) => {
                assert!(matches!(err, QueueError::Unavailable { .. }), "{err:?}");
                continue;
            }
        };
        for delivery in got {
            deliveries += 1;
            seen.insert(String::from_utf8(delivery.payload.to_vec()).unwrap());
            match queue.ack(&delivery.receipt).await {
                Ok(()) => {}
                // Lost or failed: it was acked, or it comes back.
                Err(err) => assert!(err.is_retryable(), "{err:?}"),
            }
        }
    }
}

async fn fill(queue: &ChaosQueue<MemoryQueue>) -> HashSet<String> {
    let ids: HashSet<String> = (0..JOBS).map(|i| format!("job-{i}")).collect();
    for id in &ids {
        queue.inner().enqueue(Job::new(id.clone())).await.unwrap();
    }
    ids
}

fn memory(name: &str) -> MemoryQueue {
    MemoryQueue::new(QueueConfig::new(name).max_attempts(1_000)).unwrap()
}

#[tokio::test(start_paused = true)]
async fn with_dropped_ack_replies_every_job_is_acked_or_redelivered() {
    let queue =
        ChaosQueue::new(memory("dropped-acks"), ChaosConfig::new(7).drop_rate(0.3)).unwrap();
    queue.only(&[Operation::Ack]);
    let ids = fill(&queue).await;
    let (seen, deliveries) = drain(&queue).await;
    assert_eq!(seen, ids, "every job was delivered");
    // A dropped ack reply still acked the job: nothing came back for it.
    assert_eq!(deliveries, JOBS, "no job was delivered twice");
    let injected = queue.injected();
    assert!(
        injected.dropped > JOBS as u64 / 5 && injected.dropped < JOBS as u64 * 2 / 5,
        "about 30 % of {JOBS} acks: {injected:?}"
    );
    assert!(queue.inner().dead_letters(10).await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn with_failing_acks_and_lost_dequeues_every_job_is_redelivered_until_acked() {
    let queue = ChaosQueue::new(
        memory("failing-acks"),
        ChaosConfig::new(11)
            .error_rate(0.3)
            .drop_rate(0.1)
            .latency(Duration::from_millis(1))
            .latency_jitter(Duration::from_millis(5)),
    )
    .unwrap();
    queue.only(&[Operation::Ack, Operation::Dequeue]);
    let ids = fill(&queue).await;
    let (seen, deliveries) = drain(&queue).await;
    assert_eq!(seen, ids, "every job was delivered");
    let injected = queue.injected();
    assert!(injected.errors > 0 && injected.dropped > 0, "{injected:?}");
    // Failed acks and lost dequeues bring jobs back: at least once, not
    // exactly once.
    assert!(deliveries > JOBS, "{deliveries} deliveries of {JOBS} jobs");
    let stats = queue.inner().stats().await.unwrap();
    assert_eq!(
        stats.ready + stats.delayed + stats.in_flight,
        0,
        "{stats:?}"
    );
}

#[tokio::test]
async fn the_same_seed_injects_the_same_faults() {
    async fn run(seed: u64) -> Vec<bool> {
        let queue =
            ChaosQueue::new(memory("seeded"), ChaosConfig::new(seed).error_rate(0.5)).unwrap();
        let mut out = Vec::new();
        for i in 0..50 {
            out.push(queue.enqueue(Job::new(format!("{i}"))).await.is_ok());
        }
        out
    }
    assert_eq!(run(3).await, run(3).await);
    assert_ne!(run(3).await, run(4).await);
}
