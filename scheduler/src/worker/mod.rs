//! The worker runtime; see [`Worker`].

mod config;
mod item;
mod job;
mod settle;
mod typed;

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use keel_core::RetryBudget;
use keel_queue::{Delivery, DequeueOptions, Queue, Receipt};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::Service;
use tracing::Instrument;

pub use self::config::WorkerConfig;
pub use self::item::{JobOutcome, WorkItem};
use self::job::{JobContext, LeaseClock, Settle, Start};
use self::settle::Acks;
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
/// 3. run each job: the handler, with the lease extended every third of
///    its length while it runs (a job longer than its lease is never
///    handed to a second worker), and a caught panic;
/// 4. settle: [`JobOutcome::Ack`] acks (acks are gathered per batch and
///    sent together, one `ack_batch` per round trip),
///    [`JobOutcome::Retry`] and handler errors nack for a retry with
///    backoff (bounded by the queue's `max_attempts` and the worker's
///    retry budget), [`JobOutcome::Abort`] dead-letters.
///
/// # Where handlers run
///
/// Handlers run on the worker's own task, not on a task each: the worker
/// calls the service for every job of a batch and polls each handler
/// future beside its loop (a handler that answers at once costs no
/// allocation, timer or clock reading of its own). Handlers wait
/// concurrently, up to `concurrency` of them, but they share one task, so a
/// handler that does heavy CPU work or blocks should move it off the
/// runtime (`tokio::task::spawn_blocking`) or spawn it, or run several
/// workers; a handler that awaits I/O (the usual case) needs nothing.
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
    /// The service is called for each job while it says it is ready, and
    /// cloned only for a job that finds it not ready (that clone waits for
    /// readiness); wrap a service that is not `Clone` in `tower::buffer`.
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

/// Settlements other than coalesced acks (nacks, and acks made one by one
/// when the settler is gone), polled by the worker's own task.
type Settling<'a> = FuturesUnordered<BoxFuture<'a, ()>>;

/// A `dequeue` in flight.
type Fetching<'a> = BoxFuture<'a, std::result::Result<Vec<Delivery>, keel_queue::QueueError>>;

/// What woke the pulling loop.
enum Event {
    Stop,
    Finished(job::Finished),
    Settled,
    Dequeued(std::result::Result<Vec<Delivery>, keel_queue::QueueError>),
    Resume,
    Ready(std::result::Result<(), BoxError>),
    Flush,
}

/// What woke the drain.
enum Drain {
    Finished(job::Finished),
    Settled,
    GraceOver,
    Bound,
    Flush,
}

/// Hands the acks gathered so far to the settler (one send per batch);
/// if it is gone (never while the worker runs), acks them one by one.
fn flush<'a>(
    ctx: &'a JobContext,
    acks: &mut Acks,
    settler: &mpsc::UnboundedSender<Acks>,
    settling: &mut Settling<'a>,
) {
    if acks.is_empty() {
        return;
    }
    let next = Acks::with_capacity(ctx.config.ack_batch.min(1_024));
    if let Err(mpsc::error::SendError(acks)) = settler.send(std::mem::replace(acks, next)) {
        for (receipt, until) in acks.receipts.into_iter().zip(acks.untils) {
            settling.push(settle::nack_or_ack(ctx, receipt, until, None).boxed());
        }
    }
}

/// Books a job whose handler is done: its ack joins the next batch, a
/// nack is settled beside the loop, a lost lease needs nothing.
fn book<'a>(
    ctx: &'a JobContext,
    receipt: Receipt,
    lease_until: Instant,
    settle: Option<Settle>,
    acks: &mut Acks,
    settler: &mpsc::UnboundedSender<Acks>,
    settling: &mut Settling<'a>,
) {
    match settle {
        Some(Settle::Ack) => {
            acks.push(receipt, lease_until);
            if acks.len() >= ctx.config.ack_batch {
                flush(ctx, acks, settler, settling);
            }
        }
        Some(Settle::Nack(nack)) => {
            settling.push(settle::nack_or_ack(ctx, receipt, lease_until, Some(nack)).boxed());
        }
        None => {}
    }
}

/// Books a job that finished beside the loop.
fn finish<'a>(
    ctx: &'a JobContext,
    done: job::Finished,
    acks: &mut Acks,
    settler: &mpsc::UnboundedSender<Acks>,
    settling: &mut Settling<'a>,
) {
    ctx.metrics.in_flight.decrement(1.0);
    ctx.metrics
        .job_seconds
        .record(done.dispatched.elapsed().as_secs_f64());
    book(
        ctx,
        done.receipt,
        done.lease_until,
        done.settle,
        acks,
        settler,
        settling,
    );
}

/// Calls the service (which said it is ready) with one item; a panic in
/// `call` becomes the job's panic.
fn call<S>(service: &mut S, item: WorkItem) -> Start<S>
where
    S: Service<WorkItem>,
{
    match std::panic::catch_unwind(AssertUnwindSafe(|| Box::pin(service.call(item)))) {
        Ok(call) => Start::Called(call),
        Err(panic) => Start::Panicked(panic),
    }
}

/// Starts the handler of a job past the first of its batch: called at
/// once when the service is still ready (one poll), else a clone waits
/// for readiness beside the loop.
fn start_next<S>(cx: &mut Context<'_>, service: &mut S, item: WorkItem) -> Start<S>
where
    S: Service<WorkItem> + Clone,
    S::Error: Into<BoxError>,
{
    match std::panic::catch_unwind(AssertUnwindSafe(|| service.poll_ready(cx))) {
        Ok(Poll::Ready(Ok(()))) => call(service, item),
        Ok(Poll::Ready(Err(err))) => Start::Failed(err.into()),
        Ok(Poll::Pending) => Start::NotReady(service.clone(), item),
        Err(panic) => Start::Panicked(panic),
    }
}

/// The main loop, then the drain of in-flight jobs.
///
/// Every job runs on this task, in a `FuturesUnordered` beside the
/// `dequeue` in flight: no task, service clone, allocation or timer per
/// job when the service stays ready and the handler answers without
/// waiting. Acks go to the settler in batches.
async fn pull<S>(
    ctx: &Arc<JobContext>,
    mut service: S,
    stop: &CancellationToken,
    health: &watch::Sender<WorkerHealth>,
    settler: mpsc::UnboundedSender<Acks>,
) -> Pulled
where
    S: Service<WorkItem, Response = JobOutcome> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    let ctx: &JobContext = ctx;
    let config = &ctx.config;
    let mut running = FuturesUnordered::new();
    let mut settling: Settling<'_> = FuturesUnordered::new();
    let mut acks = Acks::default();
    // The `dequeue` in flight: when it was asked, and for how many jobs.
    let mut fetch: Option<(Instant, usize, Fetching<'_>)> = None;
    // The pause after a failed `dequeue`.
    let mut pause: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    let mut failures = 0u32;
    let mut failed = false;
    tracing::info!(worker = %config.name, concurrency = config.concurrency, "worker started");
    loop {
        let free = config.concurrency.saturating_sub(running.len());
        // In order: stop; jobs finishing (they free slots); settlements;
        // the `dequeue` in flight; readiness for the next one (a free
        // slot first, then the service: backpressure comes *before*
        // `dequeue`); and, only when nothing else is ready, the acks
        // gathered so far.
        let event = tokio::select! {
            biased;
            () = &mut cancelled => Event::Stop,
            Some(done) = running.next(), if !running.is_empty() => Event::Finished(done),
            Some(()) = settling.next(), if !settling.is_empty() => Event::Settled,
            got = async { fetch.as_mut().expect("guarded").2.as_mut().await }, if fetch.is_some() => Event::Dequeued(got),
            () = async { pause.as_mut().expect("guarded").as_mut().await }, if pause.is_some() => Event::Resume,
            ready = std::future::poll_fn(|cx| service.poll_ready(cx)), if fetch.is_none() && pause.is_none() && free > 0 => {
                Event::Ready(ready.map_err(Into::into))
            }
            () = std::future::ready(()), if !acks.is_empty() => Event::Flush,
        };
        match event {
            Event::Stop => break,
            Event::Finished(done) => {
                finish(ctx, done, &mut acks, &settler, &mut settling);
                // The jobs that finished meanwhile, without another turn
                // of the loop each.
                while let Some(Some(done)) = running.next().now_or_never() {
                    finish(ctx, done, &mut acks, &settler, &mut settling);
                }
            }
            Event::Settled => {}
            Event::Resume => pause = None,
            Event::Flush => flush(ctx, &mut acks, &settler, &mut settling),
            Event::Ready(Err(err)) => {
                tracing::error!(worker = %config.name, error = %err, "the handler service failed; the worker stops pulling");
                publish(health, WorkerState::Failed, failures, Some(err.to_string()));
                failed = true;
                break;
            }
            Event::Ready(Ok(())) => {
                let max = free.min(config.dequeue_batch);
                let options = DequeueOptions::new(max)
                    .wait(config.poll_wait)
                    .lease(config.lease);
                fetch = Some((Instant::now(), max, ctx.queue.dequeue(options)));
            }
            Event::Dequeued(Ok(deliveries)) => {
                let (asked, max, _) = fetch.take().expect("a dequeue was in flight");
                if failures > 0 {
                    tracing::info!(worker = %config.name, after = failures, "broker reachable again; resuming");
                    ctx.metrics.reconnects.increment(1);
                    ctx.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    ctx.metrics.connected.set(1.0);
                    failures = 0;
                    publish(health, WorkerState::Running, 0, None);
                }
                if deliveries.len() > max {
                    // Leave the extra jobs to their leases rather than
                    // overrun.
                    tracing::warn!(worker = %config.name, "dequeue answered more jobs than asked");
                }
                let taken = deliveries.len().min(max);
                if taken == 0 {
                    continue;
                }
                ctx.metrics.started.increment(taken as u64);
                ctx.counters
                    .started
                    .fetch_add(taken as u64, Ordering::Relaxed);
                ctx.budget.deposit_many(taken as u64);
                let dispatched = Instant::now();
                let lease_until = asked + config.lease;
                let mut deliveries = deliveries.into_iter().take(taken);
                // Each handler is called and polled once here, with this
                // task's context: one that answers at once is booked
                // without a future of its own; one that waits joins
                // `running`.
                // Moved in as `&mut` (`FuturesUnordered::push` takes
                // `&self`, and a shared borrow held across the `await`
                // would ask the jobs to be `Sync`).
                let (service, running, acks, settling, settler) = (
                    &mut service,
                    &mut running,
                    &mut acks,
                    &mut settling,
                    &settler,
                );
                let answered = std::future::poll_fn(move |cx| {
                    let mut answered = 0u32;
                    for (i, delivery) in deliveries.by_ref().enumerate() {
                        let (item, receipt) = WorkItem::split(delivery);
                        let span = tracing::info_span!("job", worker = %config.name, id = %item.id, attempt = item.attempt);
                        let entered = span.enter();
                        // The instance that was made ready serves the
                        // first job; the others are called while it stays
                        // ready.
                        let start = if i == 0 {
                            call(service, item)
                        } else {
                            start_next(cx, service, item)
                        };
                        let start = match start {
                            Start::Called(mut call) => {
                                match std::panic::catch_unwind(AssertUnwindSafe(|| {
                                    call.as_mut().poll(cx)
                                })) {
                                    Ok(Poll::Pending) => Start::Called(call),
                                    Ok(Poll::Ready(result)) => {
                                        let settle = job::settle_of(ctx, Ok(result.map_err(Into::into)));
                                        answered += 1;
                                        book(ctx, receipt, lease_until, Some(settle), acks, settler, settling);
                                        continue;
                                    }
                                    Err(panic) => {
                                        let settle = job::settle_of(ctx, Err(panic));
                                        answered += 1;
                                        book(ctx, receipt, lease_until, Some(settle), acks, settler, settling);
                                        continue;
                                    }
                                }
                            }
                            other => other,
                        };
                        drop(entered);
                        ctx.metrics.in_flight.increment(1.0);
                        let lease = LeaseClock::new(asked, lease_until);
                        running.push(
                            job::run(ctx, start, receipt, lease, dispatched).instrument(span),
                        );
                    }
                    Poll::Ready(answered)
                })
                .await;
                if answered > 0 {
                    // Jobs answered at once are timed together: each
                    // records its share of the pass.
                    let each = dispatched.elapsed().as_secs_f64() / f64::from(taken as u32);
                    for _ in 0..answered {
                        ctx.metrics.job_seconds.record(each);
                    }
                    // Let the settler (woken on this thread) send the acks
                    // now, while their receipts are fresh, instead of after
                    // the next batches: a backend that answers `dequeue`
                    // at once would otherwise never give way to it.
                    tokio::task::yield_now().await;
                }
            }
            Event::Dequeued(Err(err)) => {
                fetch = None;
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
                pause = Some(Box::pin(tokio::time::sleep(delay)));
            }
        }
    }
    // A `dequeue` in flight is cancelled: what it had not answered stays
    // in the queue.
    drop(fetch);

    // Drain: no more pulling; in-flight jobs get the grace period, then
    // are released; their settlements get a bound of their own.
    if !failed {
        publish(health, WorkerState::Draining, failures, None);
    }
    tracing::info!(worker = %config.name, in_flight = running.len(), "worker draining");
    let grace = tokio::time::sleep(config.shutdown_grace);
    tokio::pin!(grace);
    let mut bound: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut finished = 0u64;
    let released_before = ctx.counters.released.load(Ordering::Relaxed);
    while !(running.is_empty() && settling.is_empty() && acks.is_empty()) {
        let event = tokio::select! {
            biased;
            Some(done) = running.next(), if !running.is_empty() => Drain::Finished(done),
            Some(()) = settling.next(), if !settling.is_empty() => Drain::Settled,
            () = &mut grace, if bound.is_none() => Drain::GraceOver,
            () = async { bound.as_mut().expect("guarded").as_mut().await }, if bound.is_some() => Drain::Bound,
            () = std::future::ready(()), if !acks.is_empty() => Drain::Flush,
        };
        match event {
            Drain::Finished(done) => {
                if bound.is_none() {
                    finished += 1;
                }
                finish(ctx, done, &mut acks, &settler, &mut settling);
            }
            Drain::Settled => {}
            Drain::Flush => flush(ctx, &mut acks, &settler, &mut settling),
            Drain::GraceOver => {
                ctx.release.cancel();
                // Released jobs only need their nack; bound that too.
                bound = Some(Box::pin(tokio::time::sleep(Duration::from_secs(10))));
            }
            Drain::Bound => {
                tracing::warn!(worker = %config.name, left = running.len() + settling.len(), "releases did not finish in time; their leases will expire");
                break;
            }
        }
    }
    drop(running);
    drop(settling);
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
