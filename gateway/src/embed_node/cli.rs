//! The `keel-embed-node` command line, shared by the CPU build (this
//! crate's `keel-embed-node` binary) and the CUDA build
//! (`gateway/embed-cuda/`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use super::{EmbedError, EmbedNode, EmbedNodeConfig};

/// An OpenAI-compatible embedding server running all-MiniLM-L6-v2 with
/// candle, micro-batched: inputs of concurrent requests share forward passes.
///
/// The model files come from `gateway/embed/fetch-model.sh`.
#[derive(Debug, Parser)]
#[command(name = "keel-embed-node", version)]
pub struct Args {
    /// Address to listen on (port 0: a free port, printed on start).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// The model id it answers with.
    #[arg(long, default_value = "all-minilm-l6-v2")]
    pub model: String,
    /// The folder holding model.safetensors, tokenizer.json and config.json
    /// [default: target/models/all-minilm-l6-v2 in the workspace].
    #[arg(long, env = "KEEL_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs the build in gateway/embed-cuda/).
    #[arg(long, env = "KEEL_EMBED_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Inputs in one batch at most; 1 turns micro-batching off.
    #[arg(long, default_value_t = 32)]
    pub max_batch_size: usize,
    /// How long a batch's first input waits for more.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,
    /// Batches embedded at once.
    #[arg(long, default_value_t = 1)]
    pub concurrent_batches: usize,
    /// Inputs queued at most; a request beyond is answered 503.
    #[arg(long, default_value_t = 1024)]
    pub max_queued: usize,
    /// Inputs in one request at most.
    #[arg(long, default_value_t = 1024)]
    pub max_inputs: usize,
}

impl Args {
    /// The node configuration these arguments describe.
    pub fn config(&self) -> EmbedNodeConfig {
        let defaults = EmbedNodeConfig::default();
        EmbedNodeConfig {
            model: self.model.clone(),
            model_dir: self.model_dir.clone().unwrap_or(defaults.model_dir),
            device: self.device.clone(),
            max_batch_size: self.max_batch_size,
            max_wait: self.max_wait,
            concurrent_batches: self.concurrent_batches,
            max_queued: self.max_queued,
            max_inputs: self.max_inputs,
        }
    }
}

/// The binary's `main`: [`run`] on the parsed command line; on an error,
/// prints it with its causes on stderr and exits with status 1.
pub async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            let mut message = format!("keel-embed-node: {err}");
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                message.push_str(": ");
                message.push_str(&cause.to_string());
                source = cause.source();
            }
            eprintln!("{message}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Loads the model `args` describe, prints `listening on ADDR` as the first
/// line of stdout, and serves until SIGTERM or Ctrl-C. Logs go to stderr
/// (`RUST_LOG`, default `info`).
///
/// # Errors
///
/// What [`EmbedNode::start`] answers: a refused setting, missing model
/// files (the message names the script that fetches them), a device that
/// cannot be used, an address that cannot be bound.
pub async fn run(args: Args) -> Result<(), EmbedError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = args.config();
    let node = EmbedNode::start(config, &args.listen).await?;
    println!("listening on {}", node.addr());
    tracing::info!(
        addr = %node.addr(),
        device = node.embedder().device(),
        dims = node.embedder().dims(),
        "serving all-MiniLM-L6-v2"
    );
    crate::shutdown_signal().await;
    Ok(())
}
