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
//!
//! `--verify` also checks the worker's side for loss: every job carries
//! its index, the handler records each one it runs, and once the backlog
//! is drained every index must have run (duplicates are counted) and the
//! queue must hold nothing (ready, delayed, in flight, dead); the run
//! fails otherwise. A million-job backlog on Redis:
//!
//! ```text
//! cargo run --release -p keel-scheduler --example worker_bench --all-features -- \
//!     --backend redis --jobs 1000000 --limit 300 --verify
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
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
    /// Check that the worker ran every job and left nothing behind.
    #[arg(long)]
    verify: bool,
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

/// Enqueues `jobs` jobs of `payload` bytes (at least 8): each starts with
/// its index (little-endian u64).
async fn fill(queue: &dyn Queue, jobs: usize, payload: usize) {
    let mut next = 0u64;
    while (next as usize) < jobs {
        let n = (jobs - next as usize).min(1_000);
        let batch = (0..n)
            .map(|_| {
                let mut body = vec![b'x'; payload.max(8)];
                body[..8].copy_from_slice(&next.to_le_bytes());
                next += 1;
                Job::new(body)
            })
            .collect();
        queue.enqueue_batch(batch).await.expect("enqueue");
    }
}

/// How many times the handler ran each job (saturating at 255).
struct Runs(Vec<AtomicU8>);

impl Runs {
    fn new(jobs: usize) -> Self {
        Runs((0..jobs).map(|_| AtomicU8::new(0)).collect())
    }

    fn record(&self, payload: &[u8]) {
        let index = u64::from_le_bytes(payload[..8].try_into().expect("8-byte index"));
        let runs = &self.0[index as usize];
        let _ = runs.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1));
    }

    /// (never run, run more than once)
    fn lost_and_duplicated(&self) -> (usize, usize) {
        self.0.iter().fold((0, 0), |(lost, dup), runs| {
            match runs.load(Ordering::Relaxed) {
                0 => (lost + 1, dup),
                1 => (lost, dup),
                n => (lost, dup + usize::from(n) - 1),
            }
        })
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
async fn worker(
    queue: Arc<dyn Queue>,
    args: &Args,
    jobs: usize,
    limit: Duration,
    runs: Arc<Runs>,
) -> f64 {
    let handler = tower::service_fn(move |item: WorkItem| {
        runs.record(&item.payload);
        async { Ok::<_, Infallible>(JobOutcome::Ack) }
    });
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
    let runs = Arc::new(Runs::new(jobs));
    let worker_rate = worker(queue.clone(), &args, jobs, limit, runs.clone()).await;
    eprintln!("worker: {worker_rate:.0} jobs/s");
    if args.verify {
        verify(&*queue, &runs, jobs).await;
    }
    queue.delete().await.expect("delete");

    println!(
        "{{\"backend\": \"{}\", \"worker_jobs_per_s\": {:.0}, \"loop_jobs_per_s\": {:.0}, \"ratio\": {:.2}}}",
        args.backend,
        worker_rate,
        loop_rate,
        worker_rate / loop_rate
    );
}

/// Fails the run unless every job ran and the queue holds nothing.
async fn verify(queue: &dyn Queue, runs: &Runs, jobs: usize) {
    let (lost, duplicated) = runs.lost_and_duplicated();
    let stats = queue.stats().await.expect("stats");
    let left = stats.ready + stats.delayed + stats.in_flight + stats.dead;
    eprintln!(
        "verify: {jobs} jobs, {} ran, {lost} never ran, {duplicated} extra runs; \
         queue left: {} ready, {} delayed, {} in flight, {} dead",
        jobs - lost,
        stats.ready,
        stats.delayed,
        stats.in_flight,
        stats.dead
    );
    assert!(
        lost == 0 && left == 0,
        "jobs were lost or left behind (raise --limit if the worker ran out of time)"
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
