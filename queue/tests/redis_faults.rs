//! Faults under load on the Redis Streams backend, against real servers:
//! connections cut mid-stream, the server killed and restarted, a latency
//! spike, a consumer dying with leases, and a black-holed network (also with
//! a command in flight, whose reply it swallows).
//!
//! Each test runs its own `redis-server` (see [`own_server`]), so its
//! timings do not depend on what else uses the shared server.
//!
//! Every test streams jobs through `RedisQueue` handles that are never
//! rebuilt after the fault: the queue must recover on its own. Producers and
//! consumers do what the error contract asks of callers: a retryable error
//! (`Error::is_retryable`) means back off briefly and try again; producers
//! give every job an idempotency key, so a retried enqueue whose first try
//! landed is answered as a duplicate rather than enqueued twice.
//!
//! Each test prints one figure line,
//! `fault=<name> sent=<n> acked=<n> lost=<n> redelivered=<n>`, where `sent`
//! counts distinct jobs whose enqueue returned `Ok`, `acked` those of them
//! that were acked, `lost = sent - acked` (asserted 0) and `redelivered`
//! counts deliveries with `attempt > 1`. Details go to stderr.
//!
//! An ack is counted when it returned `Ok`, or when an ack sent while the
//! lease was held ended without a confirmation (its reply was lost to the
//! fault, then a retry found the lease gone). Such an unconfirmed ack either
//! landed, and the job is gone, or did not, and the job comes back when its
//! lease expires and is acked again. To tell these apart from a job the
//! backend dropped, every stream test ends only when the queue is verifiably
//! empty: no ready, delayed, leased or dead job, and the queue's job counter
//! back at zero.
#![cfg(feature = "redis")]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use keel_queue::{
    Delivery, DequeueOptions, Error, Job, Queue, QueueConfig, QueueStats, Receipt, RedisQueue,
    RedisQueueConfig,
};
use keel_testkit::{Direction, FaultProxy, Latency, Namespace, RedisServer};
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};

/// How long producers and consumers wait after a retryable error.
const BACKOFF: Duration = Duration::from_millis(25);

/// Hard bound on every test, well under the 30 s budget.
const TEST_LIMIT: Duration = Duration::from_secs(20);

/// Bound on waiting for a stream to reach a point where a fault is injected.
const PROGRESS_LIMIT: Duration = Duration::from_secs(10);

/// Jobs per stream test.
const JOBS: u32 = 2_000;

/// The producer sends at most one job per this interval, so the stream
/// lasts long enough for faults to land in its middle (about two seconds).
const PACE: Duration = Duration::from_millis(1);

/// Deliveries per dequeue.
const BATCH: usize = 20;

// ---------------------------------------------------------------- tally --

/// What producers and consumers saw, shared between their tasks.
///
/// Locked only for short, synchronous updates, never across an `.await`.
#[derive(Default)]
struct Tally {
    /// Jobs whose enqueue returned `Ok` (new or duplicate).
    sent: HashSet<u32>,
    /// Jobs with an ack that returned `Ok`.
    acked: HashSet<u32>,
    /// Jobs with an ack sent under a held lease whose outcome is unknown.
    unconfirmed: HashSet<u32>,
    /// Deliveries with `attempt == 1`, per job: more than one means the job
    /// was enqueued twice.
    first_deliveries: HashMap<u32, u32>,
    /// Deliveries with `attempt > 1`.
    redelivered: u64,
    /// Set once the fault is over; the counters below count from then on.
    recovered: bool,
    sent_after: u64,
    delivered_after: u64,
    /// Retryable errors seen, by operation and kind.
    retryable: BTreeMap<String, u64>,
    /// Each distinct retryable error, with its causes, and how often.
    errors: BTreeMap<String, u64>,
    /// Failures that end the test (non-retryable errors, giving up).
    fatal: Vec<String>,
}

type Shared = Arc<Mutex<Tally>>;

/// An error with its causes, for messages.
fn chain(err: &Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

impl Tally {
    fn note_retryable(&mut self, op: &str, err: &Error) {
        let kind = match err {
            Error::Timeout(_) => "timeout",
            Error::Unavailable { .. } => "unavailable",
            Error::Full { .. } => "full",
            _ => "other",
        };
        let key = format!("{op}/{kind}");
        *self
            .errors
            .entry(format!("{key}: {}", chain(err)))
            .or_default() += 1;
        *self.retryable.entry(key).or_default() += 1;
    }

    fn note_sent(&mut self, id: u32) {
        if self.sent.insert(id) && self.recovered {
            self.sent_after += 1;
        }
    }

    fn note_delivery(&mut self, id: u32, attempt: u32) {
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
    fn acked_count(&self) -> usize {
        self.sent
            .iter()
            .filter(|id| self.acked.contains(id) || self.unconfirmed.contains(id))
            .count()
    }

    fn unconfirmed_only(&self) -> usize {
        self.unconfirmed.difference(&self.acked).count()
    }

    fn duplicated(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .first_deliveries
            .iter()
            .filter(|&(_, &n)| n > 1)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    fn missing(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .sent
            .iter()
            .filter(|id| !self.acked.contains(id) && !self.unconfirmed.contains(id))
            .copied()
            .collect();
        ids.sort_unstable();
        ids
    }
}

/// The figure line of one test.
struct Figures {
    fault: &'static str,
    sent: usize,
    acked: usize,
    redelivered: u64,
}

impl Figures {
    fn from_tally(fault: &'static str, tally: &Tally) -> Self {
        Figures {
            fault,
            sent: tally.sent.len(),
            acked: tally.acked_count(),
            redelivered: tally.redelivered,
        }
    }

    fn lost(&self) -> usize {
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

fn job(id: u32) -> Job {
    Job::new(id.to_string()).idempotency_key(format!("job-{id}"))
}

fn job_id(delivery: &Delivery) -> u32 {
    std::str::from_utf8(&delivery.payload)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("a payload this test never sent: {:?}", delivery.payload))
}

/// Enqueues `id`, retrying retryable errors until `give_up`.
async fn enqueue_until_ok(queue: &RedisQueue, tally: &Shared, id: u32, give_up: Instant) -> bool {
    loop {
        match queue.enqueue(job(id)).await {
            Ok(_) => {
                tally.lock().note_sent(id);
                return true;
            }
            Err(err) if err.is_retryable() && Instant::now() < give_up => {
                tally.lock().note_retryable("enqueue", &err);
                sleep(BACKOFF).await;
            }
            Err(err) => {
                tally
                    .lock()
                    .fatal
                    .push(format!("enqueue of job {id} failed: {}", chain(&err)));
                return false;
            }
        }
    }
}

/// Sends `ids` in order, one job per [`PACE`] at most.
async fn produce(queue: RedisQueue, tally: Shared, ids: Range<u32>, give_up: Instant) {
    let start = Instant::now();
    for (n, id) in ids.enumerate() {
        sleep_until(start + PACE * n as u32).await;
        if !enqueue_until_ok(&queue, &tally, id, give_up).await {
            return;
        }
    }
}

// ------------------------------------------------------------ consumers --

/// Acks `deliveries`: one batch call, and after any error one call per
/// receipt so each outcome is known where it can be.
async fn settle(queue: &RedisQueue, tally: &Shared, deliveries: &[Delivery], lease_end: Instant) {
    let receipts: Vec<Receipt> = deliveries.iter().map(|d| d.receipt.clone()).collect();
    match queue.ack_batch(&receipts).await {
        Ok(()) => {
            let mut tally = tally.lock();
            tally.acked.extend(deliveries.iter().map(job_id));
            return;
        }
        // Some leases expired before the ack, or the reply was lost.
        Err(Error::InvalidReceipt(_)) => {}
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
async fn ack_one(queue: &RedisQueue, tally: &Shared, delivery: &Delivery, lease_end: Instant) {
    let id = job_id(delivery);
    loop {
        match queue.ack(&delivery.receipt).await {
            Ok(()) => {
                tally.lock().acked.insert(id);
                return;
            }
            // The batch ack may have landed, or the lease expired (then the
            // job comes back): unknown.
            Err(Error::InvalidReceipt(_)) => {
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
async fn consume(queue: RedisQueue, tally: Shared, options: DequeueOptions, stop: Instant) {
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
async fn timed<T>(fut: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = fut.await;
    (out, started.elapsed())
}

/// Reads the queue's job counter straight from Redis (`keel:{q}:size`, see
/// the backend's layout): it must return to zero once every job is acked.
async fn size_counter(url: &str, queue: &str) -> redis::RedisResult<i64> {
    let client = redis::Client::open(url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let size: Option<i64> = redis::cmd("GET")
        .arg(format!("keel:{{{queue}}}:size"))
        .query_async(&mut con)
        .await?;
    Ok(size.unwrap_or(0))
}

fn is_empty(stats: &QueueStats) -> bool {
    stats.ready == 0 && stats.delayed == 0 && stats.in_flight == 0 && stats.dead == 0
}

/// Waits until every sent job is acked and the queue is empty, or until
/// `deadline`. Answers the last stats seen.
async fn drained(queue: &RedisQueue, tally: &Shared, deadline: Instant) -> Option<QueueStats> {
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
            // Stats also take back expired leases, so unconfirmed acks that
            // did not land come back to the consumers.
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
async fn sent_at_least(tally: &Shared, n: usize) {
    let wait = async {
        while tally.lock().sent.len() < n {
            sleep(Duration::from_millis(5)).await;
        }
    };
    timeout(PROGRESS_LIMIT, wait)
        .await
        .unwrap_or_else(|_| panic!("the stream never reached {n} sent jobs"));
}

/// A `redis-server` of the test's own. These tests measure time and
/// throughput, so they do not share the server with other tests (or a
/// benchmark) whose load would skew them; and the server dies with the
/// test, so there is nothing to clean up.
async fn own_server() -> RedisServer {
    RedisServer::start()
        .await
        .expect("start a redis-server of the test's own")
}

/// Builds a queue on `url` with a short operation timeout.
async fn connect(url: &str, name: &str, operation_timeout: Duration) -> RedisQueue {
    let mut config = RedisQueueConfig::new(url, QueueConfig::new(name).capacity(100_000));
    config.operation_timeout = operation_timeout;
    config.max_block = Duration::from_secs(1);
    RedisQueue::connect(config)
        .await
        .unwrap_or_else(|err| panic!("connect to {url}: {err}"))
}

struct StreamRun<'a> {
    fault: &'static str,
    /// The queue producers and consumers use (through the fault).
    queue: RedisQueue,
    /// The server itself, for the final counter check.
    direct_url: &'a str,
    name: &'a str,
    lease: Duration,
    consumers: usize,
}

/// What a stream test saw.
struct Outcome {
    tally: Tally,
    /// From the end of the fault until every job was acked.
    after_fault: Duration,
}

/// Streams [`JOBS`] jobs through `run.queue` with one producer and
/// `run.consumers` consumers while `fault` runs (it returns when its fault
/// is over; progress from then on counts as recovery). Waits until every
/// job is acked and the queue is empty, prints the figure line and checks
/// everything.
async fn stream_with_fault<F, Fut>(run: StreamRun<'_>, fault: F) -> Outcome
where
    F: FnOnce(Shared) -> Fut,
    Fut: Future<Output = ()>,
{
    let started = Instant::now();
    let stop = started + TEST_LIMIT - Duration::from_secs(4);
    let tally: Shared = Arc::default();
    let options = DequeueOptions::new(BATCH)
        .wait(Duration::from_millis(200))
        .lease(run.lease);

    let mut producer = tokio::spawn(produce(run.queue.clone(), tally.clone(), 0..JOBS, stop));
    let consumers: Vec<JoinHandle<()>> = (0..run.consumers)
        .map(|_| tokio::spawn(consume(run.queue.clone(), tally.clone(), options, stop)))
        .collect();

    fault(tally.clone()).await;
    tally.lock().recovered = true;
    let recovered_at = Instant::now();

    match timeout(
        stop.saturating_duration_since(Instant::now()),
        &mut producer,
    )
    .await
    {
        Ok(done) => done.expect("the producer panicked"),
        Err(_) => {
            producer.abort();
            let _ = producer.await;
            let mut t = tally.lock();
            let sent = t.sent.len();
            t.fatal.push(format!(
                "the producer did not finish in time: {sent} of {JOBS} sent"
            ));
        }
    }
    let stats = drained(&run.queue, &tally, stop).await;
    let finished = Instant::now();
    for consumer in &consumers {
        consumer.abort();
    }
    for consumer in consumers {
        let _ = consumer.await;
    }

    let tally = Arc::into_inner(tally)
        .expect("every task that held the tally has ended")
        .into_inner();
    let figures = Figures::from_tally(run.fault, &tally);
    println!("{figures}");
    eprintln!(
        "fault={} elapsed={:?} after_fault={:?} unconfirmed_acks={} sent_after={} \
         delivered_after={} retryable={:?}",
        run.fault,
        finished - started,
        finished - recovered_at,
        tally.unconfirmed_only(),
        tally.sent_after,
        tally.delivered_after,
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
    let size = size_counter(run.direct_url, run.name)
        .await
        .expect("read the job counter");
    assert_eq!(size, 0, "the job counter is off after every job was acked");
    assert_eq!(tally.duplicated(), Vec::<u32>::new(), "jobs enqueued twice");
    assert_eq!(figures.sent, JOBS as usize);
    Outcome {
        tally,
        after_fault: finished - recovered_at,
    }
}

// ----------------------------------------------------------------- tests --

/// Every open connection is reset twice, 200 ms apart, while jobs flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_mid_stream() {
    timeout(TEST_LIMIT, async {
        let server = own_server().await;
        let url = server.url();
        let ns = Namespace::new("connection_cut_mid_stream");
        let name = ns.name("q");
        let proxy = FaultProxy::start_for_url(&url).await.expect("start proxy");
        let queue = connect(&proxy.url_for(&url), &name, Duration::from_secs(2)).await;
        let run = StreamRun {
            fault: "connection_cut_mid_stream",
            queue,
            direct_url: &url,
            name: &name,
            lease: Duration::from_secs(2),
            consumers: 2,
        };
        // The proxy must outlive the fault: dropping it closes its port.
        let fault_proxy = &proxy;
        let accepted_at_cut = Arc::new(Mutex::new(0));
        let at_cut = accepted_at_cut.clone();
        let outcome = stream_with_fault(run, |tally| async move {
            sent_at_least(&tally, 500).await;
            assert!(fault_proxy.open_connections() > 0, "nothing to cut");
            *at_cut.lock() = fault_proxy.connections_accepted();
            fault_proxy.cut();
            sleep(Duration::from_millis(200)).await;
            fault_proxy.cut();
        })
        .await;
        let accepted_at_cut = *accepted_at_cut.lock();
        let tally = outcome.tally;
        assert!(tally.sent_after > 0, "no enqueue succeeded after the cuts");
        assert!(tally.delivered_after > 0, "no delivery after the cuts");
        assert!(
            proxy.connections_accepted() > accepted_at_cut,
            "the queue never opened a new connection after the cuts"
        );
    })
    .await
    .expect("the test took too long");
}

/// The server is killed with SIGKILL mid-stream and restarted on the same
/// port 500 ms later; with `appendfsync always` it keeps every write it
/// acknowledged.
///
/// Replaying the append-only file takes a moment, as it does for any real
/// data set, and clients that reconnect meanwhile are answered `LOADING`:
/// `key-load-delay` (a Redis testing setting, in microseconds per entry)
/// stretches the replay of this small file to over a second, so some
/// always are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted() {
    timeout(TEST_LIMIT, async {
        let mut server = RedisServer::start_with_args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--key-load-delay",
            "100",
        ])
        .await
        .expect("start a redis-server of our own");
        let url = server.url();
        let ns = Namespace::new("redis_killed_and_restarted");
        let name = ns.name("q");
        let queue = connect(&url, &name, Duration::from_secs(1)).await;
        let restarted = &mut server;
        let run = StreamRun {
            fault: "redis_killed_and_restarted",
            queue,
            direct_url: &url,
            name: &name,
            lease: Duration::from_secs(2),
            consumers: 2,
        };
        let outcome = stream_with_fault(run, |tally| async move {
            sent_at_least(&tally, 600).await;
            restarted.kill();
            sleep(Duration::from_millis(500)).await;
            restarted.restart().await.expect("restart redis-server");
        })
        .await;
        let tally = outcome.tally;
        let log = std::fs::read_to_string(server.dir().join("redis.log")).unwrap_or_default();
        let replay = log
            .lines()
            .rfind(|line| line.contains("DB loaded from append only file"))
            .unwrap_or("(no replay in the log)");
        eprintln!("fault=redis_killed_and_restarted replay: {replay}");
        assert!(
            tally.errors.keys().any(|e| e.contains("loading")),
            "no client met the server while it was loading: {:#?}",
            tally.errors
        );
        assert!(
            tally.sent_after > 0,
            "the queue never enqueued again after the restart"
        );
        assert!(
            tally.delivered_after > 0,
            "the queue never delivered again after the restart"
        );
        assert!(
            tally.retryable.keys().any(|k| k.starts_with("enqueue/")),
            "the producer saw no error while the server was down: {:?}",
            tally.retryable
        );
        drop(server);
    })
    .await
    .expect("the test took too long");
}

/// 300 ms of latency each way for 1.5 s, then none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_spike() {
    timeout(TEST_LIMIT, async {
        let server = own_server().await;
        let url = server.url();
        let ns = Namespace::new("latency_spike");
        let name = ns.name("q");
        let proxy = FaultProxy::start_for_url(&url).await.expect("start proxy");
        let queue = connect(&proxy.url_for(&url), &name, Duration::from_secs(2)).await;
        let run = StreamRun {
            fault: "latency_spike",
            queue,
            direct_url: &url,
            name: &name,
            lease: Duration::from_secs(5),
            consumers: 2,
        };
        // Jobs sent when the spike began and when it ended.
        let spike = Arc::new(Mutex::new((0usize, 0usize)));
        let at_spike = spike.clone();
        let fault_proxy = &proxy;
        let outcome = stream_with_fault(run, |tally| async move {
            sent_at_least(&tally, 500).await;
            let begin = tally.lock().sent.len();
            let latency = Latency::fixed(Duration::from_millis(300));
            fault_proxy.set_latency(Direction::Both, latency);
            sleep(Duration::from_millis(1_500)).await;
            fault_proxy.restore();
            *at_spike.lock() = (begin, tally.lock().sent.len());
        })
        .await;
        let (begin, end) = *spike.lock();
        let after = JOBS as usize - end;
        let rate_after = after as f64 / outcome.after_fault.as_secs_f64();
        eprintln!(
            "fault=latency_spike sent_during_spike={} sent_after_spike={after} \
             drained_in={:?} ({rate_after:.0} jobs/s)",
            end - begin,
            outcome.after_fault
        );
        // The spike was real: at 600 ms a round trip, a sequential producer
        // sends a handful of jobs in 1.5 s instead of 1,500.
        assert!(
            end - begin < 100,
            "{} jobs sent during the spike",
            end - begin
        );
        assert!(outcome.tally.sent_after > 0, "no enqueue after the spike");
        // Throughput recovered: the rest (about 1,500 jobs, a 1.5 s stream
        // at the producer's pace) was sent and acked soon after.
        assert!(
            outcome.after_fault < Duration::from_secs(6),
            "throughput did not recover: {after} jobs took {:?} after the spike",
            outcome.after_fault
        );
    })
    .await
    .expect("the test took too long");
}

/// A consumer takes 50 jobs with a 1 s lease and dies without acking; a
/// second process's handle on the same queue gets all 50 back, attempt 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_dropped_holding_leases() {
    const HELD: u32 = 50;
    const LEASE: Duration = Duration::from_secs(1);
    timeout(TEST_LIMIT, async {
        let server = own_server().await;
        let url = server.url();
        let ns = Namespace::new("consumer_dropped_holding_leases");
        let name = ns.name("q");
        let consumer_b = connect(&url, &name, Duration::from_secs(2)).await;
        let tally: Shared = Arc::default();
        let give_up = Instant::now() + PROGRESS_LIMIT;
        for id in 0..HELD {
            assert!(enqueue_until_ok(&consumer_b, &tally, id, give_up).await);
        }

        let consumer_a = connect(&url, &name, Duration::from_secs(2)).await;
        let (taken_tx, taken_rx) = tokio::sync::oneshot::channel();
        let holder = tokio::spawn(async move {
            let options = DequeueOptions::new(HELD as usize)
                .wait(Duration::from_secs(2))
                .lease(LEASE);
            let deliveries = consumer_a.dequeue(options).await;
            let _ = taken_tx.send(deliveries);
            // Hold the leases (and the handle) until aborted, never acking.
            std::future::pending::<()>().await;
        });
        let taken = taken_rx
            .await
            .expect("consumer A ended early")
            .expect("consumer A dequeues");
        let taken_at = Instant::now();
        assert_eq!(
            taken.len(),
            HELD as usize,
            "consumer A takes the whole batch"
        );
        assert!(taken.iter().all(|d| d.attempt == 1));
        holder.abort();
        assert!(holder.await.unwrap_err().is_cancelled());

        let options = DequeueOptions::new(HELD as usize)
            .wait(Duration::from_secs(3))
            .lease(Duration::from_secs(10));
        let mut first_back = None;
        let mut received = 0;
        while received < HELD as usize && taken_at.elapsed() < Duration::from_secs(10) {
            let deliveries = match consumer_b.dequeue(options).await {
                Ok(deliveries) => deliveries,
                Err(err) => panic!("consumer B dequeue failed: {err}"),
            };
            if deliveries.is_empty() {
                continue;
            }
            first_back.get_or_insert_with(|| taken_at.elapsed());
            received += deliveries.len();
            {
                let mut t = tally.lock();
                for delivery in &deliveries {
                    assert_eq!(delivery.attempt, 2, "a job back from a dead consumer");
                    t.note_delivery(job_id(delivery), delivery.attempt);
                }
            }
            let receipts: Vec<Receipt> = deliveries.iter().map(|d| d.receipt.clone()).collect();
            consumer_b
                .ack_batch(&receipts)
                .await
                .expect("consumer B acks");
            tally.lock().acked.extend(deliveries.iter().map(job_id));
        }

        let stats = consumer_b.stats().await.expect("stats");
        let tally = Arc::into_inner(tally)
            .expect("no task holds the tally")
            .into_inner();
        let figures = Figures::from_tally("consumer_dropped_holding_leases", &tally);
        println!("{figures}");
        eprintln!(
            "fault=consumer_dropped_holding_leases back_after={first_back:?} lease={LEASE:?} received={received}"
        );
        assert_eq!(figures.lost(), 0, "jobs never acked: {:?}", tally.missing());
        assert_eq!(figures.redelivered, u64::from(HELD));
        assert_eq!(
            received, HELD as usize,
            "consumer B got every job exactly once"
        );
        assert!(is_empty(&stats), "{stats:?}");
        // The jobs came back because the lease expired, not earlier.
        let back = first_back.expect("some job came back");
        assert!(
            back >= LEASE - Duration::from_millis(100),
            "jobs came back {back:?} after a {LEASE:?} lease"
        );
        assert_eq!(size_counter(&url, &name).await.expect("job counter"), 0);
    })
    .await
    .expect("the test took too long");
}

/// The network swallows every byte for about a second: operations fail
/// within the operation timeout with retryable errors, never hang, and the
/// same queue works once the network is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_then_restore() {
    const OP_TIMEOUT: Duration = Duration::from_millis(500);
    const SLACK: Duration = Duration::from_millis(500);
    const OUTAGE: Duration = Duration::from_secs(1);
    const JOBS_EACH_SIDE: u32 = 100;
    timeout(TEST_LIMIT, async {
        let server = own_server().await;
        let url = server.url();
        let ns = Namespace::new("blackhole_then_restore");
        let name = ns.name("q");
        let proxy = FaultProxy::start_for_url(&url).await.expect("start proxy");
        let queue = connect(&proxy.url_for(&url), &name, OP_TIMEOUT).await;
        let tally: Shared = Arc::default();
        let lease = Duration::from_secs(2);
        let drain = DequeueOptions::new(BATCH).wait(Duration::ZERO).lease(lease);

        // Before: jobs flow.
        let give_up = Instant::now() + PROGRESS_LIMIT;
        for id in 0..JOBS_EACH_SIDE {
            assert!(enqueue_until_ok(&queue, &tally, id, give_up).await);
        }

        // Then they are consumed, and a consumer waits in a long poll on
        // the empty queue when the network goes.
        let deadline = Instant::now() + PROGRESS_LIMIT;
        while tally.lock().acked_count() < JOBS_EACH_SIDE as usize && Instant::now() < deadline {
            let deliveries = queue
                .dequeue(drain)
                .await
                .expect("dequeue before the fault");
            for delivery in &deliveries {
                tally
                    .lock()
                    .note_delivery(job_id(delivery), delivery.attempt);
            }
            settle(&queue, &tally, &deliveries, Instant::now() + lease).await;
        }
        let waiting = {
            let queue = queue.clone();
            let poll = DequeueOptions::new(BATCH)
                .wait(Duration::from_secs(1))
                .lease(lease);
            tokio::spawn(async move {
                let started = Instant::now();
                (queue.dequeue(poll).await, started.elapsed())
            })
        };
        sleep(Duration::from_millis(100)).await;

        proxy.blackhole();
        let outage_ends = Instant::now() + OUTAGE;
        let mut slowest = Duration::ZERO;
        let mut failures = 0u32;
        let mut next = JOBS_EACH_SIDE;
        while Instant::now() < outage_ends {
            // Every kind of call at once, each timed on its own.
            let (enqueue, dequeue, ping, stats) = tokio::join!(
                timed(queue.enqueue(job(next))),
                timed(queue.dequeue(drain)),
                timed(queue.ping()),
                timed(queue.stats()),
            );
            let results = [
                ("enqueue", enqueue.0.map(drop), enqueue.1),
                ("dequeue", dequeue.0.map(drop), dequeue.1),
                ("ping", ping.0, ping.1),
                ("stats", stats.0.map(drop), stats.1),
            ];
            for (op, result, took) in results {
                let err = result.expect_err("an operation succeeded through a black hole");
                assert!(
                    matches!(err, Error::Timeout(_) | Error::Unavailable { .. }),
                    "{op}: {err:?}"
                );
                assert!(err.is_retryable(), "{op}: {err}");
                tally.lock().note_retryable(op, &err);
                failures += 1;
                slowest = slowest.max(took);
            }
        }
        let (polled, poll_took) = timeout(Duration::from_secs(5), waiting)
            .await
            .expect("a long poll hung through the black hole")
            .expect("the polling task panicked");
        proxy.restore();
        let restored_at = Instant::now();

        // After: the same queue recovers on its own. The enqueue tried
        // during the outage is retried with its idempotency key.
        let give_up = restored_at + PROGRESS_LIMIT;
        assert!(enqueue_until_ok(&queue, &tally, next, give_up).await);
        let recovered_in = restored_at.elapsed();
        next += 1;
        for id in next..2 * JOBS_EACH_SIDE {
            assert!(enqueue_until_ok(&queue, &tally, id, give_up).await);
        }
        let consumer = tokio::spawn(consume(
            queue.clone(),
            tally.clone(),
            DequeueOptions::new(BATCH)
                .wait(Duration::from_millis(200))
                .lease(lease),
            restored_at + Duration::from_secs(10),
        ));
        let stats = drained(&queue, &tally, restored_at + Duration::from_secs(10)).await;
        consumer.abort();
        let _ = consumer.await;

        let tally = Arc::into_inner(tally)
            .expect("no task holds the tally")
            .into_inner();
        let figures = Figures::from_tally("blackhole_then_restore", &tally);
        println!("{figures}");
        eprintln!(
            "fault=blackhole_then_restore failures_in_outage={failures} slowest_op={slowest:?} \
             long_poll={poll_took:?} ({}) recovered_in={recovered_in:?} retryable={:?}",
            match &polled {
                Ok(d) => format!("ok, {} jobs", d.len()),
                Err(err) => format!("{err}"),
            },
            tally.retryable
        );
        assert!(tally.fatal.is_empty(), "failures: {:#?}", tally.fatal);
        assert!(failures > 0);
        match &polled {
            Ok(deliveries) => assert!(deliveries.is_empty(), "a delivery through a black hole"),
            Err(err) => assert!(err.is_retryable(), "{err}"),
        }
        assert!(
            poll_took <= Duration::from_secs(1) + OP_TIMEOUT + SLACK,
            "a 1 s long poll took {poll_took:?} to give up"
        );
        assert!(
            slowest <= OP_TIMEOUT + SLACK,
            "an operation took {slowest:?} to fail (operation timeout {OP_TIMEOUT:?})"
        );
        assert_eq!(figures.lost(), 0, "jobs never acked: {:?}", tally.missing());
        assert_eq!(figures.sent, 2 * JOBS_EACH_SIDE as usize);
        let stats = stats.expect("stats answered after the restore");
        assert!(is_empty(&stats), "{stats:?}");
        assert_eq!(tally.duplicated(), Vec::<u32>::new(), "jobs enqueued twice");
        assert_eq!(size_counter(&url, &name).await.expect("job counter"), 0);
    })
    .await
    .expect("the test took too long");
}

/// A black hole that swallows the reply of a command in flight, on a queue
/// with one connection: once the network is back, the next call must
/// work; it must not inherit the lost reply.
///
/// The command is held in flight deterministically: `CLIENT PAUSE WRITE`
/// on a server of the test's own holds scripts (not `PING`) until the pause
/// ends, which happens inside the black hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_with_a_command_in_flight() {
    const OP_TIMEOUT: Duration = Duration::from_secs(1);
    timeout(TEST_LIMIT, async {
        let server = own_server().await;
        let url = server.url();
        let proxy = FaultProxy::start_for_url(&url).await.expect("start proxy");
        let ns = Namespace::new("blackhole_with_a_command_in_flight");
        let name = ns.name("q");
        let mut config =
            RedisQueueConfig::new(proxy.url_for(&url), QueueConfig::new(&name).capacity(1_000));
        config.operation_timeout = OP_TIMEOUT;
        config.pool_size = 1;
        let queue = RedisQueue::connect(config).await.expect("connect");
        let tally: Shared = Arc::default();
        let give_up = Instant::now() + PROGRESS_LIMIT;
        assert!(enqueue_until_ok(&queue, &tally, 0, give_up).await);

        let client = redis::Client::open(url.as_str()).expect("client");
        let mut direct = client
            .get_multiplexed_async_connection()
            .await
            .expect("direct connection");
        let start = Instant::now();
        let () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(1_500)
            .arg("WRITE")
            .query_async(&mut direct)
            .await
            .expect("CLIENT PAUSE");
        // Reaches the server at once and waits there for the pause to end.
        let in_flight = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.enqueue(job(1)).await })
        };
        sleep_until(start + Duration::from_millis(300)).await;
        proxy.blackhole();
        // The pause ends at 1.5 s: the server runs the script and its reply
        // falls into the black hole.
        sleep_until(start + Duration::from_millis(1_800)).await;
        proxy.restore();
        let err = in_flight
            .await
            .expect("the enqueue task panicked")
            .expect_err("an enqueue answered through a black hole");
        assert!(err.is_retryable(), "{err}");
        tally.lock().note_retryable("enqueue", &err);

        // The network is back: the producer retries job 1 (same key).
        let (first, first_took) = timed(queue.enqueue(job(1))).await;
        let first = first.map_err(|err| err.to_string());
        match &first {
            // Either outcome is correct: the timed-out call's connection is
            // closed, so Redis may have dropped the paused command with its
            // client (not a duplicate) or run it first (a duplicate). The
            // idempotency key makes the retry safe both ways.
            Ok(_) => tally.lock().note_sent(1),
            Err(_) => assert!(enqueue_until_ok(&queue, &tally, 1, give_up).await),
        }

        let consumer = tokio::spawn(consume(
            queue.clone(),
            tally.clone(),
            DequeueOptions::new(BATCH)
                .wait(Duration::from_millis(200))
                .lease(Duration::from_secs(2)),
            Instant::now() + Duration::from_secs(10),
        ));
        let stats = drained(&queue, &tally, Instant::now() + Duration::from_secs(10)).await;
        consumer.abort();
        let _ = consumer.await;

        let tally = Arc::into_inner(tally)
            .expect("no task holds the tally")
            .into_inner();
        let figures = Figures::from_tally("blackhole_with_a_command_in_flight", &tally);
        println!("{figures}");
        eprintln!(
            "fault=blackhole_with_a_command_in_flight first_call_after_restore={first:?} \
             in {first_took:?} retryable={:?}",
            tally.retryable
        );
        assert!(tally.fatal.is_empty(), "failures: {:#?}", tally.fatal);
        assert_eq!(figures.lost(), 0, "jobs never acked: {:?}", tally.missing());
        assert_eq!(figures.sent, 2);
        let stats = stats.expect("stats answered after the restore");
        assert!(is_empty(&stats), "{stats:?}");
        assert_eq!(tally.duplicated(), Vec::<u32>::new(), "jobs enqueued twice");
        assert_eq!(size_counter(&url, &name).await.expect("job counter"), 0);
        assert!(
            first.is_ok(),
            "the first call after the network came back failed after {first_took:?} with: {}; \
             the connection whose reply was lost went back to the pool, and checking it \
             (a PING that never gets its own answer) took the whole operation timeout",
            first.as_ref().unwrap_err()
        );
    })
    .await
    .expect("the test took too long");
}
