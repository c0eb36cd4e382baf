//! The Keel demo, the README's main command:
//!
//! ```text
//! cargo run --release -p keel-examples --bin demo
//! cargo run --release -p keel-examples --bin demo -- --duration 10s --seed 7 --json report.json
//! cargo run --release -p keel-examples --features redis,amqp --bin demo -- --queue redis --cache tiered
//! ```
//!
//! One process, two identical simulated fleets, the same seeded traffic
//! through a Keel pipeline and a naive one, through five phases: steady, a
//! 10x slow node, a hung node, a 3x burst, a node answering 503. It ends
//! with a table per phase, side by side.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use keel_examples::demo::{DemoConfig, run};

/// Command-line options.
#[derive(Debug, Parser)]
#[command(about = "Keel demo: a Keel pipeline and a naive one under the same faults, side by side")]
struct Args {
    /// How long to offer traffic (five equal phases), e.g. `30s`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Seed for traffic and nodes: the same seed offers the same requests.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Base offered load per pipeline, requests per second.
    #[arg(long, default_value_t = 150.0)]
    rate: f64,
    /// Queue backend of the durable path: memory, redis (feature `redis`), amqp (feature `amqp`).
    #[arg(long, default_value = "memory")]
    queue: String,
    /// Cache backend: moka, redis or tiered (the last two need feature `redis`).
    #[arg(long, default_value = "moka")]
    cache: String,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args = Args::parse();
    println!(
        "keel demo: {} of traffic at {}/s base load through two identical 5-node simulated fleets; \
         Keel pipeline (cache -> admission -> retry budget -> balancer + health) vs naive \
         (round-robin, 3 immediate retries, no cache, unbounded queue); queue={} cache={} seed={}",
        humantime::format_duration(args.duration),
        args.rate,
        args.queue,
        args.cache,
        args.seed
    );
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(200));
    let progress_bar = bar.clone();
    let report = run(DemoConfig {
        duration: args.duration,
        seed: args.seed,
        rate: args.rate,
        queue: args.queue,
        cache: args.cache,
        progress: Some(Arc::new(move |line| progress_bar.set_message(line))),
        ..DemoConfig::default()
    })
    .await?;
    bar.finish_and_clear();
    println!("{}", report.table());
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        println!("report written to {}", path.display());
    }
    let keel_lost: u64 = report.phases.iter().map(|p| p.keel.lost).sum();
    if keel_lost > 0 || report.jobs.lost > 0 {
        return Err(format!(
            "Keel lost {keel_lost} requests and {} jobs",
            report.jobs.lost
        )
        .into());
    }
    Ok(())
}
