//! all-MiniLM-L6-v2 with candle: tokenize, pad to the longest input, one
//! forward pass, mean pooling over the attention mask, L2 normalisation.

use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Tokenizer, TruncationParams};

use super::error::EmbedError;

/// The environment variable naming the model folder.
pub const MODEL_DIR_ENV: &str = "KEEL_MODEL_DIR";

/// Where `gateway/embed/fetch-model.sh` puts the model unless
/// [`MODEL_DIR_ENV`] says otherwise: `target/models/all-minilm-l6-v2` in
/// the workspace this crate was built from.
pub const DEFAULT_MODEL_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../target/models/all-minilm-l6-v2"
);

/// The model folder: `$KEEL_MODEL_DIR` when set and not empty, else
/// [`DEFAULT_MODEL_DIR`].
pub fn default_model_dir() -> PathBuf {
    match std::env::var_os(MODEL_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_MODEL_DIR),
    }
}

/// One input's embedding.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Embedding {
    /// The L2-normalised mean of the token states over the attention mask.
    pub vector: Vec<f32>,
    /// The tokens the model read for this input, `[CLS]` and `[SEP]`
    /// included, after truncation to [`Embedder::max_tokens`].
    pub tokens: usize,
}

/// A BERT sentence-embedding model (all-MiniLM-L6-v2, or any BERT in the
/// same layout) and its tokenizer, ready to embed batches of text.
///
/// Loading reads `config.json`, `tokenizer.json` and `model.safetensors`
/// from one folder (and `sentence_bert_config.json` for the length limit,
/// when present). [`embed`](Embedder::embed) blocks the thread for the
/// whole forward pass: call it from a blocking thread in async code.
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    device_name: String,
    dims: usize,
    max_tokens: usize,
}

impl fmt::Debug for Embedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Embedder")
            .field("device", &self.device_name)
            .field("dims", &self.dims)
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

impl Embedder {
    /// Loads the model in `dir` onto `device` (`cpu`, `cuda` or `cuda:N`;
    /// CUDA needs a build with candle's `cuda` feature, see
    /// `gateway/embed-cuda/`).
    ///
    /// # Errors
    ///
    /// [`EmbedError::ModelMissing`] naming the missing file and the script
    /// that fetches it; [`EmbedError::InvalidModel`] for a file that does not
    /// parse; [`EmbedError::Device`] for a device that cannot be used.
    pub fn load(dir: impl AsRef<Path>, device: &str) -> Result<Embedder, EmbedError> {
        let dir = dir.as_ref();
        let file = |name: &str| -> Result<PathBuf, EmbedError> {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(EmbedError::ModelMissing { path })
            }
        };
        let config_path = file("config.json")?;
        let tokenizer_path = file("tokenizer.json")?;
        let weights_path = file("model.safetensors")?;
        let invalid = |path: &Path| {
            let path = path.to_owned();
            move |source: keel_core::BoxError| EmbedError::InvalidModel { path, source }
        };

        let config: Config = std::fs::read(&config_path)
            .map_err(|err| invalid(&config_path)(err.into()))
            .and_then(|bytes| {
                serde_json::from_slice(&bytes).map_err(|err| invalid(&config_path)(err.into()))
            })?;
        let max_tokens = max_seq_length(dir).unwrap_or(config.max_position_embeddings);

        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(invalid(&tokenizer_path))?;
        // The file pads every input to 128 tokens; batches are padded here,
        // to their longest input. Truncation follows sentence-transformers.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(invalid(&tokenizer_path))?;

        let device_obj = open_device(device)?;
        // Read into memory: mapping the file (`from_mmaped_safetensors`) is
        // `unsafe`, which this workspace forbids.
        let weights =
            std::fs::read(&weights_path).map_err(|err| invalid(&weights_path)(err.into()))?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &device_obj)
            .map_err(|err| invalid(&weights_path)(err.into()))?;
        let model =
            BertModel::load(vb, &config).map_err(|err| invalid(&weights_path)(err.into()))?;
        Ok(Embedder {
            model,
            tokenizer,
            device: device_obj,
            device_name: device.to_owned(),
            dims: config.hidden_size,
            max_tokens,
        })
    }

    /// Length of every vector (384 for all-MiniLM-L6-v2).
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Tokens per input at most; longer inputs are truncated (as
    /// sentence-transformers does: 256 for all-MiniLM-L6-v2).
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The device the model runs on, as configured.
    pub fn device(&self) -> &str {
        &self.device_name
    }

    /// Embeds `texts` in one forward pass: each input padded to the longest
    /// one, pads masked out of attention and pooling. Answers one
    /// [`Embedding`] per text, in order; an empty slice answers an empty
    /// `Vec` without running the model.
    ///
    /// # Errors
    ///
    /// [`EmbedError::Tokenize`] or [`EmbedError::Inference`].
    pub fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Embedding>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(EmbedError::Tokenize)?;
        let rows = encodings.len();
        let longest = encodings
            .iter()
            .map(|e| e.get_ids().len())
            .max()
            .unwrap_or(0);
        let mut ids = vec![0u32; rows * longest];
        let mut mask = vec![0u32; rows * longest];
        let mut tokens = Vec::with_capacity(rows);
        for (row, encoding) in encodings.iter().enumerate() {
            let len = encoding.get_ids().len();
            ids[row * longest..row * longest + len].copy_from_slice(encoding.get_ids());
            mask[row * longest..row * longest + len].fill(1);
            tokens.push(len);
        }
        let vectors = self
            .forward(ids, mask, rows, longest)
            .map_err(EmbedError::inference)?;
        Ok(vectors
            .into_iter()
            .zip(tokens)
            .map(|(vector, tokens)| Embedding { vector, tokens })
            .collect())
    }

    fn forward(
        &self,
        ids: Vec<u32>,
        mask: Vec<u32>,
        rows: usize,
        longest: usize,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let ids = Tensor::from_vec(ids, (rows, longest), &self.device)?;
        let mask = Tensor::from_vec(mask, (rows, longest), &self.device)?;
        let types = ids.zeros_like()?;
        let states = self.model.forward(&ids, &types, Some(&mask))?;
        // Mean over the real tokens: pads weigh zero.
        let weights = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let sums = states.broadcast_mul(&weights)?.sum(1)?;
        let counts = weights.sum(1)?.clamp(1e-9, f32::MAX)?;
        let means = sums.broadcast_div(&counts)?;
        let norms = means
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12, f32::MAX)?;
        means.broadcast_div(&norms)?.to_vec2::<f32>()
    }
}

/// `max_seq_length` from sentence-transformers' `sentence_bert_config.json`.
fn max_seq_length(dir: &Path) -> Option<usize> {
    let bytes = std::fs::read(dir.join("sentence_bert_config.json")).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value["max_seq_length"]
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
}

/// `cpu`, `cuda` or `cuda:N`.
fn open_device(name: &str) -> Result<Device, EmbedError> {
    let refuse = |reason: String| EmbedError::Device {
        device: name.to_owned(),
        reason,
    };
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => ordinal,
            _ => return Err(refuse("expected `cpu`, `cuda` or `cuda:N`".to_owned())),
        },
    };
    Device::new_cuda(ordinal).map_err(|err| match err {
        candle_core::Error::NotCompiledWithCudaSupport => refuse(
            "this build has no CUDA support; build keel-embed-node from gateway/embed-cuda/ \
             (candle's `cuda` feature)"
                .to_owned(),
        ),
        other => refuse(other.to_string()),
    })
}
