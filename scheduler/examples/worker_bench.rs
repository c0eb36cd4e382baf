//! How fast the worker runtime drains a backlog, against a plain
//! `dequeue` + `ack_batch` loop with the same batch size on the same
//! backend.
//!
//! ```text
//! cargo run --release -p keel-scheduler --example worker_bench --all-features -- --backend redis
//! cargo run --release -p keel-scheduler --example worker_bench --all-features -- --backend amqp
//! cargo run --release -p keel-scheduler --example worker_bench --all-features -- --backend memory
//! ```
//!
//! Each side drains its own backlog of `--jobs` jobs of `--payload` bytes,
//! enqueued before it starts; each is bounded by `--limit` seconds (the rate
//! is then what it managed in that time). The last line is JSON:
//! `{"backend": "redis", "worker_jobs_per_s": N, "loop_jobs_per_s": N, "ratio": R}`.
//! Redis and RabbitMQ come from `REDIS_URL` / `AMQP_URL` (default local).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use keel_queue::{DequeueOptions, Job, MemoryQueue, Queue, QueueConfig};
use keel_scheduler::{JobOutcome, WorkItem, Worker, WorkerConfig};
use tokio::time::{Instant, sleep};

#[derive(Debug, Parser)]
struct Args {
    /// `memory`, `redis` or `amqp`.
    #[arg(long, default_value = "memory")]
    backend: String,
    /// Backlog per side (default 200,000; 50,000 for amqp).
    #[arg(long)]
    jobs: Option<usize>,
    /// Jobs per `dequeue` and per `ack_batch`, on both sides.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// The worker's concurrency.
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Payload bytes per job.
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Most seconds per side.
    #[arg(long, default_value_t = 60)]
    limit: u64,
}

async fn open(backend: &str, name: String) -> Arc<dyn Queue> {
    let config = QueueConfig::new(name);
    match backend {
        "memory" => Arc::new(MemoryQueue::new(config).expect("memory queue")),
        #[cfg(feature = "redis")]
        "redis" => {
            let url = keel_testkit::redis_url();
            let config = keel_queue::RedisQueueConfig::new(url, config).pool_size(16);
            Arc::new(
                keel_queue::RedisQueue::connect(config)
                    .await
                    .expect("redis: start it with `redis-server --daemonize yes`"),
            )
        }
        #[cfg(feature = "amqp")]
        "amqp" => {
            let url = keel_testkit::amqp_url();
            let config = keel_queue::AmqpQueueConfig::new(url, config).prefetch(1_000);
            Arc::new(
                keel_queue::AmqpQueue::connect(config)
                    .await
                    .expect("amqp: is RabbitMQ running?"),
            )
        }
        other => panic!("unknown or not built backend `{other}` (build with --all-features)"),
    }
}

async fn fill(queue: &dyn Queue, jobs: usize, payload: usize) {
    let body = bytes::Bytes::from(vec![b'x'; payload]);
    let mut left = jobs;
    while left > 0 {
        let n = left.min(1_000);
        let batch = (0..n).map(|_| Job::new(body.clone())).collect();
        queue.enqueue_batch(batch).await.expect("enqueue");
        left -= n;
    }
}

/// The plain loop: dequeue a batch, ack it, again.
async fn plain_loop(queue: &dyn Queue, jobs: usize, batch: usize, limit: Duration) -> f64 {
    let options = DequeueOptions::new(batch)
        .wait(Duration::from_millis(200))
        .lease(Duration::from_secs(120));
    let started = Instant::now();
    let mut done = 0usize;
    while done < jobs && started.elapsed() < limit {
        let got = queue.dequeue(options).await.expect("dequeue");
        let receipts: Vec<_> = got.into_iter().map(|d| d.receipt).collect();
        queue.ack_batch(&receipts).await.expect("ack");
        done += receipts.len();
    }
    done as f64 / started.elapsed().as_secs_f64()
}

/// The worker runtime with a handler that acks at once.
async fn worker(queue: Arc<dyn Queue>, args: &Args, jobs: usize, limit: Duration) -> f64 {
    let handler = tower::service_fn(|_: WorkItem| async { Ok::<_, Infallible>(JobOutcome::Ack) });
    let config = WorkerConfig::new("bench")
        .concurrency(args.concurrency)
        .dequeue_batch(args.batch)
        .ack_batch(args.batch)
        .lease(Duration::from_secs(120))
        .poll_wait(Duration::from_millis(200));
    let started = Instant::now();
    let handle = Worker::new(queue, config, handler)
        .expect("worker config")
        .spawn();
    while (handle.stats().acked as usize) < jobs && started.elapsed() < limit {
        sleep(Duration::from_millis(1)).await;
    }
    let rate = handle.stats().acked as f64 / started.elapsed().as_secs_f64();
    handle.shutdown().await;
    rate
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let jobs = args.jobs.unwrap_or(if args.backend == "amqp" {
        50_000
    } else {
        200_000
    });
    let limit = Duration::from_secs(args.limit);
    let name = format!("keel-worker-bench-{}", &uuid_suffix());

    let queue = open(&args.backend, format!("{name}-loop")).await;
    fill(&*queue, jobs, args.payload).await;
    let loop_rate = plain_loop(&*queue, jobs, args.batch, limit).await;
    queue.delete().await.expect("delete");
    eprintln!("loop: {loop_rate:.0} jobs/s");

    let queue = open(&args.backend, format!("{name}-worker")).await;
    fill(&*queue, jobs, args.payload).await;
    let worker_rate = worker(queue.clone(), &args, jobs, limit).await;
    queue.delete().await.expect("delete");
    eprintln!("worker: {worker_rate:.0} jobs/s");

    println!(
        "{{\"backend\": \"{}\", \"worker_jobs_per_s\": {:.0}, \"loop_jobs_per_s\": {:.0}, \"ratio\": {:.2}}}",
        args.backend,
        worker_rate,
        loop_rate,
        worker_rate / loop_rate
    );
}

fn uuid_suffix() -> String {
    format!("{:08x}", fastrand_u32())
}

fn fastrand_u32() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos ^ std::process::id()
}
