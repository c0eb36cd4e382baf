//! `keel-embed-node`: all-MiniLM-L6-v2 behind an OpenAI-compatible
//! `/v1/embeddings`, micro-batched (feature `real-model`).
//!
//! Prints `listening on <addr>` on its first line of stdout, then serves
//! until SIGTERM or Ctrl-C. `keel-embed-node --help` lists the settings.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keel_gateway::embed_node::cli::main().await
}
