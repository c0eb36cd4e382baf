//! keel-embed-node's throughput and latency with micro-batching on and off,
//! in the same run, on the same loaded model.
//!
//! ```text
//! gateway/embed/fetch-model.sh
//! cargo run --release -p keel-gateway --example embed_bench --features real-model
//! ```
//!
//! Two nodes in this process share one loaded all-MiniLM-L6-v2 on the CPU:
//! **batched** (the defaults: up to 32 inputs per batch, the first waiting
//! at most 5 ms; a batch runs as one forward pass, or a few when splitting
//! by length saves padding) and **unbatched** (`max_batch_size` 1: a
//! forward pass per input). Both run one batch at a time, which on CPU
//! already uses every core. Each phase is a closed loop over HTTP on
//! 127.0.0.1: `N` callers, each sending one sentence per
//! `POST /v1/embeddings` and the next as soon as the answer is in. The
//! sentences are the 20 short ones of `gateway/embed/reference.json`
//! (9–23 tokens), taken in turn. At 1, 8 and 32 callers, each mode gets a
//! warm-up, then 10 s of measurement cut into 5 slices, the two modes
//! taking turns slice by slice (so a burst of load from elsewhere on a
//! shared machine lands on both).
//!
//! Latency runs from just before a request is sent to the end of its body.
//! The last line printed is one JSON object, from the 32-caller phases:
//! `{"batched_per_s": N, "unbatched_per_s": N, "ratio": R}`.

#[path = "common/machine.rs"]
mod machine;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use keel_gateway::embed_node::{EmbedNode, EmbedNodeConfig, Embedder, default_model_dir};
use serde_json::{Value, json};
use tokio::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// Callers of each phase, comma-separated; the JSON line uses the last.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    callers: Vec<usize>,
    /// Measured seconds of each mode at each caller count, in `rounds`
    /// slices.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Slices the measured time is cut into, the two modes taking turns
    /// (unbatched first in odd rounds, batched first in even ones), so a
    /// burst of load from elsewhere on the machine hits both.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds of warm-up of each mode before each caller count.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// The batched node's `max_batch_size`.
    #[arg(long, default_value_t = 32)]
    max_batch_size: usize,
    /// The batched node's `max_wait`.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    max_wait: Duration,
}

/// What the measured slices of one mode at one caller count saw.
#[derive(Default)]
struct Phase {
    latencies: Vec<Duration>,
    failed: u64,
    seconds: f64,
    batches: u64,
    passes: u64,
    inputs: u64,
}

impl Phase {
    fn per_s(&self) -> f64 {
        self.latencies.len() as f64 / self.seconds
    }

    fn percentile_ms(&mut self, p: f64) -> f64 {
        self.latencies.sort_unstable();
        let rank = (self.latencies.len() as f64 * p).ceil() as usize;
        self.latencies
            .get(rank.saturating_sub(1))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    }

    fn inputs_per(&self, n: u64) -> f64 {
        if n == 0 {
            0.0
        } else {
            self.inputs as f64 / n as f64
        }
    }
}

fn sentences() -> Vec<String> {
    let reference: Value = serde_json::from_str(include_str!("../embed/reference.json"))
        .expect("gateway/embed/reference.json parses");
    reference["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|item| (3..=32).contains(&item["tokens"].as_u64().unwrap_or(0)))
        .map(|item| item["sentence"].as_str().expect("sentence").to_owned())
        .collect()
}

fn cpu() -> String {
    let model = machine::cpu_model();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {cores} cores")
}

async fn run(
    phase: &mut Phase,
    node: &EmbedNode,
    callers: usize,
    run: Duration,
    sentences: &Arc<Vec<String>>,
) {
    let before = node.stats();
    let started = Instant::now();
    let stop = started + run;
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..callers)
        .map(|caller| {
            let client = client.clone();
            let url = format!("{}/v1/embeddings", node.url());
            let sentences = sentences.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failed = 0u64;
                let mut n = caller;
                while Instant::now() < stop {
                    let input = &sentences[n % sentences.len()];
                    n += callers;
                    let sent = Instant::now();
                    let answer = client
                        .post(&url)
                        .json(&json!({"model": "all-minilm-l6-v2", "input": input}))
                        .send()
                        .await;
                    let ok = match answer {
                        Ok(answer) if answer.status() == 200 => answer.bytes().await.is_ok(),
                        _ => false,
                    };
                    if ok {
                        latencies.push(sent.elapsed());
                    } else {
                        failed += 1;
                    }
                }
                (latencies, failed)
            })
        })
        .collect();
    for task in tasks {
        let (latencies, failed) = task.await.expect("a caller");
        phase.latencies.extend(latencies);
        phase.failed += failed;
    }
    phase.seconds += started.elapsed().as_secs_f64();
    let after = node.stats();
    phase.batches += after.batches - before.batches;
    phase.passes += after.forward_passes - before.forward_passes;
    phase.inputs += after.inputs - before.inputs;
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let dir = default_model_dir();
    let embedder = Arc::new(
        tokio::task::spawn_blocking(move || Embedder::load(dir, "cpu"))
            .await?
            .map_err(|err| format!("embed_bench: {err}"))?,
    );
    let sentences = Arc::new(sentences());
    let mut batched = EmbedNodeConfig::default();
    batched.max_batch_size = args.max_batch_size;
    batched.max_wait = args.max_wait;
    let nodes = [
        ("unbatched", EmbedNodeConfig::unbatched()),
        ("batched", batched),
    ]
    .map(|(name, config)| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.set_nonblocking(true).expect("non-blocking");
        let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
        (
            name,
            EmbedNode::serve(config, embedder.clone(), listener).expect("a valid config"),
        )
    });
    println!(
        "all-MiniLM-L6-v2 on {} (candle, device cpu); {} sentences of 9-23 tokens; {} s per mode and caller count in {} alternating slices, after {} s warm-up",
        cpu(),
        sentences.len(),
        args.secs,
        args.rounds,
        args.warmup
    );
    println!(
        "batched: max_batch_size {}, max_wait {:?}; unbatched: max_batch_size 1; one batch at a time on both",
        args.max_batch_size, args.max_wait
    );
    println!();
    println!(
        "| mode | callers | ok / failed | sentences/s | p50 ms | p99 ms | inputs per batch | inputs per forward pass |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut last = (0.0, 0.0);
    let slice = Duration::from_secs_f64(args.secs / f64::from(args.rounds.max(1)));
    for &callers in &args.callers {
        let mut phases = [Phase::default(), Phase::default()];
        for (_, node) in &nodes {
            let warmup = Duration::from_secs_f64(args.warmup);
            run(&mut Phase::default(), node, callers, warmup, &sentences).await;
        }
        for round in 0..args.rounds.max(1) {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                run(&mut phases[i], &nodes[i].1, callers, slice, &sentences).await;
            }
        }
        for ((name, _), phase) in nodes.iter().zip(&mut phases) {
            let (p50, p99) = (phase.percentile_ms(0.50), phase.percentile_ms(0.99));
            println!(
                "| {name} | {callers} | {} / {} | {:.1} | {p50:.1} | {p99:.1} | {:.1} | {:.1} |",
                phase.latencies.len(),
                phase.failed,
                phase.per_s(),
                phase.inputs_per(phase.batches),
                phase.inputs_per(phase.passes),
            );
        }
        last = (phases[1].per_s(), phases[0].per_s());
    }
    let (batched, unbatched) = last;
    println!(
        "{{\"batched_per_s\": {batched:.1}, \"unbatched_per_s\": {unbatched:.1}, \"ratio\": {:.2}}}",
        batched / unbatched
    );
    Ok(())
}
