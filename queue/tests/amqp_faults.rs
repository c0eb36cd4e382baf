//! Faults under load on the RabbitMQ backend, against the real broker at
//! `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`): connections
//! cut mid-stream, a latency spike, a consumer dropped holding leases, a
//! lease expiring on a live consumer, and a black-holed network.
//!
//! Every test uses a queue of its own ([`Namespace`]) with the default
//! (quorum) queue type, and deletes its queues and exchange when it ends
//! ([`DeleteTopology`]). Network faults go through a [`FaultProxy`] in front
//! of the broker.
//!
//! Jobs flow through `AmqpQueue` handles that are never rebuilt after the
//! fault: the backend reconnects on the next call after an error. The
//! producers, consumers, tally and figure line are the shared harness in
//! `support/faults.rs` (its docs give the contract they follow and what the
//! figure line `fault=<name> sent=.. acked=.. lost=.. redelivered=..`
//! counts). RabbitMQ has no idempotency keys, so a retried enqueue whose
//! first try landed unconfirmed enqueues the job twice: at-least-once. Jobs
//! are told apart by payload, duplicates are allowed and reported in the
//! details line (`duplicates=`), and none may be lost.
//!
//! Backend stats are estimates (ready counts are the broker's, in-flight
//! only this handle's view), so every test ends with the broker's own
//! count, read once every handle is gone and the broker has requeued what
//! their connections held: no ready message and no dead letter may be left.
#![cfg(feature = "amqp")]

#[path = "support/amqp.rs"]
mod amqp_support;
#[path = "support/faults.rs"]
mod faults;

use std::sync::Arc;
use std::time::Duration;

use amqp_support::{BrokerCounts, DeleteTopology, settled_broker_counts};
use faults::{
    BATCH, Call, Figures, PROGRESS_LIMIT, Shared, StreamRun, TEST_LIMIT, Tally, ack_delivered,
    assert_spike_and_recovery, blackhole, chain, crash_holding, cut_twice, enqueue_until_ok,
    is_empty, job, send_all, send_and_ack, spike_latency, stream_with_fault, take, timed,
};
use keel_queue::{AmqpQueue, AmqpQueueConfig, DequeueOptions, Queue, QueueConfig, QueueError};
use keel_testkit::{FaultProxy, Namespace, require_amqp};
use parking_lot::Mutex;
use tokio::time::{Instant, timeout};

/// Priority levels of every test queue (the default; jobs go to level 1).
const LEVELS: u8 = 3;

/// How long the broker may take to drop a closed connection's consumers.
const SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// Producers per stream test: a publish waits for the broker's confirm (a
/// quorum queue writes it to disk first), so a few publish side by side to
/// keep the stream at its pace.
const PRODUCERS: u32 = 4;

/// A test's own queue on the broker: where it is, and the guard that
/// deletes its topology when the test ends (bind it first, so it drops
/// after every handle).
struct TestQueue {
    url: String,
    name: String,
    _topology: DeleteTopology,
}

impl TestQueue {
    /// The queue of the test `test` (in a [`Namespace`] of its own) on the
    /// broker [`require_amqp`] finds.
    async fn new(test: &str) -> TestQueue {
        let url = require_amqp().await;
        let name = Namespace::new(test).name("q");
        let _topology = DeleteTopology::new(&url, &name, LEVELS);
        TestQueue {
            url,
            name,
            _topology,
        }
    }
}

/// A handle on the queue `name` at `url` with the given operation timeout.
async fn connect(url: &str, name: &str, operation_timeout: Duration) -> AmqpQueue {
    let config = AmqpQueueConfig::new(
        url,
        QueueConfig::new(name)
            .capacity(100_000)
            .priority_levels(LEVELS),
    )
    .operation_timeout(operation_timeout)
    // Half-open connections (the black hole) are noticed within seconds, so
    // the broker requeues what it had delivered on them.
    .heartbeat(Duration::from_secs(1));
    AmqpQueue::connect(config)
        .await
        .unwrap_or_else(|err| panic!("connect to rabbitmq at {url}: {}", chain(&err)))
}

/// A [`FaultProxy`] in front of the server at `url`, and the queue `name`
/// connected through it (see [`connect`]).
async fn proxied(url: &str, name: &str, operation_timeout: Duration) -> (FaultProxy, AmqpQueue) {
    let proxy = FaultProxy::start_for_url(url).await.expect("start proxy");
    let queue = connect(&proxy.url_for(url), name, operation_timeout).await;
    (proxy, queue)
}

/// The broker's counts for `name` once every handle is gone, checked to be
/// empty.
async fn assert_broker_drained(url: &str, name: &str) -> BrokerCounts {
    let counts = settled_broker_counts(url, name, LEVELS, SETTLE_LIMIT).await;
    assert_eq!(
        (counts.ready, counts.dead),
        (0, 0),
        "the broker still holds jobs of `{name}` once every handle is gone \
         (ready, dead): {counts:?}"
    );
    counts
}

// ----------------------------------------------------------------- tests --

/// Every open connection is reset twice, 200 ms apart, while about 2,000
/// jobs flow; the same handle resumes publishing and consuming on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_mid_stream() {
    let TestQueue {
        url,
        name,
        _topology,
    } = TestQueue::new("amqp_connection_cut_mid_stream").await;
    timeout(TEST_LIMIT, async {
        let (proxy, queue) = proxied(&url, &name, Duration::from_secs(2)).await;
        let run = StreamRun {
            fault: "connection_cut_mid_stream",
            queue,
            lease: Duration::from_secs(2),
            producers: PRODUCERS,
            consumers: 2,
        };
        // The proxy must outlive the fault: dropping it closes its port.
        let fault_proxy = &proxy;
        let accepted_at_cut = Arc::new(Mutex::new(0));
        let at_cut = accepted_at_cut.clone();
        let outcome = stream_with_fault(run, |tally| async move {
            *at_cut.lock() = cut_twice(fault_proxy, &tally).await;
        })
        .await;
        let accepted_at_cut = *accepted_at_cut.lock();
        let accepted = proxy.connections_accepted();
        drop(proxy);
        let counts = assert_broker_drained(&url, &name).await;
        let tally = outcome.tally;
        eprintln!(
            "fault=connection_cut_mid_stream connections={} duplicates={:?} broker={counts:?}",
            accepted,
            tally.duplicated(),
        );
        assert!(tally.sent_after > 0, "no enqueue succeeded after the cuts");
        assert!(tally.delivered_after > 0, "no delivery after the cuts");
        assert!(
            accepted > accepted_at_cut,
            "the queue never opened a new connection after the cuts"
        );
        assert!(
            tally.retryable.keys().any(|k| !k.starts_with("stats/")),
            "the cuts went unnoticed: {:?}",
            tally.retryable
        );
    })
    .await
    .expect("the test took too long");
}

/// 300 ms of latency each way for 1.5 s, then none: every job is acked and
/// throughput comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_spike() {
    let TestQueue {
        url,
        name,
        _topology,
    } = TestQueue::new("amqp_latency_spike").await;
    timeout(TEST_LIMIT, async {
        let (proxy, queue) = proxied(&url, &name, Duration::from_secs(2)).await;
        let run = StreamRun {
            fault: "latency_spike",
            queue,
            lease: Duration::from_secs(5),
            producers: PRODUCERS,
            consumers: 2,
        };
        let spike = Arc::new(Mutex::new((0usize, 0usize)));
        let at_spike = spike.clone();
        let fault_proxy = &proxy;
        let outcome = stream_with_fault(run, |tally| async move {
            *at_spike.lock() = spike_latency(fault_proxy, &tally).await;
        })
        .await;
        drop(proxy);
        let counts = assert_broker_drained(&url, &name).await;
        let spike = *spike.lock();
        assert_spike_and_recovery(&outcome, spike, &format!("broker={counts:?}"));
    })
    .await
    .expect("the test took too long");
}

/// Handle A takes 50 jobs with a long lease and is dropped without acking,
/// as a crashed process; the broker requeues them when A's connection
/// closes, and handle B gets all 50 with attempt 2 long before A's lease
/// would have expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_dropped_holding_leases() {
    const HELD: u32 = 50;
    const LEASE: Duration = Duration::from_secs(60);
    let TestQueue {
        url,
        name,
        _topology,
    } = TestQueue::new("amqp_consumer_dropped_holding_leases").await;
    timeout(TEST_LIMIT, async {
        // B only enqueues until A holds the jobs: a handle starts consuming
        // at its first dequeue.
        let consumer_b = connect(&url, &name, Duration::from_secs(2)).await;
        let tally: Shared = Arc::default();
        send_all(&consumer_b, &tally, 0..HELD).await;

        let consumer_a = connect(&url, &name, Duration::from_secs(2)).await;
        let comeback = crash_holding(consumer_a, &consumer_b, HELD as usize, LEASE).await;
        let all_back = comeback.crashed_at.elapsed();
        let (back, first_back) = (comeback.back, comeback.first_back);
        ack_delivered(&consumer_b, &tally, &back).await;
        let stats = consumer_b.stats().await.expect("stats");
        drop(consumer_b);
        let counts = assert_broker_drained(&url, &name).await;

        let tally = Tally::take(tally);
        let figures = Figures::from_tally("consumer_dropped_holding_leases", &tally);
        println!("{figures}");
        eprintln!(
            "fault=consumer_dropped_holding_leases first_back={first_back:?} \
             all_back={all_back:?} lease={LEASE:?} received={} broker={counts:?}",
            back.len()
        );
        assert_eq!(figures.lost(), 0, "jobs never acked: {:?}", tally.missing());
        assert!(
            back.iter().all(|d| d.attempt == 2),
            "attempts of jobs back from a dead consumer: {:?}",
            back.iter().map(|d| d.attempt).collect::<Vec<_>>()
        );
        assert_eq!(figures.redelivered, u64::from(HELD));
        assert_eq!(
            back.len(),
            HELD as usize,
            "consumer B got every job exactly once"
        );
        assert!(is_empty(&stats), "{stats:?}");
        // Back because A's connection closed, not because a lease expired.
        assert!(
            all_back < Duration::from_secs(3),
            "the jobs took {all_back:?} to come back from a dropped handle"
        );
    })
    .await
    .expect("the test took too long");
}

/// Handle A takes 20 jobs with a 1 s lease and never acks them, but stays
/// alive (a stuck worker): A's handle requeues them when the lease expires
/// and they reach handle B, attempt 2, about a second later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_without_crash() {
    const HELD: u32 = 20;
    const LEASE: Duration = Duration::from_secs(1);
    let TestQueue {
        url,
        name,
        _topology,
    } = TestQueue::new("amqp_lease_expiry_without_crash").await;
    timeout(TEST_LIMIT, async {
        let consumer_b = connect(&url, &name, Duration::from_secs(2)).await;
        let tally: Shared = Arc::default();
        send_all(&consumer_b, &tally, 0..HELD).await;

        let consumer_a = connect(&url, &name, Duration::from_secs(2)).await;
        let (taken, _) = take(&consumer_a, HELD as usize, LEASE, PROGRESS_LIMIT).await;
        let taken_at = Instant::now();
        assert_eq!(
            taken.len(),
            HELD as usize,
            "consumer A takes the whole batch"
        );
        assert!(taken.iter().all(|d| d.attempt == 1));

        // A stays alive and never acks; B waits for the jobs.
        let (back, first_back) = take(
            &consumer_b,
            HELD as usize,
            Duration::from_secs(10),
            Duration::from_secs(5),
        )
        .await;
        let all_back = taken_at.elapsed();
        ack_delivered(&consumer_b, &tally, &back).await;
        // What A's late ack of one job answers: its lease is gone.
        let late_ack = consumer_a.ack(&taken[0].receipt).await;
        let stats_a = consumer_a.stats().await;
        drop(consumer_a);
        // Jobs A's handle kept to itself come back now; B acks them, so the
        // broker ends empty either way and the figures say what happened.
        let (stragglers, _) = take(
            &consumer_b,
            HELD as usize - back.len(),
            Duration::from_secs(10),
            Duration::from_secs(2),
        )
        .await;
        ack_delivered(&consumer_b, &tally, &stragglers).await;
        let stats = consumer_b.stats().await.expect("stats");
        drop(consumer_b);
        let counts = assert_broker_drained(&url, &name).await;

        let tally = Tally::take(tally);
        let figures = Figures::from_tally("lease_expiry_without_crash", &tally);
        println!("{figures}");
        eprintln!(
            "fault=lease_expiry_without_crash first_back={first_back:?} all_back={all_back:?} \
             lease={LEASE:?} received={} kept_by_a_until_dropped={} (attempts {:?}) \
             a_stats={stats_a:?} late_ack={late_ack:?} broker={counts:?}",
            back.len(),
            stragglers.len(),
            stragglers.iter().map(|d| d.attempt).collect::<Vec<_>>()
        );
        assert!(is_empty(&stats), "{stats:?}");
        assert!(
            matches!(late_ack, Err(QueueError::InvalidReceipt(_))),
            "an ack after the lease expired answered {late_ack:?}"
        );
        assert_eq!(
            back.len(),
            HELD as usize,
            "B got only {} of the {HELD} jobs whose lease expired on a live handle within \
             5 s; the other {} stayed with handle A until it was dropped",
            back.len(),
            stragglers.len()
        );
        assert_eq!(figures.lost(), 0, "jobs never acked: {:?}", tally.missing());
        assert!(
            back.iter().all(|d| d.attempt == 2),
            "attempts of jobs back after their lease: {:?}",
            back.iter().map(|d| d.attempt).collect::<Vec<_>>()
        );
        assert_eq!(figures.redelivered, u64::from(HELD));
        let first_back = first_back.expect("some job came back");
        assert!(
            first_back >= LEASE - Duration::from_millis(100),
            "jobs came back {first_back:?} after a {LEASE:?} lease"
        );
        assert!(
            all_back < LEASE + Duration::from_secs(2),
            "the jobs took {all_back:?} to come back after a {LEASE:?} lease"
        );
    })
    .await
    .expect("the test took too long");
}

/// The network swallows every byte for about a second: operations fail
/// within the operation timeout with retryable errors, never hang, and the
/// same handle works once the network is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_then_restore() {
    const OP_TIMEOUT: Duration = Duration::from_secs(1);
    const SLACK: Duration = Duration::from_millis(500);
    const OUTAGE: Duration = Duration::from_secs(1);
    const JOBS_EACH_SIDE: u32 = 100;
    let TestQueue {
        url,
        name,
        _topology,
    } = TestQueue::new("amqp_blackhole_then_restore").await;
    timeout(TEST_LIMIT, async {
        let (proxy, queue) = proxied(&url, &name, OP_TIMEOUT).await;
        let tally: Shared = Arc::default();
        let lease = Duration::from_secs(2);
        let drain = DequeueOptions::new(BATCH).wait(Duration::ZERO).lease(lease);
        // Everything the outage got wrong, reported together at the end.
        let mut problems: Vec<String> = Vec::new();

        // Before: jobs flow, and are consumed. Then a consumer waits in a
        // long poll on the empty queue when the network goes.
        let before = drain.wait(Duration::from_millis(200));
        send_and_ack(&queue, &tally, 0..JOBS_EACH_SIDE, before).await;
        let next = JOBS_EACH_SIDE;
        let outage = blackhole(&proxy, &queue, &tally, next, drain, OUTAGE, |call| {
            let Call { op, result, took } = call;
            match result {
                // A dequeue serves what this handle already holds, so
                // through a black hole it may answer nothing rather than
                // fail.
                Ok(0) if *op == "dequeue" => {}
                Ok(n) if *op == "dequeue" => {
                    problems.push(format!("dequeue delivered {n} jobs through a black hole"));
                }
                Ok(_) => problems.push(format!(
                    "{op} answered Ok through a black hole (in {took:?})"
                )),
                Err(err) => {
                    if !matches!(err, QueueError::Timeout(_) | QueueError::Unavailable { .. })
                        || !err.is_retryable()
                    {
                        problems.push(format!(
                            "{op}: not a retryable Timeout/Unavailable: {err:?}"
                        ));
                    }
                }
            }
            if *took > OP_TIMEOUT + SLACK {
                problems.push(format!(
                    "{op} took {took:?} through a black hole (operation timeout \
                     {OP_TIMEOUT:?})"
                ));
            }
        })
        .await;

        // After: the same handle recovers on its own. The enqueue tried
        // during the outage is tried again; without idempotency keys, it
        // may land twice (it cannot here: the black hole dropped its bytes).
        let give_up = outage.restored_at + PROGRESS_LIMIT;
        let failed_enqueues = |t: &Tally| -> u64 {
            t.retryable
                .iter()
                .filter(|(k, _)| k.starts_with("enqueue/"))
                .map(|(_, n)| n)
                .sum()
        };
        let failed_in_outage = failed_enqueues(&tally.lock());
        let (first, first_took) = timed(queue.enqueue(job(&queue, next))).await;
        match &first {
            Ok(_) => tally.lock().note_sent(next),
            Err(err) => tally.lock().note_retryable("enqueue", err),
        }
        let first = first.map(drop).map_err(|err| chain(&err));
        let recovered = first.is_ok() || enqueue_until_ok(&queue, &tally, next, give_up).await;
        let recovered_in = outage.restored_at.elapsed();
        let failed_after_restore = failed_enqueues(&tally.lock()) - failed_in_outage;
        for id in next + 1..2 * JOBS_EACH_SIDE {
            if !recovered || !enqueue_until_ok(&queue, &tally, id, give_up).await {
                break;
            }
        }
        let stats = outage.drain_after(&queue, &tally, lease).await;
        drop(queue);
        let connections = proxy.connections_accepted();
        drop(proxy);
        let counts = settled_broker_counts(&url, &name, LEVELS, SETTLE_LIMIT).await;

        let tally = Tally::take(tally);
        let figures = Figures::from_tally("blackhole_then_restore", &tally);
        println!("{figures}");
        eprintln!(
            "fault=blackhole_then_restore {outage} first_call_after_restore={first:?} in {first_took:?} \
             recovered_in={recovered_in:?} connections={connections} duplicates={:?} \
             retryable={:?} broker={counts:?}",
            tally.duplicated(),
            tally.retryable
        );
        for (error, n) in &tally.errors {
            eprintln!("  {n} x {error}");
        }
        match &outage.polled {
            Ok(deliveries) if deliveries.is_empty() => {}
            Ok(deliveries) => problems.push(format!(
                "the long poll delivered {} jobs through a black hole",
                deliveries.len()
            )),
            Err(err) if err.is_retryable() => {}
            Err(err) => problems.push(format!("the long poll: not retryable: {}", chain(err))),
        }
        if outage.poll_took > Duration::from_secs(1) + OP_TIMEOUT + SLACK {
            problems.push(format!(
                "a 1 s long poll took {:?} to give up",
                outage.poll_took
            ));
        }
        if outage.failures == 0 {
            problems.push("no operation failed through the black hole".into());
        }
        if let Err(err) = &first {
            problems.push(format!(
                "the first enqueue after the network came back failed after {first_took:?} \
                 with: {err}"
            ));
        }
        assert!(
            recovered,
            "the handle never enqueued again within {PROGRESS_LIMIT:?} after the restore: \
             {failed_after_restore} tries of job {next} failed ({:?} in all, outage \
             included), yet the broker holds {} ready jobs once the handle is gone, and job \
             {next} is the only one sent since the queue was drained; also: {problems:#?}",
            tally.retryable, counts.ready,
        );
        assert!(tally.fatal.is_empty(), "failures: {:#?}", tally.fatal);
        assert_eq!(figures.lost(), 0, "jobs never acked: {:?}", tally.missing());
        assert_eq!(figures.sent, 2 * JOBS_EACH_SIDE as usize);
        let stats = stats.expect("stats answered after the restore");
        assert!(is_empty(&stats), "{stats:?}");
        assert_eq!(
            (counts.ready, counts.dead),
            (0, 0),
            "the broker still holds jobs once the handle is gone: {counts:?}"
        );
        assert!(problems.is_empty(), "during the outage: {problems:#?}");
    })
    .await
    .expect("the test took too long");
}
