//! A deterministic fleet simulator (feature `sim`).
//!
//! N [simulated nodes](SimNode) with batch slots, log-normal latencies, an
//! optional prefix (KV) cache where a hit costs less than prefill, and
//! [scripted faults](Script) over time (slow, down, failing, error rate,
//! busy-503, flapping, recovery). An open-loop [load generator](Workload)
//! sends Poisson arrivals from tenants and sessions with prefix-sharing
//! prompts through any [`Router`] — a Keel stack, tower's p2c, a naive retry
//! loop — and [`run`] reports goodput, latency percentiles, attempts per
//! request, per-node load and errors by kind.
//!
//! Runs under paused tokio time on a current-thread runtime: a simulated
//! minute takes about a second of wall time (less in release builds), and
//! a run is a pure function of its seeds.
//!
//! ```
//! use keel_balancer::{BalancerConfig, Policy};
//! use keel_balancer::sim::{self, Fleet, Scenario};
//!
//! # fn main() -> Result<(), keel_balancer::BalancerError> {
//! let scenario = Scenario::slow_node().seconds(5);
//! let report = sim::block_on(async {
//!     let fleet = Fleet::new(&scenario.fleet, &scenario.script);
//!     let (router, _balancer) = sim::keel_router(&fleet, BalancerConfig::default().policy(Policy::PeakEwma), None, 7)?;
//!     Ok::<_, keel_balancer::BalancerError>(sim::run(router, &fleet, &scenario.workload).await)
//! })?;
//! assert!(report.success_rate() > 0.99);
//! println!("{}", report.summary());
//! # Ok(())
//! # }
//! ```

mod fleet;
mod report;
mod scenario;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::time::Instant;
use tower::ServiceExt;
use tower::util::BoxCloneService;
use tower_layer::Layer;

pub use fleet::{
    Fault, Fleet, FleetConfig, LatencyModel, NodeReport, Script, SimClassifier, SimError,
    SimFuture, SimNode, SimRequest, SimResponse,
};
pub use report::Report;
pub use scenario::{PromptShape, Scenario, Workload};

use keel_core::{BoxError, ConfigError};

use crate::balance::{Balancer, BalancerBuilder, mix};
use crate::completion::ReportCachedPrefix;
use crate::config::{BalancerConfig, Policy};
use crate::error::{BalancerError, Result};
use crate::request::{AffinityKey, Prompt};
use crate::retry::{RetryConfig, RetryLayer};

/// Any routing stack under test, boxed: a `tower::Service` from
/// [`SimRequest`] to [`SimResponse`].
pub type Router = BoxCloneService<SimRequest, SimResponse, BoxError>;

/// Runs `future` on a current-thread tokio runtime with paused time, the
/// way every simulation runs.
pub fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime builds")
        .block_on(future)
}

/// The balancer of [`keel_router`]: every answer reports the blocks the
/// node had cached ([`SimResponse::cached_blocks`]) to prefix affinity's
/// index.
pub type SimBalancer =
    Balancer<usize, SimNode, SimClassifier, ReportCachedPrefix<fn(&SimResponse) -> Option<usize>>>;

/// What a simulated node's answer says it had cached, for
/// [`ReportCachedPrefix`].
pub fn report_cached_prefix() -> ReportCachedPrefix<fn(&SimResponse) -> Option<usize>> {
    ReportCachedPrefix::new(|response: &SimResponse| Some(response.cached_blocks as usize))
}

/// A Keel stack over `fleet`: a [`Balancer`] with `config` (seeded, with
/// the [`SimClassifier`], answers reporting their cached prefix), under a [`RetryLayer`] when `retry` is given.
/// Returns the router and the balancer (to inspect its endpoints).
///
/// # Errors
///
/// [`BalancerError::InvalidConfig`] naming the bad field.
pub fn keel_router(
    fleet: &Fleet,
    config: BalancerConfig,
    retry: Option<RetryConfig>,
    seed: u64,
) -> Result<(Router, SimBalancer)> {
    let balancer = BalancerBuilder::from_config(config)
        .classifier(SimClassifier)
        .track_completion(report_cached_prefix())
        .seed(seed)
        .build(fleet.discover())?;
    let router = match retry {
        Some(retry) => Router::new(
            RetryLayer::with_seed(retry, mix(seed, 1))?
                .layer(balancer.clone())
                .map_err(BoxError::from),
        ),
        None => Router::new(balancer.clone().map_err(BoxError::from)),
    };
    Ok((router, balancer))
}

/// A Keel stack with keel-health in the loop: the [`Balancer`] (with
/// `config`) discovers the fleet through a [`keel_health::Health`] registry
/// (with `health`), which probes each node ([`SimNode::check`], jitter
/// seeded with `seed`), learns from every answer through its outlier
/// layer and from the balancer's timeouts through the discovery keys, and
/// publishes slow-start and busy weights and each node's capacity (its
/// `slots`) through them. Under a [`RetryLayer`] when `retry` is given.
/// Returns the router and the registry (to read its snapshot).
///
/// # Errors
///
/// [`BalancerError::InvalidConfig`] naming the bad field (of the balancer's
/// or health's config).
pub fn keel_health_router(
    fleet: &Fleet,
    config: BalancerConfig,
    retry: Option<RetryConfig>,
    health: keel_health::HealthConfig,
    seed: u64,
) -> Result<(Router, keel_health::Health)> {
    let invalid = |e: keel_health::HealthError| {
        BalancerError::InvalidConfig(ConfigError::new("health", e.to_string()))
    };
    let nodes: HashMap<String, SimNode> = fleet
        .nodes()
        .iter()
        .map(|n| (format!("node-{}", n.index()), n.clone()))
        .collect();
    let probed = nodes.clone();
    let registry = keel_health::Health::builder(health)
        .probe_fn(move |endpoint: keel_health::Endpoint| {
            let node = probed.get(endpoint.id().as_str()).cloned();
            async move {
                match node {
                    Some(node) => node.check().await,
                    None => Err(SimError::Failed(usize::MAX)),
                }
            }
        })
        .seed(mix(seed, 2))
        .build()
        .map_err(invalid)?;
    let mut ids: Vec<&String> = nodes.keys().collect();
    ids.sort();
    for id in ids {
        let slots = fleet.slots_of(nodes[id].index());
        registry
            .insert(keel_health::Endpoint::new(id.as_str(), id.as_str()).capacity(slots))
            .map_err(invalid)?;
    }
    let discover = registry.discover_with(
        move |endpoint: &keel_health::Endpoint| nodes[endpoint.id().as_str()].clone(),
        SimClassifier,
    );
    let balancer = BalancerBuilder::from_config(config)
        .classifier(SimClassifier)
        .track_completion(report_cached_prefix())
        .seed(seed)
        .build(discover)?;
    let router = match retry {
        Some(retry) => Router::new(
            RetryLayer::with_seed(retry, mix(seed, 1))?
                .layer(balancer)
                .map_err(BoxError::from),
        ),
        None => Router::new(balancer.map_err(BoxError::from)),
    };
    Ok((router, registry))
}

/// A naive client: round-robin, and every error retried at once, up to
/// `retries` times, to whichever endpoint comes next — the retry storm the
/// budget exists to prevent.
///
/// # Errors
///
/// Never in practice; the balancer config is the default round-robin one.
pub fn naive_router(fleet: &Fleet, retries: u32, seed: u64) -> Result<Router> {
    let balancer = Balancer::builder()
        .policy(Policy::RoundRobin)
        .classifier(SimClassifier)
        .seed(seed)
        .build(fleet.discover())?;
    Ok(Router::new(
        tower::retry::Retry::new(NaiveRetry { left: retries }, balancer).map_err(BoxError::from),
    ))
}

/// Retries every error immediately, `left` more times.
#[derive(Clone, Copy, Debug)]
pub struct NaiveRetry {
    /// Retries left for this request.
    pub left: u32,
}

impl<Res> tower::retry::Policy<SimRequest, Res, BalancerError> for NaiveRetry {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut SimRequest,
        result: &mut Result<Res, BalancerError>,
    ) -> Option<Self::Future> {
        if result.is_err() && self.left > 0 {
            self.left -= 1;
            Some(std::future::ready(()))
        } else {
            None
        }
    }

    fn clone_request(&mut self, request: &SimRequest) -> Option<SimRequest> {
        Some(request.clone())
    }
}

/// tower's own p2c balancer with `PeakEwma` over `fleet` (seeded), behind a
/// `Buffer` so clones share it, with no retries: the baseline Keel is
/// compared against.
pub fn tower_p2c_router(fleet: &Fleet, seed: u64) -> Router {
    let discover = tower::load::PeakEwmaDiscover::new(
        fleet.discover(),
        Duration::from_secs(1),
        Duration::from_secs(10),
        tower::load::CompleteOnResponse::default(),
    );
    let balance =
        tower::balance::p2c::Balance::from_rng(discover, SeededRng(fastrand::Rng::with_seed(seed)));
    Router::new(tower::buffer::Buffer::new(balance, 4096))
}

/// fastrand behind tower's `Rng` trait, so tower's p2c is reproducible.
struct SeededRng(fastrand::Rng);

impl tower::util::rng::Rng for SeededRng {
    fn next_u64(&mut self) -> u64 {
        self.0.u64(..)
    }
}

#[derive(Default)]
struct Collector {
    ok: u64,
    /// Requests that arrived, per second since the fleet was built.
    arrivals: Vec<u64>,
    /// Latencies of successful requests by the second they arrived in.
    by_second: Vec<Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    sessions: HashMap<u64, HashMap<usize, u64>>,
}

fn kind_of(error: &BoxError) -> String {
    if let Some(e) = error.downcast_ref::<BalancerError>() {
        return e.label().to_owned();
    }
    if let Some(e) = error.downcast_ref::<SimError>() {
        return match e {
            SimError::Failed(_) => "failed",
            SimError::Busy(_) => "busy",
        }
        .to_owned();
    }
    "other".to_owned()
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds")
}

/// Drives `workload` through `router` against `fleet` and reports what
/// happened. Each request is a spawned task that gives up (dropping, so
/// cancelling, its request) after the workload's client timeout.
///
/// Run it on a paused current-thread runtime ([`block_on`] or
/// `#[tokio::test(start_paused = true)]`).
pub async fn run(router: Router, fleet: &Fleet, workload: &Workload) -> Report {
    let collector = Arc::new(Mutex::new(Collector::default()));
    let latencies = Arc::new(Mutex::new(histogram()));
    let mut rng = fastrand::Rng::with_seed(workload.seed);
    let start = Instant::now();
    let mut arrival = start;
    let mut tasks = Vec::new();
    let mut id = 0u64;
    loop {
        let gap = -(1.0 - rng.f64()).ln() / workload.rate;
        arrival += Duration::from_secs_f64(gap);
        if arrival - start >= workload.duration {
            break;
        }
        tokio::time::sleep_until(arrival).await;
        let request = workload.request(id, &mut rng);
        id += 1;
        fleet::bump(
            &mut collector.lock().arrivals,
            fleet.probe.second(Instant::now()),
        );
        let router = router.clone();
        let collector = collector.clone();
        let latencies = latencies.clone();
        let timeout = workload.client_timeout;
        let second = fleet.probe.second(Instant::now());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let session = request.session;
            let outcome = tokio::time::timeout(timeout, router.oneshot(request)).await;
            let mut c = collector.lock();
            match outcome {
                Ok(Ok(response)) => {
                    c.ok += 1;
                    *c.sessions
                        .entry(session)
                        .or_default()
                        .entry(response.node)
                        .or_default() += 1;
                    let micros = sent.elapsed().as_micros().max(1) as u64;
                    latencies.lock().saturating_record(micros);
                    while c.by_second.len() <= second {
                        c.by_second.push(histogram());
                    }
                    c.by_second[second].saturating_record(micros);
                }
                Ok(Err(error)) => *c.errors.entry(kind_of(&error)).or_default() += 1,
                Err(_) => *c.errors.entry("client_timeout".to_owned()).or_default() += 1,
            }
        }));
    }
    for task in tasks {
        task.await.expect("a simulated request task panicked");
    }
    let collector = std::mem::take(&mut *collector.lock());
    let latencies = latencies.lock().clone();
    let nodes = fleet.report();
    let dispatch_loads = std::mem::take(&mut *fleet.probe.dispatch_loads.lock());
    let attempts = std::mem::take(&mut *fleet.probe.attempts_by_second.lock());
    let seconds = collector.arrivals.len().max(attempts.len());
    let per_second = (0..seconds)
        .map(|s| {
            (
                collector.arrivals.get(s).copied().unwrap_or(0),
                attempts.get(s).copied().unwrap_or(0),
            )
        })
        .collect();
    Report::new(
        id,
        collector.ok,
        collector.errors,
        &collector.sessions,
        &latencies,
        nodes,
        dispatch_loads,
        per_second,
        collector.by_second,
        workload.duration,
    )
}

impl Workload {
    fn request(&self, id: u64, rng: &mut fastrand::Rng) -> SimRequest {
        let tenant = rng.u32(0..self.tenants.max(1));
        let session = if self.sessions == 0 {
            id
        } else {
            rng.u64(0..self.sessions)
        };
        let shape = &self.prompt;
        let block = shape.block_bytes.max(1);
        let mut prompt =
            Vec::with_capacity(block * (shape.prefix_blocks + shape.suffix_blocks) as usize);
        let mut group = None;
        if shape.prefixes > 0 {
            let drawn = shape.draw_prefix(rng);
            let mut prefix_rng = fastrand::Rng::with_seed(mix(0x5eed, u64::from(drawn)));
            prompt.extend((0..block * shape.prefix_blocks as usize).map(|_| prefix_rng.u8(..)));
            group = Some(drawn);
        }
        prompt.extend((0..block * shape.suffix_blocks as usize).map(|_| rng.u8(..)));
        let prompt = Bytes::from(prompt);
        let mut request = SimRequest::new(id, tenant, session, prompt.clone());
        // Hashing policies key on the session where there are sessions,
        // else on the shared prefix (what a gateway hashes: the system
        // prompt), else on the request.
        let affinity = match group {
            Some(group) if self.sessions == 0 => mix(0xaff1, u64::from(group)),
            _ => session,
        };
        AffinityKey::of(affinity.to_le_bytes()).apply(&mut request);
        Prompt(prompt).apply(&mut request);
        request
    }
}
