//! `keel-gateway`: the OpenAI-compatible inference gateway.
//!
//! ```text
//! keel-gateway --config gateway.toml      # serve
//! keel-gateway hash-key sk-my-secret      # the sha256 to put in [[keys]]
//! ```

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use keel_gateway::{Gateway, GatewayConfig};

/// An OpenAI-compatible inference gateway built from the Keel crates.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The TOML configuration file.
    #[arg(long, short, env = "KEEL_CONFIG", default_value = "gateway.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints the sha256 of an API key, as `[[keys]] sha256` wants it.
    HashKey {
        /// The key.
        key: String,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(Command::HashKey { key }) = args.command {
        println!("{}", keel_gateway::config::hash_key(&key));
        return std::process::ExitCode::SUCCESS;
    }
    // Logs go to stderr: stdout's first line is `listening on ADDR`.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("keel-gateway: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let config = GatewayConfig::load(&args.config)?;
    keel_gateway::metrics::install();
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let gateway = Gateway::new(config).await?;
    println!("listening on {}", listener.local_addr()?);
    gateway
        .serve(listener, keel_gateway::shutdown_signal())
        .await?;
    Ok(())
}
