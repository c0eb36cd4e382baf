//! The demo's driver: the same seeded traffic through the Keel pipeline and
//! the naive one, side by side, phase by phase; plus the durable-queue path
//! consumed by the worker runtime.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_cache::{Tiered, TieredConfig};
use keel_queue::{Job, MemoryQueue, Queue, QueueConfig};
use keel_scheduler::{JobOutcome, WorkItem, Worker, WorkerConfig};
use tokio::time::Instant;

use crate::fleet::{Fleet, InferenceRequest, NodeMode, NodeSpec};
use crate::keel::KeelPipeline;
use crate::naive::NaivePipeline;
use crate::report::{JobFigures, Ledger, PhaseReport, Report};
use crate::traffic::{Traffic, phases};

/// Boxed error for the demo.
pub type DemoError = Box<dyn std::error::Error + Send + Sync>;

/// What to run.
#[derive(Clone)]
pub struct DemoConfig {
    /// Wall time of offered load (five equal phases).
    pub duration: Duration,
    /// Seed for traffic and nodes.
    pub seed: u64,
    /// Base offered load, requests per second, per pipeline.
    pub rate: f64,
    /// Nodes per fleet.
    pub nodes: usize,
    /// `memory`, `redis` or `amqp`.
    pub queue: String,
    /// `moka`, `redis` or `tiered`.
    pub cache: String,
    /// Called about ten times a second with a progress line.
    pub progress: Option<Arc<dyn Fn(String) + Send + Sync>>,
}

impl std::fmt::Debug for DemoConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoConfig")
            .field("duration", &self.duration)
            .field("seed", &self.seed)
            .field("rate", &self.rate)
            .field("nodes", &self.nodes)
            .field("queue", &self.queue)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            duration: Duration::from_secs(30),
            seed: 42,
            rate: 150.0,
            nodes: 5,
            queue: "memory".into(),
            cache: "moka".into(),
            progress: None,
        }
    }
}

fn build_cache(kind: &str) -> Result<Tiered, DemoError> {
    let config = TieredConfig::new("demo-responses")
        .ttl(Duration::from_secs(300))
        .l1_ttl(Duration::from_secs(60));
    match kind {
        "moka" => Ok(Tiered::builder(config).build()?),
        "redis" | "tiered" => redis_cache(config),
        other => Err(format!("--cache {other}: expected moka, redis or tiered").into()),
    }
}

#[cfg(feature = "redis")]
fn redis_cache(config: TieredConfig) -> Result<Tiered, DemoError> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let l2 = keel_cache::RedisCache::new(keel_cache::RedisCacheConfig::new(url))?;
    let l2 = keel_cache::PrefixCache::new(l2, format!("keel-demo-{}", std::process::id()));
    Ok(Tiered::builder(config).l2(l2).build()?)
}

#[cfg(not(feature = "redis"))]
fn redis_cache(_: TieredConfig) -> Result<Tiered, DemoError> {
    Err("--cache redis/tiered needs the `redis` feature: cargo run --release -p keel-examples --features redis --bin demo".into())
}

async fn build_queue(kind: &str, name: &str) -> Result<Arc<dyn Queue>, DemoError> {
    let config = QueueConfig::new(name)
        .capacity(10_000)
        .max_attempts(4)
        .backoff(Duration::from_millis(50), Duration::from_millis(500));
    match kind {
        "memory" => Ok(Arc::new(MemoryQueue::new(config)?)),
        #[cfg(feature = "redis")]
        "redis" => {
            let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
            Ok(Arc::new(
                keel_queue::RedisQueue::connect(keel_queue::RedisQueueConfig::new(url, config)).await?,
            ))
        }
        #[cfg(feature = "amqp")]
        "amqp" => {
            let url = std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
            Ok(Arc::new(
                keel_queue::AmqpQueue::connect(keel_queue::AmqpQueueConfig::new(url, config)).await?,
            ))
        }
        #[cfg(not(feature = "redis"))]
        "redis" => Err("--queue redis needs the `redis` feature: cargo run --release -p keel-examples --features redis --bin demo".into()),
        #[cfg(not(feature = "amqp"))]
        "amqp" => Err("--queue amqp needs the `amqp` feature: cargo run --release -p keel-examples --features amqp --bin demo".into()),
        other => Err(format!("--queue {other}: expected memory, redis or amqp").into()),
    }
}

/// Runs the demo and answers its report.
///
/// # Errors
///
/// A backend that is not compiled in or does not answer, or bad settings.
pub async fn run(config: DemoConfig) -> Result<Report, DemoError> {
    let script = phases();
    let phase_len = config.duration / script.len() as u32;
    let spec = NodeSpec::default();
    let keel_fleet = Fleet::new(config.nodes, spec, config.seed);
    let naive_fleet = Fleet::new(config.nodes, spec, config.seed);
    let keel_ledger = Arc::new(Ledger::new(script.len()));
    let naive_ledger = Arc::new(Ledger::new(script.len()));
    let keel = KeelPipeline::start(
        &keel_fleet,
        build_cache(&config.cache)?,
        keel_ledger.clone(),
    )?;
    let naive = NaivePipeline::start(naive_fleet.clone(), naive_ledger.clone());

    // The durable path: embedding jobs through a queue and the worker runtime.
    let queue_name = format!("keel-demo-jobs-{}-{}", std::process::id(), config.seed);
    let queue = build_queue(&config.queue, &queue_name).await?;
    let job_keel = keel.clone();
    let handler = tower::service_fn(move |item: WorkItem| {
        let keel = job_keel.clone();
        async move {
            let Ok(request) = serde_json::from_slice::<JobRequest>(&item.payload) else {
                return Ok::<_, std::convert::Infallible>(JobOutcome::abort("malformed payload"));
            };
            Ok(if keel.run_job(request.into_request()).await {
                JobOutcome::Ack
            } else {
                JobOutcome::retry("inference failed or was refused")
            })
        }
    });
    let worker = Worker::new(
        queue.clone(),
        WorkerConfig::new("demo-embedder").concurrency(8),
        handler,
    )?
    .spawn();

    let phase_now = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    // Watch queue depths and ejections.
    let monitor = {
        let (keel, naive, phase_now) = (keel.clone(), naive.clone(), phase_now.clone());
        let (keel_ledger, naive_ledger) = (keel_ledger.clone(), naive_ledger.clone());
        let progress = config.progress.clone();
        let names: Vec<&'static str> = script.iter().map(|p| p.name).collect();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let phase = phase_now.load(Ordering::Relaxed).min(names.len() - 1);
                keel_ledger.queue_depth(phase, keel.depth());
                naive_ledger.queue_depth(phase, naive.depth());
                keel.note_ejections(phase);
                if let Some(progress) = &progress {
                    progress(format!(
                        "{:>5.1}s {:<9} keel: {}/{} answered, queue {:<4} | naive: {}/{} answered, queue {}",
                        start.elapsed().as_secs_f64(),
                        names[phase],
                        keel_ledger.answered(),
                        keel_ledger.offered(),
                        keel.depth(),
                        naive_ledger.answered(),
                        naive_ledger.offered(),
                        naive.depth(),
                    ));
                }
            }
        })
    };

    // Offer the same traffic to both pipelines.
    let mut traffic = Traffic::new(config.seed);
    let mut enqueued = 0u64;
    let mut malformed_every = 0u64;
    for (index, phase) in script.iter().enumerate() {
        phase_now.store(index, Ordering::Relaxed);
        for fleet in [&keel_fleet, &naive_fleet] {
            for node in 0..config.nodes {
                fleet.set_mode(node, NodeMode::Healthy);
            }
            for (node, mode) in &phase.faults {
                if *node < config.nodes {
                    fleet.set_mode(*node, *mode);
                }
            }
        }
        let phase_end = start + phase_len * (index as u32 + 1);
        let mut next = Instant::now();
        let mut next_job = Instant::now();
        while Instant::now() < phase_end {
            next += traffic.gap(config.rate * phase.load);
            tokio::time::sleep_until(next.min(phase_end)).await;
            if next >= phase_end {
                break;
            }
            let request = traffic.request();
            keel_ledger.offer(index);
            naive_ledger.offer(index);
            naive.offer(request.clone(), index);
            let keel = keel.clone();
            tokio::spawn(async move { keel.serve(request, index).await });
            if Instant::now() >= next_job {
                // About 20 jobs a second on the durable path; 1 in 25 malformed.
                next_job += Duration::from_millis(50);
                malformed_every += 1;
                let job = if malformed_every.is_multiple_of(25) {
                    Job::new("{\"prompt\": truncated")
                } else {
                    Job::json(&JobRequest::from(&traffic.request()))?
                };
                if queue.enqueue(job).await.is_ok() {
                    enqueued += 1;
                }
            }
        }
    }
    let offered_until = start.elapsed();
    for fleet in [&keel_fleet, &naive_fleet] {
        for node in 0..config.nodes {
            fleet.set_mode(node, NodeMode::Healthy);
        }
    }
    // Let in-flight requests finish: Keel's deadlines bound its wait; the
    // naive pipeline gets the same grace, and what it still holds is lost.
    let grace = Instant::now() + Duration::from_secs(10);
    while Instant::now() < grace
        && (keel_ledger.answered() < keel_ledger.offered()
            || naive_ledger.answered() < naive_ledger.offered())
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the durable path: every job acked or dead-lettered.
    let job_grace = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = queue.stats().await?;
        let settled = stats.ready + stats.delayed + stats.in_flight == 0;
        if settled || Instant::now() >= job_grace {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    monitor.abort();
    let worker_stats = worker.stats();
    let _ = worker.shutdown().await;
    let stats = queue.stats().await?;
    let dead = stats.dead;
    let _ = queue.purge_dead_letters().await;
    let acked = worker_stats.acked;
    let still_queued = stats.ready + stats.delayed + stats.in_flight;
    let jobs = JobFigures {
        enqueued,
        acked,
        dead_lettered: dead,
        retried: worker_stats.retried,
        unfinished: still_queued,
        lost: enqueued.saturating_sub(acked + dead + still_queued),
    };

    let keel_figures = keel_ledger.finish();
    let naive_figures = naive_ledger.finish();
    let phases = script
        .iter()
        .zip(keel_figures.into_iter().zip(naive_figures))
        .map(|(phase, (keel, naive))| PhaseReport {
            name: phase.name.to_owned(),
            description: phase.description.to_owned(),
            keel,
            naive,
        })
        .collect();
    Ok(Report {
        seed: config.seed,
        duration_s: offered_until.as_secs_f64(),
        queue: config.queue.clone(),
        cache: config.cache.clone(),
        phases,
        jobs,
    })
}

/// An embedding job on the durable path.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct JobRequest {
    tenant: String,
    prefix: u32,
    suffix: u32,
    max_tokens: u32,
}

impl From<&InferenceRequest> for JobRequest {
    fn from(r: &InferenceRequest) -> Self {
        JobRequest {
            tenant: r.tenant.clone(),
            prefix: r.prefix,
            suffix: r.suffix,
            max_tokens: r.max_tokens,
        }
    }
}

impl JobRequest {
    fn into_request(self) -> InferenceRequest {
        InferenceRequest {
            id: u64::MAX,
            tenant: format!("jobs-{}", self.tenant),
            priority: 0,
            prefix: self.prefix,
            suffix: self.suffix,
            max_tokens: self.max_tokens,
        }
    }
}
