//! End-to-end queue throughput against the raw dependency, in the same run.
//!
//! ```text
//! cargo run --release -p keel-queue --example bench --all-features -- --backend memory
//! ```
//!
//! The cycle is enqueue → dequeue → ack of 256-byte payloads, batched where
//! the backend allows, with one producer task and one consumer task. The
//! raw baseline does the same cycle with the dependency alone (a tokio
//! bounded mpsc for memory). The last line printed is one JSON object:
//! `{"backend": "...", "keel_jobs_per_s": N, "raw_jobs_per_s": N, "ratio": R}`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use keel_queue::{DequeueOptions, Job, MemoryQueue, Queue, QueueConfig};
use tokio::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// memory, redis or amqp.
    #[arg(long, default_value = "memory")]
    backend: String,
    /// Jobs per measured run.
    #[arg(long, default_value_t = 200_000)]
    jobs: usize,
    /// Jobs per enqueue batch and per dequeue.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Measured runs of each side (alternating); the best run of each counts.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// One full cycle through a Keel queue; answers jobs per second.
async fn keel_cycle(queue: Arc<dyn Queue>, jobs: usize, batch: usize) -> f64 {
    let payload = Bytes::from(vec![7u8; 256]);
    let start = Instant::now();
    let producer = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            while sent < jobs {
                let n = batch.min(jobs - sent);
                let batch: Vec<Job> = (0..n).map(|_| Job::new(payload.clone())).collect();
                match queue.enqueue_batch(batch).await {
                    Ok(_) => sent += n,
                    Err(err) if err.is_retryable() => tokio::task::yield_now().await,
                    Err(err) => panic!("enqueue failed: {err}"),
                }
            }
        })
    };
    let mut acked = 0;
    let options = DequeueOptions::new(batch)
        .wait(Duration::from_secs(5))
        .lease(Duration::from_secs(60));
    while acked < jobs {
        let deliveries = queue.dequeue(options).await.expect("dequeue");
        assert!(!deliveries.is_empty(), "consumer starved for 5 s");
        let n = deliveries.len();
        let receipts: Vec<_> = deliveries.into_iter().map(|d| d.receipt).collect();
        queue.ack_batch(&receipts).await.expect("ack");
        acked += n;
    }
    producer.await.expect("producer");
    jobs as f64 / start.elapsed().as_secs_f64()
}

/// The same cycle through a tokio bounded mpsc.
async fn raw_memory_cycle(jobs: usize, batch: usize) -> f64 {
    let payload = Bytes::from(vec![7u8; 256]);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16_384);
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        for _ in 0..jobs {
            tx.send(payload.clone()).await.expect("send");
        }
    });
    let mut received = 0;
    let mut buf = Vec::with_capacity(batch);
    while received < jobs {
        buf.clear();
        let n = rx.recv_many(&mut buf, batch).await;
        assert!(n > 0, "channel closed early");
        received += n;
    }
    producer.await.expect("producer");
    jobs as f64 / start.elapsed().as_secs_f64()
}

async fn measure(args: &Args) -> Result<(f64, f64), String> {
    let mut best_keel = 0f64;
    let mut best_raw = 0f64;
    for run in 0..args.runs + 1 {
        let (keel, raw) = match args.backend.as_str() {
            "memory" => {
                let queue =
                    MemoryQueue::new(QueueConfig::new(format!("bench-{run}")).capacity(1_000_000))
                        .map_err(|e| e.to_string())?;
                (
                    keel_cycle(Arc::new(queue), args.jobs, args.batch).await,
                    raw_memory_cycle(args.jobs, args.batch).await,
                )
            }
            other => {
                return Err(format!(
                    "--backend {other}: unknown or not compiled in (memory{}{})",
                    if cfg!(feature = "redis") {
                        ", redis"
                    } else {
                        ""
                    },
                    if cfg!(feature = "amqp") { ", amqp" } else { "" },
                ));
            }
        };
        if run == 0 {
            println!("warm-up: keel {keel:.0} jobs/s, raw {raw:.0} jobs/s");
            continue;
        }
        println!(
            "run {run}: keel {keel:.0} jobs/s, raw {raw:.0} jobs/s, ratio {:.3}",
            keel / raw
        );
        best_keel = best_keel.max(keel);
        best_raw = best_raw.max(raw);
    }
    Ok((best_keel, best_raw))
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    println!(
        "backend {}: {} jobs of 256 bytes per run, batches of {}, 1 producer + 1 consumer, best of {} runs",
        args.backend, args.jobs, args.batch, args.runs
    );
    let (keel, raw) = measure(&args).await?;
    println!(
        "{{\"backend\": \"{}\", \"keel_jobs_per_s\": {:.0}, \"raw_jobs_per_s\": {:.0}, \"ratio\": {:.3}}}",
        args.backend,
        keel,
        raw,
        keel / raw
    );
    Ok(())
}
