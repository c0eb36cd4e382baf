//! `keel-embed-node` with candle's CUDA backend compiled in: the same
//! command line as the CPU build, with `--device cuda` (or `cuda:N`).
//!
//! ```text
//! cargo build --release --manifest-path gateway/embed-cuda/Cargo.toml
//! gateway/embed-cuda/target/release/keel-embed-node --device cuda:0
//! ```

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keel_gateway::embed_node::cli::main().await
}
