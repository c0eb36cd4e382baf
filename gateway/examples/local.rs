//! The gateway in front of three fake nodes, on this machine:
//!
//! ```text
//! cargo run --release -p keel-gateway --example local
//! curl -s localhost:8080/v1/chat/completions -H 'authorization: Bearer sk-local' \
//!   -d '{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}'
//! ```
//!
//! `--listen ADDR` moves the gateway; Ctrl-C stops everything.

use std::time::Duration;

use keel_gateway::config::{KeyConfig, ModelConfig, Tenant};
use keel_gateway::fake_node::{FakeNode, FakeNodeConfig};
use keel_gateway::{Gateway, GatewayConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen = std::env::args()
        .skip_while(|arg| arg != "--listen")
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    keel_gateway::metrics::install();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(FakeNode::start(FakeNodeConfig::default(), "127.0.0.1:0").await?);
    }
    let mut config = GatewayConfig::default();
    config.listen = listen.parse()?;
    config.probe_interval = Duration::from_millis(500);
    let mut model = ModelConfig::new("fake-model", nodes.iter().map(FakeNode::url));
    model.cache_deterministic = true;
    config.models = vec![model];
    config.tenants = vec![Tenant::new("local")];
    config.keys = vec![KeyConfig::new("sk-local", "local")];
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let gateway = Gateway::new(config).await?;
    println!(
        "keel-gateway on http://{} in front of:",
        listener.local_addr()?
    );
    for node in &nodes {
        println!("  keel-fake-node {}", node.url());
    }
    println!("API key: sk-local   model: fake-model   metrics: /metrics   Ctrl-C to stop");
    gateway
        .serve(listener, keel_gateway::shutdown_signal())
        .await?;
    Ok(())
}
