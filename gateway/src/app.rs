//! The gateway's HTTP surface: OpenAI-compatible routes over admission,
//! retries, the balancer and health, with the cache, token limits,
//! metrics and graceful drain.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::BodyExt;
use keel_cache::{HttpCodec, LoadFailed, Tiered, TieredConfig};
use keel_core::{ConfigError, stable_hash};
use keel_scheduler::{RateDecision, RateLimit, RateLimitConfig, Ticket};
use serde_json::Value;
use tokio::time::Instant;

use crate::config::{GatewayConfig, Tenant};
use crate::durable::{Durable, GatewayJob};
use crate::error::GatewayError;
use crate::metrics;
use crate::openai::{self, Usage, estimate_tokens, text_of};
use crate::sse::{Observed, StreamEnd, StreamReport};
use crate::stack::{Call, Prepared, SharedRedis, Stack, limiter, prepare, rates};

/// The header a client sets to bound a request's time, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-keel-timeout-ms";
/// The header the gateway answers with: `hit` or `miss`.
pub const CACHE_HEADER: &str = "x-keel-cache";
/// The header that sends a request through the durable queue: `queue`.
pub const MODE_HEADER: &str = "x-keel-mode";
/// The header carrying the request id (taken from the client or made).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// A key the gateway knows.
#[derive(Debug)]
struct KeyEntry {
    /// Short, non-secret label for limits and logs (first 12 hex digits).
    label: String,
    tenant: Arc<Tenant>,
}

/// The shared state of one gateway.
pub(crate) struct Shared {
    config: GatewayConfig,
    stack: Stack,
    keys: HashMap<String, KeyEntry>,
    key_limits: Arc<dyn RateLimit>,
    durable: Durable,
    cache: Tiered,
    draining: AtomicBool,
}

/// A built gateway: its routes, ready to serve.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field(
                "models",
                &self.shared.stack.pools.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Builds the gateway from a validated config, starts probing the
    /// upstreams, and connects the durable queue (and, for the in-memory
    /// queue, starts its worker).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the bad field.
    pub async fn new(config: GatewayConfig) -> Result<Gateway, ConfigError> {
        config.validate()?;
        let stack = Stack::new(&config)?;
        let tenants: HashMap<&str, Arc<Tenant>> = config
            .tenants
            .iter()
            .map(|t| (t.name.as_str(), Arc::new(t.clone())))
            .collect();
        let mut keys = HashMap::new();
        let mut key_rates = RateLimitConfig::new("gateway-keys");
        for key in &config.keys {
            let label = key.sha256[..12].to_owned();
            key_rates = key_rates.tenant(
                label.clone(),
                rates(key.requests_per_minute, key.tokens_per_minute),
            );
            keys.insert(
                key.sha256.clone(),
                KeyEntry {
                    label,
                    tenant: tenants[key.tenant.as_str()].clone(),
                },
            );
        }
        let key_limits = limiter(&config, &stack.redis, key_rates, "keys[]")?;
        let durable = Durable::open(&config, &stack).await?;
        let cache = response_cache(&config, &stack.redis)?;
        Ok(Gateway {
            shared: Arc::new(Shared {
                config,
                stack,
                keys,
                key_limits,
                durable,
                cache,
                draining: AtomicBool::new(false),
            }),
        })
    }

    /// The routes: `/v1/chat/completions`, `/v1/completions`,
    /// `/v1/embeddings`, `/v1/models`, `/healthz`, `/readyz`, `/metrics`.
    pub fn router(&self) -> Router {
        openai::routes(post(chat), post(completions), post(embeddings), get(models))
            .route("/v1/jobs", post(submit_job))
            .route("/v1/jobs/{id}", get(job_status))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(|| async { metrics::render() }))
            .with_state(self.shared.clone())
    }

    /// Serves on `listener` until `shutdown` resolves, then stops accepting
    /// and lets in-flight requests and streams finish for up to the
    /// configured `drain_timeout`.
    ///
    /// # Errors
    ///
    /// An I/O error of the listener.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let drain = self.shared.config.drain_timeout;
        let shared = self.shared.clone();
        let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            shared.draining.store(true, Ordering::Relaxed);
            tracing::info!(
                ?drain,
                "draining: no new connections; in-flight requests finish"
            );
            let _ = drained_tx.send(());
        };
        // Small writes (SSE chunks) go out at once, not after a delayed ACK.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = axum::serve(listener, self.router()).with_graceful_shutdown(signal);
        let mut server = std::pin::pin!(server.into_future());
        tokio::select! {
            result = &mut server => return result,
            _ = drained_rx => {}
        }
        match tokio::time::timeout(drain, server).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(?drain, "drain timeout: cutting the remaining connections");
                Ok(())
            }
        }
    }
}

/// The prefix of the response cache's keys in the shared Redis.
#[cfg(feature = "redis")]
const CACHE_PREFIX: &str = "keel:gw:cache:";
/// How long one read or write of the response cache's L2 may take: an
/// answer from Redis slower than this is worth less than one from the
/// origin, and past it the request goes on as a miss.
#[cfg(feature = "redis")]
const L2_TIMEOUT: Duration = Duration::from_millis(100);

/// The response cache: in this process (L1), and with a shared Redis, over
/// a Redis L2 on the same pool, so replicas share the answers any of them
/// loaded. A slow or failed L2 read is a miss and a failed write is
/// dropped (both counted; a breaker skips a dead L2): the answer then comes
/// from the origin, never an error. No invalidation bus: cached answers are
/// a function of the request alone and the gateway never rewrites one, so
/// there is nothing to invalidate; entries leave by their TTL.
fn response_cache(config: &GatewayConfig, redis: &SharedRedis) -> Result<Tiered, ConfigError> {
    let settings = TieredConfig::new("gateway")
        .ttl(config.cache_ttl)
        .l1_capacity_bytes(config.cache_bytes)
        .load_timeout(config.max_timeout)
        .soft_timeout(config.max_timeout);
    let builder = Tiered::builder(settings);
    #[cfg(feature = "redis")]
    let builder = match redis {
        Some(pool) => builder.l2(keel_cache::RedisCache::with_pool(
            pool.clone(),
            keel_cache::RedisCacheConfig::default()
                .prefix(CACHE_PREFIX)
                .operation_timeout(L2_TIMEOUT),
        )
        .map_err(|err| ConfigError::new(config.redis_field(), err.to_string()))?),
        None => builder,
    };
    let _ = redis;
    builder
        .build()
        .map_err(|err| ConfigError::new("cache_ttl", err.to_string()))
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.draining.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    let ready: Vec<&str> = shared
        .stack
        .pools
        .values()
        .filter(|pool| pool.ready())
        .map(|pool| pool.name.as_str())
        .collect();
    if ready.is_empty() {
        (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream").into_response()
    } else {
        (StatusCode::OK, format!("ready: {}", ready.join(", "))).into_response()
    }
}

/// How long `/v1/models` waits for an upstream's own listing.
const MODEL_LISTING_TIMEOUT: Duration = Duration::from_secs(1);

async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let key = match authenticate(&shared, &headers) {
        Ok(key) => key,
        Err(err) => return err.into_response(),
    };
    let mut pools: Vec<_> = shared
        .stack
        .pools
        .values()
        .filter(|pool| key.tenant.allows(&pool.name))
        .collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    // Each model as its upstreams describe it, asked concurrently.
    let data: Vec<Value> = futures::future::join_all(
        pools
            .into_iter()
            .map(|pool| pool.describe(MODEL_LISTING_TIMEOUT)),
    )
    .await;
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

fn authenticate<'a>(shared: &'a Shared, headers: &HeaderMap) -> Result<&'a KeyEntry, GatewayError> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or(GatewayError::Unauthorized(
            "missing API key: send `Authorization: Bearer <key>`",
        ))?;
    let key = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or(GatewayError::Unauthorized(
            "malformed Authorization header: expected `Bearer <key>`",
        ))?;
    shared
        .keys
        .get(&crate::config::hash_key(key))
        .ok_or(GatewayError::Unauthorized("unknown API key"))
}

/// Whether the client asked for durable mode (`x-keel-mode: queue`).
fn durable_mode(headers: &HeaderMap) -> bool {
    headers
        .get(MODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("queue"))
}

/// `POST /v1/jobs` with `{"route": "/v1/chat/completions", "body": {…}}`:
/// the same as that route with `x-keel-mode: queue`.
async fn submit_job(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let limit = shared.config.max_body_bytes;
    let envelope = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => serde_json::from_slice::<Value>(&bytes)
            .map_err(|err| GatewayError::BadRequest(format!("the body is not valid JSON: {err}"))),
        Err(_) => Err(GatewayError::PayloadTooLarge { limit }),
    };
    let (route, body) = match envelope {
        Ok(envelope) => {
            let route = match envelope.get("route").and_then(Value::as_str) {
                Some("/v1/chat/completions" | "chat") => Route::Chat,
                Some("/v1/completions" | "completions") => Route::Completions,
                Some("/v1/embeddings" | "embeddings") => Route::Embeddings,
                _ => {
                    return GatewayError::BadRequest(
                        "POST /v1/jobs takes {\"route\": \"/v1/chat/completions\", \"body\": {…}}: \
                         `route` (missing or unknown here) is /v1/chat/completions, \
                         /v1/completions or /v1/embeddings, and `body` the request for it"
                            .into(),
                    )
                    .into_response();
                }
            };
            match envelope.get("body") {
                Some(body) => (route, body.to_string()),
                None => {
                    return GatewayError::BadRequest(
                        "POST /v1/jobs takes {\"route\": …, \"body\": {…}}: `body`, the \
                         request for `route` (what you would send to that route), is missing"
                            .into(),
                    )
                    .into_response();
                }
            }
        }
        Err(err) => return err.into_response(),
    };
    parts
        .headers
        .insert(MODE_HEADER, HeaderValue::from_static("queue"));
    infer(shared, route, Request::from_parts(parts, Body::from(body))).await
}

async fn job_status(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(err) = authenticate(&shared, &headers) {
        return err.into_response();
    }
    match shared.durable.status(&id).await {
        Ok(record) => axum::Json(record).into_response(),
        Err(err) => err.into_response(),
    }
}

/// The kinds of inference route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Chat,
    Completions,
    Embeddings,
}

impl Route {
    fn path(self) -> &'static str {
        match self {
            Route::Chat => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
            Route::Embeddings => "/v1/embeddings",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Route::Chat => "chat",
            Route::Completions => "completions",
            Route::Embeddings => "embeddings",
        }
    }
}

async fn chat(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    infer(shared, Route::Chat, request).await
}

async fn completions(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    infer(shared, Route::Completions, request).await
}

async fn embeddings(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    infer(shared, Route::Embeddings, request).await
}

/// What the gateway read from a request body.
struct Parsed {
    body: Value,
    model: String,
    stream: bool,
    prompt_tokens: u64,
    max_output: u64,
    /// The leading part of the prompt, for prefix affinity.
    prefix: String,
    /// Whether the answer is a function of the request alone
    /// (`temperature` 0, or embeddings).
    deterministic: bool,
}

fn parse(route: Route, bytes: &[u8], default_max_tokens: u32) -> Result<Parsed, GatewayError> {
    let body: Value = serde_json::from_slice(bytes)
        .map_err(|err| GatewayError::BadRequest(format!("the body is not valid JSON: {err}")))?;
    let object = body
        .as_object()
        .ok_or_else(|| GatewayError::BadRequest("the body must be a JSON object".into()))?;
    let model = object
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| GatewayError::BadRequest("missing required field `model`".into()))?
        .to_owned();
    let stream = object
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let max_output = object
        .get("max_completion_tokens")
        .or_else(|| object.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(u64::from(default_max_tokens));
    let (prompt, prefix) = match route {
        Route::Chat => {
            let messages = object
                .get("messages")
                .and_then(Value::as_array)
                .filter(|m| !m.is_empty())
                .ok_or_else(|| {
                    GatewayError::BadRequest("missing required field `messages`".into())
                })?;
            let texts: Vec<String> = messages
                .iter()
                .map(|m| text_of(m.get("content").unwrap_or(&Value::Null)))
                .collect();
            let prefix = texts[..texts.len().min(2)].join("\n");
            (texts.join("\n"), prefix)
        }
        Route::Completions => {
            let prompt = text_of(object.get("prompt").ok_or_else(|| {
                GatewayError::BadRequest("missing required field `prompt`".into())
            })?);
            let prefix: String = prompt.chars().take(512).collect();
            (prompt, prefix)
        }
        Route::Embeddings => {
            let input = object
                .get("input")
                .ok_or_else(|| GatewayError::BadRequest("missing required field `input`".into()))?;
            (text_of(input), String::new())
        }
    };
    let max_output = if route == Route::Embeddings {
        0
    } else {
        max_output
    };
    let deterministic = route == Route::Embeddings
        || object.get("temperature").and_then(Value::as_f64) == Some(0.0);
    Ok(Parsed {
        deterministic,
        prompt_tokens: estimate_tokens(&prompt),
        body,
        model,
        stream,
        max_output,
        prefix,
    })
}

async fn infer(shared: Arc<Shared>, route: Route, request: Request) -> Response {
    let started = Instant::now();
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:016x}", fastrand::u64(..)));
    let span = tracing::info_span!("request", id = %request_id, route = route.label());
    let answer =
        tracing::Instrument::instrument(infer_inner(&shared, route, request, started), span).await;
    let mut response = match answer {
        Ok(response) => response,
        Err(err) => {
            tracing::info!(status = err.status().as_u16(), error = %err, "refused");
            metrics::request_done(route.label(), err.label(), started);
            err.into_response()
        }
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

async fn infer_inner(
    shared: &Arc<Shared>,
    route: Route,
    request: Request,
    started: Instant,
) -> Result<Response, GatewayError> {
    let (parts, body) = request.into_parts();
    let key = authenticate(shared, &parts.headers)?;
    let limit = shared.config.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| GatewayError::PayloadTooLarge { limit })?;
    let parsed = parse(route, &bytes, shared.config.default_max_tokens)?;
    let pool = shared
        .stack
        .pools
        .get(&parsed.model)
        .filter(|_| key.tenant.allows(&parsed.model))
        .ok_or_else(|| GatewayError::ModelNotFound(parsed.model.clone()))?;
    let timeout = parts
        .headers
        .get(TIMEOUT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(shared.config.default_timeout)
        .min(shared.config.max_timeout);
    let estimate = parsed.prompt_tokens + parsed.max_output;
    // Per-key limits first (the tenant's are charged by admission).
    match shared
        .key_limits
        .acquire(&keel_scheduler::TenantId::new(&key.label), estimate)
        .await
    {
        Ok(RateDecision::Allow) => {}
        Ok(RateDecision::Limited { retry_after }) => {
            return Err(GatewayError::Keel {
                kind: keel_core::ErrorKind::RateLimited {
                    retry_after: Some(retry_after),
                },
                message: "this API key is over its rate limit".into(),
            });
        }
        Err(err) => return Err(GatewayError::keel(&err)),
    }
    if durable_mode(&parts.headers) {
        let job = GatewayJob {
            id: String::new(),
            path: route.path().to_owned(),
            model: parsed.model.clone(),
            tenant: key.tenant.name.clone(),
            priority: key.tenant.priority,
            estimate,
            prefix: parsed.prefix.clone(),
            body: parsed.body,
        };
        return shared.durable.submit(job).await;
    }
    let Prepared {
        ticket,
        request: upstream,
    } = prepare(Call {
        path: route.path(),
        pool,
        body: parsed.body.clone(),
        tenant: &key.tenant.name,
        priority: key.tenant.priority,
        estimate,
        timeout,
        prefix: &parsed.prefix,
    })
    .map_err(|err| GatewayError::BadRequest(err.to_string()))?;
    metrics::tokens_reserved(&key.tenant.name, estimate);
    let cacheable = parsed.deterministic
        && !parsed.stream
        && (route == Route::Embeddings || pool.cache_deterministic);
    if cacheable {
        return cached(shared, route, &parsed, &bytes, ticket, upstream, started).await;
    }
    let answer = shared
        .stack
        .admission
        .submit_request(ticket, upstream)
        .await
        .map_err(|err| GatewayError::keel(&err))?;
    let tenant = key.tenant.name.clone();
    let model = parsed.model.clone();
    let label = route.label();
    let prompt_estimate = parsed.prompt_tokens;
    let (head, body) = answer.into_parts();
    let status = head.status;
    let settle = Settlement {
        shared: shared.clone(),
        tenant: keel_scheduler::TenantId::new(&key.tenant.name),
        key: keel_scheduler::TenantId::new(&key.label),
        reserved: estimate,
    };
    let observed = Observed::new(body, started, parsed.stream, move |report: StreamReport| {
        let usage = report.usage.unwrap_or_else(|| {
            // No usage from upstream: count streamed chunks as tokens.
            Usage::new(
                prompt_estimate,
                report.gaps.len() as u64 + u64::from(report.first_byte.is_some()),
            )
        });
        settle.spawn(usage.total_tokens);
        let outcome = match (status.is_success(), report.end) {
            (true, StreamEnd::Complete) => "completed",
            (_, StreamEnd::UpstreamFailed) => "upstream_failed",
            (_, StreamEnd::ClientGone) => "cancelled",
            (false, StreamEnd::Complete) => "upstream_error",
        };
        metrics::stream_done(&model, &tenant, label, outcome, &report, usage, started);
    });
    let mut response = Response::from_parts(head, Body::new(observed));
    response
        .headers_mut()
        .insert(CACHE_HEADER, HeaderValue::from_static("miss"));
    Ok(response)
}

/// Serves a deterministic request from the cache, or loads it once however
/// many callers ask at the same time (coalesced), storing 2xx answers.
async fn cached(
    shared: &Arc<Shared>,
    route: Route,
    parsed: &Parsed,
    body: &[u8],
    ticket: Ticket,
    upstream: http::Request<Bytes>,
    started: Instant,
) -> Result<Response, GatewayError> {
    // serde_json's map is ordered, so equal requests print equal bytes.
    let canonical = serde_json::from_slice::<Value>(body)
        .map(|v| v.to_string())
        .unwrap_or_default();
    let key = format!(
        "gw:{}:{}:{:016x}",
        route.label(),
        parsed.model,
        stable_hash(canonical.as_bytes())
    );
    let loaded = Arc::new(AtomicBool::new(false));
    let ran = loaded.clone();
    let loader_shared = shared.clone();
    let answer = shared
        .cache
        .get_or_load_with_codec(&key, &HttpCodec, move || async move {
            ran.store(true, Ordering::Relaxed);
            let response = loader_shared
                .stack
                .admission
                .submit_request(ticket, upstream)
                .await
                .map_err(|err| GatewayError::keel(&err))?;
            let (head, body) = response.into_parts();
            let bytes = body
                .collect()
                .await
                .map_err(|err| GatewayError::Keel {
                    kind: keel_core::ErrorKind::Upstream,
                    message: format!("the upstream failed mid-answer: {err}"),
                })?
                .to_bytes();
            Ok::<_, GatewayError>(http::Response::from_parts(head, bytes))
        })
        .await;
    let hit = !loaded.load(Ordering::Relaxed);
    metrics::cache(hit);
    let answer = match answer {
        Ok(answer) => answer,
        Err(LoadFailed::Loader(err)) => return Err((*err).clone()),
        Err(err) => return Err(GatewayError::keel(&err)),
    };
    metrics::request_done(
        route.label(),
        if hit { "cache_hit" } else { "completed" },
        started,
    );
    let mut response = answer.map(Body::from);
    response.headers_mut().insert(
        CACHE_HEADER,
        HeaderValue::from_static(if hit { "hit" } else { "miss" }),
    );
    Ok(response)
}

/// What a request reserved, to settle against its real usage.
struct Settlement {
    shared: Arc<Shared>,
    tenant: keel_scheduler::TenantId,
    key: keel_scheduler::TenantId,
    reserved: u64,
}

impl Settlement {
    /// Settles the tenant's and the key's token limits to `actual` tokens
    /// (policy: refund what was not used, charge an overdraft), off the
    /// request path.
    fn spawn(self, actual: u64) {
        if actual == self.reserved {
            return;
        }
        tokio::spawn(async move {
            let tenant =
                self.shared
                    .stack
                    .tenant_limits
                    .settle(&self.tenant, self.reserved, actual);
            let key = self
                .shared
                .key_limits
                .settle(&self.key, self.reserved, actual);
            let (tenant, key) = tokio::join!(tenant, key);
            if let Err(err) = tenant.and(key) {
                tracing::warn!(%err, "token settlement failed");
            }
        });
    }
}
