//! The Keel demo: the README's main command.
//!
//! Today it exercises the part of Keel that has landed — the durable-queue
//! path on the embedded in-memory queue: a producer offers inference jobs
//! (some of them malformed), workers lease them, call simulated inference
//! nodes (one of which fails often), ack, retry with backoff, and
//! dead-letter what cannot succeed. At the end it accounts for every job.
//! Later issues grow it into the full Keel-vs-naive comparison.
//!
//! ```text
//! cargo run --release -p keel-examples --bin demo -- --duration 5s --seed 7
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use clap::Parser;
use keel_queue::{DequeueOptions, Error, Job, MemoryQueue, Nack, Queue, QueueConfig, QueueExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Command-line options.
#[derive(Debug, Parser)]
#[command(about = "Keel demo: inference jobs through a durable queue, every job accounted for")]
struct Args {
    /// How long to offer traffic (then drain), e.g. `5s`, `30s`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Seed for the simulated traffic and nodes.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Jobs offered per second.
    #[arg(long, default_value_t = 400)]
    rate: u64,
    /// Concurrent workers.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Queue backend: only `memory` is built so far.
    #[arg(long, default_value = "memory")]
    queue: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct InferenceJob {
    tenant: String,
    prompt: String,
    offered_at_ms: u64,
}

#[derive(Debug, Default)]
struct Counters {
    offered: AtomicU64,
    enqueued: AtomicU64,
    rejected_full: AtomicU64,
    acked: AtomicU64,
    retries: AtomicU64,
    node_calls: AtomicU64,
}

/// A simulated inference node: latency drawn per call, a failure rate.
#[derive(Debug, Clone, Copy)]
struct Node {
    base: Duration,
    failure_rate: f64,
}

impl Node {
    async fn infer(&self, rng: &mut StdRng) -> Result<(), &'static str> {
        let factor: f64 = 0.5 + rng.random::<f64>() * rng.random::<f64>() * 4.0;
        tokio::time::sleep(self.base.mul_f64(factor)).await;
        if rng.random_bool(self.failure_rate) {
            Err("node answered 500")
        } else {
            Ok(())
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.queue != "memory" {
        return Err(format!(
            "--queue {}: only the in-memory queue is built so far (the redis and amqp backends land with the keel-queue issue)",
            args.queue
        )
        .into());
    }
    let queue: Arc<dyn Queue> = Arc::new(MemoryQueue::new(
        QueueConfig::new("demo-inference")
            .capacity(2_000)
            .max_attempts(4)
            .backoff(Duration::from_millis(20), Duration::from_millis(400)),
    )?);
    let nodes = [
        Node {
            base: Duration::from_millis(8),
            failure_rate: 0.0,
        },
        Node {
            base: Duration::from_millis(10),
            failure_rate: 0.01,
        },
        Node {
            base: Duration::from_millis(12),
            failure_rate: 0.0,
        },
        Node {
            base: Duration::from_millis(9),
            failure_rate: 0.35,
        },
    ];
    println!(
        "keel demo: {} of traffic at {} jobs/s, {} workers, {} simulated nodes (node 3 fails 35% of calls), in-memory queue, seed {}",
        humantime::format_duration(args.duration),
        args.rate,
        args.workers,
        nodes.len(),
        args.seed
    );

    let counters = Arc::new(Counters::default());
    let latencies = Arc::new(Latencies::default());
    let producing = Arc::new(AtomicBool::new(true));
    let started = Instant::now();

    let producer = {
        let queue = queue.clone();
        let counters = counters.clone();
        let producing = producing.clone();
        let mut rng = StdRng::seed_from_u64(args.seed);
        let duration = args.duration;
        let interval = Duration::from_secs(1) / args.rate.max(1) as u32;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            let tenants = ["acme", "globex", "initech"];
            let mut n = 0u64;
            while started.elapsed() < duration {
                tick.tick().await;
                n += 1;
                counters.offered.fetch_add(1, Ordering::Relaxed);
                // About one job in a hundred is malformed: it must be
                // dead-lettered with its reason, not crash a worker.
                let job = if rng.random_bool(0.01) {
                    Job::new(format!(
                        "{{\"tenant\": \"acme\", \"prompt\": truncated #{n}"
                    ))
                } else {
                    Job::json(&InferenceJob {
                        tenant: tenants[rng.random_range(0..tenants.len())].to_owned(),
                        prompt: format!("summarise document #{n}"),
                        offered_at_ms: now_ms(),
                    })
                    .expect("serialisable")
                };
                match queue.enqueue(job).await {
                    Ok(_) => {
                        counters.enqueued.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Error::Full { .. }) => {
                        counters.rejected_full.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => eprintln!("enqueue failed: {err}"),
                }
            }
            producing.store(false, Ordering::Relaxed);
        })
    };

    let mut workers = Vec::new();
    for w in 0..args.workers {
        let queue = queue.clone();
        let counters = counters.clone();
        let latencies = latencies.clone();
        let producing = producing.clone();
        let mut rng = StdRng::seed_from_u64(args.seed.wrapping_add(1 + w as u64));
        workers.push(tokio::spawn(async move {
            let mut next_node = w;
            loop {
                let batch = match queue
                    .dequeue_json::<InferenceJob>(
                        DequeueOptions::new(4)
                            .wait(Duration::from_millis(100))
                            .lease(Duration::from_secs(5)),
                    )
                    .await
                {
                    Ok(batch) => batch,
                    Err(err) => {
                        eprintln!("worker {w}: dequeue failed: {err}");
                        continue;
                    }
                };
                if batch.is_empty() {
                    let stats = queue.stats().await.expect("memory stats");
                    if !producing.load(Ordering::Relaxed)
                        && stats.ready + stats.delayed + stats.in_flight == 0
                    {
                        return;
                    }
                    continue;
                }
                for item in batch {
                    next_node = (next_node + 1) % nodes.len();
                    counters.node_calls.fetch_add(1, Ordering::Relaxed);
                    match nodes[next_node].infer(&mut rng).await {
                        Ok(()) => {
                            queue.ack(&item.delivery.receipt).await.expect("lease held");
                            counters.acked.fetch_add(1, Ordering::Relaxed);
                            latencies.record(now_ms().saturating_sub(item.job.offered_at_ms));
                        }
                        Err(reason) => {
                            counters.retries.fetch_add(1, Ordering::Relaxed);
                            queue
                                .nack(&item.delivery.receipt, Nack::retry(reason))
                                .await
                                .expect("lease held");
                        }
                    }
                }
            }
        }));
    }

    let progress = {
        let counters = counters.clone();
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let stats = queue.stats().await.expect("memory stats");
                println!(
                    "  t={:>4.1}s offered={} acked={} ready={} delayed={} in_flight={} dead={}",
                    started.elapsed().as_secs_f64(),
                    counters.offered.load(Ordering::Relaxed),
                    counters.acked.load(Ordering::Relaxed),
                    stats.ready,
                    stats.delayed,
                    stats.in_flight,
                    stats.dead,
                );
            }
        })
    };

    producer.await?;
    let drain = tokio::time::timeout(Duration::from_secs(30), async {
        for worker in workers {
            worker.await.expect("worker panicked");
        }
    })
    .await;
    progress.abort();
    if drain.is_err() {
        eprintln!("workers did not drain within 30 s");
    }

    let stats = queue.stats().await?;
    let dead = queue.dead_letters(usize::MAX).await?;
    let mut reasons: HashMap<&str, u64> = HashMap::new();
    for letter in &dead {
        let kind = if letter.reason.starts_with("undecodable") {
            "malformed payload"
        } else if letter.reason.starts_with("max attempts") {
            "max attempts exhausted"
        } else {
            "other"
        };
        *reasons.entry(kind).or_default() += 1;
    }
    let enqueued = counters.enqueued.load(Ordering::Relaxed);
    let acked = counters.acked.load(Ordering::Relaxed);
    let still_queued = stats.ready + stats.delayed + stats.in_flight;
    let lost = enqueued as i64 - acked as i64 - dead.len() as i64 - still_queued as i64;
    let (p50, p99) = latencies.percentiles();
    println!("\nresult after {:.1}s", started.elapsed().as_secs_f64());
    println!(
        "  offered            {}",
        counters.offered.load(Ordering::Relaxed)
    );
    println!("  enqueued           {enqueued}");
    println!(
        "  rejected (Full)    {}",
        counters.rejected_full.load(Ordering::Relaxed)
    );
    println!("  completed (acked)  {acked}");
    println!(
        "  node calls         {}",
        counters.node_calls.load(Ordering::Relaxed)
    );
    println!(
        "  retries            {}",
        counters.retries.load(Ordering::Relaxed)
    );
    for (kind, n) in &reasons {
        println!("  dead-lettered      {n} ({kind})");
    }
    println!("  still queued       {still_queued}");
    println!("  lost               {lost}");
    println!("  latency p50 / p99  {p50} ms / {p99} ms (offer to ack)");
    if lost != 0 {
        return Err(format!("{lost} jobs unaccounted for").into());
    }
    Ok(())
}

/// Offer-to-ack latencies in milliseconds.
#[derive(Debug, Default)]
struct Latencies(parking_lot::Mutex<Vec<u64>>);

impl Latencies {
    fn record(&self, ms: u64) {
        self.0.lock().push(ms);
    }

    fn percentiles(&self) -> (u64, u64) {
        let mut v = self.0.lock().clone();
        if v.is_empty() {
            return (0, 0);
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
        (at(0.5), at(0.99))
    }
}
