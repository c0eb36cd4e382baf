//! The RabbitMQ backend on a three-node RabbitMQ cluster of the tests' own
//! ([`RabbitCluster`], beside the system broker), with quorum queues (the
//! default):
//!
//! - the conformance suite, against the first node of a cluster shared by
//!   the cases (each case its own queue, deleted when it ends);
//! - the node leading a queue's quorum queue killed with `SIGKILL` while a
//!   producer publishes (with confirms) and a consumer consumes: every job
//!   whose `enqueue` returned `Ok` is delivered and acked, and both handles
//!   move to a live node on their own (`fallback_urls`). The figure line
//!   `fault=quorum-leader-killed enqueued=.. confirmed=.. delivered=..
//!   acked=.. lost=.. duplicates=..` goes to stdout, where `enqueued`
//!   counts enqueue calls, `confirmed` distinct jobs whose enqueue returned
//!   `Ok`, `delivered` deliveries, `acked` distinct jobs acked, `lost`
//!   confirmed jobs never acked (asserted 0) and `duplicates` deliveries of
//!   a job beyond its first. RabbitMQ has no idempotency keys, so a retried
//!   enqueue whose first try landed unconfirmed may enqueue a job twice:
//!   at-least-once, reported, allowed.
#![cfg(feature = "amqp")]

#[path = "support/amqp.rs"]
mod amqp_support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use amqp_support::DeleteTopology;
use keel_queue::conformance::QueueSubject;
use keel_queue::{AmqpQueue, AmqpQueueConfig, DequeueOptions, Job, Queue, QueueConfig};
use keel_testkit::{Namespace, RabbitCluster};
use parking_lot::Mutex;
use tokio::time::{Instant, sleep};

/// The handles a test builds on `cluster`: node `first` first, the other
/// nodes as fallbacks.
fn cluster_config(cluster: &RabbitCluster, first: usize, queue: QueueConfig) -> AmqpQueueConfig {
    let urls = cluster.urls();
    let fallbacks: Vec<String> = (1..urls.len())
        .map(|offset| urls[(first + offset) % urls.len()].clone())
        .collect();
    AmqpQueueConfig::new(urls[first].clone(), queue).fallback_urls(fallbacks)
}

async fn shared_cluster() -> &'static RabbitCluster {
    RabbitCluster::shared().await.unwrap_or_else(|err| {
        panic!("this test needs a local 3-node RabbitMQ cluster, which did not start: {err}")
    })
}

/// Longest one broker operation of a conformance case may take.
const CASE_OPERATION_TIMEOUT: Duration = Duration::from_secs(20);

async fn subject(config: QueueConfig) -> QueueSubject {
    let cluster = shared_cluster().await;
    // Deletes the case's queues and exchange when the case ends.
    let guard = DeleteTopology::new(cluster.url(0), config.name.clone(), config.priority_levels);
    // The cases check meaning, not latency: three Erlang nodes share the
    // machine with the rest of the suite, and a quorum queue's delete (a
    // Raft round on every member) has taken over the default 5 s there.
    let config = cluster_config(cluster, 0, config).operation_timeout(CASE_OPERATION_TIMEOUT);
    let queue = AmqpQueue::connect(config)
        .await
        .expect("connect to the rabbitmq cluster");
    QueueSubject::new(queue).with_guard(guard)
}

keel_queue::queue_conformance!(cluster_quorum, subject);

// ------------------------------------------------------ leader killed --

/// Jobs the producer sends.
const JOBS: u32 = 3_000;

/// The leader is killed once this many jobs were confirmed.
const KILL_AFTER: usize = 1_000;

/// Bound on the whole stream, kill and recovery included.
const STREAM_LIMIT: Duration = Duration::from_secs(120);

/// How long the producer retries one job before the test fails.
const JOB_LIMIT: Duration = Duration::from_secs(60);

/// Pause after a retryable error.
const BACKOFF: Duration = Duration::from_millis(50);

/// What the producer and the consumer saw.
#[derive(Default)]
struct Seen {
    enqueue_calls: u64,
    confirmed: HashSet<u32>,
    deliveries: u64,
    delivered: HashMap<u32, u32>,
    acked: HashSet<u32>,
    errors: HashMap<String, u64>,
}

impl Seen {
    fn note_error(&mut self, op: &str, err: &keel_queue::QueueError) {
        let kind = format!(
            "{op}: {}",
            err.to_string().chars().take(80).collect::<String>()
        );
        *self.errors.entry(kind).or_default() += 1;
    }
}

fn job_id(payload: &[u8]) -> u32 {
    std::str::from_utf8(payload)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("a payload this test never sent: {payload:?}"))
}

async fn handle(cluster: &RabbitCluster, name: &str) -> AmqpQueue {
    let config = cluster_config(cluster, 0, QueueConfig::new(name).capacity(100_000))
        .operation_timeout(Duration::from_secs(3))
        .heartbeat(Duration::from_secs(1));
    AmqpQueue::connect(config)
        .await
        .expect("connect to the rabbitmq cluster")
}

/// Sends every job, retrying each until its enqueue returns `Ok`.
async fn produce(queue: AmqpQueue, seen: Arc<Mutex<Seen>>) {
    for id in 0..JOBS {
        let give_up = Instant::now() + JOB_LIMIT;
        loop {
            seen.lock().enqueue_calls += 1;
            match queue.enqueue(Job::new(id.to_string())).await {
                Ok(_) => {
                    seen.lock().confirmed.insert(id);
                    break;
                }
                Err(err) if err.is_retryable() && Instant::now() < give_up => {
                    seen.lock().note_error("enqueue", &err);
                    sleep(BACKOFF).await;
                }
                Err(err) => panic!("job {id} could not be enqueued: {err:?}"),
            }
        }
    }
}

/// Takes and acks jobs until every job is acked or `stop`.
async fn consume(queue: AmqpQueue, seen: Arc<Mutex<Seen>>, stop: Instant) {
    let options = DequeueOptions::new(50)
        .wait(Duration::from_millis(500))
        .lease(Duration::from_secs(30));
    while Instant::now() < stop && seen.lock().acked.len() < JOBS as usize {
        let deliveries = match queue.dequeue(options).await {
            Ok(deliveries) => deliveries,
            Err(err) if err.is_retryable() => {
                seen.lock().note_error("dequeue", &err);
                sleep(BACKOFF).await;
                continue;
            }
            Err(err) => panic!("dequeue failed: {err:?}"),
        };
        for delivery in deliveries {
            let id = job_id(&delivery.payload);
            {
                let mut seen = seen.lock();
                seen.deliveries += 1;
                *seen.delivered.entry(id).or_default() += 1;
            }
            match queue.ack(&delivery.receipt).await {
                Ok(()) => {
                    seen.lock().acked.insert(id);
                }
                // The connection went with the node: the broker requeued
                // the job, which comes back.
                Err(err) => seen.lock().note_error("ack", &err),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_quorum_leader_loses_no_confirmed_job() {
    let started = Instant::now();
    let mut cluster = RabbitCluster::start().await.unwrap_or_else(|err| {
        panic!("this test needs a local 3-node RabbitMQ cluster, which did not start: {err}")
    });
    eprintln!("3-node cluster started in {:?}", started.elapsed());
    // The cluster is this test's own: dropping it at the end removes
    // the queue with every node's data.
    let name = Namespace::new("quorum_leader_killed").name("q");
    // Jobs of the default priority go to the middle of the 3 levels.
    let ready = format!("{name}.p1");

    let producer = handle(&cluster, &name).await;
    let consumer = handle(&cluster, &name).await;
    let leader = cluster
        .leader_of(&ready)
        .await
        .expect("the quorum queue's leader");
    eprintln!("`{ready}` is led by node {leader}; both handles are on node 0");

    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Instant::now() + STREAM_LIMIT;
    let producing = tokio::spawn(produce(producer.clone(), seen.clone()));
    let consuming = tokio::spawn(consume(consumer.clone(), seen.clone(), stop));

    while seen.lock().confirmed.len() < KILL_AFTER {
        assert!(
            Instant::now() < stop,
            "the stream did not reach {KILL_AFTER} confirmed jobs"
        );
        sleep(Duration::from_millis(10)).await;
    }
    let (confirmed_at_kill, acked_at_kill) = {
        let seen = seen.lock();
        (seen.confirmed.len(), seen.acked.len())
    };
    let killed_at = Instant::now();
    cluster.kill(leader);
    eprintln!("killed node {leader} at confirmed={confirmed_at_kill} acked={acked_at_kill}");

    // The survivors elect a new leader.
    let new_leader = loop {
        match cluster.leader_of(&ready).await {
            Ok(node) if node != leader => break node,
            outcome => assert!(
                Instant::now() < stop,
                "no new leader for `{ready}`: {outcome:?}"
            ),
        }
        sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "node {new_leader} leads `{ready}` {:?} after the kill",
        killed_at.elapsed()
    );

    // Both handles carry on against the survivors.
    let confirmed_resumed = async {
        while seen.lock().confirmed.len() <= confirmed_at_kill
            || seen.lock().acked.len() <= acked_at_kill
        {
            sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout_at(stop, confirmed_resumed)
        .await
        .expect("producer and consumer did not resume after the kill");
    eprintln!(
        "publishing and consuming had resumed by {:?} after the kill",
        killed_at.elapsed()
    );

    producing.await.expect("the producer panicked");
    consuming.await.expect("the consumer panicked");

    let seen = seen.lock();
    let lost: Vec<u32> = seen
        .confirmed
        .iter()
        .filter(|id| !seen.acked.contains(id))
        .copied()
        .collect();
    let duplicates: u64 = seen
        .delivered
        .values()
        .map(|&n| u64::from(n.saturating_sub(1)))
        .sum();
    println!(
        "fault=quorum-leader-killed enqueued={} confirmed={} delivered={} acked={} lost={} duplicates={}",
        seen.enqueue_calls,
        seen.confirmed.len(),
        seen.deliveries,
        seen.acked.len(),
        lost.len(),
        duplicates
    );
    eprintln!("retryable errors seen: {:?}", seen.errors);
    assert_eq!(
        seen.confirmed.len(),
        JOBS as usize,
        "every job was confirmed in the end"
    );
    assert!(
        lost.is_empty(),
        "{} confirmed jobs were never delivered and acked, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        seen.acked.iter().all(|id| seen.confirmed.contains(id)),
        "a job was acked that was never confirmed"
    );
    drop(seen);
    drop(producer);
    drop(consumer);
}
