#![doc = include_str!("../README.md")]

pub mod app;
pub mod config;
pub mod durable;
#[cfg(feature = "real-model")]
pub mod embed_node;
pub mod error;
pub mod fake_node;
pub mod metrics;
mod node_server;
pub mod openai;
pub mod pool;
pub mod sse;
mod stack;
pub mod upstream;

pub use app::Gateway;
pub use config::GatewayConfig;
pub use error::GatewayError;

/// Resolves on SIGTERM or Ctrl-C: the signal both binaries drain on.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
