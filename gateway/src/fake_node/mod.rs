//! `keel-fake-node`: an OpenAI-compatible inference node simulator for
//! tests, the demo and benchmarks.
//!
//! It serves `POST /v1/chat/completions` (with SSE streaming, one chunk
//! per token), `POST /v1/completions`, `POST /v1/embeddings` (deterministic
//! vectors), `GET /v1/models` and `GET /healthz`, with `usage` in every
//! answer. It models what makes real nodes hard to route to:
//!
//! - **batch slots**: one request more than [`FakeNodeConfig::slots`] is
//!   answered 503 with `Retry-After` (backpressure, not failure);
//! - **a prefix cache**: a prompt whose first message (the system prompt)
//!   is among the last [`FakeNodeConfig::prefix_cache`] seen skips the
//!   prefill delay;
//! - **latency**: time to first token plus time per token, jittered;
//! - **an error rate**, and **modes switchable at run time** through
//!   `POST /admin/mode` (`{"mode": "slow", "factor": 10}`, `hang`, `fail`,
//!   `busy`, `fail_mid_stream`, `normal`); `GET /admin/stats` reports what
//!   it saw, including requests whose client went away (`cancelled`).
//!
//! ```no_run
//! use keel_gateway::fake_node::{FakeNode, FakeNodeConfig};
//!
//! # #[tokio::main] async fn main() -> std::io::Result<()> {
//! let node = FakeNode::start(FakeNodeConfig::default(), "127.0.0.1:0").await?;
//! println!("an OpenAI-compatible node on http://{}", node.addr());
//! # Ok(()) }
//! ```

mod config;
mod handlers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::node_server::NodeServer;

pub use config::FakeNodeConfig;

/// What the node does with the next requests; switch it with
/// [`FakeNode::set_mode`] or `POST /admin/mode`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Mode {
    /// As configured.
    #[default]
    Normal,
    /// Every delay multiplied by `factor`.
    Slow {
        /// The slowdown, e.g. 10.
        factor: f64,
    },
    /// Accepts requests and never answers them (health checks hang too).
    Hang,
    /// Answers every request 500 (health checks too).
    Fail,
    /// Answers every request 503 with `Retry-After` (health checks pass).
    Busy,
    /// Streams `after_tokens` tokens, then cuts the connection; plain
    /// requests are cut before the answer.
    FailMidStream {
        /// Tokens sent before the cut.
        after_tokens: u32,
    },
}

/// Counts of what the node saw since it started.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Inference requests received (health checks not included).
    pub requests: u64,
    /// Requests answered in full.
    pub completed: u64,
    /// Requests whose client went away before the answer was complete.
    pub cancelled: u64,
    /// Requests refused 503 because every slot was taken (or in `busy` mode).
    pub busy: u64,
    /// Requests answered 500 or cut mid-answer.
    pub failed: u64,
    /// Requests in progress now.
    pub in_flight: u64,
    /// Prompts whose prefix was cached.
    pub prefix_hits: u64,
    /// Prompts whose prefix was not.
    pub prefix_misses: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    busy: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicU64,
    prefix_hits: AtomicU64,
    prefix_misses: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct State {
    config: FakeNodeConfig,
    mode: Mutex<Mode>,
    slots: Arc<Semaphore>,
    counters: Counters,
    /// Most recently used first.
    prefixes: Mutex<Vec<u64>>,
    rng: Mutex<fastrand::Rng>,
}

/// A running fake node. Dropping it (or [`FakeNode::crash`]) stops the
/// server and cuts every open connection.
#[derive(Debug)]
pub struct FakeNode {
    state: Arc<State>,
    server: NodeServer,
}

impl FakeNode {
    /// Starts a node on `addr` (`127.0.0.1:0` for a free port).
    ///
    /// # Errors
    ///
    /// An invalid config (as `InvalidInput`, naming the field) or a socket
    /// that cannot be bound.
    pub async fn start(config: FakeNodeConfig, addr: &str) -> std::io::Result<FakeNode> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        FakeNode::serve(config, listener)
    }

    /// Serves on an already bound listener.
    ///
    /// # Errors
    ///
    /// An invalid config, as `InvalidInput` naming the field.
    pub fn serve(
        config: FakeNodeConfig,
        listener: tokio::net::TcpListener,
    ) -> std::io::Result<FakeNode> {
        config
            .validate()
            .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
        let state = Arc::new(State::new(config));
        let app = handlers::router(state.clone());
        let server = NodeServer::start(listener, app, "fake node")?;
        Ok(FakeNode { state, server })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Switches what the node does with the next requests.
    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock() = mode;
    }

    /// Counts of what it saw.
    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    /// Stops serving at once: the listener closes and every open
    /// connection is cut, as if the process had died.
    pub fn crash(&self) {
        self.server.crash();
    }
}

impl State {
    fn new(config: FakeNodeConfig) -> State {
        State {
            slots: Arc::new(Semaphore::new(config.slots)),
            rng: Mutex::new(fastrand::Rng::with_seed(config.seed)),
            config,
            mode: Mutex::new(Mode::Normal),
            counters: Counters::default(),
            prefixes: Mutex::new(Vec::new()),
        }
    }

    fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Stats {
            requests: get(&c.requests),
            completed: get(&c.completed),
            cancelled: get(&c.cancelled),
            busy: get(&c.busy),
            failed: get(&c.failed),
            in_flight: get(&c.in_flight),
            prefix_hits: get(&c.prefix_hits),
            prefix_misses: get(&c.prefix_misses),
        }
    }

    /// Whether `prefix` was cached (and marks it most recently used).
    fn touch_prefix(&self, prefix: u64) -> bool {
        let capacity = self.config.prefix_cache;
        let mut prefixes = self.prefixes.lock();
        let hit = if let Some(at) = prefixes.iter().position(|p| *p == prefix) {
            prefixes.remove(at);
            true
        } else {
            false
        };
        if capacity > 0 {
            prefixes.insert(0, prefix);
            prefixes.truncate(capacity);
        }
        let counter = if hit {
            &self.counters.prefix_hits
        } else {
            &self.counters.prefix_misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    /// A jittered, mode-scaled delay.
    fn delay(&self, base: std::time::Duration, mode: Mode) -> std::time::Duration {
        if base.is_zero() {
            return base;
        }
        let jitter = self.config.jitter;
        let factor = 1.0 + jitter * (self.rng.lock().f64() * 2.0 - 1.0);
        let slow = match mode {
            Mode::Slow { factor } if factor.is_finite() && factor > 0.0 => factor,
            _ => 1.0,
        };
        base.mul_f64((factor * slow).max(0.0))
    }

    fn draws_error(&self) -> bool {
        self.config.error_rate > 0.0 && self.rng.lock().f64() < self.config.error_rate
    }
}
