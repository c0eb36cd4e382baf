//! The worker runtime on the in-memory queue, under paused time: leases
//! renewed for long jobs, crashed workers, poison jobs, outcomes,
//! backpressure, the retry budget and graceful shutdown.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use keel_queue::chaos::{ChaosConfig, ChaosQueue, Operation};
use keel_queue::{Job, JobId, MemoryQueue, Queue, QueueConfig};
use keel_scheduler::{JobOutcome, WorkItem, Worker, WorkerConfig, WorkerHandle, WorkerState};
use parking_lot::Mutex;
use tokio::time::{Instant, sleep, timeout};
use tower::ServiceBuilder;

/// Handler calls per job id.
type Calls = Arc<Mutex<HashMap<JobId, u32>>>;

/// The id and attempt of each job a handler saw, in order.
type Attempts = Arc<Mutex<Vec<(JobId, u32)>>>;

fn queue(max_attempts: u32) -> MemoryQueue {
    MemoryQueue::new(
        QueueConfig::new("w")
            .max_attempts(max_attempts)
            .backoff(Duration::from_millis(100), Duration::from_secs(1)),
    )
    .unwrap()
}

fn config(name: &str) -> WorkerConfig {
    WorkerConfig::new(name)
        .lease(Duration::from_secs(1))
        .poll_wait(Duration::from_millis(100))
}

/// Waits (in paused time) until `done` holds, failing after `limit`.
async fn until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let give_up = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < give_up, "timed out waiting for: {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

/// Worker `b` on `queue`, whose handler acks every job and records its id
/// and attempt, in order.
fn recording_worker(queue: &MemoryQueue) -> (WorkerHandle, Attempts) {
    let attempts: Attempts = Arc::default();
    let seen = attempts.clone();
    let ok = tower::service_fn(move |item: WorkItem| {
        seen.lock().push((item.id.clone(), item.attempt));
        async { Ok::<_, Infallible>(JobOutcome::Ack) }
    });
    let b = Worker::new(queue.clone(), config("b"), ok).unwrap().spawn();
    (b, attempts)
}

async fn queue_is_empty(queue: &MemoryQueue) -> bool {
    let stats = queue.stats().await.unwrap();
    stats.ready == 0 && stats.delayed == 0 && stats.in_flight == 0
}

#[tokio::test(start_paused = true)]
async fn a_job_running_three_times_its_lease_is_not_duplicated() {
    let queue = queue(5);
    let calls: Calls = Arc::default();
    let handler = {
        let calls = calls.clone();
        tower::service_fn(move |item: WorkItem| {
            *calls.lock().entry(item.id.clone()).or_default() += 1;
            async move {
                sleep(Duration::from_secs(3)).await;
                Ok::<_, Infallible>(JobOutcome::Ack)
            }
        })
    };
    let job = queue.enqueue(Job::new("long")).await.unwrap().id;
    // Two workers on one queue: the second must never get the job.
    let a = Worker::new(queue.clone(), config("a"), handler.clone())
        .unwrap()
        .spawn();
    let b = Worker::new(queue.clone(), config("b"), handler)
        .unwrap()
        .spawn();
    until(Duration::from_secs(10), "the job is acked", || {
        a.stats().acked + b.stats().acked == 1
    })
    .await;
    // Past several more lease lengths: nothing comes back.
    sleep(Duration::from_secs(5)).await;
    assert_eq!(calls.lock().get(&job), Some(&1), "{:?}", calls.lock());
    assert!(queue_is_empty(&queue).await);
    let (a, b) = (a.shutdown().await, b.shutdown().await);
    assert_eq!((a.released, b.released), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_killed_workers_job_is_completed_by_another_after_the_lease() {
    let queue = queue(5);
    let id = queue.enqueue(Job::new("job")).await.unwrap().id;
    // Worker A hangs on the job, then dies without settling it.
    let hang = tower::service_fn(|_: WorkItem| async {
        sleep(Duration::from_secs(3600)).await;
        Ok::<_, Infallible>(JobOutcome::Ack)
    });
    let a = Worker::new(queue.clone(), config("a"), hang)
        .unwrap()
        .spawn();
    until(Duration::from_secs(5), "A took the job", || {
        a.stats().started == 1
    })
    .await;
    let killed_at = Instant::now();
    a.kill();

    let (b, attempts) = recording_worker(&queue);
    until(Duration::from_secs(10), "B completed the job", || {
        b.stats().acked == 1
    })
    .await;
    assert!(
        killed_at.elapsed() >= Duration::from_millis(500),
        "came back only after the lease"
    );
    assert_eq!(
        *attempts.lock(),
        vec![(id, 2)],
        "redelivered once, as attempt 2"
    );
    assert!(queue_is_empty(&queue).await);
    b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_poison_job_is_dead_lettered_and_does_not_block_others() {
    let queue = queue(3);
    let poison = queue.enqueue(Job::new("poison")).await.unwrap().id;
    for i in 0..20 {
        queue.enqueue(Job::new(format!("ok-{i}"))).await.unwrap();
    }
    let handler = tower::service_fn(|item: WorkItem| async move {
        if &item.payload[..] == b"poison" {
            panic!("cannot parse this document");
        }
        sleep(Duration::from_millis(50)).await;
        Ok::<_, Infallible>(JobOutcome::Ack)
    });
    let worker = Worker::new(queue.clone(), config("w").concurrency(2), handler)
        .unwrap()
        .spawn();
    until(Duration::from_secs(30), "all jobs settled", || {
        let s = worker.stats();
        s.acked == 20 && s.panics == 3
    })
    .await;
    // The third panic's nack dead-letters it (its last attempt).
    timeout(Duration::from_secs(5), async {
        while queue.stats().await.unwrap().dead < 1 {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the poison job reached the dead letters");
    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, poison);
    assert_eq!(dead[0].attempts, 3);
    assert!(dead[0].reason.contains("panicked"), "{}", dead[0].reason);
    assert!(queue_is_empty(&queue).await);
    let health = worker.health();
    assert_eq!(
        health.state,
        WorkerState::Running,
        "a panicking handler does not stop the worker"
    );
    worker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn outcomes_ack_retry_after_and_abort() {
    let queue = queue(5);
    let seen: Arc<Mutex<Vec<(String, u32, Instant)>>> = Arc::default();
    let log = seen.clone();
    let handler = tower::service_fn(move |item: WorkItem| {
        let text = String::from_utf8(item.payload.to_vec()).unwrap();
        log.lock()
            .push((text.clone(), item.attempt, Instant::now()));
        async move {
            match (text.as_str(), item.attempt) {
                ("later", 1) => Ok(JobOutcome::retry_after(Duration::from_secs(2), "not yet")),
                ("bad", _) => Ok(JobOutcome::abort("malformed")),
                ("error", 1) => Err(std::io::Error::other("flaky backend")),
                _ => Ok(JobOutcome::Ack),
            }
        }
    });
    for text in ["later", "bad", "error"] {
        queue.enqueue(Job::new(text)).await.unwrap();
    }
    let start = Instant::now();
    let worker = Worker::new(queue.clone(), config("w"), handler)
        .unwrap()
        .spawn();
    until(
        Duration::from_secs(10),
        "two acks and a dead letter",
        || {
            let s = worker.stats();
            s.acked == 2 && s.dead_lettered == 1
        },
    )
    .await;
    let seen = seen.lock().clone();
    let later: Vec<_> = seen.iter().filter(|(t, ..)| t == "later").collect();
    assert_eq!(later.len(), 2);
    assert!(
        later[1].2 - later[0].2 >= Duration::from_secs(2),
        "retried after its delay"
    );
    assert_eq!(
        seen.iter().filter(|(t, ..)| t == "error").count(),
        2,
        "an error is retried"
    );
    assert_eq!(
        seen.iter().filter(|(t, ..)| t == "bad").count(),
        1,
        "abort is final"
    );
    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(dead[0].reason, "malformed");
    assert!(start.elapsed() < Duration::from_secs(10));
    worker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn pulls_only_when_the_service_is_ready() {
    let queue = queue(5);
    for i in 0..5 {
        queue.enqueue(Job::new(format!("{i}"))).await.unwrap();
    }
    // One job at a time downstream, however many slots the worker has.
    let handler = ServiceBuilder::new()
        .concurrency_limit(1)
        .service_fn(|_: WorkItem| async {
            sleep(Duration::from_secs(10)).await;
            Ok::<_, Infallible>(JobOutcome::Ack)
        });
    let worker = Worker::new(queue.clone(), config("w").concurrency(8), handler)
        .unwrap()
        .spawn();
    sleep(Duration::from_secs(1)).await;
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.in_flight, stats.ready), (1, 4), "{stats:?}");
    until(Duration::from_secs(60), "all done", || {
        worker.stats().acked == 5
    })
    .await;
    worker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_batch_past_a_busy_service_and_a_panicking_call_loses_nothing() {
    let queue = queue(5);
    for i in 0..8 {
        queue.enqueue(Job::new(format!("{i}"))).await.unwrap();
    }
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    // One job at a time downstream, so jobs past the first of a batch find
    // the service busy and wait for it; job "3" panics in `call` itself
    // (not in its future) the first time.
    let handler = ServiceBuilder::new()
        .concurrency_limit(1)
        .service_fn(move |item: WorkItem| {
            let n = {
                let mut calls = seen.lock();
                let n = calls.entry(item.id.clone()).or_default();
                *n += 1;
                *n
            };
            if &item.payload[..] == b"3" && n == 1 {
                panic!("cannot even start this one");
            }
            async {
                sleep(Duration::from_millis(100)).await;
                Ok::<_, Infallible>(JobOutcome::Ack)
            }
        });
    let worker = Worker::new(
        queue.clone(),
        config("w").concurrency(4).dequeue_batch(4),
        handler,
    )
    .unwrap()
    .spawn();
    until(Duration::from_secs(60), "all acked", || {
        worker.stats().acked == 8
    })
    .await;
    let stats = worker.stats();
    assert_eq!((stats.panics, stats.retried), (1, 1), "{stats:?}");
    {
        let calls = calls.lock();
        assert_eq!(calls.len(), 8);
        assert_eq!(
            calls.values().sum::<u32>(),
            9,
            "one retry, nothing run twice: {calls:?}"
        );
    }
    assert!(queue_is_empty(&queue).await);
    worker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_spent_retry_budget_delays_retries() {
    let queue = queue(100);
    for i in 0..3 {
        queue.enqueue(Job::new(format!("{i}"))).await.unwrap();
    }
    let handler = tower::service_fn(|_: WorkItem| async {
        Ok::<_, Infallible>(JobOutcome::retry("downstream is down"))
    });
    // No retries allowed at all: every retry waits out the delay.
    let config = config("w")
        .retry_budget(keel_core::BudgetConfig::default().ratio(0.0).floor(0))
        .budget_exhausted_delay(Duration::from_secs(60));
    let worker = Worker::new(queue.clone(), config, handler).unwrap().spawn();
    until(Duration::from_secs(5), "three retries", || {
        worker.stats().retried == 3
    })
    .await;
    sleep(Duration::from_secs(30)).await;
    let stats = queue.stats().await.unwrap();
    assert_eq!(stats.delayed, 3, "{stats:?}");
    assert_eq!(worker.stats().started, 3, "no job came back within 30 s");
    assert_eq!(worker.stats().budget_exhausted, 3);
    worker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_short_jobs_finish_and_releases_long_ones() {
    let queue = queue(5);
    queue.enqueue(Job::new("short")).await.unwrap();
    queue.enqueue(Job::new("long")).await.unwrap();
    let handler = tower::service_fn(|item: WorkItem| async move {
        let wait = if &item.payload[..] == b"short" {
            2
        } else {
            3600
        };
        sleep(Duration::from_secs(wait)).await;
        Ok::<_, Infallible>(JobOutcome::Ack)
    });
    let worker: WorkerHandle = Worker::new(
        queue.clone(),
        config("w")
            .concurrency(2)
            .shutdown_grace(Duration::from_secs(5)),
        handler,
    )
    .unwrap()
    .spawn();
    until(Duration::from_secs(5), "both started", || {
        worker.stats().started == 2
    })
    .await;
    let mut health = worker.subscribe();
    let started = Instant::now();
    let report = timeout(Duration::from_secs(30), worker.shutdown())
        .await
        .expect("shutdown is bounded");
    assert_eq!((report.finished, report.released), (1, 1), "{report:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(5) && started.elapsed() < Duration::from_secs(7)
    );
    assert_eq!(health.borrow_and_update().state, WorkerState::Stopped);
    // The long job is back in the queue at once, not after its lease.
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.ready, stats.in_flight), (1, 0), "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn a_job_released_at_shutdown_on_its_last_attempt_is_not_dead_lettered() {
    let queue = queue(2);
    let id = queue.enqueue(Job::new("job")).await.unwrap().id;
    // Attempt 1 fails; attempt 2, the last, is still running at shutdown.
    let handler = tower::service_fn(|item: WorkItem| async move {
        if item.attempt == 1 {
            return Ok::<_, Infallible>(JobOutcome::retry_after(Duration::ZERO, "flaky"));
        }
        sleep(Duration::from_secs(3600)).await;
        Ok(JobOutcome::Ack)
    });
    let a = Worker::new(
        queue.clone(),
        config("a").shutdown_grace(Duration::from_secs(1)),
        handler,
    )
    .unwrap()
    .spawn();
    until(Duration::from_secs(5), "the last attempt started", || {
        a.stats().started == 2
    })
    .await;
    let stats = a.stats();
    assert_eq!((stats.retried, stats.released), (1, 0), "{stats:?}");
    let report = timeout(Duration::from_secs(30), a.shutdown())
        .await
        .expect("shutdown is bounded");
    assert_eq!((report.finished, report.released), (0, 1), "{report:?}");
    // Back at once, not dead-lettered, not delayed.
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (stats.ready, stats.delayed, stats.in_flight, stats.dead),
        (1, 0, 0, 0),
        "{stats:?}"
    );

    // The next worker gets it on the same attempt, and can still finish it.
    let (b, attempts) = recording_worker(&queue);
    until(Duration::from_secs(5), "B completed the job", || {
        b.stats().acked == 1
    })
    .await;
    assert_eq!(*attempts.lock(), vec![(id, 2)]);
    assert!(queue.dead_letters(10).await.unwrap().is_empty());
    assert!(queue_is_empty(&queue).await);
    b.shutdown().await;
}

/// A broker outage, once aimed at `dequeue` alone: every `dequeue` fails
/// (after 5 ms), nothing else does.
fn outage() -> ChaosConfig {
    ChaosConfig::new(1)
        .latency(Duration::from_millis(5))
        .error_rate(1.0)
}

#[tokio::test(start_paused = true)]
async fn a_broker_outage_is_reported_and_recovered_from() {
    let flaky = ChaosQueue::new(queue(5), ChaosConfig::default()).unwrap();
    let handler = tower::service_fn(|_: WorkItem| async { Ok::<_, Infallible>(JobOutcome::Ack) });
    let config = config("w").reconnect(Duration::from_millis(100), Duration::from_secs(1));
    let worker = Worker::new(flaky.clone(), config, handler).unwrap().spawn();
    flaky.enqueue(Job::new("before")).await.unwrap();
    until(Duration::from_secs(5), "the first job", || {
        worker.stats().acked == 1
    })
    .await;

    flaky.only(&[Operation::Dequeue]);
    flaky.set_config(outage()).unwrap();
    let mut health = worker.subscribe();
    timeout(
        Duration::from_secs(5),
        health.wait_for(|h| h.state == WorkerState::Reconnecting),
    )
    .await
    .expect("the outage shows in the health")
    .unwrap();
    flaky.enqueue(Job::new("during")).await.unwrap();
    sleep(Duration::from_secs(10)).await;
    let during = worker.health();
    assert_eq!(during.state, WorkerState::Reconnecting);
    assert!(
        during
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("injected failure of dequeue"),
        "{during:?}"
    );
    // Backoff: 10 s of outage with delays growing to 1 s is a few dozen
    // attempts, not a busy loop.
    let errors = worker.stats().broker_errors;
    assert!(
        (5..=40).contains(&errors),
        "{errors} dequeue attempts in 10 s"
    );

    flaky.set_config(ChaosConfig::default()).unwrap();
    until(
        Duration::from_secs(5),
        "the job sent during the outage",
        || worker.stats().acked == 2,
    )
    .await;
    let after = worker.health();
    assert_eq!(
        (after.state, after.consecutive_errors),
        (WorkerState::Running, 0)
    );
    assert_eq!(worker.stats().reconnects, 1);
    worker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn admission_in_front_of_a_handler_turns_rejections_into_delayed_retries() {
    use keel_scheduler::{
        AdmissionLayer, LocalRateLimiter, Rate, RateLimitConfig, SchedulerConfig, TenantRates,
    };
    let queue = queue(10);
    for i in 0..3 {
        queue
            .enqueue(Job::new(format!("{i}")).header("tenant", "acme"))
            .await
            .unwrap();
    }
    // One job per two seconds per tenant.
    let limiter = LocalRateLimiter::new(
        RateLimitConfig::new("jobs")
            .default_rates(TenantRates::default().requests(Rate::new(1, Duration::from_secs(2)))),
    )
    .unwrap();
    let admission = AdmissionLayer::new(SchedulerConfig::new("jobs"), |item: &WorkItem| {
        item.ticket("tenant", None)
    })
    .unwrap()
    .rate_limit(Arc::new(limiter));
    let done: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let log = done.clone();
    let handler = ServiceBuilder::new()
        .layer(admission)
        .service_fn(move |_: WorkItem| {
            log.lock().push(Instant::now());
            async { Ok::<_, Infallible>(JobOutcome::Ack) }
        });
    let start = Instant::now();
    let worker = Worker::new(queue.clone(), config("w").concurrency(4), handler)
        .unwrap()
        .spawn();
    until(Duration::from_secs(30), "all three jobs", || {
        worker.stats().acked == 3
    })
    .await;
    let done = done.lock().clone();
    assert_eq!(done.len(), 3, "each job ran once");
    for pair in done.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_secs(2),
            "{:?}",
            done.iter().map(|t| *t - start).collect::<Vec<_>>()
        );
    }
    assert!(
        worker.stats().retried >= 2,
        "rejected jobs were nacked for later"
    );
    assert_eq!(worker.stats().dead_lettered, 0);
    worker.shutdown().await;
}
