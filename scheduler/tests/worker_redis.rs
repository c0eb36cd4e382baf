//! A worker on the Redis Streams queue resumes on its own after the Redis
//! server is killed and restarted under it. Real time, a `redis-server` of
//! the test's own.
#![cfg(feature = "redis")]

use std::convert::Infallible;
use std::time::Duration;

use keel_queue::{Job, Queue, QueueConfig, RedisQueue, RedisQueueConfig};
use keel_scheduler::{JobOutcome, WorkItem, Worker, WorkerConfig, WorkerState};
use keel_testkit::{Namespace, RedisServer};
use tokio::time::{Instant, sleep, timeout};

/// Enqueues, retrying retryable errors (the server may be coming back).
async fn enqueue(queue: &RedisQueue, text: String) {
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        match queue
            .enqueue(Job::new(text.clone()).idempotency_key(text.clone()))
            .await
        {
            Ok(_) => return,
            Err(err) if err.is_retryable() && Instant::now() < give_up => {
                sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("enqueue {text}: {err}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_resumes_after_redis_restarts() {
    timeout(Duration::from_secs(30), async {
        let mut server = RedisServer::start().await.expect("start redis-server");
        let ns = Namespace::new("worker_resumes_after_restart");
        let mut config = RedisQueueConfig::new(server.url(), QueueConfig::new(ns.name("q")));
        config.redis.operation_timeout = Duration::from_millis(500);
        config.max_block = Duration::from_millis(500);
        let queue = RedisQueue::connect(config).await.expect("connect");
        let handler =
            tower::service_fn(|_: WorkItem| async { Ok::<_, Infallible>(JobOutcome::Ack) });
        let worker_config = WorkerConfig::new("redis-worker")
            .concurrency(4)
            .lease(Duration::from_secs(5))
            .poll_wait(Duration::from_millis(200))
            .reconnect(Duration::from_millis(50), Duration::from_millis(500));
        let worker = Worker::new(queue.clone(), worker_config, handler)
            .unwrap()
            .spawn();
        let mut health = worker.subscribe();

        for i in 0..10 {
            enqueue(&queue, format!("before-{i}")).await;
        }
        while worker.stats().acked < 10 {
            sleep(Duration::from_millis(20)).await;
        }

        server.kill();
        health
            .wait_for(|h| h.state == WorkerState::Reconnecting)
            .await
            .expect("the worker reports the outage");
        assert!(worker.health().last_error.is_some());
        sleep(Duration::from_millis(500)).await;
        server.restart().await.expect("restart redis-server");
        let restarted = Instant::now();

        // Nobody touches the worker: it must find the server again itself.
        for i in 0..10 {
            enqueue(&queue, format!("after-{i}")).await;
        }
        while worker.stats().acked < 20 {
            sleep(Duration::from_millis(20)).await;
        }
        health
            .wait_for(|h| h.state == WorkerState::Running)
            .await
            .expect("the worker reports it is running again");
        let stats = worker.stats();
        println!(
            "resumed {:?} after the restart; broker_errors={} reconnects={}",
            restarted.elapsed(),
            stats.broker_errors,
            stats.reconnects
        );
        assert!(stats.broker_errors > 0);
        assert!(stats.reconnects >= 1);
        let report = worker.shutdown().await;
        assert_eq!(report.released, 0);
    })
    .await
    .expect("the test took too long");
}
