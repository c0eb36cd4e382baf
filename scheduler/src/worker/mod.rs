//! The worker runtime; see [`Worker`].

mod config;
mod item;
mod job;
mod settle;
mod typed;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel_core::RetryBudget;
use keel_queue::{DequeueOptions, Queue};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

pub use self::config::WorkerConfig;
pub use self::item::{JobOutcome, WorkItem};
use self::job::{JobContext, Leased};
pub use self::typed::{JsonJobs, TypedItem, json_jobs};
use crate::error::{BoxError, Result};
use crate::metrics::WorkerMetrics;

/// What a worker is doing, as its [`WorkerHealth`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkerState {
    /// Pulling and handling jobs.
    Running,
    /// `dequeue` is failing; the worker retries with backoff.
    Reconnecting,
    /// Shutting down: no more pulling, in-flight jobs finishing.
    Draining,
    /// Shut down (or killed).
    Stopped,
    /// The service failed in `poll_ready`; the worker stopped pulling.
    Failed,
}

/// A worker's health, published on every change.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerHealth {
    /// What the worker is doing.
    pub state: WorkerState,
    /// Broker errors in a row (0 while `dequeue` works).
    pub consecutive_errors: u32,
    /// The last broker or service error, if any.
    pub last_error: Option<String>,
}

impl WorkerHealth {
    /// Whether the worker is pulling jobs.
    pub fn is_running(&self) -> bool {
        self.state == WorkerState::Running
    }
}

/// Totals since a worker started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Jobs handed to the handler.
    pub started: u64,
    /// Jobs acked.
    pub acked: u64,
    /// Jobs nacked for a retry (including ones the queue then dead-lettered
    /// after their last attempt).
    pub retried: u64,
    /// Jobs nacked to the dead letters.
    pub dead_lettered: u64,
    /// Handler panics caught.
    pub panics: u64,
    /// Jobs released to the queue at shutdown (without spending an
    /// attempt).
    pub released: u64,
    /// Leases lost while a handler ran.
    pub lease_lost: u64,
    /// Acks and nacks that failed for good.
    pub settle_errors: u64,
    /// Retries delayed by the retry budget.
    pub budget_exhausted: u64,
    /// Failed `dequeue` calls.
    pub broker_errors: u64,
    /// Recoveries after broker errors.
    pub reconnects: u64,
}

/// The live counters behind [`WorkerStats`].
#[derive(Debug, Default)]
struct Counters {
    started: AtomicU64,
    acked: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    panics: AtomicU64,
    released: AtomicU64,
    lease_lost: AtomicU64,
    settle_errors: AtomicU64,
    budget_exhausted: AtomicU64,
    broker_errors: AtomicU64,
    reconnects: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> WorkerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WorkerStats {
            started: get(&self.started),
            acked: get(&self.acked),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            panics: get(&self.panics),
            released: get(&self.released),
            lease_lost: get(&self.lease_lost),
            settle_errors: get(&self.settle_errors),
            budget_exhausted: get(&self.budget_exhausted),
            broker_errors: get(&self.broker_errors),
            reconnects: get(&self.reconnects),
        }
    }
}

/// What a shutdown did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// In-flight jobs that finished within the grace period.
    pub finished: u64,
    /// In-flight jobs cancelled after it and released to the queue, ready
    /// again at once with their attempt number unchanged. A job whose
    /// release failed is not counted: it comes back after its lease.
    pub released: u64,
}

/// A queue consumer: pulls jobs when its handler service is ready and runs
/// each through it.
///
/// # The loop
///
/// 1. wait for a free handler slot (`concurrency`), then for the service to
///    be ready (`poll_ready`): backpressure comes *before* `dequeue`, so a
///    busy worker leaves jobs in the queue for other workers;
/// 2. `dequeue` with a long poll and a lease;
/// 3. run each job in its own task: the handler, with the lease extended
///    every third of its length while it runs (a job longer than its lease
///    is never handed to a second worker), and a caught panic;
/// 4. settle: [`JobOutcome::Ack`] acks, [`JobOutcome::Retry`] and handler
///    errors nack for a retry with backoff (bounded by the queue's
///    `max_attempts` and the worker's retry budget), [`JobOutcome::Abort`]
///    dead-letters.
///
/// # Failures
///
/// A failing `dequeue` (broker down, connection cut) never stops the
/// worker: it backs off exponentially with jitter and tries again, and its
/// [`WorkerHealth`] says [`WorkerState::Reconnecting`] (gauge
/// `keel_worker_connected` = 0) until a `dequeue` works again. Only the
/// service failing in `poll_ready` stops it, as
/// [`WorkerState::Failed`]: a tower service that errors there can take no
/// more requests.
///
/// # Shutdown
///
/// [`WorkerHandle::shutdown`] stops pulling at once, lets in-flight jobs
/// finish within the grace period, then cancels the rest and releases them
/// to the queue ([`Nack::Release`](keel_queue::Nack::Release)): they are
/// ready again at once, so another worker picks them up without waiting for
/// their leases, and they keep their attempt number (a shutdown never
/// spends an attempt, so it never dead-letters a job on its last one). [`WorkerHandle::kill`] stops
/// everything without settling, like a crash: leases bring the jobs back.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use keel_queue::{Job, MemoryQueue, Queue, QueueConfig};
/// use keel_scheduler::{JobOutcome, WorkItem, Worker, WorkerConfig};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let queue = MemoryQueue::new(QueueConfig::new("jobs"))?;
/// queue.enqueue(Job::new("hello")).await?;
///
/// let handler = tower::service_fn(|item: WorkItem| async move {
///     println!("got {:?}", item.payload);
///     Ok::<_, std::convert::Infallible>(JobOutcome::Ack)
/// });
/// let worker = Worker::new(queue.clone(), WorkerConfig::new("demo"), handler)?.spawn();
///
/// while worker.stats().acked < 1 {
///     tokio::time::sleep(Duration::from_millis(5)).await;
/// }
/// worker.shutdown().await;
/// assert_eq!(queue.stats().await?.ready, 0);
/// # Ok(())
/// # }
/// ```
pub struct Worker<S> {
    queue: Arc<dyn Queue>,
    config: WorkerConfig,
    service: S,
}

impl<S> fmt::Debug for Worker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("queue", &self.queue)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S> Worker<S>
where
    S: Service<WorkItem, Response = JobOutcome> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    /// A worker consuming `queue` with `service`.
    ///
    /// The service is cloned per job (the ready instance is used for the
    /// job it was readied for); wrap a service that is not `Clone` in
    /// `tower::buffer`.
    ///
    /// # Errors
    ///
    /// [`SchedulerError::InvalidConfig`](crate::SchedulerError::InvalidConfig)
    /// naming the bad field.
    pub fn new(queue: impl Queue, config: WorkerConfig, service: S) -> Result<Self> {
        config.validate()?;
        Ok(Worker {
            queue: Arc::new(queue),
            config,
            service,
        })
    }

    /// Starts the worker on the current Tokio runtime.
    ///
    /// Dropping the handle leaves the worker running; stop it with
    /// [`WorkerHandle::shutdown`].
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn spawn(self) -> WorkerHandle {
        let stop = CancellationToken::new();
        let counters = Arc::new(Counters::default());
        let (health_tx, health_rx) = watch::channel(WorkerHealth {
            state: WorkerState::Running,
            consecutive_errors: 0,
            last_error: None,
        });
        let metrics = WorkerMetrics::new(&self.config.name);
        metrics.connected.set(1.0);
        let ctx = Arc::new(JobContext {
            budget: RetryBudget::new(&self.config.retry_budget)
                .expect("the config was validated by Worker::new"),
            reconnect: self
                .config
                .reconnect_backoff()
                .expect("the config was validated by Worker::new"),
            settle_backoff: self
                .config
                .settle_backoff()
                .expect("the config was validated by Worker::new"),
            queue: self.queue,
            config: self.config,
            metrics,
            counters: counters.clone(),
            release: CancellationToken::new(),
        });
        let (report_tx, report_rx) = watch::channel(None);
        let task = tokio::spawn(run(ctx, self.service, stop.clone(), health_tx, report_tx));
        WorkerHandle {
            stop,
            task: task.abort_handle(),
            report: report_rx,
            health: health_rx,
            counters,
        }
    }
}

/// Controls a running [`Worker`]. Share it by reference (or in an `Arc`):
/// every method takes `&self`.
pub struct WorkerHandle {
    stop: CancellationToken,
    task: AbortHandle,
    report: watch::Receiver<Option<ShutdownReport>>,
    health: watch::Receiver<WorkerHealth>,
    counters: Arc<Counters>,
}

impl fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("health", &*self.health.borrow())
            .field("stats", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl WorkerHandle {
    /// The worker's current health.
    pub fn health(&self) -> WorkerHealth {
        self.health.borrow().clone()
    }

    /// A receiver that sees every health change (for a readiness probe).
    pub fn subscribe(&self) -> watch::Receiver<WorkerHealth> {
        self.health.clone()
    }

    /// Totals since the worker started.
    pub fn stats(&self) -> WorkerStats {
        self.counters.snapshot()
    }

    /// Stops pulling, lets in-flight jobs finish within the configured
    /// grace period, releases the rest to the queue, and waits for all of
    /// it.
    ///
    /// Every call (from any number of tasks) waits for the same drain and
    /// answers the same report; a call after the worker stopped answers at
    /// once. A worker that was [killed](Self::kill) reports nothing
    /// finished or released.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the worker draining in the background;
    /// call `shutdown` again to wait for it.
    pub async fn shutdown(&self) -> ShutdownReport {
        self.stop.cancel();
        let mut report = self.report.clone();
        match report.wait_for(Option::is_some).await {
            Ok(report) => report.unwrap_or_default(),
            Err(_) => {
                // The task ended without a report: killed, or it panicked.
                ShutdownReport::default()
            }
        }
    }

    /// Stops the worker at once without settling anything, like a crashed
    /// process: handlers are dropped mid-run and their jobs come back to
    /// the queue when their leases expire.
    pub fn kill(&self) {
        self.task.abort();
    }
}

/// Publishes a health change (only when something changed).
fn publish(
    health: &watch::Sender<WorkerHealth>,
    state: WorkerState,
    errors: u32,
    last: Option<String>,
) {
    health.send_if_modified(|h| {
        let next = WorkerHealth {
            state,
            consecutive_errors: errors,
            last_error: last.or_else(|| h.last_error.clone()),
        };
        let changed = *h != next;
        *h = next;
        changed
    });
}

/// The worker's main loop, then its drain.
async fn run<S>(
    ctx: Arc<JobContext>,
    service: S,
    stop: CancellationToken,
    health: watch::Sender<WorkerHealth>,
    report: watch::Sender<Option<ShutdownReport>>,
) where
    S: Service<WorkItem, Response = JobOutcome> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    // The settler is this task's child: killing the worker stops it too.
    let (acks, rx) = mpsc::unbounded_channel();
    let settler = AbortOnDrop(tokio::spawn(settle::settler(ctx.clone(), rx)));
    let done = pull(&ctx, service, &stop, &health, acks).await;
    // Acks of finished jobs go out before the worker reports it stopped.
    let _ = settler.wait().await;
    publish(
        &health,
        if done.failed {
            WorkerState::Failed
        } else {
            WorkerState::Stopped
        },
        done.failures,
        None,
    );
    tracing::info!(worker = %ctx.config.name, finished = done.report.finished, released = done.report.released, "worker stopped");
    report.send_replace(Some(done.report));
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    async fn wait(mut self) -> std::result::Result<(), tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How the pulling loop and its drain ended.
struct Pulled {
    report: ShutdownReport,
    failed: bool,
    failures: u32,
}

/// The main loop, then the drain of in-flight jobs.
async fn pull<S>(
    ctx: &Arc<JobContext>,
    mut service: S,
    stop: &CancellationToken,
    health: &watch::Sender<WorkerHealth>,
    acks: mpsc::UnboundedSender<settle::PendingAck>,
) -> Pulled
where
    S: Service<WorkItem, Response = JobOutcome> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    let config = &ctx.config;
    let slots = Arc::new(Semaphore::new(config.concurrency));
    let mut jobs = JoinSet::new();
    let mut failures = 0u32;
    let mut failed = false;
    tracing::info!(worker = %config.name, concurrency = config.concurrency, "worker started");
    loop {
        while jobs.try_join_next().is_some() {}
        // 1. A free handler slot.
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        // 2. The service ready to take a job.
        let ready = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            ready = ServiceExt::<WorkItem>::ready(&mut service) => ready.map(|_| ()).map_err(Into::<BoxError>::into),
        };
        if let Err(err) = ready {
            tracing::error!(worker = %config.name, error = %err, "the handler service failed; the worker stops pulling");
            publish(health, WorkerState::Failed, failures, Some(err.to_string()));
            failed = true;
            break;
        }
        let mut permits = vec![first];
        while permits.len() < config.dequeue_batch {
            match slots.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        // 3. Jobs.
        let options = DequeueOptions::new(permits.len())
            .wait(config.poll_wait)
            .lease(config.lease);
        let asked = Instant::now();
        let dequeued = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            dequeued = ctx.queue.dequeue(options) => dequeued,
        };
        match dequeued {
            Ok(deliveries) => {
                if failures > 0 {
                    tracing::info!(worker = %config.name, after = failures, "broker reachable again; resuming");
                    ctx.metrics.reconnects.increment(1);
                    ctx.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    ctx.metrics.connected.set(1.0);
                    failures = 0;
                    publish(health, WorkerState::Running, 0, None);
                }
                for (i, delivery) in deliveries.into_iter().enumerate() {
                    let Some(permit) = permits.pop() else {
                        // A backend answered more than asked: leave the
                        // extra job to its lease rather than overrun.
                        tracing::warn!(worker = %config.name, "dequeue answered more jobs than asked");
                        break;
                    };
                    // The instance that was made ready serves the first
                    // job; the others wait for readiness in their task.
                    let (svc, ready) = if i == 0 {
                        let fresh = service.clone();
                        (std::mem::replace(&mut service, fresh), true)
                    } else {
                        (service.clone(), false)
                    };
                    let leased = Leased {
                        delivery,
                        lease_until: asked + config.lease,
                        acks: acks.clone(),
                    };
                    jobs.spawn(job::run(ctx.clone(), svc, ready, leased, permit));
                }
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                ctx.metrics.broker_errors.increment(1);
                ctx.counters.broker_errors.fetch_add(1, Ordering::Relaxed);
                ctx.metrics.connected.set(0.0);
                let delay = ctx.reconnect.delay(failures);
                tracing::warn!(worker = %config.name, error = %err, failures, retry_in = ?delay, "dequeue failed; reconnecting");
                publish(
                    health,
                    WorkerState::Reconnecting,
                    failures,
                    Some(err.to_string()),
                );
                drop(permits);
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    // Drain: no more pulling; in-flight jobs get the grace period.
    while jobs.try_join_next().is_some() {}
    if !failed {
        publish(health, WorkerState::Draining, failures, None);
    }
    tracing::info!(worker = %config.name, in_flight = jobs.len(), "worker draining");
    let grace_over = Instant::now() + config.shutdown_grace;
    let mut finished = 0u64;
    let released_before = ctx.counters.released.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            biased;
            done = jobs.join_next() => match done {
                Some(_) => finished += 1,
                None => break,
            },
            () = tokio::time::sleep_until(grace_over) => {
                ctx.release.cancel();
                break;
            }
        }
    }
    // Released jobs only need their nack; bound that too.
    let settle_bound = Instant::now() + Duration::from_secs(10);
    while !jobs.is_empty() {
        tokio::select! {
            done = jobs.join_next() => if done.is_none() { break },
            () = tokio::time::sleep_until(settle_bound) => {
                tracing::warn!(worker = %config.name, left = jobs.len(), "releases did not finish in time; their leases will expire");
                jobs.abort_all();
                break;
            }
        }
    }
    let released = ctx.counters.released.load(Ordering::Relaxed) - released_before;
    ctx.metrics.connected.set(0.0);
    Pulled {
        report: ShutdownReport { finished, released },
        failed,
        failures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delay_grows_to_the_cap_with_jitter() {
        let config =
            WorkerConfig::new("w").reconnect(Duration::from_millis(100), Duration::from_secs(1));
        let backoff = config.reconnect_backoff().unwrap();
        let first = backoff.delay(1);
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let late = backoff.delay(30);
        assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
    }
}
