//! Settings of the fake node.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use keel_core::ConfigError;

/// How a [`FakeNode`](super::FakeNode) behaves. Every field can also be set
/// on the `keel-fake-node` command line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct FakeNodeConfig {
    /// The model id it serves (`/v1/models`). Default `fake-model`.
    pub model: String,
    /// Requests served at once (its batch slots); one more is answered 503
    /// with `Retry-After`. Default 8.
    pub slots: usize,
    /// Time to first token on a prefix-cache hit. Default 20 ms.
    #[serde(with = "humantime_serde")]
    pub ttft: Duration,
    /// Extra time to first token on a prefix-cache miss (prefill). Default 40 ms.
    #[serde(with = "humantime_serde")]
    pub prefill: Duration,
    /// Time per generated token. Default 2 ms.
    #[serde(with = "humantime_serde")]
    pub per_token: Duration,
    /// Every delay is multiplied by a uniform factor in `[1 - jitter, 1 + jitter]`. Default 0.1.
    pub jitter: f64,
    /// Completion tokens when a request names none. Default 16.
    pub default_max_tokens: u32,
    /// The model stops (end of sequence) after this many tokens even when
    /// `max_tokens` allows more, as real models do. Default: none.
    pub stop_after: Option<u32>,
    /// Share of requests answered 500. Default 0.
    pub error_rate: f64,
    /// Distinct prompt prefixes (system prompts) the node keeps warm, least
    /// recently used evicted first. Default 4.
    pub prefix_cache: usize,
    /// Dimensions of the (deterministic) embeddings. Default 16.
    pub embedding_dims: usize,
    /// `Retry-After` seconds sent with a busy 503. Default 1.
    pub retry_after_secs: u64,
    /// Seed of the jitter and error draws. Default 1.
    pub seed: u64,
}

impl Default for FakeNodeConfig {
    fn default() -> Self {
        FakeNodeConfig {
            model: "fake-model".to_owned(),
            slots: 8,
            ttft: Duration::from_millis(20),
            prefill: Duration::from_millis(40),
            per_token: Duration::from_millis(2),
            jitter: 0.1,
            default_max_tokens: 16,
            stop_after: None,
            error_rate: 0.0,
            prefix_cache: 4,
            embedding_dims: 16,
            retry_after_secs: 1,
            seed: 1,
        }
    }
}

impl FakeNodeConfig {
    /// A node that answers at once: no delays, no jitter (for benchmarks of
    /// what sits in front of it).
    pub fn instant() -> Self {
        FakeNodeConfig {
            ttft: Duration::ZERO,
            prefill: Duration::ZERO,
            per_token: Duration::ZERO,
            jitter: 0.0,
            slots: 100_000,
            ..FakeNodeConfig::default()
        }
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.model.is_empty() {
            return Err(ConfigError::new("model", "must not be empty"));
        }
        if self.slots == 0 {
            return Err(ConfigError::new("slots", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(ConfigError::new("jitter", "must be between 0.0 and 1.0"));
        }
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(ConfigError::new(
                "error_rate",
                "must be between 0.0 and 1.0",
            ));
        }
        if self.embedding_dims == 0 || self.embedding_dims > 4096 {
            return Err(ConfigError::new(
                "embedding_dims",
                "must be between 1 and 4096",
            ));
        }
        Ok(())
    }
}
