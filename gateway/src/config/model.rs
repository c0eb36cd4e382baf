//! A model and the pool of upstreams that serve it.

use keel_core::ConfigError;
use serde::{Deserialize, Serialize};

/// One model name clients ask for, and the upstream servers (any
/// OpenAI-compatible server: vLLM, TGI, llama.cpp, SGLang, keel-fake-node)
/// that serve it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ModelConfig {
    /// The name in requests' `model` field.
    pub name: String,
    /// Base URLs, e.g. `http://10.0.0.7:8000` (the gateway appends `/v1/…`).
    pub upstreams: Vec<String>,
    /// The model's name upstream, if it differs. Default: `name`.
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// Requests each upstream serves at once (its batch slots). Default 16.
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// Serve chat and completions from the cache when `temperature` is 0
    /// (embeddings are always cached). Default false.
    #[serde(default)]
    pub cache_deterministic: bool,
    /// How an upstream is picked (keel-balancer's `Policy`, e.g.
    /// `{ kind = "prefix_affinity" }` to keep a system prompt on the
    /// upstream whose KV cache holds it). Default peak-EWMA P2C.
    #[serde(default = "default_policy")]
    pub policy: keel_balancer::Policy,
    /// The path the gateway probes on each upstream (`GET`, expects 2xx).
    /// Default `/health` (vLLM, SGLang, TGI, llama.cpp and keel-fake-node
    /// answer it).
    #[serde(default = "default_health_path")]
    pub health_path: String,
}

fn default_policy() -> keel_balancer::Policy {
    keel_balancer::Policy::PeakEwma
}

fn default_health_path() -> String {
    "/health".to_owned()
}

fn default_slots() -> u32 {
    16
}

impl ModelConfig {
    /// A model served by `upstreams`.
    pub fn new(name: impl Into<String>, upstreams: impl IntoIterator<Item = String>) -> Self {
        ModelConfig {
            name: name.into(),
            upstreams: upstreams.into_iter().collect(),
            upstream_model: None,
            slots: default_slots(),
            cache_deterministic: false,
            health_path: default_health_path(),
            policy: default_policy(),
        }
    }

    pub(crate) fn validate(&self, index: usize) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(ConfigError::new(
                "models[].name",
                format!("models[{index}] has no name"),
            ));
        }
        if self.upstreams.is_empty() {
            return Err(ConfigError::new(
                "models[].upstreams",
                format!("model `{}` (models[{index}]) has no upstreams", self.name),
            ));
        }
        for url in &self.upstreams {
            let ok = url
                .parse::<http::Uri>()
                .ok()
                .filter(|uri| uri.scheme_str() == Some("http") && uri.authority().is_some());
            if ok.is_none() {
                return Err(ConfigError::new(
                    "models[].upstreams",
                    format!(
                        "model `{}`: `{url}` is not an http://host:port URL",
                        self.name
                    ),
                ));
            }
        }
        if !self.health_path.starts_with('/') {
            return Err(ConfigError::new(
                "models[].health_path",
                format!("model `{}`: the health path must start with `/`", self.name),
            ));
        }
        if self.slots == 0 {
            return Err(ConfigError::new(
                "models[].slots",
                format!("model `{}`: slots must be at least 1", self.name),
            ));
        }
        Ok(())
    }
}
