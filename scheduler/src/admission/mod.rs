//! The admission scheduler; see [`Scheduler`].

mod codel;
mod config;
mod dispatch;
mod limit;
mod pending;
mod signal;
mod slot;
mod tenants;

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use crossbeam_queue::SegQueue;
use crossbeam_utils::CachePadded;
use keel_core::{Deadline, RequestExtensions};
use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::Service;

use self::codel::Codel;
pub use self::config::{
    AimdConfig, ClassConfig, ConcurrencyConfig, SchedulerConfig, SheddingConfig, TenantConfig,
};
use self::dispatch::dispatch;
use self::limit::Limit;
use self::pending::{Entry, Pending};
use self::signal::Signal;
use self::slot::{Left, Slot};
use self::tenants::{TenantSlot, Tenants};
use crate::error::{BoxError, Rejection, Result, SchedulerError};
use crate::metrics::SchedulerMetrics;
use crate::rate::{RateDecision, RateLimit};
use crate::ticket::{TenantId, Ticket};

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
/// - the service's response (or its error, [`SchedulerError::Service`]): the
///   request was dispatched;
/// - [`SchedulerError::Rejected`]: refused before it reached the service —
///   [`RateLimited`](crate::Rejection::RateLimited) by the tenant's rate
///   limit, [`QueueFull`](crate::Rejection::QueueFull) by the queue bounds,
///   or [`Overloaded`](crate::Rejection::Overloaded) by queueing-delay
///   shedding, each with `retry_after` where known;
/// - [`SchedulerError::DeadlineExceeded`]: its deadline (or
///   [`max_queue_time`](SchedulerConfig::max_queue_time)) passed while it
///   waited; it was never sent;
/// - [`SchedulerError::Closed`]: the service failed in `poll_ready` and the
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
/// # async fn main() -> Result<(), keel_scheduler::SchedulerError> {
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
            .field("queued", &shared.queued.load(Ordering::Relaxed))
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
    /// [`SchedulerError::InvalidConfig`] naming the bad field.
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
        let count_tenants = config.max_queued_per_tenant < config.max_queued
            || config
                .tenants
                .values()
                .any(|t| t.max_queued.is_some_and(|max| max < config.max_queued));
        let shared = Arc::new(Shared {
            sweep_every,
            inbox: SegQueue::new(),
            unparked: SegQueue::new(),
            limit_now: AtomicUsize::new(limit.current()),
            limit: Mutex::new(limit),
            in_flight: CachePadded::new(AtomicUsize::new(0)),
            queued: CachePadded::new(AtomicUsize::new(0)),
            closed: AtomicBool::new(false),
            close_reason: OnceLock::new(),
            handles_gone: AtomicBool::new(false),
            pending_empty: AtomicBool::new(true),
            tenants: Tenants::new(),
            count_tenants,
            track_tenants: config.limits_tenants(),
            shedding: (0..classes).map(|_| AtomicU64::new(0)).collect(),
            since: (0..classes).map(|_| AtomicU64::new(EMPTY)).collect(),
            epoch: now,
            state: Mutex::new(State {
                pending: Pending::new(
                    config.classes.iter().map(|c| c.min_share).collect(),
                    config.quantum,
                ),
                codel: Codel::new(config.shedding.clone(), classes, now),
                next_sweep: now + sweep_every,
                clock: now,
                clock_uses: 0,
                published: vec![(EMPTY, 0); classes],
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
    /// [`SchedulerError::InvalidConfig`] naming the bad field.
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
    /// [`SchedulerError::Rejected`], [`SchedulerError::DeadlineExceeded`],
    /// [`SchedulerError::Service`], [`SchedulerError::Closed`], or
    /// [`SchedulerError::RateLimiter`] when a shared limiter cannot be
    /// reached and is configured to fail closed.
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
        Shared::submit(shared, ticket, request)
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
    /// # async fn main() -> Result<(), keel_scheduler::SchedulerError> {
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
        Shared::submit(shared, ticket, request)
    }

    /// A snapshot of the queue and limits.
    pub fn stats(&self) -> SchedulerStats {
        let shared = &self.handle.shared;
        let mut state = shared.state.lock();
        let now = state.read_clock();
        shared.drain_inbox(&mut state, now);
        shared.purge(&mut state);
        let classes = state.pending.classes();
        SchedulerStats {
            queued: shared.queued.load(Ordering::Acquire),
            queued_per_class: (0..classes).map(|c| state.pending.class_len(c)).collect(),
            in_flight: shared.in_flight.load(Ordering::Relaxed),
            concurrency_limit: shared.limit_now.load(Ordering::Acquire),
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
        self.shared.handles_gone.store(true, Ordering::Release);
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
    /// The deadline passed before dispatch, after waiting this long.
    Expired { waited: Duration },
    /// Shed by queueing-delay control.
    Shed { retry_after: Duration },
    /// The scheduler stopped.
    Closed(String),
}

/// The dispatcher's half of a request's [`Slot`]: answers it at most once,
/// and answers [`Verdict::Closed`] if dropped unanswered (the dispatcher
/// went away), so no submitter waits forever.
struct Reply<Req, Resp> {
    slot: Option<Arc<Slot<Verdict<Req, Resp>>>>,
}

impl<Req, Resp> Reply<Req, Resp> {
    fn slot(&self) -> &Slot<Verdict<Req, Resp>> {
        self.slot.as_deref().expect("answered at most once")
    }

    fn send(mut self, verdict: Verdict<Req, Resp>) {
        if let Some(slot) = self.slot.take() {
            slot.answer(verdict);
        }
    }
}

impl<Req, Resp> Drop for Reply<Req, Resp> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take()
            && !slot.is_gone()
        {
            // Claimed already, or claimed now.
            let _ = slot.claim();
            slot.answer(Verdict::Closed("the dispatcher stopped".to_owned()));
        }
    }
}

/// A queued request and the way back to its submitter.
struct Waiting<Req, Resp> {
    request: Req,
    reply: Reply<Req, Resp>,
    tenant: TenantId,
}

impl<Req, Resp> Waiting<Req, Resp> {
    /// Whether its submitter still waits for it to be taken.
    fn is_queued(&self) -> bool {
        self.reply.slot().is_queued()
    }
}

impl<Req, Resp> fmt::Debug for Waiting<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waiting")
            .field("queued", &self.is_queued())
            .finish_non_exhaustive()
    }
}

/// A submitted request on its way into the ordered queue.
struct Inbound<Req, Resp> {
    class: usize,
    /// When it was submitted, if the submitter read the clock (it has a
    /// deadline); otherwise the dispatcher stamps it when it drains it.
    submitted: Option<Instant>,
    entry: Entry<Waiting<Req, Resp>>,
}

/// What the ordered queue keeps per tenant: its shared counters, when
/// tenants are counted.
type Meta = Option<Arc<TenantSlot>>;

/// `since` of a class without work.
const EMPTY: u64 = u64::MAX;

/// Everything submitters, the dispatcher and permits share.
///
/// Submitting takes no lock shared with other requests: the bounds are
/// atomic counters (reserved before the request is queued, released by
/// whoever takes it out), the request goes into a lock-free inbox, and a
/// per-request [`Slot`] decides whether the dispatcher or a submitter that
/// gave up owns it. Only the dispatcher orders requests: it moves the inbox
/// into [`State`] (its own lock, which submitters never take) and hands
/// requests out from there.
struct Shared<Req, Resp> {
    config: SchedulerConfig,
    /// Submitted requests the dispatcher has not yet ordered.
    inbox: SegQueue<Inbound<Req, Resp>>,
    /// Tenants that fell below their in-flight limit, to unpark.
    unparked: SegQueue<TenantId>,
    /// The dispatcher's state (also read by `stats`).
    state: Mutex<State<Req, Resp>>,
    /// The in-flight limit (fed by completions when adaptive).
    limit: Mutex<Limit>,
    /// Wakes the dispatcher: new work, freed capacity, last handle gone.
    wake: Signal,
    limiter: Option<Arc<dyn RateLimit>>,
    metrics: SchedulerMetrics,
    in_flight: CachePadded<AtomicUsize>,
    /// Requests waiting (inbox and ordered queue), reserved at submit.
    queued: CachePadded<AtomicUsize>,
    /// The in-flight limit, readable without the lock.
    limit_now: AtomicUsize,
    /// Set once, when the service failed or the dispatcher stopped.
    closed: AtomicBool,
    close_reason: OnceLock<String>,
    /// Every [`Scheduler`] handle is gone.
    handles_gone: AtomicBool,
    /// Whether the ordered queue is empty (the dispatcher's own mirror,
    /// so an idle dispatcher waits without taking its lock).
    pending_empty: AtomicBool,
    tenants: Tenants,
    /// Whether tenants' waiting requests are counted (some tenant's bound
    /// is below `max_queued`; otherwise the global bound implies it).
    count_tenants: bool,
    /// Whether some tenant has an in-flight limit.
    track_tenants: bool,
    /// Per class: `retry_after` in nanoseconds while shedding, else 0.
    shedding: Box<[AtomicU64]>,
    /// Per class: since when it has had work, in nanoseconds after
    /// `epoch` ([`EMPTY`] when it has none).
    since: Box<[AtomicU64]>,
    epoch: Instant,
    /// How often waiting requests are checked against `max_queue_time`.
    sweep_every: Duration,
}

/// The dispatcher's state. Held only for short, synchronous work.
struct State<Req, Resp> {
    pending: Pending<Waiting<Req, Resp>, Meta>,
    codel: Codel,
    /// When requests are next checked against `max_queue_time`.
    next_sweep: Instant,
    /// The latest clock reading (each drained request brings its submit
    /// time; dispatches record theirs).
    clock: Instant,
    /// Dispatches since the dispatcher last read the clock itself.
    clock_uses: u32,
    /// Per class, the `since` and `shedding` values last published.
    published: Vec<(u64, u64)>,
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

    fn closed_error(&self) -> SchedulerError {
        SchedulerError::closed(
            self.close_reason
                .get()
                .map_or("the dispatcher stopped", String::as_str)
                .to_owned(),
        )
    }

    /// Whether `class` sheds new requests: its queueing delay is above
    /// target and its work has waited longer than the target.
    fn shed(&self, class: usize, now: Instant) -> Option<Duration> {
        let retry_after = self.shedding[class].load(Ordering::Relaxed);
        if retry_after == 0 {
            return None;
        }
        let since = self.since[class].load(Ordering::Relaxed);
        if since == EMPTY {
            return None;
        }
        let since = self.epoch + Duration::from_nanos(since);
        (now.saturating_duration_since(since) > self.config.shedding.target)
            .then(|| Duration::from_nanos(retry_after))
    }

    /// Reserves a place in the queue for a request of `tenant`.
    fn reserve(&self, tenant: &TenantId) -> bool {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.config.max_queued {
            self.unreserve(None);
            return false;
        }
        if self.count_tenants
            && !self.tenants.with(tenant, &self.config, |t| {
                if t.queued.fetch_add(1, Ordering::AcqRel) < t.max_queued {
                    true
                } else {
                    t.queued.fetch_sub(1, Ordering::AcqRel);
                    false
                }
            })
        {
            self.unreserve(None);
            return false;
        }
        true
    }

    /// Gives back a place a submitter reserved (its request was refused,
    /// or taken back); `tenant` when its tenant's count was reserved too.
    fn unreserve(&self, tenant: Option<&TenantId>) {
        if let Some(tenant) = tenant {
            self.tenants.with(tenant, &self.config, |t| {
                t.queued.fetch_sub(1, Ordering::AcqRel)
            });
        }
        self.queued.fetch_sub(1, Ordering::AcqRel);
        if self.handles_gone.load(Ordering::Acquire) {
            // The dispatcher may be waiting for the queue to empty.
            self.wake.notify();
        }
    }

    /// The dispatcher took a request out of the queue.
    fn dequeued(&self, meta: &Meta) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
        if self.count_tenants
            && let Some(tenant) = meta
        {
            tenant.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The dispatcher put a request back into the queue.
    fn requeued(&self, meta: &Meta) {
        self.queued.fetch_add(1, Ordering::AcqRel);
        if self.count_tenants
            && let Some(tenant) = meta
        {
            tenant.queued.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Answers a request taken out of the queue without dispatching it
    /// (expired, shed, closed), unless its submitter took it back first.
    /// Answers whether it was answered.
    fn answer(
        &self,
        entry: Entry<Waiting<Req, Resp>>,
        meta: &Meta,
        verdict: Verdict<Req, Resp>,
    ) -> bool {
        if !entry.value.reply.slot().claim() {
            return false;
        }
        self.dequeued(meta);
        entry.value.reply.send(verdict);
        true
    }

    /// Moves submitted requests into the ordered queue, and unparks the
    /// tenants that fell below their in-flight limits. Requests submitted
    /// without a clock reading are stamped `now` (the dispatcher's latest
    /// reading: one per wake-up, refreshed every few dispatches).
    fn drain_inbox(&self, state: &mut State<Req, Resp>, now: Instant) {
        let counted = self.count_tenants || self.track_tenants;
        let track = self.track_tenants;
        while let Some(Inbound {
            class,
            submitted,
            mut entry,
        }) = self.inbox.pop()
        {
            if !entry.value.is_queued() {
                // Its submitter already took it back.
                continue;
            }
            entry.enqueued = submitted.unwrap_or(now);
            state.clock = state.clock.max(entry.enqueued);
            state.pending.push(
                class,
                entry,
                |waiting| &waiting.tenant,
                |tenant| {
                    if counted {
                        let slot = self.tenants.get(tenant, &self.config);
                        (slot.weight, Some(slot))
                    } else {
                        (self.config.weight_of(tenant.as_str()), None)
                    }
                },
                |meta| !track || meta.as_ref().is_none_or(|t| t.below_in_flight_limit()),
            );
        }
        while let Some(tenant) = self.unparked.pop() {
            state.pending.unpark(&tenant);
        }
    }

    /// Drops requests whose submitters gave up, if there are any.
    fn purge(&self, state: &mut State<Req, Resp>) {
        // Live requests in the ordered queue are at most `queued`.
        if state.pending.len() > self.queued.load(Ordering::Acquire) {
            state.pending.purge(Waiting::is_queued);
        }
    }

    /// Publishes the queue's state for lock-free checks and the gauges.
    /// Only a shedding class needs its `since` (the submit-time check).
    fn publish(&self, state: &mut State<Req, Resp>) {
        for class in 0..state.pending.classes() {
            let shedding = state
                .codel
                .shedding(class)
                .map_or(0, |d| (d.as_nanos() as u64).max(1));
            let since = match state.pending.nonempty_since(class) {
                Some(since) if shedding != 0 => {
                    since.saturating_duration_since(self.epoch).as_nanos() as u64
                }
                _ => EMPTY,
            };
            if state.published[class] != (since, shedding) {
                state.published[class] = (since, shedding);
                self.since[class].store(since, Ordering::Relaxed);
                self.shedding[class].store(shedding, Ordering::Relaxed);
            }
        }
        self.pending_empty
            .store(state.pending.is_empty(), Ordering::Relaxed);
        self.metrics
            .queued
            .set(self.queued.load(Ordering::Relaxed) as f64);
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
        // The clock is read only when something needs it: a deadline (its
        // timer), a rate limiter, shedding. Otherwise the dispatcher stamps
        // the request when it takes it from the inbox (microseconds later).
        let mut now = None;
        if let Some(deadline) = ticket.deadline {
            let at = Instant::now();
            now = Some(at);
            if deadline <= at {
                metrics.expired.increment(1);
                return Err(SchedulerError::DeadlineExceeded {
                    waited: Duration::ZERO,
                });
            }
        }
        if let Some(limiter) = &this.limiter {
            match limiter.acquire(&ticket.tenant, ticket.cost).await? {
                RateDecision::Allow => {}
                RateDecision::Limited { retry_after } => {
                    metrics.rate_limited.increment(1);
                    return Err(Rejection::RateLimited { retry_after }.into());
                }
            }
            now = Some(Instant::now());
        }
        if this.closed.load(Ordering::Acquire) {
            return Err(this.closed_error());
        }
        let class = this.config.class_of(ticket.priority);
        if this.shedding[class].load(Ordering::Relaxed) != 0 {
            let at = *now.get_or_insert_with(Instant::now);
            if let Some(retry_after) = this.shed(class, at) {
                metrics.overloaded.increment(1);
                return Err(Rejection::Overloaded { retry_after }.into());
            }
        }
        if !this.reserve(&ticket.tenant) {
            metrics.queue_full.increment(1);
            return Err(Rejection::QueueFull.into());
        }
        let slot = Arc::new(Slot::new());
        let tenant = this.count_tenants.then(|| ticket.tenant.clone());
        this.inbox.push(Inbound {
            class,
            submitted: now,
            entry: Entry {
                value: Waiting {
                    request,
                    reply: Reply {
                        slot: Some(slot.clone()),
                    },
                    tenant: ticket.tenant,
                },
                cost: ticket.cost,
                // Stamped by the dispatcher.
                enqueued: this.epoch,
                deadline: ticket.deadline,
            },
        });
        let verdict = {
            let mut queued = Queued {
                shared: &this,
                slot: &slot,
                tenant,
                armed: true,
            };
            // Orders the push before the reads of `closed` and of the
            // signal's flag (the dispatcher fences between its writes and
            // its drain).
            fence(Ordering::SeqCst);
            this.wake.notify_fenced();
            if this.closed.load(Ordering::Relaxed) && queued.take_back() {
                // Closed meanwhile, maybe after the dispatcher's last look.
                return Err(this.closed_error());
            }
            // A request with a deadline keeps its own timer, so it is
            // answered the moment the deadline passes. Without one, the
            // dispatcher's periodic sweep enforces `max_queue_time` (no
            // timer per request).
            let timer = match (ticket.deadline, now) {
                (Some(deadline), Some(at)) => Some(tokio::time::sleep_until(
                    deadline.min(at + this.config.max_queue_time),
                )),
                _ => None,
            };
            let verdict = match (VerdictOrTimer { slot: &slot, timer }).await {
                Some(verdict) => verdict,
                None => {
                    if queued.take_back() {
                        metrics.expired.increment(1);
                        let waited = now.map_or(Duration::ZERO, |at| at.elapsed());
                        return Err(SchedulerError::DeadlineExceeded { waited });
                    }
                    // Claimed at the same moment: its verdict is on the way.
                    poll_fn(|cx| slot.poll_verdict(cx)).await
                }
            };
            queued.armed = false;
            verdict
        };
        drop(slot);
        match verdict {
            Verdict::Run {
                response,
                mut permit,
            } => {
                let result = response.await;
                if permit.shared.config.concurrency.adaptive.is_some() {
                    permit.latency = Some(permit.dispatched.elapsed());
                }
                drop(permit);
                result.map_err(SchedulerError::Service)
            }
            Verdict::Expired { waited } => Err(SchedulerError::DeadlineExceeded { waited }),
            Verdict::Shed { retry_after } => Err(Rejection::Overloaded { retry_after }.into()),
            Verdict::Closed(reason) => Err(SchedulerError::closed(reason)),
        }
    }

    /// Housekeeping under the lock: requests past `max_queue_time`, the
    /// CoDel interval, shedding.
    fn maintain(&self, state: &mut State<Req, Resp>, now: Instant) {
        if now < state.next_sweep
            && !(self.config.shedding.enabled && now >= state.codel.next_eval())
        {
            self.publish(state);
            return;
        }
        // Requests given up must not count as waiting work.
        self.purge(state);
        if now >= state.next_sweep {
            state.next_sweep = now + self.sweep_every;
            let max_wait = self.config.max_queue_time;
            for class in 0..state.pending.classes() {
                let expired = state.pending.drain_older_than(class, now, max_wait);
                for (entry, meta) in expired {
                    let waited = now.saturating_duration_since(entry.enqueued);
                    if self.answer(entry, &meta, Verdict::Expired { waited }) {
                        self.metrics.expired.increment(1);
                    }
                }
            }
            if self.tenants_need_shrinking() {
                self.tenants.shrink();
            }
        }
        let State { pending, codel, .. } = state;
        let evaluated = codel.evaluate(now, |c| pending.nonempty_since(c));
        if evaluated {
            for class in 0..pending.classes() {
                let Some(retry_after) = codel.shedding(class) else {
                    self.metrics.shedding[class].set(0.0);
                    continue;
                };
                self.metrics.shedding[class].set(1.0);
                let mut shed = 0u64;
                for (entry, meta) in pending.drain_older_than(class, now, codel.target()) {
                    if self.answer(entry, &meta, Verdict::Shed { retry_after }) {
                        shed += 1;
                    }
                }
                if shed > 0 {
                    tracing::debug!(
                        scheduler = %self.config.name,
                        class,
                        shed,
                        ?retry_after,
                        "queueing delay above target; shedding"
                    );
                    self.metrics.shed[class].increment(shed);
                    self.metrics.overloaded.increment(shed);
                }
            }
        }
        self.publish(state);
    }

    /// Whether the tenant table holds many more tenants than have work
    /// (checked at each sweep).
    fn tenants_need_shrinking(&self) -> bool {
        (self.count_tenants || self.track_tenants) && self.tenants.len() > TENANTS_KEPT
    }

    /// Stops taking requests and answers every waiting one.
    fn close(&self, reason: String) {
        let _ = self.close_reason.set(reason);
        self.closed.store(true, Ordering::Release);
        // Orders the flag before the drain (submitters fence between their
        // push and their read of the flag).
        fence(Ordering::SeqCst);
        let reason = self
            .close_reason
            .get()
            .cloned()
            .unwrap_or_else(|| "the dispatcher stopped".to_owned());
        let drained = {
            let mut state = self.state.lock();
            let now = state.read_clock();
            self.drain_inbox(&mut state, now);
            let drained = state.pending.drain_all();
            self.publish(&mut state);
            drained
        };
        for (entry, meta) in drained {
            self.answer(entry, &meta, Verdict::Closed(reason.clone()));
        }
    }
}

/// Tenants' counters kept for tenants without work before a sweep drops
/// them.
const TENANTS_KEPT: usize = 1_024;

pin_project! {
    /// A request's verdict, or `None` once its timer (if any) fires first.
    struct VerdictOrTimer<'a, V> {
        slot: &'a Slot<V>,
        #[pin]
        timer: Option<Sleep>,
    }
}

impl<V> Future for VerdictOrTimer<'_, V> {
    type Output = Option<V>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<V>> {
        let this = self.project();
        if let Poll::Ready(verdict) = this.slot.poll_verdict(cx) {
            return Poll::Ready(Some(verdict));
        }
        match this.timer.as_pin_mut().map(|timer| timer.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(None),
            _ => Poll::Pending,
        }
    }
}

/// Takes the request back if its submitter goes away before the
/// dispatcher claims it.
struct Queued<'a, Req, Resp> {
    shared: &'a Shared<Req, Resp>,
    slot: &'a Slot<Verdict<Req, Resp>>,
    /// The tenant, when its count was reserved.
    tenant: Option<TenantId>,
    /// Whether the submitter still waits for a verdict.
    armed: bool,
}

impl<Req, Resp> Queued<'_, Req, Resp> {
    /// Takes the request back; answers whether it was still waiting (else
    /// the dispatcher claimed it and its verdict is on the way).
    fn take_back(&mut self) -> bool {
        if !self.slot.take_back() {
            return false;
        }
        self.armed = false;
        self.shared.unreserve(self.tenant.as_ref());
        true
    }
}

impl<Req, Resp> Drop for Queued<'_, Req, Resp> {
    fn drop(&mut self) {
        if self.armed && self.slot.leave() == Left::TookBack {
            self.shared.unreserve(self.tenant.as_ref());
            self.shared.metrics.cancelled.increment(1);
        }
    }
}

/// One in-flight slot; released when the response is in or dropped.
struct Permit<Req, Resp> {
    shared: Arc<Shared<Req, Resp>>,
    /// The tenant's counters, when tenants are counted.
    tenant: Option<Arc<TenantSlot>>,
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
        if let Some(tenant) = &self.tenant {
            let was = tenant.in_flight.fetch_sub(1, Ordering::AcqRel);
            if tenant.max_in_flight.is_some_and(|max| was >= max) {
                // It may have been parked at its limit.
                shared.unparked.push(tenant.id.clone());
                wake = true;
            }
        }
        if let Some(latency) = self.latency {
            let mut limit = shared.limit.lock();
            if limit.is_adaptive() {
                limit.sample(latency, self.dispatched, before, Instant::now());
                let current = limit.current();
                let old = shared.limit_now.swap(current, Ordering::AcqRel);
                if old != current {
                    shared.metrics.limit.set(current as f64);
                    wake = true;
                }
            }
        }
        if wake {
            shared.wake.notify();
        }
    }
}
