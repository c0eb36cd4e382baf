//! The Keel pipeline of the demo, composed only from the crates' public
//! APIs: response cache → admission scheduler (tenants, priorities,
//! deadlines, rate and concurrency limits, shedding) → budgeted retries →
//! balancer (peak-EWMA, node capacity, busy-aware) over health-checked
//! endpoints → the nodes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keel_balancer::hedge::{HedgeConfig, HedgeLayer};
use keel_balancer::retry::{RetryConfig, RetryLayer};
use keel_balancer::{Balancer, Deadline, DefaultClassifier, Policy};
use keel_cache::Tiered;
use keel_core::{BudgetConfig, ErrorKind, KeelError};
use keel_health::{ActiveConfig, Endpoint, Health, HealthConfig, HealthState, OutlierConfig};
use keel_scheduler::{
    ConcurrencyConfig, LocalRateLimiter, Priority, Rate, RateLimitConfig, SchedulerBuilder,
    SchedulerConfig, TenantRates, Ticket,
};
use parking_lot::Mutex;
use tokio::time::Instant;
use tower::ServiceBuilder;

use crate::fleet::{FakeNode, Fleet, InferenceRequest, InferenceResponse, NodeError};
use crate::report::{Ledger, RequestResult};

/// How long an interactive request may take, end to end.
pub const INTERACTIVE_DEADLINE: Duration = Duration::from_secs(2);
/// How long a batch request may take, end to end.
pub const BATCH_DEADLINE: Duration = Duration::from_secs(8);

/// Counts node calls for one request (carried in its extensions).
#[derive(Clone, Debug, Default)]
struct Attempts(Arc<AtomicU32>);

/// A node behind an HTTP-shaped interface, as a gateway sees it: 200 with
/// the answer, 503 with `Retry-After`, 500.
#[derive(Clone, Debug)]
struct HttpNode(FakeNode);

type NodeRequest = http::Request<InferenceRequest>;
type NodeResponse = http::Response<Option<InferenceResponse>>;

impl tower::Service<NodeRequest> for HttpNode {
    type Response = NodeResponse;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<NodeResponse, std::io::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: NodeRequest) -> Self::Future {
        let node = self.0.clone();
        Box::pin(async move {
            if let Some(attempts) = request.extensions().get::<Attempts>() {
                attempts.0.fetch_add(1, Ordering::Relaxed);
            }
            let answer = node.infer(request.into_body()).await;
            Ok(match answer {
                Ok(response) => http::Response::new(Some(response)),
                Err(NodeError::Busy { retry_after }) => http::Response::builder()
                    .status(503)
                    .header("retry-after", retry_after.as_secs().max(1).to_string())
                    .body(None)
                    .expect("valid response"),
                Err(NodeError::Failed) => http::Response::builder()
                    .status(500)
                    .body(None)
                    .expect("valid response"),
            })
        })
    }
}

type Admission = keel_scheduler::Scheduler<NodeRequest, NodeResponse>;

/// The Keel gateway.
#[derive(Clone)]
pub struct KeelPipeline {
    cache: Arc<Tiered>,
    scheduler: Admission,
    health: Health,
    ledger: Arc<Ledger>,
    in_rotation: Arc<Mutex<HashMap<String, bool>>>,
}

impl std::fmt::Debug for KeelPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeelPipeline").finish_non_exhaustive()
    }
}

/// What the `--cache` flag chose, built.
pub type CacheTier = Tiered;

impl KeelPipeline {
    /// Builds the pipeline over `fleet` with `cache`, recording into `ledger`.
    pub fn start(
        fleet: &Fleet,
        cache: Tiered,
        ledger: Arc<Ledger>,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let nodes: HashMap<String, FakeNode> = fleet
            .nodes
            .iter()
            .map(|n| (format!("node-{}", n.index()), n.clone()))
            .collect();
        let probe_nodes = nodes.clone();
        let health = Health::builder(
            HealthConfig::new("demo-fleet")
                .active(
                    ActiveConfig::default()
                        .interval(Duration::from_millis(250))
                        .unhealthy_interval(Duration::from_millis(250))
                        .timeout(Duration::from_millis(150))
                        .unhealthy_threshold(2)
                        .healthy_threshold(2),
                )
                .outlier(
                    OutlierConfig::default()
                        .consecutive_failures(Some(3))
                        .ejection(Duration::from_secs(2), Duration::from_secs(10)),
                ),
        )
        .probe_fn(move |endpoint: Endpoint| {
            let node = probe_nodes.get(endpoint.id().as_str()).cloned();
            async move {
                match node {
                    Some(node) => node.health().await,
                    None => Err(std::io::Error::other("unknown node")),
                }
            }
        })
        .build()?;
        for id in nodes.keys() {
            // Each node serves 8 requests at once; the balancer reads it
            // (and health's slow-start weight) from the discovery key.
            health.insert(Endpoint::new(id.as_str(), id.as_str()).capacity(8))?;
        }
        let make_nodes = nodes.clone();
        let discover = health.discover_with(
            move |endpoint: &Endpoint| HttpNode(make_nodes[endpoint.id().as_str()].clone()),
            DefaultClassifier,
        );
        let balancer = Balancer::builder()
            .policy(Policy::PeakEwma)
            .max_wait(Duration::from_millis(300))
            .attempt_timeout(Duration::from_millis(800))
            .classifier(DefaultClassifier)
            .build(discover)?;
        // Interactive traffic is hedged: a copy goes to another node once
        // the first is slower than the recent p95, within a budget, so the
        // first requests to a node that just turned slow (or hung) do not
        // wait for the balancer's estimate to catch up. Hedging at p95
        // spends about 5 % of requests on the ordinary tail, so the budget
        // is 10 %: at 5 % it is spent before a node hangs, and the requests
        // caught on the hung node wait out their attempt timeout instead.
        // That timeout is 800 ms, 20 times the nodes' median, leaving a
        // retry inside the 2 s interactive deadline.
        let service = ServiceBuilder::new()
            .layer(RetryLayer::new(RetryConfig::default())?)
            .layer(HedgeLayer::new(
                HedgeConfig::default()
                    .percentile(0.95)
                    .window(Duration::from_secs(1))
                    .budget(BudgetConfig::default().ratio(0.1).floor(5)),
            )?)
            .service(balancer);
        let limiter = LocalRateLimiter::new(
            RateLimitConfig::new("demo")
                .default_rates(TenantRates::default().requests(Rate::per_second(180).burst(60))),
        )?;
        let scheduler = SchedulerBuilder::new(
            SchedulerConfig::new("demo-gateway")
                .max_queued(400)
                .max_queued_per_tenant(200)
                .concurrency(ConcurrencyConfig::default().max_in_flight(5 * 8)),
        )
        .rate_limit(limiter)
        .build(service)?;
        Ok(KeelPipeline {
            cache: Arc::new(cache),
            scheduler,
            health,
            ledger,
            in_rotation: Arc::default(),
        })
    }

    /// Requests waiting in the admission queue.
    pub fn depth(&self) -> u64 {
        self.scheduler.stats().queued as u64
    }

    /// Counts endpoints taken out of rotation (ejected by outlier
    /// detection, or failing their health checks) since the last call.
    pub fn note_ejections(&self, phase: usize) {
        let snapshot = self.health.snapshot();
        let mut seen = self.in_rotation.lock();
        let mut fresh = 0;
        for status in snapshot.iter() {
            let serving = matches!(status.state, HealthState::Healthy | HealthState::Degraded);
            let id = status.endpoint.id().as_str().to_owned();
            if seen.insert(id, serving) == Some(true) && !serving {
                fresh += 1;
            }
        }
        if fresh > 0 {
            self.ledger.ejections(phase, fresh);
        }
    }

    /// Serves one request to its single outcome.
    pub async fn serve(&self, request: InferenceRequest, phase: usize) {
        let offered_at = Instant::now();
        let key = format!(
            "llm:v1:{}:{}:{}",
            request.prefix, request.suffix, request.max_tokens
        );
        let attempts = Attempts::default();
        let ran_loader = Arc::new(AtomicU32::new(0));
        let loaded = {
            let (scheduler, attempts, ran) =
                (self.scheduler.clone(), attempts.clone(), ran_loader.clone());
            let request = request.clone();
            self.cache
                .get_or_load(&key, move || async move {
                    ran.fetch_add(1, Ordering::Relaxed);
                    let (ticket, mut http_request) = admission(request);
                    http_request.extensions_mut().insert(attempts);
                    let response = scheduler.submit_request(ticket, http_request).await?;
                    match response.into_body() {
                        Some(answer) => Ok(answer.text.into_bytes().into()),
                        None => Err(keel_scheduler::SchedulerError::Service(
                            "the node answered an error".into(),
                        )),
                    }
                })
                .await
        };
        let attempts = attempts.0.load(Ordering::Relaxed);
        let outcome = match loaded {
            Ok(_) => RequestResult::Completed {
                latency: offered_at.elapsed(),
                attempts,
                cache_hit: ran_loader.load(Ordering::Relaxed) == 0,
            },
            // This request's own load, another's it was coalesced onto, or
            // a remembered failure: its kind decides, in one match.
            Err(err) => outcome_of(err.kind(), attempts),
        };
        self.ledger.record(phase, &outcome);
    }
}

impl KeelPipeline {
    /// Runs one job's inference through admission and the balancer (no
    /// response cache); answers whether it succeeded.
    pub async fn run_job(&self, request: InferenceRequest) -> bool {
        let (ticket, http_request) = admission(request);
        matches!(
            self.scheduler.submit_request(ticket, http_request).await,
            Ok(response) if response.body().is_some()
        )
    }
}

/// How long a request may take, end to end, by its priority.
fn deadline_of(request: &InferenceRequest) -> Duration {
    if request.priority == 1 {
        INTERACTIVE_DEADLINE
    } else {
        BATCH_DEADLINE
    }
}

/// The admission ticket (tenant, class, deadline, cost) and the node request
/// carrying the same deadline for the layers below.
fn admission(request: InferenceRequest) -> (Ticket, NodeRequest) {
    let deadline = deadline_of(&request);
    let ticket = Ticket::new(request.tenant.as_str())
        .priority(if request.priority == 1 {
            Priority::HIGH
        } else {
            Priority::LOW
        })
        .timeout(deadline)
        .cost(u64::from(request.max_tokens));
    let mut http_request = http::Request::new(request);
    Deadline::after(deadline).apply(&mut http_request);
    (ticket, http_request)
}

/// One match over keel-core's vocabulary turns any Keel error into the
/// demo's outcome.
fn outcome_of(kind: ErrorKind, attempts: u32) -> RequestResult {
    let rejected = |reason: &str| RequestResult::Rejected {
        reason: reason.into(),
        attempts,
    };
    match kind {
        ErrorKind::DeadlineExceeded | ErrorKind::Cancelled => RequestResult::Expired { attempts },
        ErrorKind::RateLimited { .. } => rejected("rate-limited"),
        ErrorKind::Overloaded { .. } => rejected("overloaded"),
        ErrorKind::QueueFull => rejected("queue-full"),
        ErrorKind::Unavailable { .. } => rejected("no-capacity"),
        _ => RequestResult::Failed { attempts },
    }
}
