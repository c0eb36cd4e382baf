//! Per-endpoint state kept in atomics: outstanding requests, the peak-EWMA
//! latency estimate, weight, busy cooldown, reported load.
//!
//! The hot path reads these without locks. The clock is read once when a
//! request is dispatched (its timestamp doubles as "now" for the latency
//! decay of both candidates) and once when it completes.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::Wake;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::BalancerConfig;
use crate::metrics::{BalancerMetrics, EndpointMetrics};
use crate::policy::PrefixIndex;

/// The balancer's id for one endpoint it routes to.
///
/// Ids are assigned when discovery inserts an endpoint and never reused by
/// that balancer; replacing a key's service gives it a new id. Errors from an
/// endpoint carry its id ([`Error::endpoint`](crate::Error::endpoint)), and
/// [`Balancer::endpoints`](crate::Balancer::endpoints) maps ids to keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointId(u64);

impl EndpointId {
    /// The id with this number.
    pub const fn new(n: u64) -> Self {
        EndpointId(n)
    }

    /// The id's number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for EndpointId {
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
    /// The balancer's id for it.
    pub id: EndpointId,
    /// Requests dispatched to it and not finished.
    pub outstanding: u32,
    /// The weight in force (1.0 unless a weights channel says otherwise).
    pub weight: f64,
    /// The current peak-EWMA latency estimate.
    pub latency_estimate: Duration,
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
    default_rtt_ns: f64,
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
}

impl Common {
    pub(crate) fn new(config: &BalancerConfig) -> Self {
        Common {
            epoch: Instant::now(),
            decay_ns: nanos(config.decay),
            default_rtt_ns: nanos(config.default_rtt),
            busy_cooldown: config.busy_cooldown,
            report_max_age_ns: nanos(config.load_report_max_age),
            hard_cap: config.max_outstanding_per_endpoint.unwrap_or(u32::MAX),
            waiters: AtomicUsize::new(0),
            notify: Notify::new(),
            dirty: AtomicBool::new(true),
            metrics: BalancerMetrics::new(&config.name),
        }
    }

    /// Nanoseconds since this balancer was built.
    pub(crate) fn ns_of(&self, instant: Instant) -> u64 {
        instant.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    pub(crate) fn busy_cooldown(&self) -> Duration {
        self.busy_cooldown
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
    now: Option<Instant>,
}

impl<'a> LazyNow<'a> {
    pub(crate) fn new(common: &'a Common) -> Self {
        LazyNow { common, now: None }
    }

    pub(crate) fn instant(&mut self) -> Instant {
        *self.now.get_or_insert_with(Instant::now)
    }

    pub(crate) fn ns(&mut self) -> u64 {
        let now = self.instant();
        self.common.ns_of(now)
    }
}

/// One endpoint's live state.
#[derive(Debug)]
pub(crate) struct EndpointState {
    pub(crate) id: EndpointId,
    common: Arc<Common>,
    outstanding: AtomicU32,
    /// f64 bits: the peak-EWMA estimate in ns, as of `stamp_ns`.
    ewma_ns: AtomicU64,
    stamp_ns: AtomicU64,
    /// f64 bits in [0, 1].
    weight: AtomicU64,
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
    metrics: EndpointMetrics,
    pub(crate) prefix: Option<Mutex<PrefixIndex>>,
}

impl EndpointState {
    pub(crate) fn new(
        id: EndpointId,
        label: String,
        weight: f64,
        common: Arc<Common>,
        prefix_blocks: Option<usize>,
    ) -> Self {
        let now = common.ns_of(Instant::now());
        EndpointState {
            id,
            outstanding: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(common.default_rtt_ns.to_bits()),
            stamp_ns: AtomicU64::new(now),
            weight: AtomicU64::new(clamp_weight(weight).to_bits()),
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
            metrics: EndpointMetrics::new(&common.metrics.name, label),
            prefix: prefix_blocks.map(|blocks| Mutex::new(PrefixIndex::new(blocks))),
            common,
        }
    }

    pub(crate) fn common(&self) -> &Common {
        &self.common
    }

    pub(crate) fn outstanding(&self) -> u32 {
        self.outstanding.load(Relaxed)
    }

    pub(crate) fn weight(&self) -> f64 {
        f64::from_bits(self.weight.load(Relaxed))
    }

    pub(crate) fn set_weight(&self, weight: f64) {
        self.weight.store(clamp_weight(weight).to_bits(), Relaxed);
    }

    /// Outstanding requests plus other clients' reported load, aged.
    pub(crate) fn load(&self, now: &mut LazyNow<'_>) -> f64 {
        let own = f64::from(self.outstanding());
        let other = f64::from_bits(self.other_load.load(Relaxed));
        if other <= 0.0 {
            return own;
        }
        let age = now.ns().saturating_sub(self.other_at_ns.load(Relaxed)) as f64;
        own + other * (1.0 - age / self.common.report_max_age_ns).max(0.0)
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
    pub(crate) fn is_busy(&self, now: &mut LazyNow<'_>) -> bool {
        let until = self.busy_until_ns.load(Relaxed);
        until != 0 && now.ns() < until
    }

    /// The concurrency allowed now: the configured capacity, lowered after a
    /// busy answer.
    pub(crate) fn cap(&self) -> u32 {
        self.common.hard_cap.min(self.soft_cap.load(Relaxed))
    }

    /// The peak-EWMA estimate in ns, decayed to `now_ns`.
    pub(crate) fn latency_ns(&self, now_ns: u64) -> f64 {
        let estimate = f64::from_bits(self.ewma_ns.load(Relaxed));
        let elapsed = now_ns.saturating_sub(self.stamp_ns.load(Relaxed));
        if elapsed == 0 {
            estimate
        } else {
            estimate * (-(elapsed as f64) / self.common.decay_ns).exp()
        }
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
    /// formula: a sample above the decayed estimate replaces it; a lower one
    /// is blended in by the time elapsed since the last sample).
    fn observe(&self, rtt_ns: f64, now_ns: u64) {
        let stamp = self.stamp_ns.swap(now_ns, Relaxed);
        let decay = (-(now_ns.saturating_sub(stamp) as f64) / self.common.decay_ns).exp();
        let _ = self.ewma_ns.fetch_update(Relaxed, Relaxed, |bits| {
            let decayed = f64::from_bits(bits) * decay;
            let next = if decayed < rtt_ns {
                rtt_ns
            } else {
                decayed + rtt_ns * (1.0 - decay)
            };
            Some(next.to_bits())
        });
    }

    fn complete(&self, sent_ns: u64, outcome: Recorded) {
        let now_ns = self.common.ns_of(Instant::now());
        let rtt = now_ns.saturating_sub(sent_ns) as f64;
        let before = self.outstanding.fetch_sub(1, Relaxed);
        self.metrics.outstanding.decrement(1.0);
        match outcome {
            Recorded::Success => {
                self.observe(rtt, now_ns);
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
                self.observe(rtt.max(self.common.default_rtt_ns), now_ns);
                self.failed.fetch_add(1, Relaxed);
                self.metrics.failed.increment(1);
            }
            Recorded::TimedOut => {
                self.observe(rtt.max(self.common.default_rtt_ns), now_ns);
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
        let mut now = LazyNow::new(&self.common);
        let now_ns = now.ns();
        EndpointSnapshot {
            key,
            id: self.id,
            outstanding: self.outstanding(),
            weight: self.weight(),
            latency_estimate: Duration::from_nanos(self.latency_ns(now_ns) as u64),
            busy: self.is_busy(&mut now),
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
pub struct Handle {
    state: Arc<EndpointState>,
    sent_ns: u64,
    outcome: Recorded,
}

impl Handle {
    pub(crate) fn new(state: Arc<EndpointState>, sent_ns: u64) -> Self {
        Handle {
            state,
            sent_ns,
            outcome: Recorded::Cancelled,
        }
    }

    /// The endpoint this handle holds a slot on.
    pub fn endpoint(&self) -> EndpointId {
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
        self.state.complete(self.sent_ns, self.outcome);
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

    fn state(config: &BalancerConfig) -> EndpointState {
        let common = Arc::new(Common::new(config));
        EndpointState::new(EndpointId::new(0), "e0".into(), 1.0, common, None)
    }

    #[tokio::test(start_paused = true)]
    async fn peak_replaces_and_lower_samples_decay_in() {
        let config = BalancerConfig::default().decay(Duration::from_secs(10));
        let e = Arc::new(state(&config));
        let ms = 1e6;
        assert!(e.try_acquire());
        let sent = e.common.ns_of(Instant::now());
        tokio::time::advance(Duration::from_secs(3)).await;
        let mut h = Handle::new(e.clone(), sent);
        h.set_outcome(Recorded::Success);
        drop(h);
        let now = e.common.ns_of(Instant::now());
        // 3 s is above the decayed 1 s default: it becomes the estimate.
        assert!((e.latency_ns(now) - 3000.0 * ms).abs() < 1.0);
        assert_eq!(e.outstanding(), 0);
        // Ten seconds later the estimate decayed by e^-1.
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = e.common.ns_of(Instant::now());
        let expected = 3000.0 * ms * (-1f64).exp();
        assert!((e.latency_ns(now) - expected).abs() / expected < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn busy_lowers_the_cap_and_successes_restore_it() {
        let e = Arc::new(state(&BalancerConfig::default()));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                assert!(e.try_acquire());
                Handle::new(e.clone(), 0)
            })
            .collect();
        let mut handles = handles.into_iter();
        let mut busy = handles.next().unwrap();
        busy.set_outcome(Recorded::Busy(Duration::from_secs(1)));
        drop(busy);
        let mut now = LazyNow::new(&e.common);
        assert!(e.is_busy(&mut now));
        assert_eq!(e.cap(), 4, "halved from the 8 outstanding");
        assert_eq!(e.snapshot("k").failed, 0, "busy is never a failure");
        for mut h in handles {
            h.set_outcome(Recorded::Success);
        }
        assert_eq!(e.cap(), u32::MAX, "back to the level it answered busy at");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!e.is_busy(&mut LazyNow::new(&e.common)));
    }

    #[tokio::test(start_paused = true)]
    async fn reported_load_adds_to_ours_and_ages_out() {
        let config = BalancerConfig::default().load_report_max_age(Duration::from_secs(4));
        let e = state(&config);
        assert!(e.try_acquire());
        e.apply_report(&LoadReport::now(5.0));
        assert_eq!(
            e.load(&mut LazyNow::new(&e.common)),
            5.0,
            "1 ours + 4 others"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            e.load(&mut LazyNow::new(&e.common)),
            3.0,
            "others aged by half"
        );
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            e.load(&mut LazyNow::new(&e.common)),
            1.0,
            "stale report ignored"
        );
        // A stale "idle" never hides our own outstanding requests.
        e.apply_report(&LoadReport::now(0.0));
        assert_eq!(e.load(&mut LazyNow::new(&e.common)), 1.0);
    }

    #[test]
    fn weights_are_clamped() {
        let e = state(&BalancerConfig::default());
        e.set_weight(3.0);
        assert_eq!(e.weight(), 1.0);
        e.set_weight(-1.0);
        assert_eq!(e.weight(), 0.0);
        e.set_weight(f64::NAN);
        assert_eq!(e.weight(), 1.0);
    }
}
