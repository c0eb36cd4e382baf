//! `keel-worker`: runs the gateway's queued requests (durable mode) from
//! Redis or RabbitMQ through the same admission → retry → balancer →
//! health stack, and stores their results for `GET /v1/jobs/{id}`.
//!
//! ```text
//! keel-worker --config gateway.toml --listen 127.0.0.1:9100
//! ```
//!
//! It reads the gateway's configuration file (models, tenants, `redis_url`
//! or `redis_cluster_urls`, `[durable]`). SIGTERM stops pulling, lets in-flight jobs finish, and
//! hands the rest back to the queue without spending an attempt.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use keel_gateway::GatewayConfig;
use keel_gateway::durable::WorkerProcess;

/// Runs keel-gateway's queued requests.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The gateway's TOML configuration file.
    #[arg(long, short, env = "KEEL_CONFIG", default_value = "gateway.toml")]
    config: PathBuf,
    /// Where `/healthz` and `/metrics` are served.
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Logs go to stderr: stdout's first line is `listening on ADDR`.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("keel-worker: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let config = GatewayConfig::load(&args.config)?;
    keel_gateway::metrics::install();
    let worker = WorkerProcess::start(&config).await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let server = axum::serve(listener, worker.router());
    tokio::select! {
        result = server.into_future() => result?,
        () = keel_gateway::shutdown_signal() => {}
    }
    let report = worker.shutdown().await;
    tracing::info!(?report, "stopped");
    Ok(())
}
