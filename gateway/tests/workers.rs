//! Two `keel-worker` processes drain the gateway's durable queue on Redis
//! and on RabbitMQ; one is killed with SIGKILL mid-run and restarted: every
//! job completes, none is lost (duplicates only for jobs in flight at the
//! kill).
#![cfg(feature = "redis")]

mod support;

use std::time::Duration;

use keel_gateway::GatewayConfig;
use keel_gateway::config::DurableBackend;
use keel_gateway::fake_node::FakeNodeConfig;
use keel_testkit::{Namespace, require_redis};
use support::{WorkerChild, start, total};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_workers_lose_no_job_on_redis() {
    let url = require_redis().await;
    let ns = Namespace::new("gw_workers_kill").with_redis_cleanup(url.clone());
    killed_workers_lose_no_job(&ns, DurableBackend::Redis, None).await;
}

#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_workers_lose_no_job_on_rabbitmq() {
    let url = require_redis().await;
    let amqp = keel_testkit::require_amqp().await;
    let ns = Namespace::new("gw_workers_kill_amqp").with_redis_cleanup(url);
    killed_workers_lose_no_job(&ns, DurableBackend::Amqp, Some(amqp.clone())).await;
    // The broker's queues (work, delay, dead letters) go with the test.
    let queue = keel_queue::AmqpQueue::connect(keel_queue::AmqpQueueConfig::new(
        amqp,
        keel_queue::QueueConfig::new(ns.prefix()),
    ))
    .await
    .expect("RabbitMQ answers");
    keel_queue::Queue::delete(&queue)
        .await
        .expect("the queue is deleted");
}

/// 300 jobs through two workers on `backend`, one of them SIGKILLed at
/// job 100 and restarted at job 200.
async fn killed_workers_lose_no_job(
    ns: &Namespace,
    backend: DurableBackend,
    broker: Option<String>,
) {
    let url = keel_testkit::redis_url();
    let mut node = FakeNodeConfig::instant();
    node.ttft = Duration::from_millis(10);
    node.slots = 64;
    let mut written = GatewayConfig::default();
    let setup = start(1, node, |config| {
        config.redis_url = Some(url.clone());
        config.durable.backend = backend;
        config.durable.url = broker;
        config.durable.queue = ns.prefix().to_owned();
        config.durable.concurrency = 8;
        config.durable.lease = Duration::from_secs(2);
        written = config.clone();
    })
    .await;
    let (_dir, path) = support::config_file(&written);
    let mut first = WorkerChild::spawn(&path);
    let _second = WorkerChild::spawn(&path);

    let mut ids = Vec::new();
    for n in 0..300 {
        ids.push(support::enqueue_chat(&setup.url, &format!("job {n}")).await);
        if n == 100 {
            first.kill();
        }
        if n == 200 {
            first = WorkerChild::spawn(&path);
        }
    }
    for id in &ids {
        let record = support::wait_job(&setup.url, id, Duration::from_secs(40)).await;
        assert_eq!(record["status"], "completed", "{record}");
    }
    let runs = total(&setup.nodes, |s| s.completed);
    assert!(runs >= 300, "{runs} upstream runs for 300 jobs");
    // At most the jobs the killed worker had in flight run twice.
    assert!(runs <= 300 + 8, "{runs} upstream runs for 300 jobs");
    println!(
        "workers: 300 jobs, 0 lost, {} duplicate upstream runs",
        runs - 300
    );
    drop(first);
}
