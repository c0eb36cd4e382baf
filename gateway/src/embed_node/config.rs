//! Settings of the embedding node.

use std::path::PathBuf;
use std::time::Duration;

use keel_core::{ConfigError, validate};
use serde::{Deserialize, Serialize};

use super::model::default_model_dir;

/// How an [`EmbedNode`](super::EmbedNode) serves. Every field can also be
/// set on the `keel-embed-node` command line.
///
/// ```
/// use std::time::Duration;
/// use keel_gateway::embed_node::EmbedNodeConfig;
///
/// let mut config = EmbedNodeConfig::default();
/// config.max_batch_size = 64;
/// config.max_wait = Duration::from_millis(2);
/// assert!(config.validate().is_ok());
/// config.max_batch_size = 0;
/// assert!(config.validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct EmbedNodeConfig {
    /// The model id it answers with (`/v1/models`, the `model` of each
    /// answer). A request's `model` is not checked: the node serves one
    /// model. Default `all-minilm-l6-v2`.
    pub model: String,
    /// The folder holding `model.safetensors`, `tokenizer.json` and
    /// `config.json`. Default `$KEEL_MODEL_DIR`, else
    /// `target/models/all-minilm-l6-v2` in the workspace (where
    /// `gateway/embed/fetch-model.sh` puts them).
    pub model_dir: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`. Default `cpu`.
    pub device: String,
    /// Inputs gathered into one batch at most, from any number of
    /// requests; 1 turns micro-batching off (one forward pass per input).
    /// Default 32.
    pub max_batch_size: usize,
    /// How long the first input of a batch waits for more before the
    /// batch starts (a full batch starts at once). While a forward
    /// pass runs, arrivals gather for the next one anyway. Default 5 ms.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Batches embedded at once. Default 1: on CPU one forward pass
    /// already uses every core.
    pub concurrent_batches: usize,
    /// Inputs waiting for or inside a forward pass at most; a request that
    /// would go beyond is answered 503 with `Retry-After` (backpressure).
    /// Default 1,024.
    pub max_queued: usize,
    /// Inputs in one request at most (400 beyond). Default 1,024.
    pub max_inputs: usize,
}

impl Default for EmbedNodeConfig {
    fn default() -> Self {
        EmbedNodeConfig {
            model: "all-minilm-l6-v2".to_owned(),
            model_dir: default_model_dir(),
            device: "cpu".to_owned(),
            max_batch_size: 32,
            max_wait: Duration::from_millis(5),
            concurrent_batches: 1,
            max_queued: 1_024,
            max_inputs: 1_024,
        }
    }
}

impl EmbedNodeConfig {
    /// The defaults with micro-batching off: every input has a forward pass
    /// of its own (`max_batch_size` 1, no wait).
    pub fn unbatched() -> Self {
        EmbedNodeConfig {
            max_batch_size: 1,
            max_wait: Duration::ZERO,
            ..EmbedNodeConfig::default()
        }
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate::non_empty("model", &self.model)?;
        validate::non_empty("device", &self.device)?;
        validate::at_least("max_batch_size", self.max_batch_size, 1)?;
        validate::at_least("concurrent_batches", self.concurrent_batches, 1)?;
        validate::at_least("max_inputs", self.max_inputs, 1)?;
        if self.max_queued < self.max_inputs {
            return Err(ConfigError::new(
                "max_queued",
                format!(
                    "must be at least max_inputs ({}), or a request of max_inputs could never be admitted",
                    self.max_inputs
                ),
            ));
        }
        Ok(())
    }
}
