//! The admission scheduler; see [`Scheduler`].

mod codel;
mod config;
mod dispatch;
mod limit;
mod pending;
mod signal;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_core::{Deadline, RequestExtensions};
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::Service;

use self::codel::Codel;
pub use self::config::{
    AimdConfig, ClassConfig, ConcurrencyConfig, SchedulerConfig, SheddingConfig, TenantConfig,
};
use self::dispatch::dispatch;
use self::limit::Limit;
use self::pending::{Entry, Loc, Pending};
use self::signal::Signal;
use crate::error::{BoxError, Error, Rejection, Result};
use crate::metrics::SchedulerMetrics;
use crate::rate::{RateDecision, RateLimit};
use crate::ticket::{TenantHash, TenantId, Ticket};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Requests without a deadline are checked against `max_queue_time` this
/// many times per `max_queue_time`, so they wait at most 1/8 longer.
const SWEEPS_PER_MAX_QUEUE_TIME: u32 = 8;

/// An admission scheduler in front of one service: every submitted request
/// waits in one ordered queue and ends in exactly one outcome.
///
/// Cheap to clone; every clone submits to the same queue. The dispatcher
/// task stops when every handle is dropped and the queue is empty.
///
///
/// # Outcomes
///
/// [`Scheduler::submit`] answers exactly once, with one of:
///
/// - the service's response (or its error, [`Error::Service`]): the request
///   was dispatched;
/// - [`Error::Rejected`]: refused before it reached the service —
///   [`RateLimited`](crate::Rejection::RateLimited) by the tenant's rate
///   limit, [`QueueFull`](crate::Rejection::QueueFull) by the queue bounds,
///   or [`Overloaded`](crate::Rejection::Overloaded) by queueing-delay
///   shedding, each with `retry_after` where known;
/// - [`Error::DeadlineExceeded`]: its deadline (or
///   [`max_queue_time`](SchedulerConfig::max_queue_time)) passed while it
///   waited; it was never sent;
/// - [`Error::Closed`]: the service failed in `poll_ready` and the
///   scheduler stopped.
///
/// Dropping the future returned by `submit` takes the request out of the
/// queue, or, once dispatched, drops the service's response future
/// (cancelling the call).
///
/// # Order
///
/// One dispatcher task owns the service. Whenever the service is ready and
/// the in-flight limits allow, it takes the next request:
///
/// 1. **class**: a class owed its minimum share first, otherwise the highest
///    priority class with work;
/// 2. **tenant**: within the class, deficit round robin over tenants, each
///    credited `quantum × weight` cost per round, so tenants are served
///    cost in proportion to their weights however much each one offers;
///    tenants at their in-flight limit are skipped until a request ends;
/// 3. **request**: within the tenant, earliest deadline first.
///
/// The service's response future runs in the submitter's task, so a slow
/// response never holds up dispatching.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use keel_scheduler::{Priority, Scheduler, SchedulerConfig, Ticket};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), keel_scheduler::Error> {
/// let echo = tower::service_fn(|prompt: String| async move {
///     Ok::<_, std::convert::Infallible>(prompt.len())
/// });
/// let scheduler = Scheduler::new(SchedulerConfig::new("gateway"), echo)?;
///
/// let ticket = Ticket::new("acme").priority(Priority::HIGH).timeout(Duration::from_secs(1));
/// assert_eq!(scheduler.submit(ticket, "hello".to_owned()).await?, 5);
/// # Ok(())
/// # }
/// ```
pub struct Scheduler<Req, Resp> {
    handle: Arc<Handle<Req, Resp>>,
}

impl<Req, Resp> Clone for Scheduler<Req, Resp> {
    fn clone(&self) -> Self {
        Scheduler {
            handle: self.handle.clone(),
        }
    }
}

impl<Req, Resp> fmt::Debug for Scheduler<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &self.handle.shared;
        f.debug_struct("Scheduler")
            .field("name", &shared.config.name)
            .field("queued", &shared.state.lock().pending.len())
            .field("in_flight", &shared.in_flight.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A snapshot of a scheduler's queue and limits.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SchedulerStats {
    /// Requests waiting.
    pub queued: usize,
    /// Requests waiting, per class (index 0 is the lowest priority).
    pub queued_per_class: Vec<usize>,
    /// Requests dispatched and not yet answered.
    pub in_flight: usize,
    /// The current in-flight limit (`usize::MAX` when unlimited).
    pub concurrency_limit: usize,
    /// Which classes are shedding (queueing delay above target).
    pub shedding: Vec<bool>,
}

/// Builds a [`Scheduler`], with an optional rate limiter.
#[derive(Debug)]
pub struct SchedulerBuilder {
    config: SchedulerConfig,
    limiter: Option<Arc<dyn RateLimit>>,
}

impl SchedulerBuilder {
    /// A builder for a scheduler with `config`.
    pub fn new(config: SchedulerConfig) -> Self {
        SchedulerBuilder {
            config,
            limiter: None,
        }
    }

    /// Charges every submitted request to its tenant's rate limits before
    /// it is queued; limited requests are answered
    /// [`RateLimited`](crate::Rejection::RateLimited). Pass an `Arc` to
    /// share one limiter between several schedulers.
    pub fn rate_limit(mut self, limiter: impl RateLimit) -> Self {
        self.limiter = Some(Arc::new(limiter));
        self
    }

    /// Validates the config and starts the dispatcher task that owns
    /// `service`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the bad field.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime (the dispatcher is spawned).
    pub fn build<S, Req>(self, service: S) -> Result<Scheduler<Req, S::Response>>
    where
        S: Service<Req> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        S::Response: Send + 'static,
        Req: Send + 'static,
    {
        self.config.validate()?;
        let config = self.config;
        let classes = config.classes.len();
        let now = Instant::now();
        let limit = Limit::new(&config.concurrency);
        let metrics = SchedulerMetrics::new(&config.name, classes);
        metrics
            .limit
            .set(limit.current().min(u32::MAX as usize) as f64);
        let sweep_every =
            (config.max_queue_time / SWEEPS_PER_MAX_QUEUE_TIME).max(Duration::from_millis(1));
        let shared = Arc::new(Shared {
            sweep_every,
            limit_now: AtomicUsize::new(limit.current()),
            in_flight: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            track_tenants: config.limits_tenants(),
            state: Mutex::new(State {
                pending: Pending::new(
                    config.classes.iter().map(|c| c.min_share).collect(),
                    config.quantum,
                ),
                tenant_in_flight: HashMap::default(),
                limit,
                codel: Codel::new(config.shedding.clone(), classes, now),
                closed: None,
                handles_gone: false,
                dispatcher_gone: false,
                next_sweep: now + sweep_every,
                clock: now,
                clock_uses: 0,
            }),
            wake: Signal::default(),
            limiter: self.limiter,
            metrics,
            config,
        });
        tokio::spawn(dispatch(shared.clone(), service));
        Ok(Scheduler {
            handle: Arc::new(Handle { shared }),
        })
    }
}

impl<Req, Resp> Scheduler<Req, Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
{
    /// A scheduler without rate limits in front of `service`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the bad field.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime (the dispatcher is spawned).
    pub fn new<S>(config: SchedulerConfig, service: S) -> Result<Self>
    where
        S: Service<Req, Response = Resp> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        SchedulerBuilder::new(config).build(service)
    }

    /// Submits one request and waits for its one outcome (see the
    /// [type docs](Scheduler#outcomes)).
    ///
    /// The request is charged to the tenant's rate limits, checked against
    /// the queue bounds and shedding, queued in order, dispatched when its
    /// turn comes, and its response awaited in the caller's task. The rate
    /// limit is charged first: a request then refused for a full queue or
    /// shedding has still used its share of the rate.
    ///
    /// Its deadline is the earlier of the ticket's and, when the scheduler
    /// has a [`request_timeout`](SchedulerConfig::request_timeout), the
    /// time of this call plus that timeout. A request that carries
    /// extensions (an `http::Request`) should go through
    /// [`submit_request`](Self::submit_request), which also reads and sets
    /// its [`Deadline`].
    ///
    /// # Errors
    ///
    /// [`Error::Rejected`], [`Error::DeadlineExceeded`], [`Error::Service`],
    /// [`Error::Closed`], or [`Error::RateLimiter`] when a shared limiter
    /// cannot be reached and is configured to fail closed.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before dispatch takes the request out of the
    /// queue: it is never sent. After dispatch, dropping it drops the
    /// service's response future.
    pub fn submit(
        &self,
        ticket: Ticket,
        request: Req,
    ) -> impl Future<Output = Result<Resp>> + Send + 'static {
        let shared = self.handle.shared.clone();
        let ticket = shared.with_timeout(ticket);
        async move { Shared::submit(shared, ticket, request).await }
    }

    /// Like [`submit`](Self::submit), for a request that carries
    /// extensions: one [`Deadline`] for every layer.
    ///
    /// The request's deadline is the earliest of the [`Deadline`] it
    /// carries, the ticket's, and this call's time plus the scheduler's
    /// [`request_timeout`](SchedulerConfig::request_timeout). That instant
    /// orders it (earliest deadline first within its tenant), expires it
    /// while it waits, and is set on the request
    /// ([`Deadline::apply`]) before it is handed to the service, so the
    /// layers below (retries, the balancer) enforce the same instant.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keel_core::Deadline;
    /// use keel_scheduler::{Scheduler, SchedulerConfig, Ticket};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), keel_scheduler::Error> {
    /// let service = tower::service_fn(|request: http::Request<String>| async move {
    ///     // The deadline admission enforced comes down with the request.
    ///     assert!(Deadline::of(&request).is_some());
    ///     Ok::<_, std::convert::Infallible>(request.into_body().len())
    /// });
    /// let scheduler = Scheduler::new(SchedulerConfig::new("gateway"), service)?;
    /// let mut request = http::Request::new("hello".to_owned());
    /// Deadline::after(Duration::from_secs(2)).apply(&mut request);
    /// assert_eq!(scheduler.submit_request(Ticket::new("acme"), request).await?, 5);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`submit`](Self::submit).
    ///
    /// # Cancel safety
    ///
    /// As [`submit`](Self::submit).
    pub fn submit_request(
        &self,
        ticket: Ticket,
        mut request: Req,
    ) -> impl Future<Output = Result<Resp>> + Send + 'static
    where
        Req: RequestExtensions,
    {
        let shared = self.handle.shared.clone();
        let mut ticket = shared.with_timeout(ticket);
        if let Some(carried) = Deadline::of(&request) {
            let carried = carried.instant();
            ticket.deadline = Some(ticket.deadline.map_or(carried, |d| d.min(carried)));
        }
        if let Some(deadline) = ticket.deadline {
            Deadline::at(deadline).apply(&mut request);
        }
        async move { Shared::submit(shared, ticket, request).await }
    }

    /// A snapshot of the queue and limits.
    pub fn stats(&self) -> SchedulerStats {
        let shared = &self.handle.shared;
        let state = shared.state.lock();
        let classes = state.pending.classes();
        SchedulerStats {
            queued: state.pending.len(),
            queued_per_class: (0..classes).map(|c| state.pending.class_len(c)).collect(),
            in_flight: shared.in_flight.load(Ordering::Relaxed),
            concurrency_limit: state.limit.current(),
            shedding: (0..classes)
                .map(|c| state.codel.shedding(c).is_some())
                .collect(),
        }
    }

    /// The configuration the scheduler was built with.
    pub fn config(&self) -> &SchedulerConfig {
        &self.handle.shared.config
    }
}

/// Dropped with the last [`Scheduler`] clone: tells the dispatcher to stop
/// once the queue is empty.
struct Handle<Req, Resp> {
    shared: Arc<Shared<Req, Resp>>,
}

impl<Req, Resp> Drop for Handle<Req, Resp> {
    fn drop(&mut self) {
        self.shared.state.lock().handles_gone = true;
        self.shared.wake.notify();
    }
}

/// What the dispatcher answers a waiting submitter.
enum Verdict<Req, Resp> {
    /// Dispatched: await this, holding the permit.
    Run {
        response: BoxFuture<std::result::Result<Resp, BoxError>>,
        permit: Permit<Req, Resp>,
    },
    /// The deadline passed before dispatch.
    Expired,
    /// Shed by queueing-delay control.
    Shed { retry_after: Duration },
    /// The scheduler stopped.
    Closed(String),
}

/// A queued request and the way back to its submitter.
struct Waiting<Req, Resp> {
    request: Req,
    reply: oneshot::Sender<Verdict<Req, Resp>>,
}

impl<Req, Resp> fmt::Debug for Waiting<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waiting")
            .field("closed", &self.reply.is_closed())
            .finish_non_exhaustive()
    }
}

struct Shared<Req, Resp> {
    config: SchedulerConfig,
    state: Mutex<State<Req, Resp>>,
    /// Wakes the dispatcher: new work, freed capacity, last handle gone.
    wake: Signal,
    limiter: Option<Arc<dyn RateLimit>>,
    metrics: SchedulerMetrics,
    in_flight: AtomicUsize,
    /// The queue length, readable without the lock.
    queued: AtomicUsize,
    /// The in-flight limit, readable without the lock.
    limit_now: AtomicUsize,
    /// Whether some tenant has an in-flight limit.
    track_tenants: bool,
    /// How often waiting requests are checked against `max_queue_time`.
    sweep_every: Duration,
}

/// Everything behind the lock. Held only for short, synchronous work.
struct State<Req, Resp> {
    pending: Pending<Waiting<Req, Resp>>,
    tenant_in_flight: HashMap<TenantId, usize, TenantHash>,
    limit: Limit,
    codel: Codel,
    /// Set when the service failed; no more requests are taken.
    closed: Option<String>,
    handles_gone: bool,
    dispatcher_gone: bool,
    /// When requests are next checked against `max_queue_time`.
    next_sweep: Instant,
    /// The latest clock reading (submits and dispatches record theirs).
    clock: Instant,
    /// Dispatches since the dispatcher last read the clock itself.
    clock_uses: u32,
}

impl<Req, Resp> State<Req, Resp> {
    /// Reads the clock and records the reading.
    fn read_clock(&mut self) -> Instant {
        let now = Instant::now();
        self.clock = self.clock.max(now);
        self.clock_uses = 0;
        now
    }

    /// The latest reading, without reading the clock.
    fn reuse_clock(&mut self) -> Instant {
        self.clock_uses += 1;
        self.clock
    }

    fn tenant_eligible(&self, config: &SchedulerConfig, tenant: &TenantId) -> bool {
        match config.max_in_flight_of(tenant.as_str()) {
            None => true,
            Some(max) => self.tenant_in_flight.get(tenant).copied().unwrap_or(0) < max,
        }
    }
}

impl<Req, Resp> Shared<Req, Resp> {
    /// The ticket with the scheduler's `request_timeout`, counted from now
    /// (submit), folded into its deadline.
    fn with_timeout(&self, mut ticket: Ticket) -> Ticket {
        if let Some(timeout) = self.config.request_timeout {
            let own = Deadline::after(timeout).instant();
            ticket.deadline = Some(ticket.deadline.map_or(own, |d| d.min(own)));
        }
        ticket
    }

    /// Mirrors the queue length for lock-free checks and the gauge.
    fn set_queued(&self, state: &State<Req, Resp>) {
        let len = state.pending.len();
        self.queued.store(len, Ordering::Release);
        self.metrics.queued.set(len as f64);
    }
}

impl<Req, Resp> Shared<Req, Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
{
    async fn submit(this: Arc<Self>, ticket: Ticket, request: Req) -> Result<Resp> {
        let metrics = &this.metrics;
        metrics.submitted.increment(1);
        let mut now = Instant::now();
        if ticket.deadline.is_some_and(|d| d <= now) {
            metrics.expired.increment(1);
            return Err(Error::DeadlineExceeded {
                waited: Duration::ZERO,
            });
        }
        if let Some(limiter) = &this.limiter {
            match limiter.acquire(&ticket.tenant, ticket.cost).await? {
                RateDecision::Allow => {}
                RateDecision::Limited { retry_after } => {
                    metrics.rate_limited.increment(1);
                    return Err(Rejection::RateLimited { retry_after }.into());
                }
            }
            now = Instant::now();
        }
        let class = this.config.class_of(ticket.priority);
        let weight = this.config.weight_of(ticket.tenant.as_str());
        let max_queued = this.config.max_queued_of(ticket.tenant.as_str());
        let (tx, mut rx) = oneshot::channel();
        let loc = {
            let mut state = this.state.lock();
            state.clock = state.clock.max(now);
            if let Some(reason) = &state.closed {
                return Err(Error::closed(reason.clone()));
            }
            if state.dispatcher_gone {
                return Err(Error::closed("the dispatcher stopped"));
            }
            if let Some(retry_after) = state.codel.shedding(class)
                && state.pending.nonempty_since(class).is_some_and(|since| {
                    now.saturating_duration_since(since) > state.codel.target()
                })
            {
                metrics.overloaded.increment(1);
                return Err(Rejection::Overloaded { retry_after }.into());
            }
            if state.pending.len() >= this.config.max_queued
                || state.pending.tenant_len(&ticket.tenant) >= max_queued
            {
                metrics.queue_full.increment(1);
                return Err(Rejection::QueueFull.into());
            }
            let eligible =
                !this.track_tenants || state.tenant_eligible(&this.config, &ticket.tenant);
            let loc = state.pending.push(
                class,
                &ticket.tenant,
                weight,
                eligible,
                Entry {
                    value: Waiting { request, reply: tx },
                    cost: ticket.cost,
                    enqueued: now,
                    deadline: ticket.deadline,
                },
            );
            this.set_queued(&state);
            loc
        };
        this.wake.notify();

        let mut queued = Queued {
            shared: &this,
            loc: Some(loc),
        };
        // A request with a deadline keeps its own timer, so it is answered
        // the moment the deadline passes. Without one, the dispatcher's
        // periodic sweep enforces `max_queue_time` (no timer per request).
        let verdict = match ticket.deadline {
            Some(deadline) => {
                let give_up = deadline.min(now + this.config.max_queue_time);
                tokio::select! {
                    biased;
                    verdict = &mut rx => verdict,
                    () = tokio::time::sleep_until(give_up) => {
                        if queued.take_back() {
                            metrics.expired.increment(1);
                            return Err(Error::DeadlineExceeded { waited: now.elapsed() });
                        }
                        // Dispatched at the same moment: its verdict is on the way.
                        rx.await
                    }
                }
            }
            None => rx.await,
        };
        queued.loc = None;
        match verdict {
            Ok(Verdict::Run {
                response,
                mut permit,
            }) => {
                let result = response.await;
                if permit.shared.config.concurrency.adaptive.is_some() {
                    permit.latency = Some(permit.dispatched.elapsed());
                }
                drop(permit);
                result.map_err(Error::Service)
            }
            Ok(Verdict::Expired) => Err(Error::DeadlineExceeded {
                waited: now.elapsed(),
            }),
            Ok(Verdict::Shed { retry_after }) => Err(Rejection::Overloaded { retry_after }.into()),
            Ok(Verdict::Closed(reason)) => Err(Error::closed(reason)),
            Err(_) => Err(Error::closed("the dispatcher stopped")),
        }
    }

    /// Housekeeping under the lock: requests past `max_queue_time`, the
    /// CoDel interval, shedding.
    fn maintain(&self, state: &mut State<Req, Resp>, now: Instant) {
        if now < state.next_sweep
            && !(self.config.shedding.enabled && now >= state.codel.next_eval())
        {
            return;
        }
        if now >= state.next_sweep {
            state.next_sweep = now + self.sweep_every;
            let max_wait = self.config.max_queue_time;
            for class in 0..state.pending.classes() {
                let expired = state.pending.drain_older_than(class, now, max_wait);
                self.metrics.expired.increment(expired.len() as u64);
                for entry in expired {
                    let _ = entry.value.reply.send(Verdict::Expired);
                }
            }
        }
        let State { pending, codel, .. } = state;
        let evaluated = codel.evaluate(now, |c| pending.nonempty_since(c));
        if !evaluated {
            self.set_queued(state);
            return;
        }
        for class in 0..pending.classes() {
            let Some(retry_after) = codel.shedding(class) else {
                self.metrics.shedding[class].set(0.0);
                continue;
            };
            self.metrics.shedding[class].set(1.0);
            let shed = pending.drain_older_than(class, now, codel.target());
            if !shed.is_empty() {
                tracing::debug!(
                    scheduler = %self.config.name,
                    class,
                    shed = shed.len(),
                    ?retry_after,
                    "queueing delay above target; shedding"
                );
                self.metrics.shed[class].increment(shed.len() as u64);
                self.metrics.overloaded.increment(shed.len() as u64);
            }
            for entry in shed {
                let _ = entry.value.reply.send(Verdict::Shed { retry_after });
            }
        }
        self.set_queued(state);
    }

    /// Stops taking requests and answers every waiting one.
    fn close(&self, reason: String) {
        let drained = {
            let mut state = self.state.lock();
            state.closed = Some(reason.clone());
            state.dispatcher_gone = true;
            let drained = state.pending.drain_all();
            self.set_queued(&state);
            drained
        };
        for entry in drained {
            let _ = entry.value.reply.send(Verdict::Closed(reason.clone()));
        }
    }
}

/// Takes the request back out of the queue if its submitter goes away.
struct Queued<'a, Req, Resp> {
    shared: &'a Shared<Req, Resp>,
    loc: Option<Loc>,
}

impl<Req, Resp> Queued<'_, Req, Resp> {
    /// Removes the request; answers whether it was still waiting.
    fn take_back(&mut self) -> bool {
        let Some(loc) = self.loc.take() else {
            return false;
        };
        let removed = {
            let mut state = self.shared.state.lock();
            let removed = state.pending.remove(&loc);
            self.shared.set_queued(&state);
            removed
        };
        removed.is_some()
    }
}

impl<Req, Resp> Drop for Queued<'_, Req, Resp> {
    fn drop(&mut self) {
        if self.loc.is_some() && self.take_back() {
            self.shared.metrics.cancelled.increment(1);
        }
    }
}

/// One in-flight slot; released when the response is in or dropped.
struct Permit<Req, Resp> {
    shared: Arc<Shared<Req, Resp>>,
    /// The tenant, when tenants are counted.
    tenant: Option<TenantId>,
    dispatched: Instant,
    /// Set when the response came back (a sample for the adaptive limit).
    latency: Option<Duration>,
}

impl<Req, Resp> Drop for Permit<Req, Resp> {
    fn drop(&mut self) {
        let shared = &self.shared;
        let before = shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        shared.metrics.in_flight.set((before - 1) as f64);
        let mut wake = before >= shared.limit_now.load(Ordering::Acquire);
        if self.tenant.is_some()
            || (self.latency.is_some() && shared.config.concurrency.adaptive.is_some())
        {
            let mut state = shared.state.lock();
            if let Some(tenant) = &self.tenant
                && let Some(count) = state.tenant_in_flight.get_mut(tenant)
            {
                *count -= 1;
                let left = *count;
                if left == 0 {
                    state.tenant_in_flight.remove(tenant);
                }
                if shared
                    .config
                    .max_in_flight_of(tenant.as_str())
                    .is_some_and(|max| left < max)
                {
                    state.pending.unpark(tenant);
                    wake = true;
                }
            }
            if let Some(latency) = self.latency
                && state.limit.is_adaptive()
            {
                state
                    .limit
                    .sample(latency, self.dispatched, before, Instant::now());
                let limit = state.limit.current();
                let old = shared.limit_now.swap(limit, Ordering::AcqRel);
                if old != limit {
                    shared.metrics.limit.set(limit as f64);
                    wake = true;
                }
            }
        }
        if wake {
            shared.wake.notify();
        }
    }
}
