//! Outcome-recording overhead against a bare atomic counter, in the same run.
//!
//! ```text
//! cargo run --release -p keel-health --example bench
//! cargo run --release -p keel-health --example bench -- --threads 1,2,4
//! ```
//!
//! N tasks on an N-worker runtime each record `--ops` outcomes spread over
//! 64 endpoints (98% successes, 1.5% failures, 0.5% busy answers, in a
//! fixed pseudo-random order per task) through each endpoint's `Recorder`,
//! the handle behind `OutlierLayer`. The baseline is the same loop doing a
//! bare `Arc<AtomicU64>::fetch_add` on one shared counter. A figure is the
//! wall time of a run divided by the operations of one task: the cost of
//! one operation as seen by each of the N tasks running at once (flat
//! across N is perfect scaling). One warm-up run and the best of `--runs`
//! measured runs of each side (alternating).
//!
//! `--threads` gives N: one count or a list (`--threads 1,2,4`), each
//! measured in the same run on its own runtime with a fresh `Health`, and
//! a line `threads N: ... ratio R` reports each. Without it, N is 2 (two
//! tasks on two worker threads, as before `--threads` existed).
//!
//! The last line printed is one JSON object,
//! `{"record_ns": N, "baseline_ns": N, "ratio": R}`, for the **last**
//! thread count given.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use keel_health::{
    Endpoint, FailureKind, Health, HealthConfig, Outcome, OutlierConfig, OutlierLayer, Recorder,
};
use keel_testkit::{bench_runtime, thread_list};
use tokio::time::Instant;
use tower::{Layer, Service};

#[derive(Debug, Parser)]
struct Args {
    /// Outcomes recorded by each task per run.
    #[arg(long, default_value_t = 4_000_000)]
    ops: usize,
    /// Measured runs of each side; the best counts.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Endpoints.
    #[arg(long, default_value_t = 64)]
    endpoints: usize,
    /// Tokio worker threads, one count or a comma-separated list; as many
    /// tasks record at once. The JSON line reports the last. Default: 2.
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
}

/// Worker threads (and recording tasks) without `--threads`.
const DEFAULT_THREADS: usize = 2;
const PATTERN: usize = 4096;

/// A fixed pseudo-random sequence of (endpoint, outcome) pairs.
fn pattern(endpoints: usize, seed: u64) -> Arc<Vec<(usize, Outcome)>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    Arc::new(
        (0..PATTERN)
            .map(|_| {
                let roll = rng.u32(0..1000);
                let outcome = if roll < 980 {
                    Outcome::Success
                } else if roll < 995 {
                    Outcome::failure(FailureKind::Transport)
                } else {
                    Outcome::Busy { retry_after: None }
                };
                (rng.usize(0..endpoints), outcome)
            })
            .collect(),
    )
}

async fn run_record(recorders: &Arc<Vec<Recorder>>, ops: usize, tasks: usize) -> Duration {
    let start = Instant::now();
    let tasks: Vec<_> = (0..tasks)
        .map(|task| {
            let recorders = recorders.clone();
            let pattern = pattern(recorders.len(), task as u64 + 1);
            tokio::spawn(async move {
                let latency = Duration::from_micros(1500);
                for i in 0..ops {
                    let (endpoint, outcome) = pattern[i % PATTERN];
                    recorders[endpoint].record(black_box(outcome), latency);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("record task");
    }
    start.elapsed()
}

async fn run_baseline(
    counter: &Arc<AtomicU64>,
    endpoints: usize,
    ops: usize,
    tasks: usize,
) -> Duration {
    let start = Instant::now();
    let tasks: Vec<_> = (0..tasks)
        .map(|task| {
            let counter = counter.clone();
            let pattern = pattern(endpoints, task as u64 + 1);
            tokio::spawn(async move {
                for i in 0..ops {
                    let (endpoint, outcome) = pattern[i % PATTERN];
                    black_box((endpoint, outcome));
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("baseline task");
    }
    start.elapsed()
}

/// One request through `Outlier` around an always-ready service, against the
/// bare service: the whole layer's cost (two clock reads, the recorder
/// clone, classification, recording), single task.
async fn layer_overhead(health: &Health, ops: usize) -> (f64, f64) {
    let layer: OutlierLayer = health.outlier_layer("node-0").expect("registered");
    let mut bare = tower::service_fn(|_: u64| std::future::ready(Ok::<_, std::io::Error>(())));
    let mut wrapped = layer.layer(bare);
    let start = Instant::now();
    for i in 0..ops as u64 {
        wrapped.call(black_box(i)).await.expect("call");
    }
    let wrapped_ns = start.elapsed().as_nanos() as f64 / ops as f64;
    let start = Instant::now();
    for i in 0..ops as u64 {
        bare.call(black_box(i)).await.expect("call");
    }
    let bare_ns = start.elapsed().as_nanos() as f64 / ops as f64;
    (wrapped_ns, bare_ns)
}

/// A fresh `Health` over `args.endpoints` endpoints, then `tasks`
/// recording tasks: a warm-up run and `args.runs` measured runs of each
/// side. Answers the `Health` and the best ns per outcome and per increment.
async fn measure(args: &Args, tasks: usize) -> (Health, f64, f64) {
    // Thresholds out of the way: this measures recording, not ejection.
    let health = Health::new(
        HealthConfig::new("bench")
            .outlier(OutlierConfig::default().consecutive_failures(Some(1_000_000))),
    )
    .expect("health");
    for i in 0..args.endpoints {
        health
            .insert(Endpoint::new(
                format!("node-{i}"),
                format!("10.0.0.{i}:8000"),
            ))
            .expect("insert");
    }
    let recorders: Arc<Vec<Recorder>> = Arc::new(
        (0..args.endpoints)
            .map(|i| health.recorder(&format!("node-{i}")).expect("recorder"))
            .collect(),
    );
    let counter = Arc::new(AtomicU64::new(0));
    run_record(&recorders, args.ops / 10, tasks).await;
    run_baseline(&counter, args.endpoints, args.ops / 10, tasks).await;
    let mut best_record = f64::MAX;
    let mut best_baseline = f64::MAX;
    for run in 1..=args.runs {
        let record =
            run_record(&recorders, args.ops, tasks).await.as_nanos() as f64 / args.ops as f64;
        let baseline = run_baseline(&counter, args.endpoints, args.ops, tasks)
            .await
            .as_nanos() as f64
            / args.ops as f64;
        println!(
            "threads {tasks} run {run}: record {record:.1} ns/outcome, baseline {baseline:.1} ns/increment"
        );
        best_record = best_record.min(record);
        best_baseline = best_baseline.min(baseline);
    }
    (health, best_record, best_baseline)
}

fn main() {
    let args = Args::parse();
    let counts: Vec<usize> = if args.threads.is_empty() {
        vec![DEFAULT_THREADS]
    } else {
        args.threads.iter().map(|&n| n.max(1)).collect()
    };
    println!(
        "keel-health bench: N tasks on N worker threads × {} outcomes over {} endpoints, best of {}, threads {}",
        args.ops,
        args.endpoints,
        args.runs,
        thread_list(&counts)
    );
    let mut last = None;
    for &threads in &counts {
        let runtime = bench_runtime(Some(threads));
        let (health, record, baseline) = runtime.block_on(measure(&args, threads));
        println!(
            "threads {threads}: record {record:.1} ns/outcome, baseline {baseline:.1} ns/increment, ratio {:.2}",
            record / baseline
        );
        last = Some((runtime, health, record, baseline));
    }
    let (runtime, health, best_record, best_baseline) = last.expect("at least one thread count");
    runtime.block_on(async move {
        let (wrapped, bare) = layer_overhead(&health, args.ops / 4).await;
        println!(
            "whole Outlier layer (1 task, incl. 2 clock reads): {wrapped:.1} ns/request vs {bare:.1} ns bare service (+{:.1} ns)",
            wrapped - bare
        );
        let snapshot = health.snapshot();
        println!(
            "after the last count's runs: {} endpoints, {} in rotation, {} ejected",
            snapshot.len(),
            snapshot.in_rotation().count(),
            snapshot.ejected_count()
        );
    });
    let ratio = best_record / best_baseline;
    println!(
        "{{\"record_ns\": {best_record:.1}, \"baseline_ns\": {best_baseline:.1}, \"ratio\": {ratio:.2}}}"
    );
}
