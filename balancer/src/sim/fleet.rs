//! Simulated inference nodes: batch slots, latency distributions, an
//! optional prefix (KV) cache, and scripted faults.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::discover::ServiceList;
use tower_service::Service;

use keel_core::{Classify, FailureKind, Outcome, RequestExtensions, stable_hash_seeded};

/// How long a node takes to serve one request.
///
/// Service time = `base` × a log-normal factor (median 1, shape `sigma`) ×
/// the node's slowdown + `prefill_per_block` per prompt block not in the
/// node's cache + `cached_block` per block that is (KV-cache reuse costs
/// less than prefill).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct LatencyModel {
    /// Median decode time. Default 50 ms.
    pub base: Duration,
    /// Log-normal shape of the decode time. Default 0.25.
    pub sigma: f64,
    /// Prefill time per uncached prompt block. Default zero.
    pub prefill_per_block: Duration,
    /// Time per cached prompt block. Default zero.
    pub cached_block: Duration,
}

impl Default for LatencyModel {
    fn default() -> Self {
        LatencyModel {
            base: Duration::from_millis(50),
            sigma: 0.25,
            prefill_per_block: Duration::ZERO,
            cached_block: Duration::ZERO,
        }
    }
}

impl LatencyModel {
    /// Sets [`base`](Self::base) and [`sigma`](Self::sigma).
    pub fn decode(mut self, base: Duration, sigma: f64) -> Self {
        self.base = base;
        self.sigma = sigma;
        self
    }

    /// Sets [`prefill_per_block`](Self::prefill_per_block) and
    /// [`cached_block`](Self::cached_block).
    pub fn prefill(mut self, per_block: Duration, cached_block: Duration) -> Self {
        self.prefill_per_block = per_block;
        self.cached_block = cached_block;
        self
    }
}

/// The fleet: identical nodes.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct FleetConfig {
    /// Nodes. Default 10.
    pub nodes: usize,
    /// Batch slots per node: requests beyond them queue at the node.
    /// Default 16.
    pub slots: u32,
    /// Heterogeneous fleets: node `i` has `slot_mix[i % len]` slots (and
    /// serves at the same speed per slot, so a bigger node has more
    /// throughput). Empty (the default): every node has `slots`.
    pub slot_mix: Vec<u32>,
    /// Service time model.
    pub latency: LatencyModel,
    /// Prompt blocks each node's prefix cache holds (LRU); `None` (the
    /// default) means no cache.
    pub cache_blocks: Option<usize>,
    /// Bytes per prompt block in the node's cache. Default 64.
    pub block_bytes: usize,
    /// Seed of the nodes' latency and error draws. Default 1.
    pub seed: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            nodes: 10,
            slots: 16,
            slot_mix: Vec::new(),
            latency: LatencyModel::default(),
            cache_blocks: None,
            block_bytes: 64,
            seed: 1,
        }
    }
}

impl FleetConfig {
    /// Sets [`nodes`](Self::nodes).
    pub fn nodes(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }

    /// Sets [`slots`](Self::slots).
    pub fn slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }

    /// Sets [`slot_mix`](Self::slot_mix).
    pub fn slot_mix(mut self, slots: Vec<u32>) -> Self {
        self.slot_mix = slots;
        self
    }

    /// The slots of node `index`.
    pub fn slots_of(&self, index: usize) -> u32 {
        if self.slot_mix.is_empty() {
            self.slots
        } else {
            self.slot_mix[index % self.slot_mix.len()]
        }
    }

    /// Sets [`latency`](Self::latency).
    pub fn latency(mut self, latency: LatencyModel) -> Self {
        self.latency = latency;
        self
    }

    /// Sets [`cache_blocks`](Self::cache_blocks).
    pub fn cache_blocks(mut self, blocks: usize) -> Self {
        self.cache_blocks = Some(blocks);
        self
    }

    /// Sets [`seed`](Self::seed).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// What is wrong with a node, from a point in simulated time on.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Fault {
    /// Every request takes k times as long.
    Slow(f64),
    /// Accepts requests and never answers (a hung process, a black hole).
    Down,
    /// Answers every request with an error after 1 ms.
    Failing,
    /// Fails this share of requests (after a tenth of the base latency).
    ErrorRate(f64),
    /// Answers every request "busy" (HTTP 503) after 1 ms.
    Busy,
    /// Alternates `Failing` and healthy, switching every `period`.
    Flapping {
        /// Time in each state.
        period: Duration,
    },
    /// Healthy again.
    Recover,
}

/// Faults over time: each event applies to one node (or all) from its time
/// on, until the node's next event.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Script {
    events: Vec<(Duration, Option<usize>, Fault)>,
}

impl Script {
    /// No faults.
    pub fn new() -> Self {
        Script::default()
    }

    /// From `at` on, `node` has `fault`.
    pub fn at(mut self, at: Duration, node: usize, fault: Fault) -> Self {
        self.events.push((at, Some(node), fault));
        self
    }

    /// From `at` on, every node has `fault`.
    pub fn all(mut self, at: Duration, fault: Fault) -> Self {
        self.events.push((at, None, fault));
        self
    }

    fn for_node(&self, node: usize) -> Vec<(Duration, Fault)> {
        let mut events: Vec<_> = self
            .events
            .iter()
            .filter(|(_, n, _)| n.is_none_or(|n| n == node))
            .map(|&(at, _, fault)| (at, fault))
            .collect();
        events.sort_by_key(|&(at, _)| at);
        events
    }
}

/// A request to the simulated fleet.
///
/// The load generator puts an [`AffinityKey`](crate::AffinityKey) (the
/// session) and a [`Prompt`](crate::Prompt) in its extensions.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SimRequest {
    /// Arrival number.
    pub id: u64,
    /// The tenant that sent it.
    pub tenant: u32,
    /// The session (affinity key) it belongs to.
    pub session: u64,
    /// The prompt.
    pub prompt: Bytes,
    /// Routing hints.
    pub extensions: http::Extensions,
}

impl SimRequest {
    /// A request with empty extensions.
    pub fn new(id: u64, tenant: u32, session: u64, prompt: Bytes) -> Self {
        SimRequest {
            id,
            tenant,
            session,
            prompt,
            extensions: http::Extensions::new(),
        }
    }
}

impl RequestExtensions for SimRequest {
    fn extensions(&self) -> &http::Extensions {
        &self.extensions
    }

    fn extensions_mut(&mut self) -> &mut http::Extensions {
        &mut self.extensions
    }
}

/// A simulated node's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SimResponse {
    /// The node that served it.
    pub node: usize,
    /// Prompt blocks in the request.
    pub prompt_blocks: u32,
    /// Of those, blocks found in the node's cache.
    pub cached_blocks: u32,
}

/// A simulated node's error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The node failed the request.
    #[error("simulated node {0} failed the request")]
    Failed(usize),
    /// The node is saturated (HTTP 503).
    #[error("simulated node {0} is busy")]
    Busy(usize),
}

/// Classifies simulated answers: `Busy` is busy, `Failed` a retryable
/// server failure.
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub struct SimClassifier;

impl Classify<SimResponse, SimError> for SimClassifier {
    fn classify(&self, result: &Result<SimResponse, SimError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(SimError::Busy(_)) => Outcome::Busy { retry_after: None },
            Err(SimError::Failed(_)) => Outcome::failure(FailureKind::Server),
        }
    }
}

/// What one node saw during a run.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct NodeReport {
    /// Attempts that reached the node.
    pub calls: u64,
    /// Attempts it served.
    pub served: u64,
    /// Attempts it failed.
    pub failed: u64,
    /// Attempts it answered busy.
    pub busy: u64,
    /// Attempts it never answered (the caller gave up).
    pub hung: u64,
    /// Attempts cancelled by the caller before the node answered (timeouts,
    /// hedges, dropped clients), `hung` included.
    pub cancelled: u64,
    /// Prompt blocks of the requests it served.
    pub prompt_blocks: u64,
    /// Of those, blocks found in its cache.
    pub cached_blocks: u64,
    /// The most requests it had in flight at once.
    pub peak_in_flight: u32,
    /// Attempts that reached it, per simulated second of the run.
    pub calls_by_second: Vec<u64>,
}

#[derive(Debug, Default)]
struct NodeStats {
    calls: AtomicU64,
    served: AtomicU64,
    failed: AtomicU64,
    busy: AtomicU64,
    hung: AtomicU64,
    cancelled: AtomicU64,
    prompt_blocks: AtomicU64,
    cached_blocks: AtomicU64,
    peak: AtomicU32,
    calls_by_second: Mutex<Vec<u64>>,
}

/// In-flight counts across the fleet, for the bounded-load check.
#[derive(Debug)]
pub(crate) struct Probe {
    total: AtomicU32,
    pub(crate) dispatch_loads: Mutex<Vec<(u32, u32)>>,
    /// When the fleet was built: second buckets count from here.
    pub(crate) start: Instant,
    /// Attempts that reached any node, per simulated second.
    pub(crate) attempts_by_second: Mutex<Vec<u64>>,
}

impl Probe {
    /// The second bucket `at` falls in.
    pub(crate) fn second(&self, at: Instant) -> usize {
        at.saturating_duration_since(self.start).as_secs() as usize
    }
}

/// Adds one to `counts[index]`, growing the vector as needed.
pub(crate) fn bump(counts: &mut Vec<u64>, index: usize) {
    if counts.len() <= index {
        counts.resize(index + 1, 0);
    }
    counts[index] += 1;
}

/// An LRU of block hashes.
#[derive(Debug)]
struct BlockCache {
    capacity: usize,
    clock: u64,
    stamps: HashMap<u64, u64>,
    order: BTreeMap<u64, u64>,
}

impl BlockCache {
    fn new(capacity: usize) -> Self {
        BlockCache {
            capacity: capacity.max(1),
            clock: 0,
            stamps: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// Leading blocks present, then caches every block (most recent last).
    fn serve(&mut self, blocks: &[u64]) -> u32 {
        let hits = blocks
            .iter()
            .take_while(|b| self.stamps.contains_key(b))
            .count() as u32;
        for &block in blocks {
            self.clock += 1;
            if let Some(old) = self.stamps.insert(block, self.clock) {
                self.order.remove(&old);
            }
            self.order.insert(self.clock, block);
            while self.stamps.len() > self.capacity {
                let Some((_, evicted)) = self.order.pop_first() else {
                    break;
                };
                self.stamps.remove(&evicted);
            }
        }
        hits
    }
}

struct NodeInner {
    index: usize,
    slots: Arc<Semaphore>,
    slot_count: u32,
    faults: Vec<(Duration, Fault)>,
    start: Instant,
    latency: LatencyModel,
    block_bytes: usize,
    cache: Option<Mutex<BlockCache>>,
    rng: Mutex<fastrand::Rng>,
    in_flight: AtomicU32,
    stats: NodeStats,
    probe: Arc<Probe>,
}

impl NodeInner {
    fn fault_at(&self, elapsed: Duration) -> Option<Fault> {
        let fault = self
            .faults
            .iter()
            .take_while(|(at, _)| *at <= elapsed)
            .last()
            .map(|&(_, fault)| fault)?;
        match fault {
            Fault::Recover => None,
            Fault::Flapping { period } => {
                let phase = elapsed.as_nanos() / period.as_nanos().max(1);
                (phase % 2 == 1).then_some(Fault::Failing)
            }
            other => Some(other),
        }
    }
}

/// A simulated inference node: a `tower::Service<SimRequest>`; clones share
/// the node.
#[derive(Clone)]
pub struct SimNode {
    inner: Arc<NodeInner>,
}

impl fmt::Debug for SimNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimNode")
            .field("index", &self.inner.index)
            .field("in_flight", &self.inner.in_flight.load(Relaxed))
            .finish()
    }
}

/// Counts a request in flight while it is at the node.
struct InFlight {
    node: Arc<NodeInner>,
    answered: bool,
    down: bool,
}

impl InFlight {
    fn enter(node: Arc<NodeInner>) -> Self {
        let mine = node.in_flight.fetch_add(1, Relaxed) + 1;
        let total = node.probe.total.fetch_add(1, Relaxed) + 1;
        node.probe.dispatch_loads.lock().push((mine, total));
        let second = node.probe.second(Instant::now());
        bump(&mut node.probe.attempts_by_second.lock(), second);
        bump(&mut node.stats.calls_by_second.lock(), second);
        node.stats.peak.fetch_max(mine, Relaxed);
        node.stats.calls.fetch_add(1, Relaxed);
        InFlight {
            node,
            answered: false,
            down: false,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.node.in_flight.fetch_sub(1, Relaxed);
        self.node.probe.total.fetch_sub(1, Relaxed);
        if !self.answered {
            self.node.stats.cancelled.fetch_add(1, Relaxed);
            if self.down {
                self.node.stats.hung.fetch_add(1, Relaxed);
            }
        }
    }
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut fastrand::Rng) -> f64 {
    let u1 = 1.0 - rng.f64();
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

async fn serve(node: Arc<NodeInner>, request: SimRequest) -> Result<SimResponse, SimError> {
    let mut guard = InFlight::enter(node.clone());
    let fault = node.fault_at(node.start.elapsed());
    let (coin, factor) = {
        let mut rng = node.rng.lock();
        let coin = rng.f64();
        (coin, (node.latency.sigma * normal(&mut rng)).exp())
    };
    let index = node.index;
    let fail = |guard: &mut InFlight, error: SimError| {
        guard.answered = true;
        match error {
            SimError::Failed(_) => node.stats.failed.fetch_add(1, Relaxed),
            SimError::Busy(_) => node.stats.busy.fetch_add(1, Relaxed),
        };
        Err(error)
    };
    match fault {
        Some(Fault::Down) => {
            guard.down = true;
            std::future::pending::<()>().await;
        }
        Some(Fault::Failing) => {
            tokio::time::sleep(Duration::from_millis(1)).await;
            return fail(&mut guard, SimError::Failed(index));
        }
        Some(Fault::Busy) => {
            tokio::time::sleep(Duration::from_millis(1)).await;
            return fail(&mut guard, SimError::Busy(index));
        }
        Some(Fault::ErrorRate(p)) if coin < p => {
            tokio::time::sleep(node.latency.base / 10).await;
            return fail(&mut guard, SimError::Failed(index));
        }
        _ => {}
    }
    let slow = match fault {
        Some(Fault::Slow(k)) => k,
        _ => 1.0,
    };
    let _slot = node
        .slots
        .clone()
        .acquire_owned()
        .await
        .expect("the node's semaphore is never closed");
    let blocks = if node.cache.is_some() || !node.latency.prefill_per_block.is_zero() {
        chain(&request.prompt, node.block_bytes)
    } else {
        Vec::new()
    };
    let cached = node.cache.as_ref().map_or(0, |c| c.lock().serve(&blocks));
    let uncached = blocks.len() as u32 - cached;
    let service = node.latency.base.mul_f64(factor * slow)
        + node.latency.prefill_per_block * uncached
        + node.latency.cached_block * cached;
    tokio::time::sleep(service).await;
    guard.answered = true;
    node.stats.served.fetch_add(1, Relaxed);
    node.stats
        .prompt_blocks
        .fetch_add(u64::from(blocks.len() as u32), Relaxed);
    node.stats
        .cached_blocks
        .fetch_add(u64::from(cached), Relaxed);
    Ok(SimResponse {
        node: index,
        prompt_blocks: blocks.len() as u32,
        cached_blocks: cached,
    })
}

fn chain(prompt: &[u8], block_bytes: usize) -> Vec<u64> {
    let mut hash = 0u64;
    prompt
        .chunks(block_bytes.max(1))
        .map(|block| {
            hash = stable_hash_seeded(block, hash);
            hash
        })
        .collect()
}

/// The future of [`SimNode`].
pub struct SimFuture {
    inner: Pin<Box<dyn Future<Output = Result<SimResponse, SimError>> + Send>>,
}

impl fmt::Debug for SimFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimFuture").finish_non_exhaustive()
    }
}

impl Future for SimFuture {
    type Output = Result<SimResponse, SimError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl SimNode {
    /// The node's index in its fleet.
    pub fn index(&self) -> usize {
        self.inner.index
    }

    /// An active health check: answers at once unless the node is failing
    /// (an error) or down (it never answers; the checker's timeout ends
    /// it). It costs the node nothing and is not counted as an attempt.
    ///
    /// # Errors
    ///
    /// [`SimError::Failed`] while the node fails every request.
    pub async fn check(&self) -> Result<(), SimError> {
        match self.inner.fault_at(self.inner.start.elapsed()) {
            Some(Fault::Down) => std::future::pending().await,
            Some(Fault::Failing) => Err(SimError::Failed(self.inner.index)),
            _ => Ok(()),
        }
    }
}

impl Service<SimRequest> for SimNode {
    type Response = SimResponse;
    type Error = SimError;
    type Future = SimFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), SimError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: SimRequest) -> SimFuture {
        SimFuture {
            inner: Box::pin(serve(self.inner.clone(), request)),
        }
    }
}

/// A simulated fleet. Build it inside the (paused) runtime that runs the
/// simulation: fault times count from its creation.
#[derive(Debug)]
pub struct Fleet {
    nodes: Vec<SimNode>,
    pub(crate) probe: Arc<Probe>,
}

impl Fleet {
    /// Nodes per `config`, with faults per `script`.
    pub fn new(config: &FleetConfig, script: &Script) -> Self {
        let start = Instant::now();
        let probe = Arc::new(Probe {
            total: AtomicU32::new(0),
            dispatch_loads: Mutex::new(Vec::new()),
            start,
            attempts_by_second: Mutex::new(Vec::new()),
        });
        let nodes = (0..config.nodes)
            .map(|index| SimNode {
                inner: Arc::new(NodeInner {
                    index,
                    slots: Arc::new(Semaphore::new(config.slots_of(index) as usize)),
                    slot_count: config.slots_of(index),
                    faults: script.for_node(index),
                    start,
                    latency: config.latency.clone(),
                    block_bytes: config.block_bytes,
                    cache: config.cache_blocks.map(|b| Mutex::new(BlockCache::new(b))),
                    rng: Mutex::new(fastrand::Rng::with_seed(crate::balance::mix(
                        config.seed,
                        index as u64,
                    ))),
                    in_flight: AtomicU32::new(0),
                    stats: NodeStats::default(),
                    probe: probe.clone(),
                }),
            })
            .collect();
        Fleet { nodes, probe }
    }

    /// The batch slots of node `index` (0 when there is no such node).
    pub fn slots_of(&self, index: usize) -> u32 {
        self.nodes.get(index).map_or(0, |n| n.inner.slot_count)
    }

    /// The nodes.
    pub fn nodes(&self) -> &[SimNode] {
        &self.nodes
    }

    /// The nodes as a `tower::discover::Discover` (keys are node indices).
    pub fn discover(&self) -> ServiceList<Vec<SimNode>> {
        ServiceList::new(self.nodes.clone())
    }

    /// What each node saw so far.
    pub fn report(&self) -> Vec<NodeReport> {
        self.nodes
            .iter()
            .map(|n| {
                let s = &n.inner.stats;
                NodeReport {
                    calls: s.calls.load(Relaxed),
                    served: s.served.load(Relaxed),
                    failed: s.failed.load(Relaxed),
                    busy: s.busy.load(Relaxed),
                    hung: s.hung.load(Relaxed),
                    cancelled: s.cancelled.load(Relaxed),
                    prompt_blocks: s.prompt_blocks.load(Relaxed),
                    cached_blocks: s.cached_blocks.load(Relaxed),
                    peak_in_flight: s.peak.load(Relaxed),
                    calls_by_second: s.calls_by_second.lock().clone(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_cache_counts_leading_hits_and_evicts_the_oldest() {
        let mut cache = BlockCache::new(4);
        assert_eq!(cache.serve(&[1, 2, 3]), 0);
        assert_eq!(cache.serve(&[1, 2, 9]), 2);
        // 1, 2, 3, 9 cached; 3 is the oldest now.
        assert_eq!(cache.serve(&[5]), 0);
        assert_eq!(cache.serve(&[3]), 0, "3 was evicted");
        assert_eq!(cache.serve(&[1, 2]), 0, "1 was evicted by 3");
    }

    #[tokio::test(start_paused = true)]
    async fn scripted_faults_follow_time() {
        let script = Script::new()
            .at(Duration::from_secs(1), 0, Fault::Slow(3.0))
            .all(
                Duration::from_secs(2),
                Fault::Flapping {
                    period: Duration::from_secs(1),
                },
            )
            .at(Duration::from_secs(5), 0, Fault::Recover);
        let fleet = Fleet::new(&FleetConfig::default().nodes(2), &script);
        let node = &fleet.nodes()[0].inner;
        assert_eq!(node.fault_at(Duration::ZERO), None);
        assert_eq!(
            node.fault_at(Duration::from_millis(1500)),
            Some(Fault::Slow(3.0))
        );
        assert_eq!(
            node.fault_at(Duration::from_millis(2500)),
            None,
            "flapping: even second is up"
        );
        assert_eq!(
            node.fault_at(Duration::from_millis(3500)),
            Some(Fault::Failing)
        );
        assert_eq!(node.fault_at(Duration::from_secs(6)), None);
        assert_eq!(
            fleet.nodes()[1].inner.fault_at(Duration::from_secs(7)),
            Some(Fault::Failing)
        );
    }
}
