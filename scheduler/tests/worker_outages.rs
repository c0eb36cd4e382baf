//! Settling through outages: a worker whose Redis (persistent, append-only
//! file) is killed and restarted three times under load loses no job, runs
//! no job twice, and resumes on its own. Real time, a `redis-server` of the
//! test's own.
#![cfg(feature = "redis")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use keel_queue::{Job, JobId, Queue, QueueConfig, RedisQueue, RedisQueueConfig};
use keel_scheduler::{JobOutcome, WorkItem, Worker, WorkerConfig, WorkerState};
use keel_testkit::{Namespace, RedisServer};
use parking_lot::Mutex;
use tokio::time::{Instant, sleep, timeout};

const JOBS: usize = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_redis_restarts_under_load_lose_nothing_and_run_nothing_twice() {
    timeout(Duration::from_secs(90), async {
        let mut server =
            RedisServer::start_with_args(["--appendonly", "yes", "--appendfsync", "always"])
                .await
                .expect("start redis-server");
        let ns = Namespace::new("worker_settles_through_outages");
        let mut config = RedisQueueConfig::new(server.url(), QueueConfig::new(ns.name("q")));
        config.redis.operation_timeout = Duration::from_millis(500);
        config.max_block = Duration::from_millis(300);
        let queue = RedisQueue::connect(config).await.expect("connect");
        let jobs: Vec<Job> = (0..JOBS)
            .map(|i| Job::new(i.to_string()).id(JobId::from_string(format!("job-{i}"))))
            .collect();
        for chunk in jobs.chunks(500) {
            queue.enqueue_batch(chunk.to_vec()).await.expect("enqueue");
        }

        let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let seen = runs.clone();
        let handler = tower::service_fn(move |item: WorkItem| {
            let seen = seen.clone();
            async move {
                sleep(Duration::from_millis(15)).await;
                *seen.lock().entry(item.id.to_string()).or_default() += 1;
                Ok::<_, Infallible>(JobOutcome::Ack)
            }
        });
        // Outages of about a second, well inside the 10 s lease.
        let worker_config = WorkerConfig::new("outages")
            .concurrency(16)
            .dequeue_batch(8)
            .lease(Duration::from_secs(10))
            .poll_wait(Duration::from_millis(200))
            .reconnect(Duration::from_millis(50), Duration::from_millis(300))
            .settle_retry(Duration::from_millis(20), Duration::from_millis(200));
        let worker = Worker::new(queue.clone(), worker_config, handler)
            .unwrap()
            .spawn();
        let mut health = worker.subscribe();

        for outage in 1..=3 {
            // Under load: kill while jobs run and acks are in flight.
            let done_before = runs.lock().len();
            while runs.lock().len() < done_before + 200 {
                sleep(Duration::from_millis(10)).await;
            }
            server.kill();
            health
                .wait_for(|h| h.state == WorkerState::Reconnecting)
                .await
                .expect("the worker reports the outage");
            sleep(Duration::from_millis(800)).await;
            server.restart().await.expect("restart redis-server");
            println!("outage {outage} over after {} jobs", runs.lock().len());
        }

        // Nobody touches the worker: it resumes and drains the queue.
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            let stats = queue.stats().await;
            let drained = matches!(&stats, Ok(s) if s.ready + s.delayed + s.in_flight == 0);
            if drained && runs.lock().len() == JOBS {
                break;
            }
            assert!(
                Instant::now() < give_up,
                "not drained: {stats:?}, {} of {JOBS} jobs ran",
                runs.lock().len()
            );
            sleep(Duration::from_millis(50)).await;
        }
        let stats = worker.stats();
        let runs = runs.lock().clone();
        let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
        println!("{stats:?}");
        assert_eq!(runs.len(), JOBS, "every job ran");
        assert!(twice.is_empty(), "jobs run twice: {twice:?}");
        assert_eq!(
            queue.stats().await.unwrap().dead,
            0,
            "nothing dead-lettered"
        );
        assert!(stats.broker_errors > 0, "the outages were seen");
        assert!(stats.reconnects >= 3, "{stats:?}");
        assert_eq!(worker.health().state, WorkerState::Running);
        worker.shutdown().await;
        queue.delete().await.expect("delete the queue");
    })
    .await
    .expect("the test took too long");
}
