//! The real model for the tests: sentence-transformers' reference vectors,
//! one loaded model per test binary, `keel-embed-node` processes, and a
//! gateway in front of them.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keel_gateway::GatewayConfig;
use keel_gateway::config::{KeyConfig, ModelConfig, Tenant};
use keel_gateway::embed_node::{Embedder, FETCH_SCRIPT, default_model_dir};
use serde::Deserialize;

use super::{KEY, Setup};

/// The model id the nodes answer with, and the gateway's model name.
pub const EMBED_MODEL: &str = "all-minilm-l6-v2";

/// `gateway/embed/reference.json`: what sentence-transformers answers.
#[derive(Debug, Deserialize)]
pub struct Reference {
    pub close_pairs: Vec<(usize, usize)>,
    pub unrelated_pairs: Vec<(usize, usize)>,
    pub items: Vec<ReferenceItem>,
}

/// One reference sentence.
#[derive(Debug, Deserialize)]
pub struct ReferenceItem {
    pub sentence: String,
    /// Tokens sentence-transformers read, `[CLS]` and `[SEP]` included.
    pub tokens: usize,
    pub embedding: Vec<f32>,
}

/// The reference vectors (parsed once).
pub fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        serde_json::from_str(include_str!("../../embed/reference.json"))
            .expect("gateway/embed/reference.json parses")
    })
}

/// Fails the test, naming the script, when the model files are missing.
pub fn require_model() {
    let dir = default_model_dir();
    assert!(
        dir.join("model.safetensors").is_file(),
        "no all-MiniLM-L6-v2 in {}: run `{FETCH_SCRIPT}` (or set KEEL_MODEL_DIR)",
        dir.display()
    );
}

/// The model, loaded once per test binary on the CPU.
pub fn embedder() -> Arc<Embedder> {
    static EMBEDDER: OnceLock<Arc<Embedder>> = OnceLock::new();
    EMBEDDER
        .get_or_init(|| {
            require_model();
            Arc::new(
                Embedder::load(default_model_dir(), "cpu").unwrap_or_else(|err| panic!("{err}")),
            )
        })
        .clone()
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// A `keel-embed-node` process on a free loopback port; killed (SIGKILL)
/// when dropped.
pub struct EmbedProcess {
    pub child: std::process::Child,
    pub url: String,
}

impl EmbedProcess {
    /// Starts the binary with `args` added and waits for its address.
    pub fn start(args: &[&str]) -> EmbedProcess {
        require_model();
        let (child, url) = super::spawn_announcing(
            std::process::Command::new(env!("CARGO_BIN_EXE_keel-embed-node"))
                .args(["--listen", "127.0.0.1:0", "--model", EMBED_MODEL])
                .args(args),
            "keel-embed-node",
        );
        EmbedProcess { child, url }
    }

    /// SIGKILL: the process dies mid-request, connections cut.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EmbedProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gateway in front of `upstreams` serving [`EMBED_MODEL`]: tenant
/// `acme`, key [`KEY`], probes every 100 ms; ready when this returns.
pub async fn gateway(upstreams: Vec<String>, tweak: impl FnOnce(&mut GatewayConfig)) -> Setup {
    let mut config = GatewayConfig::default();
    config.probe_interval = Duration::from_millis(100);
    config.models = vec![ModelConfig::new(EMBED_MODEL, upstreams)];
    config.tenants = vec![Tenant::new("acme")];
    config.keys = vec![KeyConfig::new(KEY, "acme")];
    tweak(&mut config);
    super::serve(config, Vec::new()).await
}
