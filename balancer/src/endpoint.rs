//! Per-endpoint state kept in atomics: outstanding requests, the peak-EWMA
//! latency estimate, busy cooldown, reported load; weight and capacity are
//! read live from the endpoint's discovery key.
//!
//! The hot path reads these without locks. The clock is read once when a
//! request is dispatched (its timestamp doubles as "now" for the latency
//! decay of both candidates) and once when it completes.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::Wake;
use std::time::Duration;

use keel_core::{EndpointKey, FailureKind, Outcome};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::BalancerConfig;
use crate::metrics::{BalancerMetrics, EndpointMetrics};
use crate::policy::PrefixIndex;

/// One balancer's number for one endpoint it routes to: the *n*-th service
/// discovery handed it.
///
/// Not the endpoint's identity across crates (that is its discovery key,
/// for keel-health a [`keel_core::EndpointId`]) and not a position in the
/// endpoint list: indexes are assigned in order when discovery inserts an
/// endpoint and never reused by that balancer, so replacing a key's
/// service (a restarted node) gives it a new index and the old index's
/// failures no longer exclude it. Errors from an endpoint carry its index
/// ([`BalancerError::endpoint`](crate::BalancerError::endpoint)), so does
/// [`AvoidEndpoints`](crate::AvoidEndpoints), and
/// [`Balancer::key_of`](crate::Balancer::key_of) maps an index to its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointIndex(u64);

impl EndpointIndex {
    /// The index with this number.
    pub const fn new(n: u64) -> Self {
        EndpointIndex(n)
    }

    /// The index's number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for EndpointIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Load an endpoint reported about itself (for example its queue depth plus
/// running batch, scraped from its metrics), shared by every client of the
/// endpoint.
///
/// The balancer never trusts a report alone: it adds its own count of
/// outstanding requests and ages the rest, so a stale "idle" cannot attract
/// a herd. See [`BalancerBuilder::load_reports`](crate::BalancerBuilder::load_reports).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadReport {
    /// Requests the endpoint had in progress or queued, from every client.
    pub load: f64,
    /// When the endpoint measured it.
    pub at: Instant,
}

impl LoadReport {
    /// A report of `load` measured now.
    pub fn now(load: f64) -> Self {
        LoadReport {
            load,
            at: Instant::now(),
        }
    }
}

/// What one endpoint looks like to the balancer right now; see
/// [`Balancer::endpoints`](crate::Balancer::endpoints).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct EndpointSnapshot<K> {
    /// The endpoint's discovery key.
    pub key: K,
    /// The balancer's index for it.
    pub index: EndpointIndex,
    /// Requests dispatched to it and not finished.
    pub outstanding: u32,
    /// The requests it may have outstanding now: its key's capacity, else
    /// the configured `max_outstanding_per_endpoint`, lowered after a busy
    /// answer; `None` when unbounded.
    pub capacity: Option<u32>,
    /// The weight in force, read from the key
    /// ([`EndpointKey::weight`], clamped to [0, 1]).
    pub weight: f64,
    /// The current peak-EWMA latency estimate (the fleet's, until the
    /// endpoint's first response).
    pub latency_estimate: Duration,
    /// Responses folded into the estimate.
    pub samples: u64,
    /// Whether it is in a busy cooldown.
    pub busy: bool,
    /// Requests dispatched to it.
    pub dispatched: u64,
    /// Attempts classified successful.
    pub succeeded: u64,
    /// Attempts classified failed (errors, failed responses).
    pub failed: u64,
    /// Attempts answered busy. Never counted in `failed`.
    pub busy_responses: u64,
    /// Attempts cut by the attempt timeout.
    pub timed_out: u64,
    /// Attempts dropped before finishing (the caller gave up, a hedge won,
    /// the deadline passed).
    pub cancelled: u64,
}

/// State shared by every endpoint of one balancer.
#[derive(Debug)]
pub(crate) struct Common {
    epoch: Instant,
    decay_ns: f64,
    decay_samples: u64,
    default_rtt_ns: f64,
    /// The fleet's estimate: an EWMA over every endpoint's successful
    /// response times (f64 bits, ns, as of `fleet_stamp_ns`); what an
    /// endpoint without a response of its own is assumed to take.
    fleet_ns: AtomicU64,
    fleet_stamp_ns: AtomicU64,
    fleet_samples: AtomicU64,
    busy_cooldown: Duration,
    report_max_age_ns: f64,
    pub(crate) hard_cap: u32,
    /// Requests waiting for a slot.
    pub(crate) waiters: AtomicUsize,
    /// Woken when a slot frees (one waiter) or the endpoint set changes (all).
    pub(crate) notify: Notify,
    /// Set by the discovery stream's waker: there may be changes to read.
    pub(crate) dirty: AtomicBool,
    pub(crate) metrics: BalancerMetrics,
    /// Dispatches to every endpoint, decayed over [`SHARE_WINDOW_NS`].
    recent: Decayed,
}

/// The time constant over which dispatch shares are measured (slow start
/// caps an endpoint's share of requests, not only its weight).
pub(crate) const SHARE_WINDOW_NS: f64 = 1e9;

/// A count that decays exponentially with time, in two atomics (f64 bits
/// of the count as of a stamp, and the stamp).
#[derive(Debug, Default)]
pub(crate) struct Decayed {
    bits: AtomicU64,
    stamp_ns: AtomicU64,
}

impl Decayed {
    fn at(bits: u64, stamp: u64, now_ns: u64) -> f64 {
        let value = f64::from_bits(bits);
        let elapsed = now_ns.saturating_sub(stamp) as f64;
        value * (-elapsed / SHARE_WINDOW_NS).exp()
    }

    /// The count decayed to `now_ns`.
    pub(crate) fn get(&self, now_ns: u64) -> f64 {
        Decayed::at(self.bits.load(Relaxed), self.stamp_ns.load(Relaxed), now_ns)
    }

    /// Adds one at `now_ns`. Racing adds may lose a fraction of a count:
    /// the share it measures is an estimate, not a ledger.
    pub(crate) fn add(&self, now_ns: u64) {
        let stamp = self.stamp_ns.swap(now_ns, Relaxed);
        let _ = self.bits.fetch_update(Relaxed, Relaxed, |bits| {
            Some((Decayed::at(bits, stamp, now_ns) + 1.0).to_bits())
        });
    }
}

impl Common {
    pub(crate) fn new(config: &BalancerConfig) -> Self {
        Common {
            epoch: Instant::now(),
            decay_ns: nanos(config.decay),
            decay_samples: u64::from(config.decay_samples.max(1)),
            default_rtt_ns: nanos(config.default_rtt),
            fleet_ns: AtomicU64::new(nanos(config.default_rtt).to_bits()),
            fleet_stamp_ns: AtomicU64::new(0),
            fleet_samples: AtomicU64::new(0),
            busy_cooldown: config.busy_cooldown,
            report_max_age_ns: nanos(config.load_report_max_age),
            hard_cap: config.max_outstanding_per_endpoint.unwrap_or(u32::MAX),
            waiters: AtomicUsize::new(0),
            notify: Notify::new(),
            dirty: AtomicBool::new(true),
            metrics: BalancerMetrics::new(&config.name),
            recent: Decayed::default(),
        }
    }

    /// Nanoseconds since this balancer was built.
    pub(crate) fn ns_of(&self, instant: Instant) -> u64 {
        instant.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    pub(crate) fn busy_cooldown(&self) -> Duration {
        self.busy_cooldown
    }

    /// The weight of the old estimate when a sample arrives `elapsed_ns`
    /// after the previous one, the estimate having `samples` before it:
    /// the time decay, but never more than `1 - 1/decay_samples` (and 0
    /// for the first sample, which replaces the starting estimate).
    fn keep(&self, elapsed_ns: u64, samples: u64) -> f64 {
        let by_time = (-(elapsed_ns as f64) / self.decay_ns).exp();
        let n = (samples + 1).min(self.decay_samples) as f64;
        by_time.min(1.0 - 1.0 / n)
    }

    /// The fleet's estimate in ns, decayed to `now_ns`; `default_rtt`
    /// until any endpoint answered.
    pub(crate) fn fleet_ns(&self, now_ns: u64) -> f64 {
        if self.fleet_samples.load(Relaxed) == 0 {
            return self.default_rtt_ns;
        }
        let estimate = f64::from_bits(self.fleet_ns.load(Relaxed));
        let elapsed = now_ns.saturating_sub(self.fleet_stamp_ns.load(Relaxed));
        estimate * (-(elapsed as f64) / self.decay_ns).exp()
    }

    /// Folds one successful response time into the fleet's estimate.
    fn observe_fleet(&self, rtt_ns: f64, now_ns: u64) {
        let samples = self.fleet_samples.fetch_add(1, Relaxed);
        let stamp = self.fleet_stamp_ns.swap(now_ns, Relaxed);
        let keep = self.keep(now_ns.saturating_sub(stamp), samples);
        let _ = self.fleet_ns.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) * keep + rtt_ns * (1.0 - keep)).to_bits())
        });
    }

    /// The least latency a failure is recorded as: `default_rtt`, and twice
    /// the fleet's estimate (so it fits fleets of any speed).
    fn failure_floor_ns(&self, now_ns: u64) -> f64 {
        self.default_rtt_ns.max(2.0 * self.fleet_ns(now_ns))
    }

    /// Dispatches to the whole fleet over the last second or so (decayed).
    pub(crate) fn recent_dispatches(&self, now_ns: u64) -> f64 {
        self.recent.get(now_ns)
    }

    /// Wakes one waiter if any request waits for a slot.
    pub(crate) fn slot_freed(&self) {
        if self.waiters.load(Relaxed) > 0 {
            self.notify.notify_one();
        }
    }
}

impl Wake for Common {
    /// The discovery stream has news: read it at the next chance, and let
    /// waiting requests look at the new set.
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
        if self.waiters.load(Relaxed) > 0 {
            self.notify.notify_waiters();
        }
    }
}

/// "Now", read from the clock at most once.
#[derive(Debug)]
pub(crate) struct LazyNow<'a> {
    common: &'a Common,
    now: Cell<Option<Instant>>,
}

impl<'a> LazyNow<'a> {
    pub(crate) fn new(common: &'a Common) -> Self {
        LazyNow {
            common,
            now: Cell::new(None),
        }
    }

    pub(crate) fn instant(&self) -> Instant {
        match self.now.get() {
            Some(now) => now,
            None => {
                let now = Instant::now();
                self.now.set(Some(now));
                now
            }
        }
    }

    pub(crate) fn ns(&self) -> u64 {
        self.common.ns_of(self.instant())
    }

    /// The instant read so far, if any.
    pub(crate) fn read(&self) -> Option<Instant> {
        self.now.get()
    }

    /// The same "now", taking an instant read elsewhere (so the clock is
    /// read once per request).
    pub(crate) fn with(self, read: Option<Instant>) -> Self {
        if self.now.get().is_none() {
            self.now.set(read);
        }
        self
    }
}

/// One endpoint's live state.
#[derive(Debug)]
pub(crate) struct EndpointState {
    pub(crate) id: EndpointIndex,
    common: Arc<Common>,
    /// The discovery key: live weight and capacity, and where timeouts the
    /// balancer imposes are reported.
    key: Key,
    outstanding: AtomicU32,
    /// f64 bits: the peak-EWMA estimate in ns, as of `stamp_ns`; unused
    /// while `samples` is 0 (the fleet's estimate stands in).
    ewma_ns: AtomicU64,
    stamp_ns: AtomicU64,
    samples: AtomicU64,
    /// 0 when not busy.
    busy_until_ns: AtomicU64,
    /// Concurrency allowed after a busy answer; `u32::MAX` when none.
    soft_cap: AtomicU32,
    /// Outstanding requests when the endpoint last answered busy.
    busy_level: AtomicU32,
    /// f64 bits: reported load from other clients, as of `other_at_ns`.
    other_load: AtomicU64,
    other_at_ns: AtomicU64,
    dispatched: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    busy: AtomicU64,
    timed_out: AtomicU64,
    cancelled: AtomicU64,
    /// Handles alive on the endpoint, and the sum of their send times: the
    /// mean age of what is in flight (a hung node's requests age with no
    /// answer, and that age counts as its latency before any times out).
    timed: AtomicU64,
    sent_sum_ns: AtomicU64,
    /// Dispatches here, decayed like [`Common::recent_dispatches`].
    recent: Decayed,
    metrics: EndpointMetrics,
    /// Created by the prefix-affinity policy on first use.
    pub(crate) prefix: OnceLock<Mutex<PrefixIndex>>,
}

/// An endpoint's discovery key, type-erased.
pub(crate) struct Key(Arc<dyn EndpointKey + Send + Sync>);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("weight", &self.0.weight())
            .field("capacity", &self.0.capacity())
            .finish()
    }
}

impl EndpointState {
    pub(crate) fn new(
        id: EndpointIndex,
        label: String,
        key: Arc<dyn EndpointKey + Send + Sync>,
        common: Arc<Common>,
    ) -> Self {
        let now = common.ns_of(Instant::now());
        EndpointState {
            id,
            key: Key(key),
            outstanding: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(common.default_rtt_ns.to_bits()),
            stamp_ns: AtomicU64::new(now),
            samples: AtomicU64::new(0),
            busy_until_ns: AtomicU64::new(0),
            soft_cap: AtomicU32::new(u32::MAX),
            busy_level: AtomicU32::new(0),
            other_load: AtomicU64::new(0f64.to_bits()),
            other_at_ns: AtomicU64::new(0),
            dispatched: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            timed: AtomicU64::new(0),
            sent_sum_ns: AtomicU64::new(0),
            recent: Decayed::default(),
            metrics: EndpointMetrics::new(&common.metrics.name, label),
            prefix: OnceLock::new(),
            common,
        }
    }

    pub(crate) fn common(&self) -> &Common {
        &self.common
    }

    pub(crate) fn outstanding(&self) -> u32 {
        self.outstanding.load(Relaxed)
    }

    /// The key's weight, clamped to [0, 1] (NaN: 1).
    pub(crate) fn weight(&self) -> f64 {
        clamp_weight(self.key.0.weight())
    }

    /// Other clients' reported load, aged.
    pub(crate) fn reported_load(&self, now: &LazyNow<'_>) -> f64 {
        let other = f64::from_bits(self.other_load.load(Relaxed));
        if other <= 0.0 {
            return 0.0;
        }
        let age = now.ns().saturating_sub(self.other_at_ns.load(Relaxed)) as f64;
        other * (1.0 - age / self.common.report_max_age_ns).max(0.0)
    }

    /// Outstanding requests plus other clients' reported load, aged.
    pub(crate) fn load(&self, now: &LazyNow<'_>) -> f64 {
        f64::from(self.outstanding()) + self.reported_load(now)
    }

    pub(crate) fn samples(&self) -> u64 {
        self.samples.load(Relaxed)
    }

    /// Records a load report: what the endpoint carries beyond our own
    /// outstanding requests counts, aged from when it was measured.
    pub(crate) fn apply_report(&self, report: &LoadReport) {
        let other = if report.load.is_finite() {
            (report.load - f64::from(self.outstanding())).max(0.0)
        } else {
            0.0
        };
        self.other_at_ns
            .store(self.common.ns_of(report.at), Relaxed);
        self.other_load.store(other.to_bits(), Relaxed);
    }

    /// Whether the endpoint is in a busy cooldown.
    pub(crate) fn is_busy(&self, now: &LazyNow<'_>) -> bool {
        let until = self.busy_until_ns.load(Relaxed);
        until != 0 && now.ns() < until
    }

    /// The concurrency allowed now: the key's capacity (else the
    /// configured one), lowered after a busy answer.
    pub(crate) fn cap(&self) -> u32 {
        let hard = self.key.0.capacity().unwrap_or(self.common.hard_cap);
        hard.min(self.soft_cap.load(Relaxed))
    }

    /// The peak-EWMA estimate in ns, decayed to `now_ns` (the fleet's until
    /// the endpoint's first response), raised to the mean age of the
    /// requests in flight there: a node that stops answering looks slower
    /// with every millisecond its requests wait, long before the first one
    /// times out or a slow answer arrives.
    pub(crate) fn latency_ns(&self, now_ns: u64) -> f64 {
        let estimate = if self.samples.load(Relaxed) == 0 {
            self.common.fleet_ns(now_ns)
        } else {
            let estimate = f64::from_bits(self.ewma_ns.load(Relaxed));
            let elapsed = now_ns.saturating_sub(self.stamp_ns.load(Relaxed));
            if elapsed == 0 {
                estimate
            } else {
                estimate * (-(elapsed as f64) / self.common.decay_ns).exp()
            }
        };
        estimate.max(self.in_flight_age_ns(now_ns))
    }

    /// The mean age of the requests in flight here (0 when none).
    pub(crate) fn in_flight_age_ns(&self, now_ns: u64) -> f64 {
        let timed = self.timed.load(Relaxed);
        if timed == 0 {
            return 0.0;
        }
        let mean_sent = self.sent_sum_ns.load(Relaxed) / timed;
        now_ns.saturating_sub(mean_sent) as f64
    }

    /// Dispatches here over the last second or so (decayed).
    pub(crate) fn recent_dispatches(&self, now_ns: u64) -> f64 {
        self.recent.get(now_ns)
    }

    fn sent(&self, sent_ns: u64) {
        self.sent_sum_ns.fetch_add(sent_ns, Relaxed);
        self.timed.fetch_add(1, Relaxed);
        self.recent.add(sent_ns);
        self.common.recent.add(sent_ns);
    }

    /// Takes a slot if the endpoint is under its cap.
    pub(crate) fn try_acquire(&self) -> bool {
        let cap = self.cap();
        if cap == u32::MAX {
            self.outstanding.fetch_add(1, Relaxed);
        } else if self
            .outstanding
            .fetch_update(Relaxed, Relaxed, |n| (n < cap).then_some(n + 1))
            .is_err()
        {
            return false;
        }
        self.dispatched.fetch_add(1, Relaxed);
        self.metrics.outstanding.increment(1.0);
        true
    }

    /// Folds one latency sample into the peak-EWMA estimate (Finagle's
    /// peak rule: a sample above the decayed estimate replaces it; a lower
    /// one is blended in, keeping at most `1 - 1/decay_samples` of the old
    /// estimate and less the longer it has been since the last sample; the
    /// first sample replaces the fleet's estimate the endpoint started
    /// from).
    fn observe(&self, rtt_ns: f64, now_ns: u64) {
        let samples = self.samples.load(Relaxed);
        let stamp = self.stamp_ns.swap(now_ns, Relaxed);
        let elapsed = now_ns.saturating_sub(stamp);
        let by_time = (-(elapsed as f64) / self.common.decay_ns).exp();
        let keep = self.common.keep(elapsed, samples);
        let _ = self.ewma_ns.fetch_update(Relaxed, Relaxed, |bits| {
            let old = f64::from_bits(bits);
            let next = if samples == 0 || old * by_time < rtt_ns {
                rtt_ns
            } else {
                old * keep + rtt_ns * (1.0 - keep)
            };
            Some(next.to_bits())
        });
        self.samples.fetch_add(1, Relaxed);
    }

    /// Reports a timeout the balancer imposed to the endpoint's key (so the
    /// health checker that published it sees it).
    pub(crate) fn report_timeout(&self) {
        self.key.0.report(Outcome::failure(FailureKind::Timeout));
    }

    pub(crate) fn report_transport_failure(&self) {
        self.key.0.report(Outcome::failure(FailureKind::Transport));
    }

    fn complete(&self, sent_ns: u64, answered: Answered, outcome: Recorded) {
        let now_ns = self.common.ns_of(Instant::now());
        // A streamed answer is timed to its first byte, not its end; a
        // stall between two of its chunks that lasted longer counts instead.
        let first_byte = answered.first_ns.unwrap_or(now_ns).saturating_sub(sent_ns);
        let rtt = first_byte.max(answered.longest_gap_ns) as f64;
        self.sent_sum_ns.fetch_sub(sent_ns, Relaxed);
        self.timed.fetch_sub(1, Relaxed);
        let before = self.outstanding.fetch_sub(1, Relaxed);
        self.metrics.outstanding.decrement(1.0);
        match outcome {
            Recorded::Success => {
                self.observe(rtt, now_ns);
                self.common.observe_fleet(rtt, now_ns);
                self.succeeded.fetch_add(1, Relaxed);
                self.metrics.succeeded.increment(1);
                let soft = self.soft_cap.load(Relaxed);
                if soft != u32::MAX {
                    let level = self.busy_level.load(Relaxed);
                    let next = if soft + 1 >= level {
                        u32::MAX
                    } else {
                        soft + 1
                    };
                    self.soft_cap.store(next, Relaxed);
                }
            }
            Recorded::Failure => {
                self.observe(rtt.max(self.common.failure_floor_ns(now_ns)), now_ns);
                self.failed.fetch_add(1, Relaxed);
                self.metrics.failed.increment(1);
            }
            Recorded::TimedOut => {
                self.observe(rtt.max(self.common.failure_floor_ns(now_ns)), now_ns);
                self.timed_out.fetch_add(1, Relaxed);
                self.metrics.timed_out.increment(1);
            }
            Recorded::Busy(cooldown) => {
                let until = now_ns.saturating_add(cooldown.as_nanos() as u64).max(1);
                self.busy_until_ns.fetch_max(until, Relaxed);
                self.soft_cap.store((before / 2).max(1), Relaxed);
                self.busy_level.store(before.max(1), Relaxed);
                self.busy.fetch_add(1, Relaxed);
                self.metrics.busy.increment(1);
            }
            Recorded::Cancelled => {
                // Elapsed time is a lower bound of the latency: let it raise
                // the estimate, never lower it.
                if rtt > self.latency_ns(now_ns) {
                    self.observe(rtt, now_ns);
                }
                self.cancelled.fetch_add(1, Relaxed);
                self.metrics.cancelled.increment(1);
            }
        }
        self.common.slot_freed();
    }

    pub(crate) fn snapshot<K>(&self, key: K) -> EndpointSnapshot<K> {
        let now = LazyNow::new(&self.common);
        let now_ns = now.ns();
        let cap = self.cap();
        EndpointSnapshot {
            key,
            index: self.id,
            outstanding: self.outstanding(),
            capacity: (cap != u32::MAX).then_some(cap),
            weight: self.weight(),
            latency_estimate: Duration::from_nanos(self.latency_ns(now_ns) as u64),
            samples: self.samples(),
            busy: self.is_busy(&now),
            dispatched: self.dispatched.load(Relaxed),
            succeeded: self.succeeded.load(Relaxed),
            failed: self.failed.load(Relaxed),
            busy_responses: self.busy.load(Relaxed),
            timed_out: self.timed_out.load(Relaxed),
            cancelled: self.cancelled.load(Relaxed),
        }
    }
}

/// How an attempt ended, as far as its endpoint's statistics go.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Recorded {
    Success,
    Failure,
    TimedOut,
    Busy(Duration),
    Cancelled,
}

/// The slot an in-flight request holds on its endpoint.
///
/// Dropping it frees the slot and records the attempt's latency and outcome.
/// The balancer hands it to the
/// [`TrackCompletion`](tower::load::TrackCompletion) it was built with: with
/// the default [`CompleteOnResponse`](tower::load::CompleteOnResponse) it is
/// dropped when the response arrives; a streaming response can carry it in
/// its body so the slot stays taken until the stream ends.
///
/// Dropped unfinished once the request's deadline has passed (the balancer's
/// own deadline timer, or an outer layer that gave up at the deadline), it
/// reports a [`FailureKind::Timeout`] to the endpoint's key, as an attempt
/// timeout does: once per attempt.
pub struct Handle {
    state: Arc<EndpointState>,
    sent_ns: u64,
    answered: Answered,
    deadline: Option<Instant>,
    outcome: Recorded,
    /// What prefix affinity claimed the endpoint had cached of the prompt
    /// (leading blocks, prompt blocks), until the answer reports it.
    prefix_claim: Option<(usize, usize)>,
}

/// When an answer started and how long it stalled at most afterwards.
#[derive(Clone, Copy, Debug, Default)]
struct Answered {
    /// The first byte (`mark_answered` / first `mark_progress`).
    first_ns: Option<u64>,
    /// The latest `mark_progress`.
    last_ns: u64,
    /// The longest wait between two `mark_progress` calls.
    longest_gap_ns: u64,
}

impl Handle {
    pub(crate) fn new(state: Arc<EndpointState>, sent_ns: u64, deadline: Option<Instant>) -> Self {
        state.sent(sent_ns);
        Handle {
            state,
            sent_ns,
            answered: Answered::default(),
            deadline,
            outcome: Recorded::Cancelled,
            prefix_claim: None,
        }
    }

    pub(crate) fn with_prefix_claim(mut self, claim: Option<(usize, usize)>) -> Self {
        self.prefix_claim = claim;
        self
    }

    /// Tells the balancer how many leading blocks of the prompt the
    /// endpoint had in its prefix (KV) cache when it served this request
    /// (blocks of [`PrefixConfig::block_bytes`](crate::PrefixConfig::block_bytes);
    /// an OpenAI-compatible server reports tokens, as
    /// `usage.prompt_tokens_details.cached_tokens`:
    /// [`PrefixConfig::blocks_of_tokens`](crate::PrefixConfig::blocks_of_tokens)
    /// converts them). With [`Policy::PrefixAffinity`](crate::Policy::PrefixAffinity),
    /// the endpoint's prefix index learns from it how much the node keeps:
    /// more than one block less than the index claimed means the node
    /// evicted what the index remembers, and the endpoint's index halves;
    /// about as much grows it back by half the prompt's length. Without reports the index keeps
    /// [`PrefixConfig::index_blocks`](crate::PrefixConfig::index_blocks).
    /// Only the first call counts; with another policy it does nothing.
    /// [`ReportCachedPrefix`](crate::ReportCachedPrefix) calls it for
    /// every response.
    pub fn report_cached_prefix(&mut self, cached_blocks: usize) {
        if let Some((claimed, len)) = self.prefix_claim.take()
            && let Some(index) = self.state.prefix.get()
        {
            index.lock().learn(claimed, len, cached_blocks);
        }
    }

    /// The answer broke after it started (a stream cut mid-way): the
    /// attempt counts as a failure of the endpoint — in its latency
    /// estimate and, through its key's reporter, in its health — although
    /// the response head had arrived. Called once by a body carrying the
    /// handle when it fails; later calls change nothing.
    pub fn mark_failed(&mut self) {
        if self.outcome != Recorded::Failure {
            self.outcome = Recorded::Failure;
            self.state.report_transport_failure();
        }
    }

    /// Marks now as when the endpoint answered: the latency the endpoint is
    /// judged by (its peak-EWMA sample) ends here, while the slot stays
    /// taken until the handle is dropped. A body carrying the handle calls
    /// it at its first byte, so a streamed answer is timed to its first
    /// token, not to its length. Later calls change nothing.
    pub fn mark_answered(&mut self) {
        if self.answered.first_ns.is_none() {
            let now_ns = self.state.common().ns_of(Instant::now());
            self.answered.first_ns = Some(now_ns);
            self.answered.last_ns = now_ns;
        }
    }

    /// Marks that the answer moved on (a streamed chunk, e.g. a token
    /// arrived). The first call marks the first byte, as
    /// [`mark_answered`](Self::mark_answered) does; after that the longest
    /// gap between two calls is kept, and where it is longer than the time
    /// to the first byte it becomes the endpoint's latency sample instead:
    /// a stream that stalls mid-way (slow inter-token latency) raises the
    /// endpoint's peak-EWMA estimate like a slow first token would. A body
    /// carrying the handle calls it at every data frame.
    pub fn mark_progress(&mut self) {
        let now_ns = self.state.common().ns_of(Instant::now());
        match self.answered.first_ns {
            None => {
                self.answered.first_ns = Some(now_ns);
                self.answered.last_ns = now_ns;
            }
            Some(_) => {
                let gap = now_ns.saturating_sub(self.answered.last_ns);
                self.answered.longest_gap_ns = self.answered.longest_gap_ns.max(gap);
                self.answered.last_ns = now_ns;
            }
        }
    }

    /// The endpoint this handle holds a slot on.
    pub fn endpoint(&self) -> EndpointIndex {
        self.state.id
    }

    pub(crate) fn common(&self) -> &Common {
        self.state.common()
    }

    pub(crate) fn set_outcome(&mut self, outcome: Recorded) {
        self.outcome = outcome;
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("endpoint", &self.state.id)
            .field("outcome", &self.outcome)
            .finish()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let timed_out = match self.outcome {
            Recorded::TimedOut => true,
            Recorded::Cancelled => self.deadline.is_some_and(|d| Instant::now() >= d),
            Recorded::Success | Recorded::Failure | Recorded::Busy(_) => false,
        };
        if timed_out {
            self.state.report_timeout();
        }
        self.state
            .complete(self.sent_ns, self.answered, self.outcome);
    }
}

fn clamp_weight(weight: f64) -> f64 {
    if weight.is_nan() {
        1.0
    } else {
        weight.clamp(0.0, 1.0)
    }
}

pub(crate) fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(config: &BalancerConfig, key: keel_core::EndpointId) -> EndpointState {
        let common = Arc::new(Common::new(config));
        EndpointState::new(EndpointIndex::new(0), "e0".into(), Arc::new(key), common)
    }

    fn state(config: &BalancerConfig) -> EndpointState {
        keyed(config, keel_core::EndpointId::new("e0"))
    }

    /// One request that takes `rtt` and ends `outcome`.
    async fn sample(e: &Arc<EndpointState>, rtt: Duration, outcome: Recorded) {
        assert!(e.try_acquire());
        let sent = e.common.ns_of(Instant::now());
        tokio::time::advance(rtt).await;
        let mut h = Handle::new(e.clone(), sent, None);
        h.set_outcome(outcome);
    }

    fn ms(e: &EndpointState) -> f64 {
        e.latency_ns(e.common.ns_of(Instant::now())) / 1e6
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_cut_mid_way_is_reported_once() {
        use std::sync::atomic::AtomicUsize;
        let config = BalancerConfig::default();
        let key = keel_core::EndpointId::new("e0");
        let reports = Arc::new(AtomicUsize::new(0));
        let seen = reports.clone();
        key.set_reporter(Arc::new(
            move |_: &keel_core::EndpointId, outcome: Outcome| {
                assert_eq!(outcome, Outcome::failure(FailureKind::Transport));
                seen.fetch_add(1, Relaxed);
            },
        ));
        let e = Arc::new(keyed(&config, key));
        assert!(e.try_acquire());
        let mut h = Handle::new(e.clone(), e.common.ns_of(Instant::now()), None);
        h.set_outcome(Recorded::Success);
        h.mark_failed();
        h.mark_failed();
        drop(h);
        assert_eq!(reports.load(Relaxed), 1);
        assert_eq!(e.outstanding(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_answer_is_timed_to_its_first_byte() {
        let config = BalancerConfig::default();
        let e = Arc::new(state(&config));
        assert!(e.try_acquire());
        let sent = e.common.ns_of(Instant::now());
        let mut h = Handle::new(e.clone(), sent, None);
        tokio::time::advance(Duration::from_millis(40)).await;
        h.mark_answered();
        // The stream runs on for 5 s; the slot stays taken meanwhile.
        tokio::time::advance(Duration::from_secs(5)).await;
        h.mark_answered();
        assert_eq!(e.outstanding(), 1);
        h.set_outcome(Recorded::Success);
        drop(h);
        assert_eq!(e.outstanding(), 0);
        assert!((ms(&e) - 40.0).abs() < 1e-6, "estimate {} ms", ms(&e));
    }

    /// A stream: `first` to its first chunk, then one chunk after each gap.
    async fn streamed(e: &Arc<EndpointState>, first: Duration, gaps: &[Duration]) {
        assert!(e.try_acquire());
        let mut h = Handle::new(e.clone(), e.common.ns_of(Instant::now()), None);
        tokio::time::advance(first).await;
        h.mark_progress();
        for gap in gaps {
            tokio::time::advance(*gap).await;
            h.mark_progress();
        }
        h.set_outcome(Recorded::Success);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_is_judged_by_its_first_chunk_or_its_longest_stall() {
        let config = BalancerConfig::default();
        let ms_ = Duration::from_millis;
        // Steady tokens every 20 ms after a 40 ms first chunk: 40 ms.
        let steady = Arc::new(state(&config));
        streamed(&steady, ms_(40), &[ms_(20); 50]).await;
        assert!(
            (ms(&steady) - 40.0).abs() < 1e-6,
            "estimate {} ms",
            ms(&steady)
        );
        // Same first chunk, then a 900 ms stall between two tokens: the
        // stall is the sample (slow inter-token latency is seen).
        let stalling = Arc::new(state(&config));
        streamed(&stalling, ms_(40), &[ms_(20), ms_(900), ms_(20)]).await;
        assert!(
            (ms(&stalling) - 900.0).abs() < 1e-6,
            "estimate {} ms",
            ms(&stalling)
        );
        assert_eq!(stalling.outstanding(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn peak_replaces_and_lower_samples_decay_in() {
        let config = BalancerConfig::default().decay(Duration::from_secs(10));
        let e = Arc::new(state(&config));
        assert_eq!(ms(&e), 1000.0, "default_rtt before anything answered");
        sample(&e, Duration::from_secs(3), Recorded::Success).await;
        // The first sample replaces the starting estimate.
        assert!((ms(&e) - 3000.0).abs() < 1e-6);
        assert_eq!(e.outstanding(), 0);
        // Ten seconds later the estimate decayed by e^-1.
        tokio::time::advance(Duration::from_secs(10)).await;
        let expected = 3000.0 * (-1f64).exp();
        assert!((ms(&e) - expected).abs() / expected < 1e-9);
        // A peak replaces the estimate at once.
        sample(&e, Duration::from_secs(5), Recorded::Success).await;
        assert!((ms(&e) - 5000.0).abs() < 1e-6);
    }

    #[tokio::test(start_paused = true)]
    async fn the_estimate_follows_a_faster_node_within_a_few_dozen_samples() {
        // The trap: with a 1 s start and a 10 s time-only decay, a 35 ms
        // node was still estimated at 368 ms after 10 s of traffic.
        let e = Arc::new(state(&BalancerConfig::default()));
        sample(&e, Duration::from_millis(35), Recorded::Success).await;
        assert!(
            (ms(&e) - 35.0).abs() < 1e-6,
            "the first response replaces the 1 s start"
        );
        // A node that was slow and got fast: 90 % of the way in 22
        // responses, within 10 % of its new latency in 52 (decay_samples 10).
        for _ in 0..3 {
            sample(&e, Duration::from_millis(800), Recorded::Success).await;
        }
        assert!((ms(&e) - 800.0).abs() < 1e-6, "the peak");
        let mut samples = 0;
        let mut most_of_the_way = None;
        while ms(&e) > 38.5 {
            sample(&e, Duration::from_millis(35), Recorded::Success).await;
            samples += 1;
            if most_of_the_way.is_none() && ms(&e) < 35.0 + 76.5 {
                most_of_the_way = Some(samples);
            }
        }
        assert!(most_of_the_way.unwrap() <= 22, "{most_of_the_way:?}");
        assert!(samples <= 52, "{samples} samples to converge");
    }

    /// A hung node answers nothing, so no sample can raise its estimate:
    /// the age of what it holds in flight does, at once.
    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_count_as_latency_before_they_answer() {
        let e = Arc::new(state(&BalancerConfig::default()));
        sample(&e, Duration::from_millis(50), Recorded::Success).await;
        assert!((ms(&e) - 50.0).abs() < 1.0);
        let sent = e.common.ns_of(Instant::now());
        let hung: Vec<_> = (0..4)
            .map(|_| {
                assert!(e.try_acquire());
                Handle::new(e.clone(), sent, None)
            })
            .collect();
        tokio::time::advance(Duration::from_millis(30)).await;
        assert!(ms(&e) < 51.0, "younger than the estimate: no change");
        tokio::time::advance(Duration::from_millis(270)).await;
        assert!((ms(&e) - 300.0).abs() < 1.0, "{} ms", ms(&e));
        drop(hung);
        // Cancelled after 300 ms: the peak holds, the in-flight term is gone.
        assert!((ms(&e) - 300.0).abs() < 1.0, "{} ms", ms(&e));
        assert_eq!(e.in_flight_age_ns(e.common.ns_of(Instant::now())), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_starts_from_the_fleet_and_failures_fit_the_fleet() {
        let config = BalancerConfig::default();
        let e = Arc::new(state(&config));
        for _ in 0..30 {
            sample(&e, Duration::from_secs(4), Recorded::Success).await;
        }
        let fresh = EndpointState::new(
            EndpointIndex::new(1),
            "e1".into(),
            Arc::new(7usize),
            e.common.clone(),
        );
        assert_eq!(fresh.samples(), 0);
        assert!((ms(&fresh) - 4000.0).abs() < 1e-3, "{}", ms(&fresh));
        // A fast failure on a fleet of 4 s nodes is recorded as at least
        // twice the fleet's estimate, not as the 1 s `default_rtt`.
        let fresh = Arc::new(fresh);
        sample(&fresh, Duration::from_millis(2), Recorded::Failure).await;
        assert!(ms(&fresh) >= 7990.0, "{}", ms(&fresh));
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_the_balancer_imposed_are_reported_to_the_key_once() {
        use std::sync::atomic::AtomicUsize;
        let key = keel_core::EndpointId::new("e0");
        let reports = Arc::new(AtomicUsize::new(0));
        let counter = reports.clone();
        key.set_reporter(Arc::new(move |_: &keel_core::EndpointId, outcome| {
            assert_eq!(outcome, Outcome::failure(FailureKind::Timeout));
            counter.fetch_add(1, Relaxed);
        }));
        let e = Arc::new(keyed(&BalancerConfig::default(), key));
        sample(&e, Duration::from_millis(5), Recorded::TimedOut).await;
        assert_eq!(reports.load(Relaxed), 1);
        sample(&e, Duration::from_millis(5), Recorded::Failure).await;
        sample(&e, Duration::from_millis(5), Recorded::Cancelled).await;
        assert_eq!(reports.load(Relaxed), 1, "a plain cancel is not a timeout");
        // Dropped unfinished past the request's deadline: a timeout.
        assert!(e.try_acquire());
        let h = Handle::new(e.clone(), 0, Some(Instant::now()));
        drop(h);
        assert_eq!(reports.load(Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn busy_lowers_the_cap_and_successes_restore_it() {
        let e = Arc::new(state(&BalancerConfig::default()));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                assert!(e.try_acquire());
                Handle::new(e.clone(), 0, None)
            })
            .collect();
        let mut handles = handles.into_iter();
        let mut busy = handles.next().unwrap();
        busy.set_outcome(Recorded::Busy(Duration::from_secs(1)));
        drop(busy);
        let now = LazyNow::new(&e.common);
        assert!(e.is_busy(&now));
        assert_eq!(e.cap(), 4, "halved from the 8 outstanding");
        assert_eq!(e.snapshot("k").failed, 0, "busy is never a failure");
        for mut h in handles {
            h.set_outcome(Recorded::Success);
        }
        assert_eq!(e.cap(), u32::MAX, "back to the level it answered busy at");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!e.is_busy(&LazyNow::new(&e.common)));
    }

    #[tokio::test(start_paused = true)]
    async fn reported_load_adds_to_ours_and_ages_out() {
        let config = BalancerConfig::default().load_report_max_age(Duration::from_secs(4));
        let e = state(&config);
        assert!(e.try_acquire());
        e.apply_report(&LoadReport::now(5.0));
        assert_eq!(e.load(&LazyNow::new(&e.common)), 5.0, "1 ours + 4 others");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(e.load(&LazyNow::new(&e.common)), 3.0, "others aged by half");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            e.load(&LazyNow::new(&e.common)),
            1.0,
            "stale report ignored"
        );
        // A stale "idle" never hides our own outstanding requests.
        e.apply_report(&LoadReport::now(0.0));
        assert_eq!(e.load(&LazyNow::new(&e.common)), 1.0);
    }

    #[test]
    fn weight_and_capacity_come_from_the_key() {
        let key = keel_core::EndpointId::new("e0");
        let config = BalancerConfig::default().max_outstanding_per_endpoint(8);
        let e = keyed(&config, key.clone());
        assert_eq!((e.weight(), e.cap()), (1.0, 8), "the config's capacity");
        key.set_weight(0.25);
        key.set_capacity(Some(2));
        assert_eq!((e.weight(), e.cap()), (0.25, 2), "read live");
        assert!(e.try_acquire() && e.try_acquire());
        assert!(!e.try_acquire(), "at the key's capacity");
        struct Odd;
        impl EndpointKey for Odd {
            fn weight(&self) -> f64 {
                f64::NAN
            }
        }
        let odd = EndpointState::new(
            EndpointIndex::new(1),
            "odd".into(),
            Arc::new(Odd),
            e.common.clone(),
        );
        assert_eq!(odd.weight(), 1.0, "NaN is taken as 1");
    }
}
