//! Durable mode: requests that can wait go through a keel-queue instead of
//! holding a connection. The gateway answers 202 with a job id; a worker
//! (inside the gateway for the in-memory queue, `keel-worker` processes for
//! Redis and RabbitMQ) calls the upstream through the same admission →
//! retry → balancer → health stack and stores the result, which
//! `GET /v1/jobs/{id}` returns until `result_ttl` passes.
//!
//! # What a 202 promises
//!
//! The job's record (`queued`) is written and the queue accepted the job:
//! on Redis, its master applied the write, or with
//! [`replica_acks`](crate::config::DurableConfig::replica_acks) a replica
//! holds it too, so it survives a failover. A record or an enqueue that
//! fails is answered with the error (503 while Redis is unavailable or a
//! failover is under way), never a 202 for a job that was not queued. A
//! worker acks a job only once its final record (`completed`, `failed`) is
//! written; a record it cannot write sends the job back to run again, so a
//! job runs at least once and the record of its last run is the one kept.
//! The records themselves are written without waiting for a replica: a
//! record written in the moment before its master dies can be lost with
//! it (the job then reads as `queued`, or unknown).

use std::sync::Arc;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use keel_cache::Cache;
use keel_core::{ConfigError, KeelError};
use keel_queue::{Job, Queue, QueueConfig};
use keel_scheduler::{JobOutcome, WorkItem, Worker, WorkerConfig, WorkerHandle};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{DurableBackend, GatewayConfig, PriorityClass};
use crate::error::GatewayError;
use crate::stack::{Call, Prepared, Stack, prepare};

/// A request the gateway queued: what to call, for whom. The queue's
/// payload (JSON).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct GatewayJob {
    /// The job's id, chosen by the gateway (its record is written before
    /// the job is queued, so a fast worker's result is never overwritten).
    #[serde(default)]
    pub id: String,
    /// The upstream path (`/v1/chat/completions`, …).
    pub path: String,
    /// The model (a pool).
    pub model: String,
    /// The tenant it is charged to.
    pub tenant: String,
    /// The tenant's priority class.
    pub priority: PriorityClass,
    /// Tokens reserved for it.
    pub estimate: u64,
    /// The prompt prefix, for affinity.
    pub prefix: String,
    /// The request body as the client sent it.
    pub body: Value,
}

/// A job's state, as `GET /v1/jobs/{id}` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "status", rename_all = "snake_case")]
#[non_exhaustive]
pub enum JobRecord {
    /// Waiting in the queue or running.
    Queued {
        /// The job id.
        id: String,
    },
    /// The upstream answered.
    Completed {
        /// The job id.
        id: String,
        /// The upstream's HTTP status.
        http_status: u16,
        /// The upstream's answer.
        result: Value,
    },
    /// The job failed for good (dead-lettered).
    Failed {
        /// The job id.
        id: String,
        /// OpenAI-style error object.
        error: Value,
    },
}

/// The gateway's durable side: the queue and the result store.
pub(crate) struct Durable {
    queue: Arc<dyn Queue>,
    results: Arc<dyn Cache>,
    ttl: Duration,
    worker: Option<WorkerHandle>,
}

impl Durable {
    /// Opens the queue and the result store the config names; starts an
    /// embedded worker for the in-memory queue (or when asked).
    pub(crate) async fn open(
        config: &GatewayConfig,
        stack: &Stack,
    ) -> Result<Durable, ConfigError> {
        let durable = &config.durable;
        let (queue, results) = backends(config, stack).await?;
        let worker = if durable.embedded_worker || durable.backend == DurableBackend::Memory {
            Some(start_worker(config, stack, queue.clone(), results.clone())?)
        } else {
            None
        };
        Ok(Durable {
            queue,
            results,
            ttl: durable.result_ttl,
            worker,
        })
    }

    /// Queues `job`: 202 with its id.
    pub(crate) async fn submit(&self, mut job: GatewayJob) -> Result<Response, GatewayError> {
        let id = format!("job-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        job.id = id.clone();
        let payload =
            serde_json::to_vec(&job).map_err(|err| GatewayError::BadRequest(err.to_string()))?;
        let priority = crate::stack::priority(job.priority);
        // The record first: a fast worker's result must not be overwritten.
        // Without it the client could not follow the job: refuse instead.
        if let Err(err) = store(
            &*self.results,
            self.ttl,
            &JobRecord::Queued { id: id.clone() },
        )
        .await
        {
            return Err(GatewayError::keel(&err).context(
                "could not store the job's record in the result store, so nothing was queued; \
                 send the job again",
            ));
        }
        if let Err(err) = self
            .queue
            .enqueue(Job::new(payload).priority(priority))
            .await
        {
            if let Err(cleanup) = self.results.delete(&key_of(&id)).await {
                tracing::warn!(%cleanup, job = %id, "could not remove the record of a job that was not queued");
            }
            // The queue may have taken the job all the same (a write no
            // replica confirmed in time): name it, so the client can look.
            return Err(GatewayError::keel(&err).context(&format!(
                "job `{id}` was not confirmed queued; it may still run, and GET /v1/jobs/{id} \
                 shows its result if it does"
            )));
        }
        let body = serde_json::json!({"id": id, "object": "job", "status": "queued"});
        Ok((http::StatusCode::ACCEPTED, axum::Json(body)).into_response())
    }

    /// The job's record.
    pub(crate) async fn status(&self, id: &str) -> Result<JobRecord, GatewayError> {
        let stored = self
            .results
            .get(&key_of(id))
            .await
            .map_err(|err| GatewayError::keel(&err))?;
        stored
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| GatewayError::JobNotFound(id.to_owned()))
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.kill();
        }
    }
}

fn key_of(id: &str) -> String {
    format!("job:{id}")
}

/// Writes `record` (logged when it fails).
///
/// # Errors
///
/// The result store's, when the record could not be written.
async fn store(
    results: &dyn Cache,
    ttl: Duration,
    record: &JobRecord,
) -> Result<(), keel_cache::CacheError> {
    let id = match record {
        JobRecord::Queued { id }
        | JobRecord::Completed { id, .. }
        | JobRecord::Failed { id, .. } => id,
    };
    let bytes = Bytes::from(serde_json::to_vec(record).expect("a record serializes"));
    let written = results.set(&key_of(id), bytes, ttl).await;
    if let Err(err) = &written {
        tracing::warn!(%err, job = %id, "could not store the job's record");
    }
    written
}

/// The job's outcome once its final record is written: `settled` if the
/// record is stored, else a retry, so a result the store lost (its Redis
/// master failing over, say) is never acked away: the job runs again.
fn unless_unstored(written: Result<(), keel_cache::CacheError>, settled: JobOutcome) -> JobOutcome {
    match written {
        Ok(()) => settled,
        Err(err) => JobOutcome::retry(format!("could not store the job's record: {err}")),
    }
}

/// The queue and the result store of `config`.
pub(crate) async fn backends(
    config: &GatewayConfig,
    stack: &Stack,
) -> Result<(Arc<dyn Queue>, Arc<dyn Cache>), ConfigError> {
    let durable = &config.durable;
    let queue_config = QueueConfig::new(durable.queue.clone());
    match durable.backend {
        DurableBackend::Memory => {
            let queue = keel_queue::MemoryQueue::new(queue_config)
                .map_err(|err| ConfigError::new("durable.queue", err.to_string()))?;
            let results = keel_cache::MokaCache::new(keel_cache::MokaCacheConfig::default())
                .map_err(|err| ConfigError::new("durable.result_ttl", err.to_string()))?;
            Ok((Arc::new(queue), Arc::new(results)))
        }
        DurableBackend::Redis | DurableBackend::Amqp => {
            remote_backends(config, stack, queue_config).await
        }
    }
}

#[cfg(feature = "redis")]
async fn remote_backends(
    config: &GatewayConfig,
    stack: &Stack,
    queue_config: QueueConfig,
) -> Result<(Arc<dyn Queue>, Arc<dyn Cache>), ConfigError> {
    let pool = stack.redis.clone().ok_or_else(|| {
        ConfigError::new(
            "redis_url",
            "durable mode on redis or amqp needs redis_url (or redis_cluster_urls)",
        )
    })?;
    let results = keel_cache::RedisCache::with_pool(
        pool.clone(),
        keel_cache::RedisCacheConfig::default()
            .prefix(format!("keel:gw:{}:", config.durable.queue))
            .operation_timeout(Duration::from_millis(500)),
    )
    .map_err(|err| ConfigError::new(config.redis_field(), err.to_string()))?;
    let queue: Arc<dyn Queue> = match config.durable.backend {
        DurableBackend::Redis => {
            let settings =
                crate::config::redis_queue_config(&config.durable, pool.config().clone());
            let queue = keel_queue::RedisQueue::with_pool(pool, settings)
                .await
                .map_err(|err| crate::config::queue_config_error(&err))?;
            Arc::new(queue)
        }
        _ => amqp_queue(config, queue_config).await?,
    };
    Ok((queue, Arc::new(results)))
}

#[cfg(all(feature = "redis", feature = "amqp"))]
async fn amqp_queue(
    config: &GatewayConfig,
    queue_config: QueueConfig,
) -> Result<Arc<dyn Queue>, ConfigError> {
    let url =
        config.durable.url.clone().ok_or_else(|| {
            ConfigError::new("durable.url", "the amqp backend needs the broker URL")
        })?;
    let queue = keel_queue::AmqpQueue::connect(keel_queue::AmqpQueueConfig::new(url, queue_config))
        .await
        .map_err(|err| ConfigError::new("durable.url", err.to_string()))?;
    Ok(Arc::new(queue))
}

#[cfg(all(feature = "redis", not(feature = "amqp")))]
async fn amqp_queue(_: &GatewayConfig, _: QueueConfig) -> Result<Arc<dyn Queue>, ConfigError> {
    Err(ConfigError::new(
        "durable.backend",
        "this build has no RabbitMQ support; rebuild with `--features amqp`",
    ))
}

#[cfg(not(feature = "redis"))]
async fn remote_backends(
    _: &GatewayConfig,
    _: &Stack,
    _: QueueConfig,
) -> Result<(Arc<dyn Queue>, Arc<dyn Cache>), ConfigError> {
    Err(ConfigError::new(
        "durable.backend",
        "this build has no Redis support (job results live in Redis); rebuild with `--features redis`",
    ))
}

/// A worker process's side of durable mode: the stack, the queue, the
/// worker running it, and a small HTTP server for `/healthz` and
/// `/metrics` (the `keel-worker` binary).
pub struct WorkerProcess {
    handle: WorkerHandle,
    _stack: Stack,
}

impl std::fmt::Debug for WorkerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerProcess")
            .field("stats", &self.handle.stats())
            .finish_non_exhaustive()
    }
}

impl WorkerProcess {
    /// Builds the stack from `config`, connects the durable queue and
    /// result store, and starts consuming.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the bad field (including a queue that cannot
    /// be reached).
    pub async fn start(config: &GatewayConfig) -> Result<WorkerProcess, ConfigError> {
        config.validate()?;
        let stack = Stack::new(config)?;
        let (queue, results) = backends(config, &stack).await?;
        let handle = start_worker(config, &stack, queue, results)?;
        Ok(WorkerProcess {
            handle,
            _stack: stack,
        })
    }

    /// `/healthz` (200 while the worker runs and reaches its queue, 503
    /// otherwise) and `/metrics` (Prometheus text).
    pub fn router(&self) -> axum::Router {
        let health = self.handle.subscribe();
        axum::Router::new()
            .route(
                "/healthz",
                axum::routing::get(move || {
                    let health = health.borrow().clone();
                    async move {
                        if health.is_running() {
                            (http::StatusCode::OK, "ok").into_response()
                        } else {
                            (
                                http::StatusCode::SERVICE_UNAVAILABLE,
                                format!("{:?}", health.state),
                            )
                                .into_response()
                        }
                    }
                }),
            )
            .route(
                "/metrics",
                axum::routing::get(|| async { crate::metrics::render() }),
            )
    }

    /// Jobs settled so far.
    pub fn stats(&self) -> keel_scheduler::WorkerStats {
        self.handle.stats()
    }

    /// Stops pulling, lets in-flight jobs finish within the grace period,
    /// and hands the rest back to the queue without spending an attempt.
    pub async fn shutdown(&self) -> keel_scheduler::ShutdownReport {
        self.handle.shutdown().await
    }
}

/// Starts a worker that runs queued jobs through `stack` and stores their
/// results.
pub(crate) fn start_worker(
    config: &GatewayConfig,
    stack: &Stack,
    queue: Arc<dyn Queue>,
    results: Arc<dyn Cache>,
) -> Result<WorkerHandle, ConfigError> {
    let runner = Arc::new(Runner {
        pools: stack.pools.clone(),
        admission: stack.admission.clone(),
        results,
        ttl: config.durable.result_ttl,
        timeout: config.max_timeout,
    });
    let handler = tower::service_fn(move |item: WorkItem| {
        let runner = runner.clone();
        async move { Ok::<_, std::convert::Infallible>(runner.run(item).await) }
    });
    let worker_config = WorkerConfig::new(format!("gateway-{}", config.durable.queue))
        .concurrency(config.durable.concurrency)
        .lease(config.durable.lease);
    let worker = Worker::new(queue, worker_config, handler)
        .map_err(|err| ConfigError::new("durable.concurrency", err.to_string()))?;
    Ok(worker.spawn())
}

/// What a worker needs to run one job.
struct Runner {
    pools: Arc<std::collections::HashMap<String, crate::pool::ModelPool>>,
    admission: keel_scheduler::Scheduler<http::Request<Bytes>, crate::pool::UpstreamResponse>,
    results: Arc<dyn Cache>,
    ttl: Duration,
    timeout: Duration,
}

impl Runner {
    async fn run(&self, item: WorkItem) -> JobOutcome {
        let job = match serde_json::from_slice::<GatewayJob>(&item.payload) {
            Ok(job) if !job.id.is_empty() => job,
            Ok(_) => return JobOutcome::abort("a gateway job without an id"),
            // Bytes that do not decode will never decode: dead-letter them.
            Err(err) => return JobOutcome::abort(format!("not a gateway job: {err}")),
        };
        let id = job.id.clone();
        let Some(pool) = self.pools.get(&job.model) else {
            let error = serde_json::json!({"message": format!("unknown model `{}`", job.model), "type": "invalid_request_error", "code": "model_not_found"});
            let written = store(&*self.results, self.ttl, &JobRecord::Failed { id, error }).await;
            return unless_unstored(written, JobOutcome::abort("unknown model"));
        };
        let prepared = prepare(Call {
            path: &job.path,
            pool,
            body: job.body,
            tenant: &job.tenant,
            priority: job.priority,
            estimate: job.estimate,
            timeout: self.timeout,
            prefix: &job.prefix,
        });
        let Prepared { ticket, request } = match prepared {
            Ok(prepared) => prepared,
            Err(err) => return JobOutcome::abort(format!("cannot build the request: {err}")),
        };
        let answer = match self.admission.submit_request(ticket, request).await {
            Ok(answer) => answer,
            Err(err) => {
                let kind = err.kind();
                if kind.is_retryable() {
                    return JobOutcome::retry(format!("upstream not available: {err}"));
                }
                let error = GatewayError::keel(&err);
                let body = serde_json::json!({"message": error.to_string(), "type": "server_error", "code": error.label()});
                let written = store(
                    &*self.results,
                    self.ttl,
                    &JobRecord::Failed { id, error: body },
                )
                .await;
                return unless_unstored(written, JobOutcome::abort(format!("failed: {err}")));
            }
        };
        let (head, body) = answer.into_parts();
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => return JobOutcome::retry(format!("the upstream failed mid-answer: {err}")),
        };
        if head.status.is_server_error() {
            return JobOutcome::retry(format!("the upstream answered {}", head.status));
        }
        let result = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        let written = store(
            &*self.results,
            self.ttl,
            &JobRecord::Completed {
                id,
                http_status: head.status.as_u16(),
                result,
            },
        )
        .await;
        unless_unstored(written, JobOutcome::Ack)
    }
}
