//! The conformance suite: one set of behaviour tests that every backend and
//! decorator passes unchanged.
//!
//! Enable the `conformance` feature and expand [`queue_conformance!`](crate::queue_conformance) with a
//! factory that builds your queue from a [`QueueConfig`] (whose `name` is a
//! fresh namespace for each case). Each case becomes its own
//! `#[tokio::test]`, gated on the queue's [`QueueCapabilities`]:
//!
//! ```no_run
//! keel_queue::queue_conformance!(memory, |config| async move {
//!     keel_queue::conformance::QueueSubject::new(keel_queue::MemoryQueue::new(config).unwrap())
//! });
//! ```
//!
//! The cases run on real time with short leases and delays (so they also
//! run against real servers) and assert lower bounds on waits with generous
//! upper bounds, so a loaded machine does not make them flake.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use keel_core::ArgumentError;
use tokio::time::Instant;

use crate::{
    DequeueOptions, Job, Nack, Priority, Queue, QueueCapabilities, QueueConfig, QueueError,
    QueueExt, Receipt,
};

/// A queue under test, with whatever must live as long as the test (a
/// cleanup guard that deletes the namespace's keys, a spawned server…).
#[derive(Debug)]
pub struct QueueSubject {
    /// The queue under test.
    pub queue: Arc<dyn Queue>,
    guard: Option<Box<dyn std::fmt::Debug + Send + Sync>>,
}

impl QueueSubject {
    /// A subject with no guard.
    pub fn new(queue: impl Queue) -> Self {
        QueueSubject {
            queue: Arc::new(queue),
            guard: None,
        }
    }

    /// Keeps `guard` alive until the case ends (dropped after the queue).
    pub fn with_guard(mut self, guard: impl std::fmt::Debug + Send + Sync + 'static) -> Self {
        self.guard = Some(Box::new(guard));
        self
    }
}

/// A fresh namespace for one case: `keel-conf-<case>-<random>`.
pub fn namespace(case: &str) -> String {
    format!(
        "keel-conf-{case}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

async fn subject<F, Fut>(
    make: &F,
    case: &str,
    tune: impl FnOnce(QueueConfig) -> QueueConfig,
) -> QueueSubject
where
    F: Fn(QueueConfig) -> Fut,
    Fut: Future<Output = QueueSubject>,
{
    let config = tune(
        QueueConfig::new(namespace(case))
            .backoff(Duration::from_millis(50), Duration::from_millis(200)),
    );
    make(config).await
}

const SHORT_LEASE: Duration = Duration::from_millis(400);
/// Upper bound on "returns promptly" on a loaded two-core machine.
const SLACK: Duration = Duration::from_secs(3);

fn opts(max: usize, wait: Duration, lease: Duration) -> DequeueOptions {
    DequeueOptions { max, wait, lease }
}

async fn one(queue: &dyn Queue, wait: Duration, lease: Duration) -> crate::Delivery {
    let mut got = queue.dequeue(opts(1, wait, lease)).await.expect("dequeue");
    assert_eq!(got.len(), 1, "expected one delivery within {wait:?}");
    got.pop().expect("checked")
}

async fn nothing(queue: &dyn Queue, wait: Duration) {
    let got = queue
        .dequeue(opts(10, wait, SHORT_LEASE))
        .await
        .expect("dequeue");
    assert!(got.is_empty(), "expected no delivery, got {got:?}");
}

/// Whether the backend supports a feature. When it does not, it must refuse
/// the feature with `Unsupported` rather than emulate it badly: `attempt`
/// (an operation using the feature) is run and checked, and the case ends.
async fn supported_or_refused<T: std::fmt::Debug>(
    supported: bool,
    attempt: impl Future<Output = crate::Result<T>>,
) -> bool {
    if !supported {
        let answer = attempt.await;
        assert!(
            matches!(answer, Err(QueueError::Unsupported { .. })),
            "an unsupported feature must answer Unsupported, got {answer:?}"
        );
    }
    supported
}

/// Whether leases expire on the backend ([`supported_or_refused`] with
/// `extend_lease` as the attempt).
async fn lease_expiry_or_refused(queue: &dyn Queue) -> bool {
    supported_or_refused(
        queue.capabilities().lease_expiry,
        queue.extend_lease(&Receipt::from_string("none"), SHORT_LEASE),
    )
    .await
}

/// Whether the backend delays jobs ([`supported_or_refused`] with a
/// delayed enqueue as the attempt).
async fn delay_or_refused(queue: &dyn Queue) -> bool {
    supported_or_refused(
        queue.capabilities().delay,
        queue.enqueue(Job::new("later").delay(Duration::from_millis(1))),
    )
    .await
}

fn caps(subject: &QueueSubject) -> QueueCapabilities {
    subject.queue.capabilities()
}

/// Payload bytes (including non-UTF-8) and headers arrive unchanged.
pub async fn round_trip<F: Fn(QueueConfig) -> Fut, Fut: Future<Output = QueueSubject>>(make: F) {
    let s = subject(&make, "round-trip", |c| c).await;
    let payload = Bytes::from_static(b"\x00\xff binary \xc3\x28 payload");
    let sent = s
        .queue
        .enqueue(
            Job::new(payload.clone())
                .header("tenant", "acme")
                .header("trace", "t-1"),
        )
        .await
        .unwrap();
    assert!(!sent.duplicate);
    let got = one(&*s.queue, SLACK, SHORT_LEASE).await;
    assert_eq!(got.payload, payload);
    assert_eq!(got.headers["tenant"], "acme");
    assert_eq!(got.headers["trace"], "t-1");
    assert_eq!(got.id, sent.id);
    assert_eq!(got.attempt, 1);
    let age = SystemTime::now()
        .duration_since(got.enqueued_at)
        .unwrap_or_default();
    assert!(age < Duration::from_secs(60), "enqueued_at is {age:?} old");
    s.queue.ack(&got.receipt).await.unwrap();
}

/// Out-of-range options are refused naming the field, and a refused
/// `extend_lease` leaves the lease as it was.
pub async fn bad_options_are_refused<
    F: Fn(QueueConfig) -> Fut,
    Fut: Future<Output = QueueSubject>,
>(
    make: F,
) {
    let s = subject(&make, "bad-options", |c| c).await;
    let refused = |result: crate::Result<Vec<crate::Delivery>>| match result {
        Err(QueueError::InvalidArgument(ArgumentError { name, .. })) => name,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    let base = DequeueOptions::new(1).wait(Duration::ZERO);
    assert_eq!(
        refused(s.queue.dequeue(DequeueOptions { max: 0, ..base }).await),
        "max"
    );
    assert_eq!(
        refused(s.queue.dequeue(base.lease(Duration::ZERO)).await),
        "lease"
    );
    assert_eq!(
        refused(s.queue.dequeue(base.lease(Duration::MAX)).await),
        "lease"
    );
    assert_eq!(
        refused(s.queue.dequeue(base.wait(Duration::MAX)).await),
        "wait"
    );

    s.queue.enqueue(Job::new("job")).await.unwrap();
    let got = one(&*s.queue, SLACK, Duration::from_secs(30)).await;
    if caps(&s).lease_expiry {
        for lease in [Duration::ZERO, crate::MAX_LEASE + Duration::from_secs(1)] {
            match s.queue.extend_lease(&got.receipt, lease).await {
                Err(QueueError::InvalidArgument(ArgumentError { name: "lease", .. })) => {}
                other => panic!("extend_lease({lease:?}) answered {other:?}"),
            }
        }
    }
    s.queue.ack(&got.receipt).await.unwrap();
}

/// An empty dequeue waits about `wait` (a long poll) and then returns empty.
pub async fn empty_dequeue_waits<F: Fn(QueueConfig) -> Fut, Fut: Future<Output = QueueSubject>>(
    make: F,
) {
    let s = subject(&make, "empty-wait", |c| c).await;
    let wait = Duration::from_millis(300);
    let start = Instant::now();
    nothing(&*s.queue, wait).await;
    let took = start.elapsed();
    assert!(
        took >= wait - Duration::from_millis(20),
        "returned early after {took:?}"
    );
    assert!(took < wait + SLACK, "returned late after {took:?}");
}

/// A waiting dequeue wakes as soon as a job arrives, not at the end of its wait.
pub async fn waiting_dequeue_wakes_on_enqueue<
    F: Fn(QueueConfig) -> Fut,
    Fut: Future<Output = QueueSubject>,
>(
    make: F,
) {
    let s = subject(&make, "wake", |c| c).await;
    let queue = s.queue.clone();
    let waiter = tokio::spawn(async move {
        let start = Instant::now();
        let got = queue
            .dequeue(opts(1, Duration::from_secs(20), SHORT_LEASE))
            .await
            .unwrap();
        (got, start.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.queue.enqueue(Job::new("wake up")).await.unwrap();
    let (got, took) = waiter.await.unwrap();
    assert_eq!(got.len(), 1);
    // The job came 200 ms in. Well under any backend's own re-check period
    // (Redis looks again every `max_block`, 5 s by default), so only a real
    // wake-up passes.
    assert!(
        took < Duration::from_millis(2_500),
        "woke after {took:?} of a 20 s wait, for a job enqueued at 200 ms"
    );
}

/// An acked job never comes back, even after its lease would have expired.
pub async fn ack_is_final<F: Fn(QueueConfig) -> Fut, Fut: Future<Output = QueueSubject>>(make: F) {
    let s = subject(&make, "ack-final", |c| c).await;
    s.queue.enqueue(Job::new("once")).await.unwrap();
    let got = one(&*s.queue, SLACK, Duration::from_millis(200)).await;
    s.queue.ack(&got.receipt).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    nothing(&*s.queue, Duration::from_millis(300)).await;
    let err = s.queue.ack(&got.receipt).await.unwrap_err();
    assert!(
        matches!(err, QueueError::InvalidReceipt(_)),
        "second ack: {err:?}"
    );
}

/// `nack` with a retry delay redelivers after the delay with `attempt + 1`.
pub async fn nack_retry_redelivers<
    F: Fn(QueueConfig) -> Fut,
    Fut: Future<Output = QueueSubject>,
>(
    make: F,
) {
    let s = subject(&make, "nack-retry", |c| c).await;
    if !delay_or_refused(&*s.queue).await {
        return;
    }
    s.queue.enqueue(Job::new("flaky")).await.unwrap();
    let got = one(&*s.queue, SLACK, SHORT_LEASE).await;
    let delay = Duration::from_millis(500);
    let nacked = Instant::now();
    s.queue
        .nack(&got.receipt, Nack::retry_after(delay, "node busy"))
        .await
        .unwrap();
    nothing(&*s.queue, Duration::ZERO).await;
    let again = one(&*s.queue, SLACK + delay, SHORT_LEASE).await;
    let took = nacked.elapsed();
    assert!(
        took >= delay - Duration::from_millis(50),
        "redelivered after {took:?}"
    );
    assert_eq!(again.id, got.id);
    assert_eq!(again.attempt, 2);
    s.queue.ack(&again.receipt).await.unwrap();
}

/// `nack` with `Release` hands a job back at once without spending an
/// attempt: after two releases it is still on attempt 1, and with
/// `max_attempts(1)` a release never dead-letters it.
pub async fn release_keeps_attempt<
    F: Fn(QueueConfig) -> Fut,
    Fut: Future<Output = QueueSubject>,
>(
    make: F,
) {
    let s = subject(&make, "release", |c| c.max_attempts(1)).await;
    let sent = s.queue.enqueue(Job::new("untried")).await.unwrap();
    let mut got = one(&*s.queue, SLACK, SHORT_LEASE).await;
    assert_eq!(got.attempt, 1);
    for _ in 0..2 {
        s.queue
            .nack(&got.receipt, Nack::release("worker shutting down"))
            .await
            .unwrap();
        let err = s
            .queue
            .nack(&got.receipt, Nack::release("again"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, QueueError::InvalidReceipt(_)),
            "second release of one delivery: {err:?}"
        );
        got = one(&*s.queue, SLACK, SHORT_LEASE).await;
        assert_eq!(got.id, sent.id);
        assert_eq!(got.attempt, 1, "a release spent an attempt");
        assert_eq!(&got.payload[..], b"untried");
    }
    if caps(&s).dead_letter_admin {
        let dead = s.queue.dead_letters(10).await.unwrap();
        assert!(dead.is_empty(), "a release dead-lettered: {dead:?}");
    }
    // The attempt was not spent, so a failure now is the last one.
    s.queue
        .nack(
            &got.receipt,
            Nack::retry_after(Duration::ZERO, "really failed"),
        )
        .await
        .unwrap();
    nothing(&*s.queue, Duration::from_millis(200)).await;
    if caps(&s).dead_letter_admin {
        let dead = s.queue.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].id, sent.id);
        assert_eq!(dead[0].attempts, 1, "{dead:?}");
    }
}

/// An unacked job comes back after its lease with `attempt + 1`.
pub async fn lease_expiry_redelivers<
    F: Fn(QueueConfig) -> Fut,
    Fut: Future<Output = QueueSubject>,
>(
    make: F,
) {
    let s = subject(&make, "lease-expiry", |c| c).await;
    if !lease_expiry_or_refused(&*s.queue).await {
        return;
    }
    s.queue.enqueue(Job::new("abandoned")).await.unwrap();
    let leased = Instant::now();
    let first = one(&*s.queue, SLACK, SHORT_LEASE).await;
    let again = one(&*s.queue, SLACK + SHORT_LEASE, SHORT_LEASE).await;
    let took = leased.elapsed();
    assert!(
        took >= SHORT_LEASE - Duration::from_millis(50),
        "redelivered after {took:?}"
    );
    assert_eq!(again.id, first.id);
    assert_eq!(again.attempt, 2);
    s.queue.ack(&again.receipt).await.unwrap();
}

/// Acking with an expired lease's receipt is `InvalidReceipt`.
pub async fn expired_receipt_is_invalid<
    F: Fn(QueueConfig) -> Fut,
    Fut: Future<Output = QueueSubject>,
>(
    make: F,
) {
    let s = subject(&make, "expired-receipt", |c| c).await;
    if !lease_expiry_or_refused(&*s.queue).await {
        return;
    }
    s.queue.enqueue(Job::new("slow")).await.unwrap();
    let got = one(&*s.queue, SLACK, Duration::from_millis(200)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = s.queue.ack(&got.receipt).await.unwrap_err();
    assert!(
        matches!(err, QueueError::InvalidReceipt(_)),
        "ack after expiry: {err:?}"
    );
    assert!(!err.is_retryable());
    let err = s
        .queue
        .extend_lease(&got.receipt, SHORT_LEASE)
        .await
        .unwrap_err();
    assert!(
        matches!(err, QueueError::InvalidReceipt(_)),
        "extend after expiry: {err:?}"
    );
    let again = one(&*s.queue, SLACK, SHORT_LEASE).await;
    assert_eq!(again.attempt, 2);
    s.queue.ack(&again.receipt).await.unwrap();
}

/// `extend_lease` keeps a long-running job from being redelivered.
pub async fn extend_lease_keeps_job<
    F: Fn(QueueConfig) -> Fut,
    Fut: Future<Output = QueueSubject>,
>(
    make: F,
) {
    let s = subject(&make, "extend-lease", |c| c).await;
    if !lease_expiry_or_refused(&*s.queue).await {
        return;
    }
    s.queue.enqueue(Job::new("long job")).await.unwrap();
    let got = one(&*s.queue, SLACK, SHORT_LEASE).await;
    s.queue
        .extend_lease(&got.receipt, Duration::from_secs(10))
        .await
        .unwrap();
    tokio::time::sleep(SHORT_LEASE + Duration::from_millis(300)).await;
    nothing(&*s.queue, Duration::from_millis(100)).await;
    s.queue.ack(&got.receipt).await.unwrap();
}

/// A job that fails `max_attempts` times lands in the dead letters with the reason.
pub async fn max_attempts_dead_letters<
    F: Fn(QueueConfig) -> Fut,
    Fut: Future<Output = QueueSubject>,
>(
    make: F,
) {
    let s = subject(&make, "max-attempts", |c| c.max_attempts(2)).await;
    let sent = s.queue.enqueue(Job::new("poison")).await.unwrap();
    for attempt in 1..=2 {
        let got = one(&*s.queue, SLACK, SHORT_LEASE).await;
        assert_eq!(got.attempt, attempt);
        s.queue
            .nack(
                &got.receipt,
                Nack::retry_after(Duration::ZERO, "model crashed"),
            )
            .await
            .unwrap();
    }
    nothing(&*s.queue, Duration::from_millis(200)).await;
    if !supported_or_refused(caps(&s).dead_letter_admin, s.queue.dead_letters(1)).await {
        return;
    }
    let dead = s.queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].id, sent.id);
    assert_eq!(&dead[0].payload[..], b"poison");
    assert!(
        dead[0].reason.contains("max attempts"),
        "{}",
        dead[0].reason
    );
    assert!(
        dead[0].reason.contains("model crashed"),
        "{}",
        dead[0].reason
    );
}

/// Dead letters can be replayed as fresh jobs, and purged.
pub async fn replay_and_purge<F: Fn(QueueConfig) -> Fut, Fut: Future<Output = QueueSubject>>(
    make: F,
) {
    let s = subject(&make, "replay", |c| c).await;
    if !supported_or_refused(caps(&s).dead_letter_admin, s.queue.dead_letters(1)).await {
        return;
    }
    let a = s
        .queue
        .enqueue(Job::new("a").header("h", "1"))
        .await
        .unwrap();
    s.queue.enqueue(Job::new("b")).await.unwrap();
    for _ in 0..2 {
        let got = one(&*s.queue, SLACK, SHORT_LEASE).await;
        s.queue
            .nack(&got.receipt, Nack::dead_letter("bad input"))
            .await
            .unwrap();
    }
    let dead = s.queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].reason, "bad input");
    assert_eq!(
        s.queue
            .replay_dead_letters(std::slice::from_ref(&a.id))
            .await
            .unwrap(),
        1
    );
    let got = one(&*s.queue, SLACK, SHORT_LEASE).await;
    assert_eq!(got.id, a.id);
    assert_eq!(&got.payload[..], b"a");
    assert_eq!(got.headers["h"], "1");
    assert_eq!(got.attempt, 1);
    s.queue.ack(&got.receipt).await.unwrap();
    assert_eq!(s.queue.dead_letters(10).await.unwrap().len(), 1);
    assert_eq!(s.queue.purge_dead_letters().await.unwrap(), 1);
    assert!(s.queue.dead_letters(10).await.unwrap().is_empty());
}

/// A second enqueue with the same idempotency key inside the window is not enqueued.
pub async fn dedup_window<F: Fn(QueueConfig) -> Fut, Fut: Future<Output = QueueSubject>>(make: F) {
    let s = subject(&make, "dedup", |c| c).await;
    if !supported_or_refused(
        caps(&s).idempotency,
        s.queue.enqueue(Job::new("x").idempotency_key("refused")),
    )
    .await
    {
        return;
    }
    let first = s
        .queue
        .enqueue(Job::new("x").idempotency_key("req-1"))
        .await
        .unwrap();
    let second = s
        .queue
        .enqueue(Job::new("x").idempotency_key("req-1"))
        .await
        .unwrap();
    let other = s
        .queue
        .enqueue(Job::new("y").idempotency_key("req-2"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(second.id, first.id);
    assert!(!other.duplicate);
    let got = s.queue.dequeue(opts(10, SLACK, SHORT_LEASE)).await.unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    for d in &got {
        s.queue.ack(&d.receipt).await.unwrap();
    }
    nothing(&*s.queue, Duration::from_millis(100)).await;
}

/// Jobs of one priority come out in the order they went in.
pub async fn fifo_within_priority<F: Fn(QueueConfig) -> Fut, Fut: Future<Output = QueueSubject>>(
    make: F,
) {
    let s = subject(&make, "fifo", |c| c).await;
    let jobs: Vec<Job> = (0..50).map(|i| Job::new(format!("{i}"))).collect();
    s.queue.enqueue_batch(jobs).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 50 {
        let got = s
            .queue
            .dequeue(opts(7, SLACK, Duration::from_secs(10)))
            .await
            .unwrap();
        assert!(!got.is_empty(), "ran dry after {}", seen.len());
        for d in got {
            seen.push(String::from_utf8(d.payload.to_vec()).unwrap());
            s.queue.ack(&d.receipt).await.unwrap();
        }
    }
    let expected: Vec<String> = (0..50).map(|i| format!("{i}")).collect();
    assert_eq!(seen, expected);
}

/// Higher priorities are served first.
pub async fn priority_order<F: Fn(QueueConfig) -> Fut, Fut: Future<Output = QueueSubject>>(
    make: F,
) {
    let s = subject(&make, "priority", |c| c).await;
    assert_eq!(
        caps(&s).priority_levels,
        3,
        "the queue was built with the default three levels"
    );
    for (payload, priority) in [
        ("low", Priority::LOW),
        ("normal", Priority::NORMAL),
        ("high", Priority::HIGH),
        ("low2", Priority::LOW),
        ("high2", Priority::HIGH),
    ] {
        s.queue
            .enqueue(Job::new(payload).priority(priority))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let got = s
            .queue
            .dequeue(opts(1, SLACK, Duration::from_secs(10)))
            .await
            .unwrap();
        assert!(!got.is_empty());
        for d in got {
            seen.push(String::from_utf8(d.payload.to_vec()).unwrap());
            s.queue.ack(&d.receipt).await.unwrap();
        }
    }
    assert_eq!(seen, ["high", "high2", "normal", "low", "low2"]);
    let err = s
        .queue
        .enqueue(Job::new("x").priority(Priority(200)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            QueueError::InvalidArgument(ArgumentError {
                name: "priority",
                ..
            })
        ),
        "{err:?}"
    );
}

/// A delayed job is not delivered before its delay.
pub async fn delayed_delivery<F: Fn(QueueConfig) -> Fut, Fut: Future<Output = QueueSubject>>(
    make: F,
) {
    let s = subject(&make, "delay", |c| c).await;
    if !delay_or_refused(&*s.queue).await {
        return;
    }
    let delay = Duration::from_millis(600);
    let sent = Instant::now();
    s.queue
        .enqueue(Job::new("later").delay(delay))
        .await
        .unwrap();
    s.queue.enqueue(Job::new("now")).await.unwrap();
    let first = one(&*s.queue, SLACK, SHORT_LEASE).await;
    assert_eq!(&first.payload[..], b"now");
    s.queue.ack(&first.receipt).await.unwrap();
    let later = one(&*s.queue, SLACK + delay, SHORT_LEASE).await;
    let took = sent.elapsed();
    assert_eq!(&later.payload[..], b"later");
    assert!(
        took >= delay - Duration::from_millis(50),
        "delivered after {took:?}"
    );
    s.queue.ack(&later.receipt).await.unwrap();
}

/// A job past its deadline is dead-lettered, never delivered.
pub async fn expired_deadline_is_not_delivered<
    F: Fn(QueueConfig) -> Fut,
    Fut: Future<Output = QueueSubject>,
>(
    make: F,
) {
    let s = subject(&make, "deadline", |c| c).await;
    s.queue
        .enqueue(Job::new("too late").deadline(SystemTime::now() - Duration::from_secs(1)))
        .await
        .unwrap();
    s.queue
        .enqueue(Job::new("on time").deadline(SystemTime::now() + Duration::from_secs(600)))
        .await
        .unwrap();
    let got = one(&*s.queue, SLACK, SHORT_LEASE).await;
    assert_eq!(&got.payload[..], b"on time");
    assert!(got.deadline.is_some());
    s.queue.ack(&got.receipt).await.unwrap();
    nothing(&*s.queue, Duration::from_millis(100)).await;
    if caps(&s).dead_letter_admin {
        let dead = s.queue.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert!(dead[0].reason.contains("deadline"), "{}", dead[0].reason);
    }
}

/// Past capacity `enqueue` answers `Full` (retryable) and stores nothing.
pub async fn capacity_full<F: Fn(QueueConfig) -> Fut, Fut: Future<Output = QueueSubject>>(make: F) {
    let s = subject(&make, "capacity", |c| c.capacity(3)).await;
    assert!(
        caps(&s).capacity,
        "bounded capacity is part of the queue contract for every backend"
    );
    for i in 0..3 {
        s.queue.enqueue(Job::new(format!("{i}"))).await.unwrap();
    }
    let err = s.queue.enqueue(Job::new("overflow")).await.unwrap_err();
    assert!(matches!(err, QueueError::Full { capacity: 3 }), "{err:?}");
    assert!(err.is_retryable());
    let got = one(&*s.queue, SLACK, SHORT_LEASE).await;
    s.queue.ack(&got.receipt).await.unwrap();
    s.queue.enqueue(Job::new("fits now")).await.unwrap();
    let mut payloads = Vec::new();
    loop {
        let got = s
            .queue
            .dequeue(opts(10, Duration::from_millis(200), SHORT_LEASE))
            .await
            .unwrap();
        if got.is_empty() {
            break;
        }
        for d in got {
            payloads.push(String::from_utf8(d.payload.to_vec()).unwrap());
            s.queue.ack(&d.receipt).await.unwrap();
        }
    }
    assert_eq!(payloads, ["1", "2", "fits now"]);
}

/// `stats` counts ready, delayed, in-flight and dead jobs exactly.
pub async fn stats_exact<F: Fn(QueueConfig) -> Fut, Fut: Future<Output = QueueSubject>>(make: F) {
    let s = subject(&make, "stats", |c| c).await;
    if !caps(&s).exact_stats {
        // Estimates (the broker's counts may lag): a fresh queue has no dead
        // letters, and the counts settle on what was done within the slack.
        let stats = s.queue.stats().await.unwrap();
        assert_eq!(stats.dead, 0, "{stats:?}");
        for i in 0..3 {
            s.queue.enqueue(Job::new(format!("{i}"))).await.unwrap();
        }
        let got = one(&*s.queue, SLACK, Duration::from_secs(60)).await;
        s.queue
            .nack(&got.receipt, Nack::dead_letter("nope"))
            .await
            .unwrap();
        let give_up = Instant::now() + SLACK;
        loop {
            let stats = s.queue.stats().await.unwrap();
            if (stats.ready, stats.dead) == (2, 1) {
                break;
            }
            assert!(
                Instant::now() < give_up,
                "estimates never settled on 2 ready, 1 dead: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        return;
    }
    let empty = s.queue.stats().await.unwrap();
    assert_eq!(
        (empty.ready, empty.delayed, empty.in_flight, empty.dead),
        (0, 0, 0, 0)
    );
    assert_eq!(empty.oldest_ready_age, None);
    for i in 0..4 {
        s.queue.enqueue(Job::new(format!("{i}"))).await.unwrap();
    }
    s.queue
        .enqueue(Job::new("later").delay(Duration::from_secs(60)))
        .await
        .unwrap();
    let leased = s
        .queue
        .dequeue(opts(2, SLACK, Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(leased.len(), 2);
    s.queue
        .nack(&leased[1].receipt, Nack::dead_letter("nope"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let stats = s.queue.stats().await.unwrap();
    assert_eq!(stats.ready, 2, "{stats:?}");
    assert_eq!(stats.delayed, 1, "{stats:?}");
    assert_eq!(stats.in_flight, 1, "{stats:?}");
    assert_eq!(stats.dead, 1, "{stats:?}");
    let age = stats.oldest_ready_age.expect("two jobs are ready");
    assert!(
        age >= Duration::from_millis(10) && age < Duration::from_secs(60),
        "{age:?}"
    );
}

/// Two queues with different names never see each other's jobs.
pub async fn namespace_isolation<F: Fn(QueueConfig) -> Fut, Fut: Future<Output = QueueSubject>>(
    make: F,
) {
    let a = subject(&make, "iso-a", |c| c).await;
    let b = subject(&make, "iso-b", |c| c).await;
    a.queue.enqueue(Job::new("for a")).await.unwrap();
    nothing(&*b.queue, Duration::from_millis(200)).await;
    let got = one(&*a.queue, SLACK, SHORT_LEASE).await;
    assert_eq!(&got.payload[..], b"for a");
    a.queue.ack(&got.receipt).await.unwrap();
}

/// Undecodable payloads are dead-lettered with the reason by the typed layer.
pub async fn poison_payload_is_dead_lettered<
    F: Fn(QueueConfig) -> Fut,
    Fut: Future<Output = QueueSubject>,
>(
    make: F,
) {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Embed {
        text: String,
    }
    let s = subject(&make, "poison", |c| c).await;
    s.queue.enqueue(Job::new("{not json")).await.unwrap();
    s.queue
        .enqueue_json(&Embed { text: "ok".into() })
        .await
        .unwrap();
    let mut good = Vec::new();
    let start = Instant::now();
    while good.is_empty() && start.elapsed() < SLACK {
        good = s
            .queue
            .dequeue_json::<Embed>(opts(10, SLACK, SHORT_LEASE))
            .await
            .unwrap();
    }
    assert_eq!(good.len(), 1);
    assert_eq!(good[0].job, Embed { text: "ok".into() });
    s.queue.ack(&good[0].delivery.receipt).await.unwrap();
    if caps(&s).dead_letter_admin {
        let dead = s.queue.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(&dead[0].payload[..], b"{not json");
        assert!(dead[0].reason.contains("undecodable"), "{}", dead[0].reason);
    }
}

/// Dropping `dequeue` futures at any point loses no job.
pub async fn cancelled_dequeue_loses_nothing<
    F: Fn(QueueConfig) -> Fut,
    Fut: Future<Output = QueueSubject>,
>(
    make: F,
) {
    let s = subject(&make, "cancel", |c| c.max_attempts(100)).await;
    let total = 200;
    let producer = {
        let queue = s.queue.clone();
        tokio::spawn(async move {
            for i in 0..total {
                queue.enqueue(Job::new(format!("{i}"))).await.unwrap();
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    // Dequeues cut short at staggered moments, racing the producer.
    for i in 0..40u64 {
        let cut = Duration::from_micros(200 * (i % 10));
        let _ = tokio::time::timeout(
            cut,
            s.queue
                .dequeue(opts(5, Duration::from_secs(1), SHORT_LEASE)),
        )
        .await;
    }
    producer.await.unwrap();
    let mut seen = std::collections::HashSet::new();
    let start = Instant::now();
    while seen.len() < total && start.elapsed() < Duration::from_secs(20) {
        for d in s
            .queue
            .dequeue(opts(
                50,
                Duration::from_millis(500),
                Duration::from_secs(30),
            ))
            .await
            .unwrap()
        {
            seen.insert(d.payload.clone());
            s.queue.ack(&d.receipt).await.unwrap();
        }
    }
    assert_eq!(seen.len(), total, "jobs lost to cancelled dequeues");
}

/// 8 producers and 8 consumers move 10,000 jobs: each acked exactly once.
pub async fn many_producers_and_consumers<
    F: Fn(QueueConfig) -> Fut,
    Fut: Future<Output = QueueSubject>,
>(
    make: F,
) {
    const PRODUCERS: usize = 8;
    const CONSUMERS: usize = 8;
    const TOTAL: usize = 10_000;
    let s = subject(&make, "mpmc", |c| c).await;
    let start = Instant::now();
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let queue = s.queue.clone();
        producers.push(tokio::spawn(async move {
            let per = TOTAL / PRODUCERS;
            for chunk in (0..per).collect::<Vec<_>>().chunks(50) {
                let jobs = chunk.iter().map(|i| Job::new(format!("{p}-{i}"))).collect();
                queue.enqueue_batch(jobs).await.unwrap();
            }
        }));
    }
    let acked = Arc::new(parking_lot::Mutex::new(HashMap::<Bytes, u32>::new()));
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        let queue = s.queue.clone();
        let acked = acked.clone();
        consumers.push(tokio::spawn(async move {
            loop {
                if acked.lock().len() >= TOTAL || start.elapsed() > Duration::from_secs(120) {
                    return;
                }
                let got = queue
                    .dequeue(opts(
                        32,
                        Duration::from_millis(200),
                        Duration::from_secs(60),
                    ))
                    .await
                    .unwrap();
                for d in got {
                    queue.ack(&d.receipt).await.unwrap();
                    *acked.lock().entry(d.payload).or_default() += 1;
                }
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    for c in consumers {
        c.await.unwrap();
    }
    let acked = acked.lock();
    let twice = acked.values().filter(|n| **n > 1).count();
    assert_eq!(acked.len(), TOTAL, "lost {} jobs", TOTAL - acked.len());
    assert_eq!(twice, 0, "{twice} jobs acked more than once");
    println!(
        "conformance mpmc: sent={TOTAL} acked={} lost={} in {:?}",
        acked.len(),
        TOTAL - acked.len(),
        start.elapsed()
    );
}

/// A backlog of 20,000 jobs that all come due at once drains completely
/// (a peer library's known trap: unpacking every due job in one script).
pub async fn large_due_backlog_drains<
    F: Fn(QueueConfig) -> Fut,
    Fut: Future<Output = QueueSubject>,
>(
    make: F,
) {
    const TOTAL: usize = 20_000;
    let s = subject(&make, "backlog", |c| c).await;
    let delay = if caps(&s).delay {
        Some(Duration::from_millis(300))
    } else {
        None
    };
    let start = Instant::now();
    for chunk in (0..TOTAL).collect::<Vec<_>>().chunks(500) {
        let jobs = chunk
            .iter()
            .map(|i| {
                let job = Job::new(format!("{i}"));
                match delay {
                    Some(d) => job.delay(d),
                    None => job,
                }
            })
            .collect();
        s.queue.enqueue_batch(jobs).await.unwrap();
    }
    let enqueued_in = start.elapsed();
    let mut seen = std::collections::HashSet::new();
    while seen.len() < TOTAL && start.elapsed() < Duration::from_secs(60) {
        let got = s
            .queue
            .dequeue(opts(500, Duration::from_secs(2), Duration::from_secs(60)))
            .await
            .unwrap();
        let receipts: Vec<_> = got.iter().map(|d| d.receipt.clone()).collect();
        for d in got {
            seen.insert(d.payload);
        }
        s.queue.ack_batch(&receipts).await.unwrap();
    }
    assert_eq!(seen.len(), TOTAL, "backlog did not drain");
    println!(
        "conformance backlog: {TOTAL} due jobs enqueued in {enqueued_in:?}, drained in {:?}",
        start.elapsed()
    );
}

/// `purge` removes every waiting job (ready and delayed) and leaves leased
/// jobs and dead letters alone.
pub async fn purge_removes_waiting_jobs<
    F: Fn(QueueConfig) -> Fut,
    Fut: Future<Output = QueueSubject>,
>(
    make: F,
) {
    let s = subject(&make, "purge", |c| c).await;
    let caps = caps(&s);
    s.queue.enqueue(Job::new("leased")).await.unwrap();
    let leased = one(&*s.queue, SLACK, Duration::from_secs(30)).await;
    if caps.dead_letter_admin {
        s.queue.enqueue(Job::new("dead")).await.unwrap();
        let dead = one(&*s.queue, SLACK, SHORT_LEASE).await;
        s.queue
            .nack(&dead.receipt, Nack::dead_letter("kept"))
            .await
            .unwrap();
    }
    let mut waiting = 3u64;
    for i in 0..3 {
        s.queue
            .enqueue(Job::new(format!("ready-{i}")))
            .await
            .unwrap();
    }
    if caps.delay {
        for delay in [300, 301] {
            s.queue
                .enqueue(Job::new("delayed").delay(Duration::from_millis(delay)))
                .await
                .unwrap();
        }
        waiting += 2;
    }
    let removed = s.queue.purge().await.unwrap();
    if caps.exact_stats {
        assert_eq!(removed, waiting, "purge answers how many it removed");
    }
    nothing(&*s.queue, Duration::from_millis(800)).await;
    // The leased job is untouched: its ack still works.
    s.queue.ack(&leased.receipt).await.unwrap();
    if caps.dead_letter_admin {
        let dead = s.queue.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 1, "dead letters survive a purge");
        assert_eq!(dead[0].reason, "kept");
    }
    // The queue works on after a purge, delays included.
    s.queue.enqueue(Job::new("after")).await.unwrap();
    let got = one(&*s.queue, SLACK, SHORT_LEASE).await;
    assert_eq!(&got.payload[..], b"after");
    s.queue.ack(&got.receipt).await.unwrap();
    if caps.delay {
        s.queue
            .enqueue(Job::new("later").delay(Duration::from_millis(300)))
            .await
            .unwrap();
        let got = one(&*s.queue, SLACK, SHORT_LEASE).await;
        assert_eq!(&got.payload[..], b"later");
        s.queue.ack(&got.receipt).await.unwrap();
    }
    // An empty queue purges to nothing.
    assert_eq!(s.queue.purge().await.unwrap(), 0);
}

/// `delete` removes the queue with its jobs, leases, delays and dead
/// letters; the handle starts afresh, empty, and a second delete succeeds.
pub async fn delete_removes_everything<
    F: Fn(QueueConfig) -> Fut,
    Fut: Future<Output = QueueSubject>,
>(
    make: F,
) {
    let s = subject(&make, "delete", |c| c).await;
    let caps = caps(&s);
    for i in 0..3 {
        s.queue.enqueue(Job::new(format!("job-{i}"))).await.unwrap();
    }
    let leased = one(&*s.queue, SLACK, Duration::from_secs(30)).await;
    let dead = one(&*s.queue, SLACK, Duration::from_secs(30)).await;
    s.queue
        .nack(&dead.receipt, Nack::dead_letter("gone with the queue"))
        .await
        .unwrap();
    if caps.delay {
        s.queue
            .enqueue(Job::new("delayed").delay(Duration::from_millis(300)))
            .await
            .unwrap();
        // A retry's backoff is a delay too.
        let retried = one(&*s.queue, SLACK, Duration::from_secs(30)).await;
        s.queue
            .nack(
                &retried.receipt,
                Nack::retry_after(Duration::from_millis(250), "later"),
            )
            .await
            .unwrap();
    }
    s.queue.delete().await.unwrap();
    assert!(
        matches!(
            s.queue.ack(&leased.receipt).await,
            Err(QueueError::InvalidReceipt(_))
        ),
        "a receipt from before the delete is invalid"
    );
    nothing(&*s.queue, Duration::from_millis(800)).await;
    let stats = s.queue.stats().await.unwrap();
    assert_eq!(
        (stats.ready, stats.delayed, stats.in_flight, stats.dead),
        (0, 0, 0, 0),
        "{stats:?}"
    );
    if caps.dead_letter_admin {
        assert!(s.queue.dead_letters(10).await.unwrap().is_empty());
    }
    // The handle starts afresh.
    s.queue.enqueue(Job::new("fresh")).await.unwrap();
    let got = one(&*s.queue, SLACK, SHORT_LEASE).await;
    assert_eq!(&got.payload[..], b"fresh");
    assert_eq!(got.attempt, 1);
    s.queue.ack(&got.receipt).await.unwrap();
    s.queue.delete().await.unwrap();
    s.queue.delete().await.unwrap();
}

/// A caller-chosen id names the job in deliveries, retries and dead
/// letters; two jobs under one id are two jobs. Backends without the
/// capability refuse it with `Unsupported`.
pub async fn caller_chosen_ids<F: Fn(QueueConfig) -> Fut, Fut: Future<Output = QueueSubject>>(
    make: F,
) {
    let s = subject(&make, "ids", |c| c).await;
    let id = crate::JobId::from_string("order-42/embed");
    if !supported_or_refused(
        caps(&s).caller_ids,
        s.queue.enqueue(Job::new("x").id(id.clone())),
    )
    .await
    {
        return;
    }
    let caps = caps(&s);
    let sent = s
        .queue
        .enqueue(Job::new("first").id(id.clone()))
        .await
        .unwrap();
    assert_eq!(sent.id, id);
    match s
        .queue
        .enqueue(Job::new("x").id(crate::JobId::from_string("")))
        .await
    {
        Err(QueueError::InvalidArgument(ArgumentError { name: "id", .. })) => {}
        other => panic!("an empty id must be refused naming `id`, got {other:?}"),
    }
    let got = one(&*s.queue, SLACK, SHORT_LEASE).await;
    assert_eq!(got.id, id);
    if caps.delay {
        // Two delayed jobs under one id (a retry and a new job) both arrive.
        s.queue
            .nack(
                &got.receipt,
                Nack::retry_after(Duration::from_millis(200), "again"),
            )
            .await
            .unwrap();
        s.queue
            .enqueue(
                Job::new("second")
                    .id(id.clone())
                    .delay(Duration::from_millis(200)),
            )
            .await
            .unwrap();
        let mut payloads = Vec::new();
        let give_up = Instant::now() + SLACK * 2;
        while payloads.len() < 2 && Instant::now() < give_up {
            for d in s.queue.dequeue(opts(10, SLACK, SHORT_LEASE)).await.unwrap() {
                assert_eq!(d.id, id);
                payloads.push(d.payload.clone());
                if caps.dead_letter_admin && &d.payload[..] == b"first" {
                    s.queue
                        .nack(&d.receipt, Nack::dead_letter("done"))
                        .await
                        .unwrap();
                } else {
                    s.queue.ack(&d.receipt).await.unwrap();
                }
            }
        }
        payloads.sort();
        assert_eq!(payloads, vec![Bytes::from("first"), Bytes::from("second")]);
        if caps.dead_letter_admin {
            let dead = s.queue.dead_letters(10).await.unwrap();
            assert_eq!(dead.len(), 1);
            assert_eq!(dead[0].id, id);
        }
    } else {
        s.queue.ack(&got.receipt).await.unwrap();
    }
}

/// Jobs a backend cannot hold are refused up front, naming the field; the
/// queue keeps working.
pub async fn bad_jobs_are_refused<F: Fn(QueueConfig) -> Fut, Fut: Future<Output = QueueSubject>>(
    make: F,
) {
    let s = subject(&make, "bad-jobs", |c| c).await;
    if caps(&s).idempotency {
        match s.queue.enqueue(Job::new("x").idempotency_key("")).await {
            Err(QueueError::InvalidArgument(ArgumentError {
                name: "idempotency_key",
                ..
            })) => {}
            other => panic!("an empty idempotency key must be refused, got {other:?}"),
        }
    }
    // A batch with one bad job enqueues none of it.
    let batch = vec![Job::new("fine"), Job::new("bad").priority(Priority(200))];
    assert!(matches!(
        s.queue.enqueue_batch(batch).await,
        Err(QueueError::InvalidArgument(ArgumentError {
            name: "priority",
            ..
        }))
    ));
    nothing(&*s.queue, Duration::from_millis(200)).await;
    s.queue.enqueue(Job::new("ok")).await.unwrap();
    let got = one(&*s.queue, SLACK, SHORT_LEASE).await;
    s.queue.ack(&got.receipt).await.unwrap();
}

/// Expands the whole suite into one `#[tokio::test]` per case in a module
/// named `$module`, for the queue built by `$make`: a closure from
/// [`QueueConfig`] to a future of [`QueueSubject`].
#[macro_export]
macro_rules! queue_conformance {
    ($module:ident, $make:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $crate::queue_conformance!(@cases $make;
                round_trip, bad_options_are_refused, empty_dequeue_waits, waiting_dequeue_wakes_on_enqueue, ack_is_final,
                nack_retry_redelivers, release_keeps_attempt, lease_expiry_redelivers,
                expired_receipt_is_invalid, extend_lease_keeps_job, max_attempts_dead_letters,
                replay_and_purge, dedup_window, fifo_within_priority, priority_order,
                delayed_delivery,
                expired_deadline_is_not_delivered, capacity_full, stats_exact,
                namespace_isolation, poison_payload_is_dead_lettered,
                cancelled_dequeue_loses_nothing, many_producers_and_consumers,
                large_due_backlog_drains, purge_removes_waiting_jobs,
                delete_removes_everything, caller_chosen_ids, bad_jobs_are_refused);
        }
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            $crate::conformance::$case($make).await;
        }
    )*};
}
