//! keel-gateway: an OpenAI-compatible inference gateway built from the
//! Keel crates, and [`fake_node`], the OpenAI-compatible node simulator its
//! tests, the demo and the benchmarks run against (binary
//! `keel-fake-node`).

pub mod app;
pub mod config;
pub mod durable;
pub mod error;
pub mod fake_node;
pub mod metrics;
pub mod openai;
pub mod pool;
pub mod sse;
mod stack;
pub mod upstream;

pub use app::Gateway;
pub use config::GatewayConfig;
pub use error::GatewayError;
