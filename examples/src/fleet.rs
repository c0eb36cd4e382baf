//! Simulated inference nodes: tower services with batch slots, a latency
//! model, a small prefix (KV) cache and a fault mode switched while they run.
//!
//! The nodes are honest: a pipeline sees only what a real client would —
//! answers, errors, 503s and time. The mode, slots and queue live inside.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;

/// One inference request, as both pipelines see it.
#[derive(Clone, Debug)]
pub struct InferenceRequest {
    /// Unique per offered request.
    pub id: u64,
    /// The tenant that sent it.
    pub tenant: String,
    /// 0 = batch, 1 = interactive.
    pub priority: u8,
    /// Which shared system prompt it starts with.
    pub prefix: u32,
    /// The prompt's tail; (prefix, suffix) equal means the same request.
    pub suffix: u32,
    /// Output tokens asked for (cost).
    pub max_tokens: u32,
}

impl InferenceRequest {
    /// The prompt text, for prefix affinity and cache keys.
    pub fn prompt(&self) -> String {
        format!(
            "system-prompt-{:03} | user question {}",
            self.prefix, self.suffix
        )
    }
}

/// A node's answer.
#[derive(Clone, Debug)]
pub struct InferenceResponse {
    /// Which node answered.
    pub node: usize,
    /// The generated text.
    pub text: String,
    /// Whether the node's prefix cache held the prompt's prefix.
    pub prefix_hit: bool,
}

/// How a node call failed, as a client sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeError {
    /// HTTP 503 with Retry-After: the node's batch is full. Backpressure,
    /// not failure.
    Busy {
        /// The node's hint.
        retry_after: Duration,
    },
    /// HTTP 500: the node failed this request.
    Failed,
}

impl fmt::Display for NodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeError::Busy { retry_after } => write!(f, "503 busy (retry after {retry_after:?})"),
            NodeError::Failed => f.write_str("500 internal error"),
        }
    }
}

impl std::error::Error for NodeError {}

/// What a node is doing, switched by the scenario.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NodeMode {
    /// Normal service.
    Healthy,
    /// Every call takes this many times longer.
    Slow(f64),
    /// Accepts connections and never answers (a hung process).
    Dead,
    /// Answers 503 to everything (a full batch, a draining node).
    Busy,
}

/// A node's shape.
#[derive(Clone, Copy, Debug)]
pub struct NodeSpec {
    /// Requests processed at once (batch slots).
    pub slots: usize,
    /// Requests allowed to wait for a slot before the node answers 503.
    pub max_waiting: usize,
    /// Median latency for 100 output tokens without a prefix hit.
    pub base_latency: Duration,
    /// Prefixes the node keeps warm.
    pub prefix_cache: usize,
}

impl Default for NodeSpec {
    fn default() -> Self {
        NodeSpec {
            slots: 8,
            max_waiting: 16,
            base_latency: Duration::from_millis(40),
            prefix_cache: 6,
        }
    }
}

struct Node {
    index: usize,
    spec: NodeSpec,
    mode: Mutex<NodeMode>,
    slots: Semaphore,
    waiting: AtomicUsize,
    prefixes: Mutex<VecDeque<u32>>,
    rng: Mutex<StdRng>,
    calls: AtomicU64,
}

/// A simulated inference node; clones are the same node.
#[derive(Clone)]
pub struct FakeNode {
    node: Arc<Node>,
}

impl fmt::Debug for FakeNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeNode")
            .field("index", &self.node.index)
            .field("mode", &*self.node.mode.lock())
            .finish()
    }
}

impl FakeNode {
    /// A healthy node.
    pub fn new(index: usize, spec: NodeSpec, seed: u64) -> Self {
        FakeNode {
            node: Arc::new(Node {
                index,
                spec,
                mode: Mutex::new(NodeMode::Healthy),
                slots: Semaphore::new(spec.slots),
                waiting: AtomicUsize::new(0),
                prefixes: Mutex::new(VecDeque::new()),
                rng: Mutex::new(StdRng::seed_from_u64(seed ^ (index as u64 * 0x9e37_79b9))),
                calls: AtomicU64::new(0),
            }),
        }
    }

    /// The node's position in its fleet.
    pub fn index(&self) -> usize {
        self.node.index
    }

    /// Switches the node's behaviour.
    pub fn set_mode(&self, mode: NodeMode) {
        *self.node.mode.lock() = mode;
    }

    /// Calls received so far (including failed ones).
    pub fn calls(&self) -> u64 {
        self.node.calls.load(Ordering::Relaxed)
    }

    /// The node's health endpoint: answers at once unless the node hangs.
    ///
    /// # Errors
    ///
    /// Never; a dead node never answers (the probe times out).
    pub async fn health(&self) -> Result<(), std::io::Error> {
        if *self.node.mode.lock() == NodeMode::Dead {
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    /// Serves one request.
    pub async fn infer(&self, request: InferenceRequest) -> Result<InferenceResponse, NodeError> {
        let node = &self.node;
        node.calls.fetch_add(1, Ordering::Relaxed);
        let mode = *node.mode.lock();
        match mode {
            NodeMode::Dead => std::future::pending().await,
            NodeMode::Busy => {
                tokio::time::sleep(Duration::from_millis(1)).await;
                return Err(NodeError::Busy {
                    retry_after: Duration::from_millis(200),
                });
            }
            NodeMode::Healthy | NodeMode::Slow(_) => {}
        }
        if node.waiting.load(Ordering::Relaxed) >= node.spec.max_waiting {
            return Err(NodeError::Busy {
                retry_after: Duration::from_millis(100),
            });
        }
        node.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = node.slots.acquire().await;
        node.waiting.fetch_sub(1, Ordering::Relaxed);
        let _permit = permit.expect("never closed");
        let prefix_hit = {
            let mut prefixes = node.prefixes.lock();
            let hit = prefixes.contains(&request.prefix);
            prefixes.retain(|p| *p != request.prefix);
            prefixes.push_front(request.prefix);
            prefixes.truncate(node.spec.prefix_cache);
            hit
        };
        let (noise, fails) = {
            let mut rng = node.rng.lock();
            // A long-tailed latency: most calls near the median, a few 3-5x.
            let u: f64 = rng.random();
            (0.6 + u * u * u * 4.0, rng.random_bool(0.002))
        };
        let slow = match mode {
            NodeMode::Slow(k) => k,
            _ => 1.0,
        };
        let prefill = if prefix_hit { 0.35 } else { 1.0 };
        let tokens = f64::from(request.max_tokens) / 100.0;
        let latency = node
            .spec
            .base_latency
            .mul_f64(noise * slow * prefill * tokens.max(0.2));
        tokio::time::sleep(latency).await;
        if fails {
            return Err(NodeError::Failed);
        }
        Ok(InferenceResponse {
            node: node.index,
            text: format!("answer to {} from node {}", request.id, node.index),
            prefix_hit,
        })
    }
}

impl tower::Service<InferenceRequest> for FakeNode {
    type Response = InferenceResponse;
    type Error = NodeError;
    type Future = Pin<Box<dyn Future<Output = Result<InferenceResponse, NodeError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), NodeError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: InferenceRequest) -> Self::Future {
        let node = self.clone();
        Box::pin(async move { node.infer(request).await })
    }
}

/// A fleet of nodes built from one spec.
#[derive(Clone, Debug)]
pub struct Fleet {
    /// The nodes, by index.
    pub nodes: Vec<FakeNode>,
}

impl Fleet {
    /// `count` healthy nodes.
    pub fn new(count: usize, spec: NodeSpec, seed: u64) -> Self {
        Fleet {
            nodes: (0..count).map(|i| FakeNode::new(i, spec, seed)).collect(),
        }
    }

    /// Sets one node's mode.
    pub fn set_mode(&self, index: usize, mode: NodeMode) {
        self.nodes[index].set_mode(mode);
    }
}
