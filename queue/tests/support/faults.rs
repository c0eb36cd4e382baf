//! The backend-neutral half of the fault tests: producers and consumers that
//! follow the error contract, the tally of what they saw, the figure line,
//! and [`stream_with_fault`], which streams jobs through any [`Queue`] while
//! a test breaks something.
//!
//! Included by each `*_faults.rs` test file with
//! `#[path = "support/faults.rs"] mod faults;`. Backend-specific checks (a
//! server of the test's own, counters only one backend keeps, broker-side
//! counts) stay in those files.
//!
//! # Contract of the producers and consumers
//!
//! A retryable error (`QueueError::is_retryable`) means back off briefly
//! ([`BACKOFF`]) and try again. Where the backend supports idempotency keys
//! ([`QueueCapabilities::idempotency`](keel_queue::QueueCapabilities)), every
//! job carries one, so a retried enqueue whose first try landed is answered
//! as a duplicate rather than enqueued twice, and the harness asserts no job
//! was enqueued twice. Where it does not, a retried enqueue after an
//! unconfirmed one may enqueue the job twice: at-least-once. Jobs are told
//! apart by payload, duplicates are allowed and reported, and loss is still
//! asserted to be zero.
//!
//! # The figure line
//!
//! `fault=<name> sent=<n> acked=<n> lost=<n> redelivered=<n>`, on stdout,
//! where `sent` counts distinct jobs whose enqueue returned `Ok`, `acked`
//! those of them that were acked, `lost = sent - acked` (asserted 0) and
//! `redelivered` counts deliveries with `attempt > 1`. Details go to stderr.
//!
//! An ack is counted when it returned `Ok`, or when an ack sent while the
//! lease was held ended without a confirmation (its reply was lost to the
//! fault, then a retry found the lease gone). Such an unconfirmed ack either
//! landed, and the job is gone, or did not, and the job comes back and is
//! acked again. To tell these apart from a job the backend dropped, every
//! stream ends only when the queue is verifiably empty (see [`drained`]);
//! each test file adds the checks only its backend allows.
// Each test file uses a different part of the harness.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use keel_queue::{Delivery, DequeueOptions, Job, Queue, QueueError, QueueStats, Receipt};
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};

/// How long producers and consumers wait after a retryable error.
pub(crate) const BACKOFF: Duration = Duration::from_millis(25);

/// Hard bound on every test, well under the 30 s budget.
pub(crate) const TEST_LIMIT: Duration = Duration::from_secs(20);

/// Bound on waiting for a stream to reach a point where a fault is injected.
pub(crate) const PROGRESS_LIMIT: Duration = Duration::from_secs(10);

/// Jobs per stream test.
pub(crate) const JOBS: u32 = 2_000;

/// The producers send at most one job per this interval between them, so
/// the stream lasts long enough for faults to land in its middle (about two
/// seconds).
pub(crate) const PACE: Duration = Duration::from_millis(1);

/// Deliveries per dequeue.
pub(crate) const BATCH: usize = 20;

// ---------------------------------------------------------------- tally --

/// What producers and consumers saw, shared between their tasks.
///
/// Locked only for short, synchronous updates, never across an `.await`.
#[derive(Default)]
pub(crate) struct Tally {
    /// Jobs whose enqueue returned `Ok` (new or duplicate).
    pub(crate) sent: HashSet<u32>,
    /// Jobs with an ack that returned `Ok`.
    pub(crate) acked: HashSet<u32>,
    /// Jobs with an ack sent under a held lease whose outcome is unknown.
    pub(crate) unconfirmed: HashSet<u32>,
    /// Deliveries with `attempt == 1`, per job: more than one means the job
    /// was enqueued twice.
    pub(crate) first_deliveries: HashMap<u32, u32>,
    /// Deliveries with `attempt > 1`.
    pub(crate) redelivered: u64,
    /// Enqueues tried again after a retryable error (each may have landed).
    pub(crate) enqueue_retries: u64,
    /// Set once the fault is over; the counters below count from then on.
    pub(crate) recovered: bool,
    pub(crate) sent_after: u64,
    pub(crate) delivered_after: u64,
    /// Retryable errors seen, by operation and kind.
    pub(crate) retryable: BTreeMap<String, u64>,
    /// Each distinct retryable error, with its causes, and how often.
    pub(crate) errors: BTreeMap<String, u64>,
    /// Failures that end the test (non-retryable errors, giving up).
    pub(crate) fatal: Vec<String>,
}

/// The tally, shared between the tasks of one test.
pub(crate) type Shared = Arc<Mutex<Tally>>;

/// An error with its causes, for messages.
pub(crate) fn chain(err: &QueueError) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

impl Tally {
    pub(crate) fn note_retryable(&mut self, op: &str, err: &QueueError) {
        let kind = match err {
            QueueError::Timeout(_) => "timeout",
            QueueError::Unavailable { .. } => "unavailable",
            QueueError::Full { .. } => "full",
            _ => "other",
        };
        let key = format!("{op}/{kind}");
        *self
            .errors
            .entry(format!("{key}: {}", chain(err)))
            .or_default() += 1;
        *self.retryable.entry(key).or_default() += 1;
    }

    pub(crate) fn note_sent(&mut self, id: u32) {
        if self.sent.insert(id) && self.recovered {
            self.sent_after += 1;
        }
    }

    pub(crate) fn note_delivery(&mut self, id: u32, attempt: u32) {
        if attempt == 1 {
            *self.first_deliveries.entry(id).or_default() += 1;
        } else {
            self.redelivered += 1;
        }
        if self.recovered {
            self.delivered_after += 1;
        }
    }

    /// Sent jobs with an ack (confirmed or not).
    pub(crate) fn acked_count(&self) -> usize {
        self.sent
            .iter()
            .filter(|id| self.acked.contains(id) || self.unconfirmed.contains(id))
            .count()
    }

    pub(crate) fn unconfirmed_only(&self) -> usize {
        self.unconfirmed.difference(&self.acked).count()
    }

    /// Jobs delivered more than once with `attempt == 1`: enqueued twice.
    pub(crate) fn duplicated(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .first_deliveries
            .iter()
            .filter(|&(_, &n)| n > 1)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    pub(crate) fn missing(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .sent
            .iter()
            .filter(|id| !self.acked.contains(id) && !self.unconfirmed.contains(id))
            .copied()
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Takes the tally back from a [`Shared`] once every task that held it
    /// has ended.
    pub(crate) fn take(shared: Shared) -> Tally {
        Arc::into_inner(shared)
            .expect("every task that held the tally has ended")
            .into_inner()
    }
}

/// The figure line of one test.
pub(crate) struct Figures {
    pub(crate) fault: &'static str,
    pub(crate) sent: usize,
    pub(crate) acked: usize,
    pub(crate) redelivered: u64,
}

impl Figures {
    pub(crate) fn from_tally(fault: &'static str, tally: &Tally) -> Self {
        Figures {
            fault,
            sent: tally.sent.len(),
            acked: tally.acked_count(),
            redelivered: tally.redelivered,
        }
    }

    pub(crate) fn lost(&self) -> usize {
        self.sent - self.acked
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fault={} sent={} acked={} lost={} redelivered={}",
            self.fault,
            self.sent,
            self.acked,
            self.lost(),
            self.redelivered
        )
    }
}

// ------------------------------------------------------------ producers --

/// Job `id`: its payload is the id, and it carries an idempotency key where
/// the backend supports them.
pub(crate) fn job<Q: Queue + ?Sized>(queue: &Q, id: u32) -> Job {
    let job = Job::new(id.to_string());
    if queue.capabilities().idempotency {
        job.idempotency_key(format!("job-{id}"))
    } else {
        job
    }
}

/// The id a delivery's payload carries.
pub(crate) fn job_id(delivery: &Delivery) -> u32 {
    std::str::from_utf8(&delivery.payload)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("a payload this test never sent: {:?}", delivery.payload))
}

/// Enqueues `id`, retrying retryable errors until `give_up`.
pub(crate) async fn enqueue_until_ok<Q: Queue + ?Sized>(
    queue: &Q,
    tally: &Shared,
    id: u32,
    give_up: Instant,
) -> bool {
    let mut retry = false;
    loop {
        if retry {
            tally.lock().enqueue_retries += 1;
        }
        match queue.enqueue(job(queue, id)).await {
            Ok(_) => {
                tally.lock().note_sent(id);
                return true;
            }
            Err(err) if err.is_retryable() && Instant::now() < give_up => {
                tally.lock().note_retryable("enqueue", &err);
                sleep(BACKOFF).await;
                retry = true;
            }
            Err(err) => {
                let mut t = tally.lock();
                if err.is_retryable() {
                    // Retryable, but past `give_up`.
                    t.note_retryable("enqueue", &err);
                }
                t.fatal
                    .push(format!("enqueue of job {id} failed: {}", chain(&err)));
                return false;
            }
        }
    }
}

/// Sends `ids` in order, job `n` of the range no earlier than `start + n *
/// PACE * every`; with `every` producers on interleaved ranges, the stream
/// keeps one job per [`PACE`] between them.
pub(crate) async fn produce<Q: Queue>(
    queue: Q,
    tally: Shared,
    ids: impl IntoIterator<Item = u32>,
    every: u32,
    give_up: Instant,
) {
    let start = Instant::now();
    for (n, id) in ids.into_iter().enumerate() {
        sleep_until(start + PACE * every * n as u32).await;
        if !enqueue_until_ok(&queue, &tally, id, give_up).await {
            return;
        }
    }
}

// ------------------------------------------------------------ consumers --

/// Acks `deliveries`: one batch call, and after any error one call per
/// receipt so each outcome is known where it can be.
pub(crate) async fn settle<Q: Queue + ?Sized>(
    queue: &Q,
    tally: &Shared,
    deliveries: &[Delivery],
    lease_end: Instant,
) {
    let receipts: Vec<Receipt> = deliveries.iter().map(|d| d.receipt.clone()).collect();
    match queue.ack_batch(&receipts).await {
        Ok(()) => {
            let mut tally = tally.lock();
            tally.acked.extend(deliveries.iter().map(job_id));
            return;
        }
        // Some leases expired before the ack, or the reply was lost.
        Err(QueueError::InvalidReceipt(_)) => {}
        Err(err) if err.is_retryable() => tally.lock().note_retryable("ack", &err),
        Err(err) => {
            tally
                .lock()
                .fatal
                .push(format!("ack_batch failed: {}", chain(&err)));
            return;
        }
    }
    for delivery in deliveries {
        ack_one(queue, tally, delivery, lease_end).await;
    }
}

/// Acks one delivery after its batch ack failed, retrying retryable errors
/// while the lease lasts.
pub(crate) async fn ack_one<Q: Queue + ?Sized>(
    queue: &Q,
    tally: &Shared,
    delivery: &Delivery,
    lease_end: Instant,
) {
    let id = job_id(delivery);
    loop {
        match queue.ack(&delivery.receipt).await {
            Ok(()) => {
                tally.lock().acked.insert(id);
                return;
            }
            // The batch ack may have landed, or the lease expired (then the
            // job comes back): unknown.
            Err(QueueError::InvalidReceipt(_)) => {
                tally.lock().unconfirmed.insert(id);
                return;
            }
            Err(err) if err.is_retryable() => {
                let give_up = Instant::now() >= lease_end;
                {
                    let mut t = tally.lock();
                    t.note_retryable("ack", &err);
                    if give_up {
                        t.unconfirmed.insert(id);
                    }
                }
                if give_up {
                    return;
                }
                sleep(BACKOFF).await;
            }
            Err(err) => {
                tally
                    .lock()
                    .fatal
                    .push(format!("ack of job {id} failed: {}", chain(&err)));
                return;
            }
        }
    }
}

/// Dequeues and acks until `stop`, sleeping briefly after retryable errors.
pub(crate) async fn consume<Q: Queue>(
    queue: Q,
    tally: Shared,
    options: DequeueOptions,
    stop: Instant,
) {
    while Instant::now() < stop {
        let started = Instant::now();
        let deliveries = match queue.dequeue(options).await {
            Ok(deliveries) => deliveries,
            Err(err) if err.is_retryable() => {
                tally.lock().note_retryable("dequeue", &err);
                sleep(BACKOFF).await;
                continue;
            }
            Err(err) => {
                tally
                    .lock()
                    .fatal
                    .push(format!("dequeue failed: {}", chain(&err)));
                return;
            }
        };
        {
            let mut tally = tally.lock();
            for delivery in &deliveries {
                tally.note_delivery(job_id(delivery), delivery.attempt);
            }
        }
        if !deliveries.is_empty() {
            settle(&queue, &tally, &deliveries, started + options.lease).await;
        }
    }
}

// ---------------------------------------------------------------- checks --

/// Runs `fut` and answers its output with how long it took.
pub(crate) async fn timed<T>(fut: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = fut.await;
    (out, started.elapsed())
}

/// No ready, delayed, leased or dead job.
pub(crate) fn is_empty(stats: &QueueStats) -> bool {
    stats.ready == 0 && stats.delayed == 0 && stats.in_flight == 0 && stats.dead == 0
}

/// Waits until every sent job is acked and the queue's stats show it empty,
/// or until `deadline`. Answers the last stats seen.
pub(crate) async fn drained<Q: Queue + ?Sized>(
    queue: &Q,
    tally: &Shared,
    deadline: Instant,
) -> Option<QueueStats> {
    let mut last = None;
    while Instant::now() < deadline {
        if !tally.lock().fatal.is_empty() {
            // A producer or consumer gave up: the test fails; say so now.
            break;
        }
        let all_acked = {
            let t = tally.lock();
            t.acked_count() == t.sent.len()
        };
        if all_acked {
            // Stats also take back expired leases on some backends, so
            // unconfirmed acks that did not land come back to the consumers.
            match queue.stats().await {
                Ok(stats) => {
                    last = Some(stats);
                    if is_empty(&stats) {
                        return last;
                    }
                }
                Err(err) if err.is_retryable() => tally.lock().note_retryable("stats", &err),
                Err(err) => tally
                    .lock()
                    .fatal
                    .push(format!("stats failed: {}", chain(&err))),
            }
        }
        sleep(Duration::from_millis(50)).await;
    }
    last
}

/// Waits until at least `n` jobs were sent.
pub(crate) async fn sent_at_least(tally: &Shared, n: usize) {
    let wait = async {
        while tally.lock().sent.len() < n {
            sleep(Duration::from_millis(5)).await;
        }
    };
    timeout(PROGRESS_LIMIT, wait)
        .await
        .unwrap_or_else(|_| panic!("the stream never reached {n} sent jobs"));
}

/// Sends `ids`; every enqueue must succeed, retries included, within
/// [`PROGRESS_LIMIT`].
pub(crate) async fn send_all<Q: Queue + ?Sized>(queue: &Q, tally: &Shared, ids: Range<u32>) {
    let give_up = Instant::now() + PROGRESS_LIMIT;
    for id in ids {
        assert!(
            enqueue_until_ok(queue, tally, id, give_up).await,
            "enqueue of job {id}: {:?}",
            tally.lock().fatal
        );
    }
}

/// Sends `ids`, then dequeues with `options` and acks until every one is
/// acked: the calm before a fault. Every call must succeed, within
/// [`PROGRESS_LIMIT`].
pub(crate) async fn send_and_ack<Q: Queue + ?Sized>(
    queue: &Q,
    tally: &Shared,
    ids: Range<u32>,
    options: DequeueOptions,
) {
    let deadline = Instant::now() + PROGRESS_LIMIT;
    let n = ids.len();
    send_all(queue, tally, ids).await;
    while tally.lock().acked_count() < n && Instant::now() < deadline {
        let deliveries = queue
            .dequeue(options)
            .await
            .unwrap_or_else(|err| panic!("dequeue before the fault: {}", chain(&err)));
        {
            let mut t = tally.lock();
            for delivery in &deliveries {
                t.note_delivery(job_id(delivery), delivery.attempt);
            }
        }
        settle(queue, tally, &deliveries, Instant::now() + options.lease).await;
    }
    assert_eq!(tally.lock().acked_count(), n, "jobs acked before the fault");
}

/// Notes `deliveries` and acks them in one call, which must succeed.
pub(crate) async fn ack_delivered<Q: Queue + ?Sized>(
    queue: &Q,
    tally: &Shared,
    deliveries: &[Delivery],
) {
    {
        let mut t = tally.lock();
        for delivery in deliveries {
            t.note_delivery(job_id(delivery), delivery.attempt);
        }
    }
    let receipts: Vec<Receipt> = deliveries.iter().map(|d| d.receipt.clone()).collect();
    queue
        .ack_batch(&receipts)
        .await
        .unwrap_or_else(|err| panic!("ack_batch failed: {}", chain(&err)));
    tally.lock().acked.extend(deliveries.iter().map(job_id));
}

/// Dequeues from `queue`, leasing for `lease`, until `n` deliveries arrived
/// or `limit` passed; answers them and when the first arrived (from the
/// call). Any error fails the test.
pub(crate) async fn take<Q: Queue + ?Sized>(
    queue: &Q,
    n: usize,
    lease: Duration,
    limit: Duration,
) -> (Vec<Delivery>, Option<Duration>) {
    let started = Instant::now();
    let options = DequeueOptions::new(n)
        .wait(Duration::from_millis(200))
        .lease(lease);
    let mut taken = Vec::new();
    let mut first = None;
    while taken.len() < n && started.elapsed() < limit {
        let deliveries = queue
            .dequeue(DequeueOptions {
                max: n - taken.len(),
                ..options
            })
            .await
            .unwrap_or_else(|err| panic!("dequeue failed: {}", chain(&err)));
        if !deliveries.is_empty() {
            first.get_or_insert_with(|| started.elapsed());
        }
        taken.extend(deliveries);
    }
    (taken, first)
}

/// A consumer on a task of its own that takes `n` jobs leased for `lease`
/// (see [`take`], within [`PROGRESS_LIMIT`]), then holds them and `queue`
/// without acking until the task is aborted, as a process that crashes.
/// Answers what it took, and the task to abort.
pub(crate) async fn hold<Q: Queue>(
    queue: Q,
    n: usize,
    lease: Duration,
) -> (Vec<Delivery>, JoinHandle<()>) {
    let (taken_tx, taken_rx) = tokio::sync::oneshot::channel();
    let holder = tokio::spawn(async move {
        let (taken, _) = take(&queue, n, lease, PROGRESS_LIMIT).await;
        let _ = taken_tx.send(taken);
        std::future::pending::<()>().await;
    });
    let taken = taken_rx.await.expect("the holding consumer ended early");
    (taken, holder)
}

/// A dequeue that waits up to `options.wait`, on a task of its own:
/// answers its result and how long it took.
pub(crate) fn long_poll<Q: Queue + Clone>(
    queue: &Q,
    options: DequeueOptions,
) -> JoinHandle<(Result<Vec<Delivery>, QueueError>, Duration)> {
    let queue = queue.clone();
    tokio::spawn(async move { timed(queue.dequeue(options)).await })
}

/// One call of [`every_call_at_once`].
pub(crate) struct Call {
    pub(crate) op: &'static str,
    /// How many jobs a dequeue delivered (0 for the other calls).
    pub(crate) result: Result<usize, QueueError>,
    pub(crate) took: Duration,
}

/// Every kind of call at once (enqueue of job `id`, dequeue with
/// `options`, ping, stats), each timed on its own.
pub(crate) async fn every_call_at_once<Q: Queue + ?Sized>(
    queue: &Q,
    id: u32,
    options: DequeueOptions,
) -> [Call; 4] {
    let (enqueue, dequeue, ping, stats) = tokio::join!(
        timed(queue.enqueue(job(queue, id))),
        timed(queue.dequeue(options)),
        timed(queue.ping()),
        timed(queue.stats()),
    );
    [
        Call {
            op: "enqueue",
            result: enqueue.0.map(|_| 0),
            took: enqueue.1,
        },
        Call {
            op: "dequeue",
            result: dequeue.0.map(|d| d.len()),
            took: dequeue.1,
        },
        Call {
            op: "ping",
            result: ping.0.map(|()| 0),
            took: ping.1,
        },
        Call {
            op: "stats",
            result: stats.0.map(|_| 0),
            took: stats.1,
        },
    ]
}

/// Runs a consumer (batches of [`BATCH`], 200 ms long polls, leases of
/// `lease`) until every sent job is acked and the queue is empty, or
/// `deadline`; answers the last stats seen (see [`drained`]).
pub(crate) async fn drain_with_consumer<Q: Queue + Clone>(
    queue: &Q,
    tally: &Shared,
    lease: Duration,
    deadline: Instant,
) -> Option<QueueStats> {
    let options = DequeueOptions::new(BATCH)
        .wait(Duration::from_millis(200))
        .lease(lease);
    let consumer = tokio::spawn(consume(queue.clone(), tally.clone(), options, deadline));
    let stats = drained(queue, tally, deadline).await;
    consumer.abort();
    let _ = consumer.await;
    stats
}

/// What [`blackhole`] saw.
pub(crate) struct Blackhole {
    /// Calls that failed during the outage.
    pub(crate) failures: u32,
    /// The slowest call during the outage.
    pub(crate) slowest: Duration,
    /// What the long poll that was waiting when the network went answered.
    pub(crate) polled: Result<Vec<Delivery>, QueueError>,
    /// How long that long poll took.
    pub(crate) poll_took: Duration,
    /// When the network came back.
    pub(crate) restored_at: Instant,
}

impl Blackhole {
    /// Runs a consumer until every sent job is acked and the queue is
    /// empty (see [`drain_with_consumer`]), at most until 10 s after the
    /// network came back.
    pub(crate) async fn drain_after<Q: Queue + Clone>(
        &self,
        queue: &Q,
        tally: &Shared,
        lease: Duration,
    ) -> Option<QueueStats> {
        let deadline = self.restored_at + Duration::from_secs(10);
        drain_with_consumer(queue, tally, lease, deadline).await
    }
}

/// The outage's part of a details line: `failures_in_outage=.. slowest_op=..
/// long_poll=.. (ok, n jobs | the error)`.
impl fmt::Display for Blackhole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "failures_in_outage={} slowest_op={:?} long_poll={:?} (",
            self.failures, self.slowest, self.poll_took
        )?;
        match &self.polled {
            Ok(deliveries) => write!(f, "ok, {} jobs)", deliveries.len()),
            Err(err) => write!(f, "{err})"),
        }
    }
}

/// The black-hole fault on an idle queue: a consumer waits in a 1 s long
/// poll, then `proxy` swallows every byte for `outage` while
/// [`every_call_at_once`] (enqueueing job `id`, dequeueing with `drain`)
/// runs over and over. `check` judges every call (panicking, or noting a
/// problem, where the backend got one wrong), and each failed call is noted
/// in `tally` as a retryable error. Then the network is restored.
pub(crate) async fn blackhole<Q: Queue + Clone>(
    proxy: &keel_testkit::FaultProxy,
    queue: &Q,
    tally: &Shared,
    id: u32,
    drain: DequeueOptions,
    outage: Duration,
    mut check: impl FnMut(&Call),
) -> Blackhole {
    let waiting = long_poll(queue, drain.wait(Duration::from_secs(1)));
    sleep(Duration::from_millis(100)).await;

    proxy.blackhole();
    let outage_ends = Instant::now() + outage;
    let mut slowest = Duration::ZERO;
    let mut failures = 0u32;
    while Instant::now() < outage_ends {
        for call in every_call_at_once(queue, id, drain).await {
            check(&call);
            if let Err(err) = &call.result {
                failures += 1;
                tally.lock().note_retryable(call.op, err);
            }
            slowest = slowest.max(call.took);
        }
    }
    let (polled, poll_took) = timeout(Duration::from_secs(5), waiting)
        .await
        .expect("a long poll hung through the black hole")
        .expect("the polling task panicked");
    proxy.restore();
    Blackhole {
        failures,
        slowest,
        polled,
        poll_took,
        restored_at: Instant::now(),
    }
}

// --------------------------------------------------------------- stream --

/// One stream test's setup.
pub(crate) struct StreamRun<Q> {
    pub(crate) fault: &'static str,
    /// The queue producers and consumers use (through the fault). It is
    /// dropped, with every clone, before [`stream_with_fault`] returns.
    pub(crate) queue: Q,
    pub(crate) lease: Duration,
    pub(crate) producers: u32,
    pub(crate) consumers: usize,
}

/// What a stream test saw.
pub(crate) struct Outcome {
    pub(crate) tally: Tally,
    pub(crate) figures: Figures,
    /// From the end of the fault until every job was acked.
    pub(crate) after_fault: Duration,
}

/// Streams [`JOBS`] jobs through `run.queue` with `run.producers` producers
/// and `run.consumers` consumers while `fault` runs (it returns when its
/// fault is over; progress from then on counts as recovery). Waits until
/// every job is acked and the queue is empty, prints the figure line and
/// checks everything a backend-neutral test can: no failure, nothing lost,
/// the queue empty, every job sent, and, where the backend has idempotency
/// keys, no job enqueued twice.
pub(crate) async fn stream_with_fault<Q, F, Fut>(run: StreamRun<Q>, fault: F) -> Outcome
where
    Q: Queue + Clone,
    F: FnOnce(Shared) -> Fut,
    Fut: Future<Output = ()>,
{
    let started = Instant::now();
    let stop = started + TEST_LIMIT - Duration::from_secs(4);
    let tally: Shared = Arc::default();
    let options = DequeueOptions::new(BATCH)
        .wait(Duration::from_millis(200))
        .lease(run.lease);
    let idempotent = run.queue.capabilities().idempotency;

    let every = run.producers.max(1);
    let producers: Vec<JoinHandle<()>> = (0..every)
        .map(|k| {
            let ids = (k..JOBS).step_by(every as usize);
            tokio::spawn(produce(run.queue.clone(), tally.clone(), ids, every, stop))
        })
        .collect();
    let consumers: Vec<JoinHandle<()>> = (0..run.consumers)
        .map(|_| tokio::spawn(consume(run.queue.clone(), tally.clone(), options, stop)))
        .collect();

    fault(tally.clone()).await;
    tally.lock().recovered = true;
    let recovered_at = Instant::now();

    let mut unfinished = Vec::new();
    for mut producer in producers {
        match timeout(
            stop.saturating_duration_since(Instant::now()),
            &mut producer,
        )
        .await
        {
            Ok(done) => done.expect("a producer panicked"),
            Err(_) => {
                producer.abort();
                unfinished.push(producer);
                let mut t = tally.lock();
                let sent = t.sent.len();
                t.fatal.push(format!(
                    "a producer did not finish in time: {sent} of {JOBS} sent"
                ));
            }
        }
    }
    let stats = drained(&run.queue, &tally, stop).await;
    let finished = Instant::now();
    for task in &consumers {
        task.abort();
    }
    for task in unfinished.into_iter().chain(consumers) {
        let _ = task.await;
    }
    drop(run.queue);

    let tally = Tally::take(tally);
    let figures = Figures::from_tally(run.fault, &tally);
    println!("{figures}");
    let duplicated = tally.duplicated();
    eprintln!(
        "fault={} elapsed={:?} after_fault={:?} unconfirmed_acks={} sent_after={} \
         delivered_after={} enqueue_retries={} duplicates={} retryable={:?}",
        run.fault,
        finished - started,
        finished - recovered_at,
        tally.unconfirmed_only(),
        tally.sent_after,
        tally.delivered_after,
        tally.enqueue_retries,
        duplicated.len(),
        tally.retryable,
    );
    for (error, n) in &tally.errors {
        eprintln!("  {n} x {error}");
    }

    assert!(tally.fatal.is_empty(), "failures: {:#?}", tally.fatal);
    assert_eq!(
        figures.lost(),
        0,
        "{figures}: jobs never acked: {:?}; last stats {stats:?}",
        tally.missing()
    );
    let stats = stats.expect("stats never answered after the fault");
    assert!(
        is_empty(&stats),
        "the queue is not empty at the end: {stats:?}"
    );
    if idempotent {
        assert_eq!(duplicated, Vec::<u32>::new(), "jobs enqueued twice");
    } else {
        // At-least-once without keys: a retried enqueue may land twice, but
        // only an enqueue that was retried.
        assert!(
            duplicated.len() as u64 <= tally.enqueue_retries,
            "{} jobs enqueued twice but only {} enqueues retried: {duplicated:?}",
            duplicated.len(),
            tally.enqueue_retries
        );
    }
    assert_eq!(figures.sent, JOBS as usize);
    Outcome {
        tally,
        figures,
        after_fault: finished - recovered_at,
    }
}

/// The connection-cut fault: once 500 jobs are sent, every open connection
/// through `proxy` is reset twice, 200 ms apart. Answers how many
/// connections the proxy had accepted before the cuts.
pub(crate) async fn cut_twice(proxy: &keel_testkit::FaultProxy, tally: &Shared) -> u64 {
    sent_at_least(tally, 500).await;
    assert!(proxy.open_connections() > 0, "nothing to cut");
    let accepted = proxy.connections_accepted();
    proxy.cut();
    sleep(Duration::from_millis(200)).await;
    proxy.cut();
    accepted
}

/// The latency-spike fault: once 500 jobs are sent, 300 ms each way through
/// `proxy` for 1.5 s, then restored. Answers how many jobs had been sent
/// when the spike began and when it ended.
pub(crate) async fn spike_latency(
    proxy: &keel_testkit::FaultProxy,
    tally: &Shared,
) -> (usize, usize) {
    sent_at_least(tally, 500).await;
    let begin = tally.lock().sent.len();
    let latency = keel_testkit::Latency::fixed(Duration::from_millis(300));
    proxy.set_latency(keel_testkit::Direction::Both, latency);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    proxy.restore();
    (begin, tally.lock().sent.len())
}

/// Checks a latency-spike run: the spike was real (few jobs got through at
/// 600 ms a round trip) and throughput recovered soon after it.
pub(crate) fn assert_spike_and_recovery(
    outcome: &Outcome,
    (begin, end): (usize, usize),
    details: &str,
) {
    let after = JOBS as usize - end;
    let rate_after = after as f64 / outcome.after_fault.as_secs_f64();
    eprintln!(
        "fault=latency_spike sent_during_spike={} sent_after_spike={after} \
         drained_in={:?} ({rate_after:.0} jobs/s) {details}",
        end - begin,
        outcome.after_fault
    );
    // The producers send a handful of jobs in 1.5 s instead of 1,500.
    assert!(
        end - begin < 100,
        "{} jobs sent during the spike",
        end - begin
    );
    assert!(outcome.tally.sent_after > 0, "no enqueue after the spike");
    // The rest (about 1,500 jobs, a 1.5 s stream at the producers' pace)
    // was sent and acked soon after.
    assert!(
        outcome.after_fault < Duration::from_secs(6),
        "throughput did not recover: {after} jobs took {:?} after the spike",
        outcome.after_fault
    );
}

/// What came back after a consumer died holding jobs.
pub(crate) struct Comeback {
    /// The deliveries the second consumer received.
    pub(crate) back: Vec<Delivery>,
    /// When the first of them arrived, after the crash.
    pub(crate) first_back: Option<Duration>,
    /// When the crash happened.
    pub(crate) crashed_at: Instant,
}

/// Consumer `a` takes `held` jobs with `lease` and dies (its task and its
/// handle are dropped without acking); answers what `b` then receives
/// within 10 s.
pub(crate) async fn crash_holding<Q: Queue>(a: Q, b: &Q, held: usize, lease: Duration) -> Comeback {
    let (taken, holder) = hold(a, held, lease).await;
    assert_eq!(taken.len(), held, "consumer A takes the whole batch");
    assert!(taken.iter().all(|d| d.attempt == 1));
    holder.abort();
    assert!(holder.await.unwrap_err().is_cancelled());
    let crashed_at = Instant::now();
    let (back, first_back) = take(b, held, Duration::from_secs(10), Duration::from_secs(10)).await;
    Comeback {
        back,
        first_back,
        crashed_at,
    }
}
