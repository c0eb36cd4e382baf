//! What a gateway and a worker share: the model pools and admission in
//! front of them, and how a request for an upstream is prepared.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use keel_balancer::Prompt;
use keel_core::{BoxError, ConfigError, Deadline};
use keel_scheduler::{
    ConcurrencyConfig, LocalRateLimiter, Priority, Rate, RateLimit, RateLimitConfig, Scheduler,
    SchedulerBuilder, SchedulerConfig, TenantRates, Ticket,
};
use serde_json::Value;

use crate::config::{GatewayConfig, PriorityClass};
use crate::pool::{ModelPool, UpstreamResponse};
use crate::upstream::HttpClient;

/// Which model pool a request goes to (request extension).
#[derive(Clone, Debug)]
struct RouteTo(Arc<str>);

/// What admission's dispatcher drives: the model pools, by name.
#[derive(Clone)]
struct PoolRouter {
    pools: Arc<HashMap<String, ModelPool>>,
}

impl tower::Service<http::Request<Bytes>> for PoolRouter {
    type Response = UpstreamResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamResponse, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Bytes>) -> Self::Future {
        use tower::ServiceExt;
        let pool = request
            .extensions()
            .get::<RouteTo>()
            .and_then(|route| self.pools.get(&*route.0))
            .map(|pool| pool.service.clone());
        Box::pin(async move {
            let service = pool.ok_or("no pool for this request's model")?;
            service.oneshot(request).await.map_err(BoxError::from)
        })
    }
}

/// The model pools and the admission scheduler in front of them (tenant
/// priority, token-weighted fairness, tenant limits, queue bounds).
pub(crate) struct Stack {
    pub(crate) pools: Arc<HashMap<String, ModelPool>>,
    pub(crate) admission: Scheduler<http::Request<Bytes>, UpstreamResponse>,
    pub(crate) tenant_limits: Arc<dyn RateLimit>,
    pub(crate) redis: SharedRedis,
}

impl Stack {
    /// Starts the pools (probing their upstreams) and the admission
    /// dispatcher. Inside a Tokio runtime.
    pub(crate) fn new(config: &GatewayConfig) -> Result<Stack, ConfigError> {
        let client = HttpClient::new(Duration::from_secs(2));
        let mut pools = HashMap::new();
        for model in &config.models {
            pools.insert(
                model.name.clone(),
                ModelPool::start(config, model, &client)?,
            );
        }
        let pools = Arc::new(pools);
        let mut tenant_rates = RateLimitConfig::new("gateway-tenants");
        let mut scheduler = SchedulerConfig::new("gateway")
            .max_queued(config.max_queued)
            .max_queued_per_tenant(config.max_queued)
            .concurrency(ConcurrencyConfig::default().max_in_flight(config.max_in_flight));
        for tenant in &config.tenants {
            tenant_rates = tenant_rates.tenant(
                tenant.name.clone(),
                rates(tenant.requests_per_minute, tenant.tokens_per_minute),
            );
            // Weights are relative: two decimals of the configured value.
            let weight = (tenant.weight * 100.0)
                .round()
                .clamp(1.0, f64::from(u32::MAX)) as u32;
            scheduler = scheduler.tenant(
                tenant.name.clone(),
                keel_scheduler::TenantConfig::default().weight(weight),
            );
        }
        let redis = shared_redis(config)?;
        let tenant_limits = limiter(config, &redis, tenant_rates, "tenants[]")?;
        let admission = SchedulerBuilder::new(scheduler)
            .rate_limit(tenant_limits.clone())
            .build(PoolRouter {
                pools: pools.clone(),
            })
            .map_err(|err| ConfigError::new("max_queued", err.to_string()))?;
        Ok(Stack {
            pools,
            admission,
            tenant_limits,
            redis,
        })
    }
}

/// One upstream call, ready for admission: its ticket (tenant, priority,
/// cost in tokens) and the request (path, body for the upstream model,
/// deadline, prefix for affinity, the pool to route to).
pub(crate) struct Prepared {
    pub(crate) ticket: Ticket,
    pub(crate) request: http::Request<Bytes>,
}

/// What [`prepare`] needs to know about a call.
pub(crate) struct Call<'a> {
    pub(crate) path: &'a str,
    pub(crate) pool: &'a ModelPool,
    pub(crate) body: Value,
    pub(crate) tenant: &'a str,
    pub(crate) priority: PriorityClass,
    pub(crate) estimate: u64,
    pub(crate) timeout: Duration,
    pub(crate) prefix: &'a str,
}

/// Builds the upstream request and its admission ticket.
pub(crate) fn prepare(call: Call<'_>) -> Result<Prepared, http::Error> {
    let body = rewrite_model(call.body, &call.pool.upstream_model);
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(call.path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)?;
    request
        .extensions_mut()
        .insert(RouteTo(Arc::from(call.pool.name.as_str())));
    Deadline::after(call.timeout).apply(&mut request);
    if !call.prefix.is_empty() {
        Prompt(Bytes::from(call.prefix.to_owned())).apply(&mut request);
    }
    let ticket = Ticket::new(call.tenant)
        .priority(priority(call.priority))
        .cost(call.estimate.max(1));
    Ok(Prepared { ticket, request })
}

/// The Redis pool of this process (limits, the durable queue, job
/// results, the cache's L2), when `redis_url` (feature `redis`) or
/// `redis_cluster_urls` (feature `cluster`) is set: one server's pool or a
/// cluster client following redirections and failovers.
#[cfg(feature = "redis")]
pub(crate) type SharedRedis = Option<keel_core::redis::RedisPool>;
/// Without the `redis` feature there is no shared Redis.
#[cfg(not(feature = "redis"))]
pub(crate) type SharedRedis = Option<std::convert::Infallible>;

fn shared_redis(config: &GatewayConfig) -> Result<SharedRedis, ConfigError> {
    #[cfg(feature = "redis")]
    if let Some(redis) = config.redis_config() {
        let shared = if redis.is_cluster() {
            format!("a Redis Cluster ({} seed nodes)", redis.cluster_urls.len())
        } else {
            format!("one Redis server ({})", keel_core::redacted_url(&redis.url))
        };
        let pool = keel_core::redis::RedisPool::new(redis)
            .map_err(|err| ConfigError::new(config.redis_field(), err.reason))?;
        tracing::info!("shared state (limits, durable jobs, cache L2) on {shared}");
        return Ok(Some(pool));
    }
    let _ = config;
    tracing::info!("no shared Redis: limits and the cache are this process's own");
    Ok(None)
}

/// A limiter for `limits`: shared by every replica through Redis when
/// there is a shared Redis, else in this process.
pub(crate) fn limiter(
    config: &GatewayConfig,
    redis: &SharedRedis,
    limits: RateLimitConfig,
    field: &'static str,
) -> Result<Arc<dyn RateLimit>, ConfigError> {
    #[cfg(feature = "redis")]
    if let Some(pool) = redis {
        use keel_scheduler::{RedisRateLimitConfig, RedisRateLimiter};
        let settings = RedisRateLimitConfig::with_redis(pool.config().clone(), limits)
            .fail_open(config.limits_fail_open);
        let limiter = RedisRateLimiter::with_pool(pool.clone(), settings)
            .map_err(|err| ConfigError::new(config.redis_field(), err.to_string()))?;
        return Ok(Arc::new(limiter));
    }
    let _ = (config, redis);
    let limiter =
        LocalRateLimiter::new(limits).map_err(|err| ConfigError::new(field, err.to_string()))?;
    Ok(Arc::new(limiter))
}

/// GCRA rates for a requests-per-minute and a tokens-per-minute limit,
/// each with a bucket of one minute's worth.
pub(crate) fn rates(
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u64>,
) -> TenantRates {
    let mut rates = TenantRates::default();
    if let Some(rpm) = requests_per_minute {
        rates = rates.requests(Rate::per_minute(rpm).burst(rpm));
    }
    if let Some(tpm) = tokens_per_minute {
        let tpm = u32::try_from(tpm).unwrap_or(u32::MAX);
        rates = rates.cost(Rate::per_minute(tpm).burst(tpm));
    }
    rates
}

/// The body sent upstream: the upstream's model name, and for a stream,
/// `stream_options.include_usage` so the stream ends with its token
/// counts (the gateway settles token limits from them; clients see the
/// usage chunk OpenAI documents for that option).
fn rewrite_model(mut body: Value, upstream_model: &str) -> Bytes {
    if let Some(object) = body.as_object_mut() {
        object.insert("model".into(), Value::String(upstream_model.to_owned()));
        if object.get("stream").and_then(Value::as_bool) == Some(true) {
            let options = object
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(options) = options.as_object_mut() {
                options.insert("include_usage".into(), Value::Bool(true));
            }
        }
    }
    Bytes::from(body.to_string())
}

pub(crate) fn priority(class: PriorityClass) -> Priority {
    match class {
        PriorityClass::High => Priority::HIGH,
        PriorityClass::Normal => Priority::NORMAL,
        PriorityClass::Low => Priority::LOW,
    }
}
