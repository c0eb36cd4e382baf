//! The request path's side of passive outlier detection: per-endpoint
//! atomic counters, written without any lock.

use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed,
};
use std::sync::{Arc, Weak};
use std::time::Duration;

use keel_core::{EndpointId, FailureKind, Outcome};

use crate::registry::Shared;

/// The sliding window's current bucket, advanced by the registry's driver
/// task and shared by every endpoint, so recording an outcome reads no clock.
#[derive(Debug)]
pub(crate) struct WindowClock {
    current: AtomicUsize,
    /// Buckets in the ring: the configured buckets plus one being retired.
    pub(crate) len: usize,
}

impl WindowClock {
    pub(crate) fn new(buckets: u32) -> Self {
        WindowClock {
            current: AtomicUsize::new(0),
            len: buckets as usize + 1,
        }
    }

    pub(crate) fn current(&self) -> usize {
        self.current.load(Relaxed)
    }

    pub(crate) fn set(&self, index: usize) {
        self.current.store(index, Relaxed);
    }
}

/// One bucket of one endpoint's window, on its own cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct Bucket {
    success: AtomicU64,
    failure: AtomicU64,
    latency_us: AtomicU64,
    /// Outcomes without a latency (reported through the endpoint's id).
    untimed: AtomicU64,
}

/// Totals over an endpoint's window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct WindowStats {
    pub(crate) success: u64,
    pub(crate) failure: u64,
    pub(crate) latency_us: u64,
    pub(crate) untimed: u64,
}

impl WindowStats {
    pub(crate) fn volume(&self) -> u64 {
        self.success + self.failure
    }

    /// The mean over the outcomes that carried a latency.
    pub(crate) fn mean_latency(&self) -> Option<Duration> {
        let timed = self.volume().saturating_sub(self.untimed);
        (timed > 0).then(|| Duration::from_micros(self.latency_us / timed))
    }
}

/// The hot counters of one endpoint incarnation.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) id: EndpointId,
    pub(crate) incarnation: u64,
    window: Arc<WindowClock>,
    buckets: Box<[Bucket]>,
    consecutive: AtomicU32,
    /// The last failure's kind, as `FailureKind::index` (`u8::MAX`: none yet).
    last_kind: AtomicU8,
    /// Set when this incarnation is removed from the registry.
    pub(crate) retired: AtomicBool,
    /// Micros since the registry's epoch until which the endpoint is busy; 0
    /// when it never was.
    pub(crate) busy_until_us: AtomicU64,
    /// Consecutive failures that eject (0: disabled).
    threshold: u32,
    shared: Weak<Shared>,
    pub(crate) busy_total: metrics::Counter,
}

impl Slot {
    pub(crate) fn new(
        id: EndpointId,
        incarnation: u64,
        window: Arc<WindowClock>,
        threshold: Option<u32>,
        shared: Weak<Shared>,
        busy_total: metrics::Counter,
    ) -> Self {
        let buckets = (0..window.len).map(|_| Bucket::default()).collect();
        Slot {
            id,
            incarnation,
            window,
            buckets,
            consecutive: AtomicU32::new(0),
            last_kind: AtomicU8::new(u8::MAX),
            retired: AtomicBool::new(false),
            busy_until_us: AtomicU64::new(0),
            threshold: threshold.unwrap_or(0),
            shared,
            busy_total,
        }
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(Relaxed)
    }

    pub(crate) fn last_failure_kind(&self) -> Option<FailureKind> {
        FailureKind::ALL
            .get(usize::from(self.last_kind.load(Relaxed)))
            .copied()
    }

    /// Zeroes the bucket at `index` (about to become current).
    pub(crate) fn clear_bucket(&self, index: usize) {
        let bucket = &self.buckets[index];
        bucket.success.store(0, Relaxed);
        bucket.failure.store(0, Relaxed);
        bucket.latency_us.store(0, Relaxed);
        bucket.untimed.store(0, Relaxed);
    }

    /// Forgets everything (after an ejection or a re-admission).
    pub(crate) fn reset(&self) {
        for index in 0..self.buckets.len() {
            self.clear_bucket(index);
        }
        self.consecutive.store(0, Relaxed);
    }

    /// Totals over the window: every bucket but the oldest (the one after
    /// the current bucket in the ring, to be cleared next).
    pub(crate) fn stats(&self) -> WindowStats {
        let retiring = (self.window.current() + 1) % self.window.len;
        let mut stats = WindowStats::default();
        for (index, bucket) in self.buckets.iter().enumerate() {
            if index == retiring && self.window.len > 1 {
                continue;
            }
            stats.success += bucket.success.load(Relaxed);
            stats.failure += bucket.failure.load(Relaxed);
            stats.latency_us += bucket.latency_us.load(Relaxed);
            stats.untimed += bucket.untimed.load(Relaxed);
        }
        stats
    }
}

/// Records request outcomes for one endpoint: the handle behind
/// [`OutlierLayer`](crate::OutlierLayer), for callers that observe outcomes
/// themselves.
///
/// Recording a success or failure is a handful of relaxed atomic operations
/// on the endpoint's own counters: no lock, no clock read, no allocation.
/// Only the rare transitions (the failure that completes an ejecting run,
/// the first busy answer of a cooldown) take the registry's lock.
///
/// A recorder outlives its endpoint harmlessly: after the endpoint is
/// removed its outcomes are ignored.
#[derive(Clone, Debug)]
pub struct Recorder {
    slot: Arc<Slot>,
}

impl Recorder {
    pub(crate) fn new(slot: Arc<Slot>) -> Self {
        Recorder { slot }
    }

    /// The endpoint this recorder feeds.
    pub fn endpoint(&self) -> &EndpointId {
        &self.slot.id
    }

    /// Records one request's outcome and latency.
    ///
    /// A [`Outcome::Failure`] counts toward ejection (its `retryable` flag
    /// does not matter here); [`Outcome::Busy`] dampens the endpoint's
    /// weight for the busy cooldown and never counts as a failure;
    /// [`Outcome::Cancelled`] records nothing.
    pub fn record(&self, outcome: Outcome, latency: Duration) {
        self.record_inner(outcome, Some(latency));
    }

    /// Records an outcome whose latency is not known (one the router
    /// reported through the endpoint's id, such as an attempt timeout): it
    /// counts like any other but leaves the latency mean alone.
    pub(crate) fn record_untimed(&self, outcome: Outcome) {
        self.record_inner(outcome, None);
    }

    fn record_inner(&self, outcome: Outcome, latency: Option<Duration>) {
        let slot = &*self.slot;
        let bucket = || {
            let bucket = &slot.buckets[slot.window.current()];
            match latency {
                Some(latency) => {
                    bucket.latency_us.fetch_add(micros(latency), Relaxed);
                }
                None => {
                    bucket.untimed.fetch_add(1, Relaxed);
                }
            }
            bucket
        };
        match outcome {
            Outcome::Success => {
                bucket().success.fetch_add(1, Relaxed);
                // Read first: a success on a clean endpoint writes nothing shared.
                if slot.consecutive.load(Relaxed) != 0 {
                    slot.consecutive.store(0, Relaxed);
                }
            }
            Outcome::Failure { kind, .. } => {
                bucket().failure.fetch_add(1, Relaxed);
                slot.last_kind.store(kind.index() as u8, Relaxed);
                let run = slot.consecutive.fetch_add(1, Relaxed) + 1;
                if run == slot.threshold {
                    self.on_run(run, kind);
                }
            }
            Outcome::Busy { retry_after } => {
                slot.busy_total.increment(1);
                if let Some(shared) = slot.shared.upgrade() {
                    shared.on_busy(slot, retry_after);
                }
            }
            // `Outcome` is non-exhaustive: what a later version adds
            // records nothing until this crate learns it.
            _ => {}
        }
    }

    #[cold]
    fn on_run(&self, run: u32, kind: FailureKind) {
        if let Some(shared) = self.slot.shared.upgrade() {
            shared.on_consecutive_failures(&self.slot, run, kind);
        }
    }
}

fn micros(latency: Duration) -> u64 {
    u64::try_from(latency.as_micros()).unwrap_or(u64::MAX)
}
