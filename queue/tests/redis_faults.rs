//! Faults under load on the Redis Streams backend, against real servers:
//! connections cut mid-stream, the server killed and restarted, a latency
//! spike, a consumer dying with leases, and a black-holed network (also with
//! a command in flight, whose reply it swallows).
//!
//! Each test runs its own `redis-server` (see [`own_server`]), so its
//! timings do not depend on what else uses the shared server.
//!
//! Every test streams jobs through `RedisQueue` handles that are never
//! rebuilt after the fault: the queue must recover on its own. The
//! producers, consumers, tally and figure line are the shared harness in
//! `support/faults.rs` (its docs give the contract they follow and what the
//! figure line counts); producers give every job an idempotency key, so a
//! retried enqueue whose first try landed is answered as a duplicate rather
//! than enqueued twice, and no job may be delivered as new twice.
//!
//! On top of the harness's checks, every stream test ends only when the
//! jobs the queue holds by its own keys (what its capacity bound counts:
//! every level's stream plus the delayed set) are back at zero.
#![cfg(feature = "redis")]

#[path = "support/faults.rs"]
mod faults;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use faults::{
    BATCH, Call, Figures, Outcome, PROGRESS_LIMIT, Shared, StreamRun, TEST_LIMIT, Tally,
    ack_delivered, assert_spike_and_recovery, blackhole, crash_holding, cut_twice,
    drain_with_consumer, enqueue_until_ok, is_empty, job, send_all, send_and_ack, sent_at_least,
    spike_latency, stream_with_fault, timed,
};
use keel_queue::{DequeueOptions, Queue, QueueConfig, QueueError, RedisQueue, RedisQueueConfig};
use keel_testkit::{FaultProxy, Namespace, RedisServer};
use parking_lot::Mutex;
use tokio::time::{Instant, sleep, sleep_until, timeout};

/// Counts the jobs the queue holds straight from Redis, as its capacity
/// bound does (see the backend's layout): the entries of every level's
/// stream (acked ones are deleted) plus the delayed set. It must be zero
/// once every job is acked.
async fn jobs_held(url: &str, queue: &str) -> redis::RedisResult<i64> {
    let client = redis::Client::open(url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let mut pipe = redis::pipe();
    for level in 0..QueueConfig::new(queue).priority_levels {
        pipe.cmd("XLEN").arg(format!("keel:{{{queue}}}:p:{level}"));
    }
    pipe.cmd("ZCARD").arg(format!("keel:{{{queue}}}:delayed"));
    let counts: Vec<i64> = pipe.query_async(&mut con).await?;
    Ok(counts.into_iter().sum())
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
    config.redis.operation_timeout = operation_timeout;
    config.max_block = Duration::from_secs(1);
    RedisQueue::connect(config)
        .await
        .unwrap_or_else(|err| panic!("connect to {url}: {err}"))
}

/// A [`FaultProxy`] in front of the server at `url`, and the queue `name`
/// connected through it (see [`connect`]).
async fn proxied(url: &str, name: &str, operation_timeout: Duration) -> (FaultProxy, RedisQueue) {
    let proxy = FaultProxy::start_for_url(url).await.expect("start proxy");
    let queue = connect(&proxy.url_for(url), name, operation_timeout).await;
    (proxy, queue)
}

/// [`stream_with_fault`], then the Redis-only check: the jobs the queue
/// holds (stream lengths plus the delayed set), read from the server itself
/// at `direct_url`, are back at zero.
async fn stream_and_count<F, Fut>(
    run: StreamRun<RedisQueue>,
    direct_url: &str,
    name: &str,
    fault: F,
) -> Outcome
where
    F: FnOnce(Shared) -> Fut,
    Fut: Future<Output = ()>,
{
    let outcome = stream_with_fault(run, fault).await;
    let held = jobs_held(direct_url, name)
        .await
        .expect("count the jobs held");
    assert_eq!(held, 0, "jobs are still held after every job was acked");
    outcome
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
        let (proxy, queue) = proxied(&url, &name, Duration::from_secs(2)).await;
        let run = StreamRun {
            fault: "connection_cut_mid_stream",
            queue,
            lease: Duration::from_secs(2),
            producers: 1,
            consumers: 2,
        };
        // The proxy must outlive the fault: dropping it closes its port.
        let fault_proxy = &proxy;
        let accepted_at_cut = Arc::new(Mutex::new(0));
        let at_cut = accepted_at_cut.clone();
        let outcome = stream_and_count(run, &url, &name, |tally| async move {
            *at_cut.lock() = cut_twice(fault_proxy, &tally).await;
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
            lease: Duration::from_secs(2),
            producers: 1,
            consumers: 2,
        };
        let outcome = stream_and_count(run, &url, &name, |tally| async move {
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
        let (proxy, queue) = proxied(&url, &name, Duration::from_secs(2)).await;
        let run = StreamRun {
            fault: "latency_spike",
            queue,
            lease: Duration::from_secs(5),
            producers: 1,
            consumers: 2,
        };
        let spike = Arc::new(Mutex::new((0usize, 0usize)));
        let at_spike = spike.clone();
        let fault_proxy = &proxy;
        let outcome = stream_and_count(run, &url, &name, |tally| async move {
            *at_spike.lock() = spike_latency(fault_proxy, &tally).await;
        })
        .await;
        let spike = *spike.lock();
        assert_spike_and_recovery(&outcome, spike, "");
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
        send_all(&consumer_b, &tally, 0..HELD).await;

        let consumer_a = connect(&url, &name, Duration::from_secs(2)).await;
        let comeback = crash_holding(consumer_a, &consumer_b, HELD as usize, LEASE).await;
        let (back, first_back) = (comeback.back, comeback.first_back);
        for delivery in &back {
            assert_eq!(delivery.attempt, 2, "a job back from a dead consumer");
        }
        ack_delivered(&consumer_b, &tally, &back).await;
        let received = back.len();

        let stats = consumer_b.stats().await.expect("stats");
        let tally = Tally::take(tally);
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
        assert_eq!(jobs_held(&url, &name).await.expect("jobs held"), 0);
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
        let (proxy, queue) = proxied(&url, &name, OP_TIMEOUT).await;
        let tally: Shared = Arc::default();
        let lease = Duration::from_secs(2);
        let drain = DequeueOptions::new(BATCH).wait(Duration::ZERO).lease(lease);

        // Before: jobs flow, and are consumed. Then a consumer waits in a
        // long poll on the empty queue when the network goes.
        send_and_ack(&queue, &tally, 0..JOBS_EACH_SIDE, drain).await;
        let mut next = JOBS_EACH_SIDE;
        let outage = blackhole(&proxy, &queue, &tally, next, drain, OUTAGE, |call| {
            let Call { op, result, .. } = call;
            let err = result
                .as_ref()
                .expect_err("an operation succeeded through a black hole");
            assert!(
                matches!(err, QueueError::Timeout(_) | QueueError::Unavailable { .. }),
                "{op}: {err:?}"
            );
            assert!(err.is_retryable(), "{op}: {err}");
        })
        .await;

        // After: the same queue recovers on its own. The enqueue tried
        // during the outage is retried with its idempotency key.
        let give_up = outage.restored_at + PROGRESS_LIMIT;
        assert!(enqueue_until_ok(&queue, &tally, next, give_up).await);
        let recovered_in = outage.restored_at.elapsed();
        next += 1;
        for id in next..2 * JOBS_EACH_SIDE {
            assert!(enqueue_until_ok(&queue, &tally, id, give_up).await);
        }
        let stats = outage.drain_after(&queue, &tally, lease).await;

        let tally = Tally::take(tally);
        let figures = Figures::from_tally("blackhole_then_restore", &tally);
        println!("{figures}");
        eprintln!(
            "fault=blackhole_then_restore {outage} recovered_in={recovered_in:?} retryable={:?}",
            tally.retryable
        );
        assert!(tally.fatal.is_empty(), "failures: {:#?}", tally.fatal);
        assert!(outage.failures > 0);
        match &outage.polled {
            Ok(deliveries) => assert!(deliveries.is_empty(), "a delivery through a black hole"),
            Err(err) => assert!(err.is_retryable(), "{err}"),
        }
        assert!(
            outage.poll_took <= Duration::from_secs(1) + OP_TIMEOUT + SLACK,
            "a 1 s long poll took {:?} to give up",
            outage.poll_took
        );
        assert!(
            outage.slowest <= OP_TIMEOUT + SLACK,
            "an operation took {:?} to fail (operation timeout {OP_TIMEOUT:?})",
            outage.slowest
        );
        assert_eq!(figures.lost(), 0, "jobs never acked: {:?}", tally.missing());
        assert_eq!(figures.sent, 2 * JOBS_EACH_SIDE as usize);
        let stats = stats.expect("stats answered after the restore");
        assert!(is_empty(&stats), "{stats:?}");
        assert_eq!(tally.duplicated(), Vec::<u32>::new(), "jobs enqueued twice");
        assert_eq!(jobs_held(&url, &name).await.expect("jobs held"), 0);
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
        config.redis.operation_timeout = OP_TIMEOUT;
        config.redis.pool_size = 1;
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
            tokio::spawn(async move { queue.enqueue(job(&queue, 1)).await })
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
        let (first, first_took) = timed(queue.enqueue(job(&queue, 1))).await;
        let first = first.map_err(|err| err.to_string());
        match &first {
            // Either outcome is correct: the timed-out call's connection is
            // closed, so Redis may have dropped the paused command with its
            // client (not a duplicate) or run it first (a duplicate). The
            // idempotency key makes the retry safe both ways.
            Ok(_) => tally.lock().note_sent(1),
            Err(_) => assert!(enqueue_until_ok(&queue, &tally, 1, give_up).await),
        }

        let stats = drain_with_consumer(
            &queue,
            &tally,
            Duration::from_secs(2),
            Instant::now() + Duration::from_secs(10),
        )
        .await;

        let tally = Tally::take(tally);
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
        assert_eq!(jobs_held(&url, &name).await.expect("jobs held"), 0);
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
