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

/// What one [`Embedder::embed_counted`] call ran.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Passes {
    /// Forward passes.
    pub(crate) passes: usize,
    /// Token positions over all passes, pads included.
    pub(crate) positions: usize,
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

    /// Embeds `texts`: each input padded to the longest of its forward
    /// pass, pads masked out of attention and pooling. Inputs of very
    /// different lengths are split into a few passes by length when that
    /// costs less than padding them all to the longest. Answers one
    /// [`Embedding`] per text, in order; an empty slice answers an empty
    /// `Vec` without running the model.
    ///
    /// # Errors
    ///
    /// [`EmbedError::Tokenize`] or [`EmbedError::Inference`].
    pub fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Embedding>, EmbedError> {
        self.embed_counted(texts).map(|(embeddings, _)| embeddings)
    }

    /// [`embed`](Self::embed), and what the passes cost.
    pub(crate) fn embed_counted<S: AsRef<str>>(
        &self,
        texts: &[S],
    ) -> Result<(Vec<Embedding>, Passes), EmbedError> {
        let mut counted = Passes::default();
        if texts.is_empty() {
            return Ok((Vec::new(), counted));
        }
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(EmbedError::Tokenize)?;
        let lengths: Vec<usize> = encodings.iter().map(|e| e.get_ids().len()).collect();
        let mut answers: Vec<Option<Embedding>> = vec![None; encodings.len()];
        for pass in plan_passes(&lengths) {
            let longest = pass.iter().map(|&i| lengths[i]).max().unwrap_or(0);
            let rows = pass.len();
            let mut ids = vec![0u32; rows * longest];
            let mut mask = vec![0u32; rows * longest];
            for (row, &i) in pass.iter().enumerate() {
                let len = lengths[i];
                let start = row * longest;
                ids[start..start + len].copy_from_slice(encodings[i].get_ids());
                mask[start..start + len].fill(1);
            }
            let vectors = self
                .forward(ids, mask, rows, longest)
                .map_err(EmbedError::inference)?;
            counted.passes += 1;
            counted.positions += rows * longest;
            for (&i, vector) in pass.iter().zip(vectors) {
                answers[i] = Some(Embedding {
                    vector,
                    tokens: lengths[i],
                });
            }
        }
        let embeddings = answers
            .into_iter()
            .map(|answer| answer.expect("every input is in one pass"))
            .collect();
        Ok((embeddings, counted))
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

/// What a forward pass costs beyond its token positions, in token
/// positions (op dispatch, allocations, thread wake-ups). Tuned on a 2-core
/// CPU with batches of 32 sentences of 9–23 tokens: of 0, 32, 64 and 128,
/// 32 or 64 ran them fastest, 1.2–1.4× faster than one pass padded to the
/// longest.
const PASS_OVERHEAD: usize = 32;

/// Splits inputs of `lengths` tokens into forward passes: the indices of
/// each pass, every index in exactly one. Sorted by length, the inputs are
/// cut into runs so that the sum over passes of `PASS_OVERHEAD + rows ×
/// longest` is the least possible: inputs of similar length share a pass,
/// a few long ones do not make every short one pay their padding.
fn plan_passes(lengths: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    let n = order.len();
    // best[j]: least cost of the first j inputs (sorted); cut[j]: where
    // the last pass of that plan starts.
    let mut best = vec![0usize; n + 1];
    let mut cut = vec![0usize; n + 1];
    for j in 1..=n {
        let longest = lengths[order[j - 1]];
        (best[j], cut[j]) = (0..j)
            .map(|i| (best[i] + PASS_OVERHEAD + (j - i) * longest, i))
            .min()
            .expect("j >= 1");
    }
    let mut passes = Vec::new();
    let mut end = n;
    while end > 0 {
        let start = cut[end];
        passes.push(order[start..end].to_vec());
        end = start;
    }
    passes.reverse();
    passes
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

#[cfg(test)]
mod tests {
    use super::{PASS_OVERHEAD, plan_passes};

    fn cost(lengths: &[usize], passes: &[Vec<usize>]) -> usize {
        passes
            .iter()
            .map(|pass| {
                PASS_OVERHEAD + pass.len() * pass.iter().map(|&i| lengths[i]).max().unwrap()
            })
            .sum()
    }

    #[test]
    fn every_input_is_in_exactly_one_pass() {
        let lengths = [9, 23, 2, 256, 13, 13, 11, 17, 9, 14, 256, 12];
        let passes = plan_passes(&lengths);
        let mut seen: Vec<usize> = passes.concat();
        seen.sort_unstable();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        assert!(passes.iter().all(|pass| !pass.is_empty()));
    }

    #[test]
    fn similar_lengths_share_one_pass() {
        assert_eq!(plan_passes(&[12, 11, 13, 12]), vec![vec![1, 0, 3, 2]]);
        assert!(plan_passes(&[]).is_empty());
    }

    #[test]
    fn a_long_input_does_not_pad_every_short_one() {
        let mut lengths = vec![12; 31];
        lengths.push(256);
        let passes = plan_passes(&lengths);
        assert_eq!(passes.len(), 2);
        assert_eq!(passes[1], vec![31]);
    }

    #[test]
    fn the_plan_costs_no_more_than_one_pass_or_one_pass_each() {
        let lengths = [9, 23, 2, 13, 13, 11, 17, 9, 14, 12, 15, 10, 16, 21, 9, 11];
        let planned = cost(&lengths, &plan_passes(&lengths));
        let one = cost(&lengths, &[(0..lengths.len()).collect()]);
        let each: Vec<Vec<usize>> = (0..lengths.len()).map(|i| vec![i]).collect();
        assert!(planned <= one && planned <= cost(&lengths, &each));
    }
}
