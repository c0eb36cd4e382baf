//! `keel-fake-node`: an OpenAI-compatible node simulator.
//!
//! Prints `listening on <addr>` on its first line of stdout, then serves
//! until killed.

use std::time::Duration;

use clap::Parser;
use keel_gateway::fake_node::{FakeNode, FakeNodeConfig};

/// An OpenAI-compatible inference node simulator (chat with SSE,
/// completions, embeddings), with batch slots, a prefix cache, latency,
/// an error rate and run-time modes (`POST /admin/mode`).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (port 0: a free port, printed on start).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// The model id it serves.
    #[arg(long, default_value = "fake-model")]
    model: String,
    /// Requests served at once; one more is answered 503.
    #[arg(long, default_value_t = 8)]
    slots: usize,
    /// Time to first token on a prefix-cache hit.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    ttft: Duration,
    /// Extra time to first token on a prefix-cache miss.
    #[arg(long, default_value = "40ms", value_parser = humantime::parse_duration)]
    prefill: Duration,
    /// Time per generated token.
    #[arg(long, default_value = "2ms", value_parser = humantime::parse_duration)]
    per_token: Duration,
    /// Delay jitter, 0.0 to 1.0.
    #[arg(long, default_value_t = 0.1)]
    jitter: f64,
    /// Share of requests answered 500.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Prompt prefixes kept warm.
    #[arg(long, default_value_t = 4)]
    prefix_cache: usize,
    /// Completion tokens when a request names none.
    #[arg(long, default_value_t = 16)]
    default_max_tokens: u32,
    /// Answer at once (no delays, unlimited slots): for benchmarks.
    #[arg(long)]
    instant: bool,
    /// Seed of the jitter and error draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut config = if args.instant {
        FakeNodeConfig::instant()
    } else {
        let mut config = FakeNodeConfig::default();
        config.slots = args.slots;
        config.ttft = args.ttft;
        config.prefill = args.prefill;
        config.per_token = args.per_token;
        config.jitter = args.jitter;
        config
    };
    config.model = args.model;
    config.error_rate = args.error_rate;
    config.prefix_cache = args.prefix_cache;
    config.default_max_tokens = args.default_max_tokens;
    config.seed = args.seed;
    let node = FakeNode::start(config, &args.listen).await?;
    println!("listening on {}", node.addr());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
