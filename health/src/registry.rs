//! The endpoint registry: state machine, timers and publication.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::AbortHandle;
use tokio::time::{Instant, sleep_until};

use crate::classify::{DefaultClassifier, FailureKind};
use crate::config::HealthConfig;
use crate::discover::HealthDiscover;
use crate::endpoint::{Endpoint, EndpointId, EndpointStatus, HealthState, Reason, Snapshot};
use crate::error::{Error, Result};
use crate::metrics::HealthMetrics;
use crate::outlier::OutlierLayer;
use crate::probe::{Probe, probe_fn};
use crate::recorder::{Recorder, Slot, WindowClock};

/// Keeps a fleet of endpoints healthy and tells the balancer about it.
///
/// A cheap handle (clone it freely). The registry's background tasks stop
/// when the last `Health` handle and the last [`HealthDiscover`] (which
/// holds one) are dropped; [`Recorder`]s do not keep it alive.
///
/// - [`insert`](Self::insert) / [`remove`](Self::remove) manage the fleet;
/// - [`subscribe`](Self::subscribe) gives a `tokio::sync::watch` of the
///   [`Snapshot`] (state, effective weight, reason, since per endpoint);
/// - [`discover`](Self::discover) gives a `tower::discover::Discover`
///   stream of `Insert`/`Remove` as endpoints enter and leave rotation,
///   each service wrapped in the passive outlier layer;
/// - [`recorder`](Self::recorder) / [`outlier_layer`](Self::outlier_layer)
///   feed request outcomes by hand.
///
/// See the crate docs for the whole lifecycle.
#[derive(Clone)]
pub struct Health {
    shared: Arc<Shared>,
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("name", &self.shared.config.name)
            .field("endpoints", &self.shared.fleet.lock().entries.len())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Health`] registry; see [`Health::builder`].
pub struct HealthBuilder {
    config: HealthConfig,
    probe: Option<Arc<dyn Probe>>,
}

impl fmt::Debug for HealthBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthBuilder")
            .field("config", &self.config)
            .field("probe", &self.probe.is_some())
            .finish()
    }
}

impl HealthBuilder {
    /// Runs active checks with `probe` (see [`probe_fn`],
    /// [`probe_service`](crate::probe_service), `HttpProbe`).
    ///
    /// Without a probe there are no active checks: new endpoints enter
    /// rotation at once (through slow start) and ejected ones come back when
    /// their ejection time is over.
    pub fn probe(mut self, probe: impl Probe) -> Self {
        self.probe = Some(Arc::new(probe));
        self
    }

    /// Runs active checks with an async closure; shorthand for
    /// `.probe(probe_fn(f))`.
    pub fn probe_fn<F, Fut, E>(self, f: F) -> Self
    where
        F: Fn(Endpoint) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<crate::BoxError>,
    {
        self.probe(probe_fn(f))
    }

    /// Validates the config and starts the registry's driver task.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the bad field.
    ///
    /// # Panics
    ///
    /// When called outside a Tokio runtime (like `tokio::spawn`).
    pub fn build(self) -> Result<Health> {
        self.config.validate()?;
        let runtime = tokio::runtime::Handle::current();
        let now = Instant::now();
        let config = self.config;
        let metrics = HealthMetrics::new(&config.name);
        let max = config.max_ejected(0);
        let (tx, _) = watch::channel(Snapshot::new(HashMap::new(), false, max, now));
        let shared = Arc::new(Shared {
            window: Arc::new(WindowClock::new(config.outlier.buckets)),
            probe_permits: Arc::new(Semaphore::new(config.active.max_concurrent)),
            config,
            epoch: now,
            fleet: Mutex::new(Fleet::default()),
            tx,
            probe: self.probe,
            metrics,
            runtime,
            driver: Mutex::new(None),
        });
        let driver = shared.runtime.spawn(drive(Arc::downgrade(&shared)));
        *shared.driver.lock() = Some(driver.abort_handle());
        Ok(Health { shared })
    }
}

impl Health {
    /// A builder, to add a probe.
    pub fn builder(config: HealthConfig) -> HealthBuilder {
        HealthBuilder {
            config,
            probe: None,
        }
    }

    /// A registry without active checks; see [`HealthBuilder::build`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the bad field.
    ///
    /// # Panics
    ///
    /// When called outside a Tokio runtime.
    pub fn new(config: HealthConfig) -> Result<Health> {
        Health::builder(config).build()
    }

    /// The config in force.
    pub fn config(&self) -> &HealthConfig {
        &self.shared.config
    }

    /// Adds an endpoint.
    ///
    /// With a probe configured it starts in `Probing` and enters rotation
    /// after its first passed check; without one it enters rotation at
    /// once. Either way its weight ramps up through slow start.
    ///
    /// # Errors
    ///
    /// [`Error::EndpointExists`] if the id is taken; [`Error::InvalidArgument`]
    /// for an empty id or a weight that is not a finite number above 0.
    pub fn insert(&self, endpoint: Endpoint) -> Result<()> {
        endpoint.check()?;
        let shared = &self.shared;
        let now = Instant::now();
        let mut fleet = shared.fleet.lock();
        if fleet.entries.contains_key(endpoint.id()) {
            return Err(Error::EndpointExists(endpoint.id().to_string()));
        }
        fleet.next_incarnation += 1;
        let incarnation = fleet.next_incarnation;
        let id = endpoint.id().clone();
        let slot = Arc::new(Slot::new(
            id.clone(),
            incarnation,
            shared.window.clone(),
            shared.config.outlier.consecutive_failures,
            Arc::downgrade(shared),
            shared.metrics.busy_counter(id.as_str()),
        ));
        let probing = shared.probe.is_some();
        let wake = Arc::new(Notify::new());
        let task = shared.runtime.spawn(endpoint_task(
            Arc::downgrade(shared),
            id.clone(),
            incarnation,
            wake.clone(),
        ));
        let entry = Entry {
            endpoint,
            slot,
            state: if probing {
                HealthState::Probing
            } else {
                HealthState::Healthy
            },
            reason: Reason::Added,
            since: now,
            counted: false,
            ejections: 0,
            eject_until: None,
            admitted_at: now,
            ramp_start: (!probing).then_some(now),
            probe_passed: 0,
            probe_failed: 0,
            next_probe: probing.then_some(now),
            wake,
            task: task.abort_handle(),
        };
        tracing::info!(
            health = %shared.config.name,
            endpoint = %id,
            state = %entry.state,
            "endpoint added"
        );
        shared
            .metrics
            .state_change(id.as_str(), entry.state, &entry.reason);
        fleet.entries.insert(id, entry);
        shared.publish(&fleet, now);
        Ok(())
    }

    /// Removes an endpoint: it leaves rotation (a `Remove` on every
    /// discover stream) and its probes stop.
    ///
    /// If the smaller fleet now has more endpoints ejected than its
    /// max-ejection share allows, the longest-ejected ones are put back in
    /// rotation (panic mode) so the share holds.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownEndpoint`] if no endpoint has this id.
    pub fn remove(&self, id: &str) -> Result<Endpoint> {
        let shared = &self.shared;
        let now = Instant::now();
        let mut fleet = shared.fleet.lock();
        let entry = fleet
            .entries
            .remove(id)
            .ok_or_else(|| Error::UnknownEndpoint(id.to_owned()))?;
        entry.task.abort();
        tracing::info!(health = %shared.config.name, endpoint = %id, "endpoint removed");
        shared.enforce_share(&mut fleet, now);
        shared.publish(&fleet, now);
        Ok(entry.endpoint)
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.tx.borrow().clone()
    }

    /// A watch of the snapshot: the balancer reads weights from it
    /// (`receiver.borrow().weight(id)`) and awaits `changed()` to react.
    ///
    /// Don't hold the `borrow()` guard while calling or polling endpoint
    /// services: recording an outcome can publish a new snapshot, which
    /// waits for the guard (on the same thread, forever). Copy the weight
    /// out, or clone the snapshot (an `Arc` clone).
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.shared.tx.subscribe()
    }

    /// The outcome recorder of an endpoint, or `None` if it is not registered.
    pub fn recorder(&self, id: &str) -> Option<Recorder> {
        let fleet = self.shared.fleet.lock();
        fleet
            .entries
            .get(id)
            .map(|entry| Recorder::new(entry.slot.clone()))
    }

    pub(crate) fn recorder_of(&self, id: &str, incarnation: u64) -> Option<Recorder> {
        let fleet = self.shared.fleet.lock();
        fleet
            .entries
            .get(id)
            .filter(|entry| entry.slot.incarnation == incarnation)
            .map(|entry| Recorder::new(entry.slot.clone()))
    }

    /// The passive outlier layer of an endpoint (with the default
    /// classifier), or `None` if it is not registered.
    pub fn outlier_layer(&self, id: &str) -> Option<OutlierLayer> {
        self.recorder(id).map(OutlierLayer::new)
    }

    /// A `tower::discover::Discover` stream of the endpoints in rotation.
    ///
    /// `make` builds the request-path service of an endpoint each time it
    /// enters rotation; the stream wraps it in [`Outlier`](crate::Outlier)
    /// with the [`DefaultClassifier`], so every request through it feeds
    /// passive outlier detection. An ejected endpoint is `Remove`d and
    /// `Insert`ed again (with a new service) when it comes back.
    pub fn discover<S, M>(&self, make: M) -> HealthDiscover<S, M>
    where
        M: FnMut(&Endpoint) -> S,
    {
        HealthDiscover::new(self.clone(), make, DefaultClassifier)
    }

    /// Like [`discover`](Self::discover) with your own classifier.
    pub fn discover_with<S, M, C>(&self, make: M, classifier: C) -> HealthDiscover<S, M, C>
    where
        M: FnMut(&Endpoint) -> S,
        C: Clone,
    {
        HealthDiscover::new(self.clone(), make, classifier)
    }

    /// Evaluates the sliding window now (failure rate and latency
    /// outliers, panic-mode re-checks), as the driver does each time the
    /// window advances. Useful in tests and after a burst you want judged
    /// at once.
    pub fn evaluate(&self) {
        let now = Instant::now();
        let mut fleet = self.shared.fleet.lock();
        self.shared.evaluate(&mut fleet, now);
        self.shared.publish(&fleet, now);
    }
}

/// The registry's state shared by handles, recorders and tasks.
pub(crate) struct Shared {
    config: HealthConfig,
    epoch: Instant,
    window: Arc<WindowClock>,
    fleet: Mutex<Fleet>,
    tx: watch::Sender<Snapshot>,
    probe: Option<Arc<dyn Probe>>,
    probe_permits: Arc<Semaphore>,
    metrics: HealthMetrics,
    runtime: tokio::runtime::Handle,
    driver: Mutex<Option<AbortHandle>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(driver) = self.driver.lock().take() {
            driver.abort();
        }
        for entry in self.fleet.get_mut().entries.values() {
            entry.task.abort();
        }
    }
}

#[derive(Default)]
struct Fleet {
    entries: HashMap<EndpointId, Entry>,
    next_incarnation: u64,
}

impl Fleet {
    fn counted(&self) -> usize {
        self.entries.values().filter(|e| e.counted).count()
    }
}

struct Entry {
    endpoint: Endpoint,
    slot: Arc<Slot>,
    state: HealthState,
    reason: Reason,
    since: Instant,
    /// Out of rotation for health reasons after being admitted: counts
    /// toward the max-ejection share.
    counted: bool,
    ejections: u32,
    eject_until: Option<Instant>,
    /// When it last entered rotation (for the ejection streak's reset).
    admitted_at: Instant,
    ramp_start: Option<Instant>,
    probe_passed: u32,
    probe_failed: u32,
    next_probe: Option<Instant>,
    wake: Arc<Notify>,
    task: AbortHandle,
}

/// How an ejection takes the endpoint out.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    /// Passive detection: ejected for the (doubling) ejection time.
    Passive,
    /// Failed active checks: probing until it passes again.
    Active,
}

/// What an endpoint's task does next.
enum Plan {
    Stop,
    Wait,
    Expire(Instant),
    Probe {
        at: Instant,
        probe: Arc<dyn Probe>,
        endpoint: Endpoint,
    },
}

/// How one active check ended.
enum ProbeResult {
    Passed,
    Failed(String),
    TimedOut,
}

fn jittered(base: Duration, jitter: f64) -> Duration {
    if jitter == 0.0 {
        return base;
    }
    base.mul_f64(1.0 + jitter * (fastrand::f64() * 2.0 - 1.0))
}

impl Shared {
    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    /// Moves an entry to a new state, with tracing, metrics and a task wake-up
    /// when its plan changes.
    fn transition(&self, entry: &mut Entry, state: HealthState, reason: Reason, now: Instant) {
        let from = entry.state;
        if from == state && entry.reason == reason {
            return;
        }
        if from != state {
            entry.since = now;
        }
        let id = entry.endpoint.id();
        if state == HealthState::Degraded && matches!(reason, Reason::PanicRetained(_)) {
            tracing::warn!(health = %self.config.name, endpoint = %id, %from, to = %state, %reason, "endpoint state changed");
        } else {
            tracing::info!(health = %self.config.name, endpoint = %id, %from, to = %state, %reason, "endpoint state changed");
        }
        self.metrics.state_change(id.as_str(), state, &reason);
        let replan = from.is_in_rotation() != state.is_in_rotation()
            || (!from.is_in_rotation() && from != state);
        entry.state = state;
        entry.reason = reason;
        if replan {
            entry.wake.notify_one();
        }
    }

    /// Takes an endpoint out of rotation unless that would eject more than
    /// the allowed share; answers whether it was ejected.
    fn try_eject(
        &self,
        fleet: &mut Fleet,
        id: &str,
        reason: Reason,
        via: Via,
        now: Instant,
    ) -> bool {
        let max = self.config.max_ejected(fleet.entries.len());
        let counted = fleet.counted();
        let Some(entry) = fleet.entries.get_mut(id) else {
            return false;
        };
        if !entry.state.is_in_rotation() {
            return false;
        }
        if counted + 1 > max {
            if !matches!(entry.reason, Reason::PanicRetained(_)) {
                self.metrics.panic_refusal(&reason);
                self.transition(
                    entry,
                    HealthState::Degraded,
                    Reason::PanicRetained(Box::new(reason)),
                    now,
                );
            }
            return false;
        }
        if now.saturating_duration_since(entry.admitted_at) >= self.config.outlier.max_ejection {
            entry.ejections = 0;
        }
        entry.ejections += 1;
        entry.counted = true;
        entry.ramp_start = None;
        entry.probe_passed = 0;
        entry.probe_failed = 0;
        entry.slot.reset();
        self.metrics.ejection(id, &reason);
        match via {
            Via::Passive => {
                entry.eject_until = Some(now + self.config.outlier.ejection_for(entry.ejections));
                self.transition(entry, HealthState::Ejected, reason, now);
            }
            Via::Active => {
                entry.eject_until = None;
                entry.next_probe = Some(
                    now + jittered(
                        self.config.active.unhealthy_interval,
                        self.config.active.jitter,
                    ),
                );
                self.transition(entry, HealthState::Probing, reason, now);
            }
        }
        true
    }

    /// Puts an endpoint back in rotation through slow start.
    fn readmit(&self, entry: &mut Entry, reason: Reason, now: Instant) {
        entry.counted = false;
        entry.eject_until = None;
        entry.admitted_at = now;
        entry.ramp_start = (!self.config.slow_start.window.is_zero()).then_some(now);
        entry.probe_passed = 0;
        entry.probe_failed = 0;
        entry.next_probe = self
            .probe
            .is_some()
            .then(|| now + jittered(self.config.active.interval, self.config.active.jitter));
        entry.slot.reset();
        entry
            .slot
            .busy_until_us
            .store(0, std::sync::atomic::Ordering::Relaxed);
        self.transition(entry, HealthState::Healthy, reason, now);
    }

    /// After the fleet shrank: puts ejected endpoints back in rotation
    /// (soonest to return first) until the share holds again.
    fn enforce_share(&self, fleet: &mut Fleet, now: Instant) {
        let max = self.config.max_ejected(fleet.entries.len());
        let mut counted: Vec<(Option<Instant>, EndpointId)> = fleet
            .entries
            .values()
            .filter(|e| e.counted)
            .map(|e| (e.eject_until, e.endpoint.id().clone()))
            .collect();
        if counted.len() <= max {
            return;
        }
        counted.sort();
        let excess = counted.len() - max;
        for (_, id) in counted.into_iter().take(excess) {
            if let Some(entry) = fleet.entries.get_mut(&id) {
                let why = entry.reason.clone();
                self.metrics.panic_refusal(&why);
                entry.counted = false;
                entry.eject_until = None;
                entry.admitted_at = now;
                entry.slot.reset();
                self.transition(
                    entry,
                    HealthState::Degraded,
                    Reason::PanicRetained(Box::new(why)),
                    now,
                );
            }
        }
    }

    /// The request path's slow path: a run of failures reached the threshold.
    pub(crate) fn on_consecutive_failures(&self, slot: &Arc<Slot>, run: u32, kind: FailureKind) {
        let now = Instant::now();
        let mut fleet = self.fleet.lock();
        if !current(&fleet, slot) {
            return;
        }
        let reason = Reason::ConsecutiveFailures { count: run, kind };
        self.try_eject(&mut fleet, slot.id.as_str(), reason, Via::Passive, now);
        self.publish(&fleet, now);
    }

    /// The request path's busy path: extends the cooldown, and on the first
    /// busy answer of a cooldown marks the endpoint degraded.
    pub(crate) fn on_busy(&self, slot: &Slot, retry_after: Option<Duration>) {
        let now = Instant::now();
        let now_us = self.micros(now);
        let busy = &self.config.busy;
        let cooldown = retry_after
            .map_or(busy.cooldown, |after| after.max(busy.cooldown))
            .min(busy.max_cooldown);
        let until = now_us.saturating_add(u64::try_from(cooldown.as_micros()).unwrap_or(u64::MAX));
        let previous = slot
            .busy_until_us
            .fetch_max(until, std::sync::atomic::Ordering::Relaxed);
        if previous > now_us {
            // Already dampened; the driver sees the longer cooldown.
            return;
        }
        let mut fleet = self.fleet.lock();
        let Some(entry) = fleet.entries.get_mut(slot.id.as_str()) else {
            return;
        };
        if entry.slot.incarnation != slot.incarnation {
            return;
        }
        if entry.state == HealthState::Healthy {
            self.transition(
                entry,
                HealthState::Degraded,
                Reason::Busy { retry_after },
                now,
            );
        }
        self.publish(&fleet, now);
    }

    /// Each tick: busy cooldowns over, slow-start ramps done.
    fn tick(&self, fleet: &mut Fleet, now: Instant) {
        let now_us = self.micros(now);
        for entry in fleet.entries.values_mut() {
            if matches!(entry.reason, Reason::Busy { .. })
                && entry
                    .slot
                    .busy_until_us
                    .load(std::sync::atomic::Ordering::Relaxed)
                    <= now_us
            {
                self.transition(entry, HealthState::Healthy, Reason::BusyCleared, now);
            }
            if let Some(start) = entry.ramp_start
                && now.saturating_duration_since(start) >= self.config.slow_start.window
            {
                entry.ramp_start = None;
            }
        }
    }

    /// Advances the sliding window by one bucket.
    fn rotate(&self, fleet: &Fleet) {
        let next = (self.window.current() + 1) % self.window.len;
        for entry in fleet.entries.values() {
            entry.slot.clear_bucket(next);
        }
        self.window.set(next);
    }

    /// Failure-rate and latency detection over the window, and re-checks of
    /// outliers kept in rotation by panic mode.
    fn evaluate(&self, fleet: &mut Fleet, now: Instant) {
        let outlier = &self.config.outlier;
        let mut candidates: Vec<(EndpointId, Reason, Via)> = Vec::new();
        let mut latencies: Vec<(EndpointId, Duration)> = Vec::new();
        let mut retained: Vec<EndpointId> = Vec::new();
        for (id, entry) in &fleet.entries {
            if !entry.state.is_in_rotation() {
                continue;
            }
            if matches!(entry.reason, Reason::PanicRetained(_)) {
                retained.push(id.clone());
            }
            // Still failing its active checks (kept in rotation by panic mode).
            if self.probe.is_some() && entry.probe_failed >= self.config.active.unhealthy_threshold
            {
                let consecutive = entry.probe_failed;
                candidates.push((id.clone(), Reason::ProbeFailed { consecutive }, Via::Active));
                continue;
            }
            let stats = entry.slot.stats();
            let volume = stats.volume();
            if let Some(threshold) = outlier.consecutive_failures {
                let run = entry.slot.consecutive_failures();
                if run >= threshold {
                    candidates.push((
                        id.clone(),
                        Reason::ConsecutiveFailures {
                            count: run,
                            kind: entry.slot.last_failure_kind(),
                        },
                        Via::Passive,
                    ));
                    continue;
                }
            }
            if volume >= outlier.min_volume {
                let rate = stats.failure as f64 / volume as f64;
                if let Some(threshold) = outlier.failure_rate
                    && rate >= threshold
                {
                    candidates.push((
                        id.clone(),
                        Reason::FailureRate { rate, volume },
                        Via::Passive,
                    ));
                    continue;
                }
                if let Some(mean) = stats.mean_latency() {
                    latencies.push((id.clone(), mean));
                }
            }
        }
        if let Some(factor) = outlier.latency_factor
            && latencies.len() >= outlier.latency_min_endpoints
        {
            let mut means: Vec<Duration> = latencies.iter().map(|(_, mean)| *mean).collect();
            means.sort();
            let median = if means.len() % 2 == 1 {
                means[means.len() / 2]
            } else {
                (means[means.len() / 2 - 1] + means[means.len() / 2]) / 2
            };
            for (id, mean) in latencies {
                if mean >= outlier.latency_floor
                    && mean.as_secs_f64() > factor * median.as_secs_f64()
                {
                    candidates.push((id, Reason::LatencyOutlier { mean, median }, Via::Passive));
                }
            }
        }
        // Worst first is not knowable across detectors; eject in id order so
        // runs are reproducible.
        candidates.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, reason, via) in &candidates {
            self.try_eject(fleet, id.as_str(), reason.clone(), *via, now);
        }
        for id in retained {
            if candidates.iter().any(|(c, _, _)| *c == id) {
                continue;
            }
            if let Some(entry) = fleet.entries.get_mut(&id)
                && matches!(entry.reason, Reason::PanicRetained(_))
            {
                self.transition(entry, HealthState::Healthy, Reason::Recovered, now);
            }
        }
    }

    /// Builds and publishes the snapshot if anything changed.
    fn publish(&self, fleet: &Fleet, now: Instant) {
        let now_us = self.micros(now);
        let max_weight = fleet
            .entries
            .values()
            .map(|e| e.endpoint.configured_weight())
            .fold(0.0_f64, f64::max);
        let mut per_state = [0usize; 4];
        let mut panic = false;
        let mut counted = 0;
        let endpoints: HashMap<EndpointId, EndpointStatus> = fleet
            .entries
            .iter()
            .map(|(id, entry)| {
                per_state[HealthMetrics::state_index(entry.state)] += 1;
                panic |= matches!(entry.reason, Reason::PanicRetained(_));
                counted += usize::from(entry.counted);
                let weight = if entry.state.is_in_rotation() {
                    let mut weight = entry.endpoint.configured_weight() / max_weight;
                    if let Some(start) = entry.ramp_start {
                        weight *= self
                            .config
                            .slow_start
                            .factor(now.saturating_duration_since(start));
                    }
                    if entry
                        .slot
                        .busy_until_us
                        .load(std::sync::atomic::Ordering::Relaxed)
                        > now_us
                    {
                        weight *= self.config.busy.weight;
                    }
                    weight.clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let status = EndpointStatus {
                    endpoint: entry.endpoint.clone(),
                    state: entry.state,
                    weight,
                    reason: entry.reason.clone(),
                    since: entry.since,
                    ejections: entry.ejections,
                    incarnation: entry.slot.incarnation,
                    counted: entry.counted,
                };
                (id.clone(), status)
            })
            .collect();
        let max = self.config.max_ejected(fleet.entries.len());
        debug_assert!(counted <= max, "{counted} ejected, max {max}");
        let snapshot = Snapshot::new(endpoints, panic, max, now);
        self.tx.send_if_modified(|current| {
            if current.same_as(&snapshot) {
                false
            } else {
                *current = snapshot;
                true
            }
        });
        self.metrics.publish(per_state, counted, panic);
    }

    /// What an endpoint's task should do next.
    fn plan(&self, id: &str, incarnation: u64) -> Plan {
        let fleet = self.fleet.lock();
        let Some(entry) = fleet.entries.get(id) else {
            return Plan::Stop;
        };
        if entry.slot.incarnation != incarnation {
            return Plan::Stop;
        }
        match entry.state {
            HealthState::Ejected => match entry.eject_until {
                Some(at) => Plan::Expire(at),
                None => Plan::Wait,
            },
            HealthState::Healthy | HealthState::Degraded | HealthState::Probing => {
                match (&self.probe, entry.next_probe) {
                    (Some(probe), Some(at)) => Plan::Probe {
                        at,
                        probe: probe.clone(),
                        endpoint: entry.endpoint.clone(),
                    },
                    _ => Plan::Wait,
                }
            }
        }
    }

    /// An ejection's time is over: probe it back, or re-admit it.
    fn expire(&self, id: &str, incarnation: u64) {
        let now = Instant::now();
        let mut fleet = self.fleet.lock();
        let Some(entry) = fleet.entries.get_mut(id) else {
            return;
        };
        if entry.slot.incarnation != incarnation
            || entry.state != HealthState::Ejected
            || entry.eject_until.is_some_and(|at| at > now)
        {
            return;
        }
        entry.eject_until = None;
        if self.probe.is_some() {
            entry.probe_passed = 0;
            entry.probe_failed = 0;
            entry.next_probe = Some(now);
            let reason = entry.reason.clone();
            self.transition(entry, HealthState::Probing, reason, now);
        } else {
            self.readmit(entry, Reason::EjectionExpired, now);
        }
        self.publish(&fleet, now);
    }

    /// One active check ended.
    fn on_probe(&self, id: &str, incarnation: u64, result: ProbeResult) {
        let now = Instant::now();
        let active = &self.config.active;
        self.metrics.probe(match result {
            ProbeResult::Passed => "passed",
            ProbeResult::Failed(_) => "failed",
            ProbeResult::TimedOut => "timeout",
        });
        let mut fleet = self.fleet.lock();
        let Some(entry) = fleet.entries.get_mut(id) else {
            return;
        };
        if entry.slot.incarnation != incarnation {
            return;
        }
        if let ProbeResult::Failed(error) = &result {
            tracing::debug!(health = %self.config.name, endpoint = %id, %error, "active check failed");
        }
        let passed = matches!(result, ProbeResult::Passed);
        if passed {
            entry.probe_passed += 1;
            entry.probe_failed = 0;
        } else {
            entry.probe_failed += 1;
            entry.probe_passed = 0;
        }
        let failure_reason = |consecutive| match result {
            ProbeResult::TimedOut => Reason::ProbeTimeout { consecutive },
            _ => Reason::ProbeFailed { consecutive },
        };
        let mut eject = None;
        match entry.state {
            HealthState::Healthy | HealthState::Degraded => {
                entry.next_probe = Some(now + jittered(active.interval, active.jitter));
                if !passed && entry.probe_failed >= active.unhealthy_threshold {
                    eject = Some(failure_reason(entry.probe_failed));
                }
            }
            HealthState::Probing => {
                let needed = if entry.counted {
                    active.healthy_threshold
                } else {
                    1
                };
                if passed && entry.probe_passed >= needed {
                    self.readmit(entry, Reason::ProbePassed, now);
                } else {
                    entry.next_probe =
                        Some(now + jittered(active.unhealthy_interval, active.jitter));
                    if !passed {
                        let reason = failure_reason(entry.probe_failed);
                        self.transition(entry, HealthState::Probing, reason, now);
                    }
                }
            }
            HealthState::Ejected => {}
        }
        if let Some(reason) = eject {
            self.try_eject(&mut fleet, id, reason, Via::Active, now);
        }
        self.publish(&fleet, now);
    }
}

/// Whether `slot` is the registered incarnation of its endpoint.
fn current(fleet: &Fleet, slot: &Arc<Slot>) -> bool {
    fleet
        .entries
        .get(slot.id.as_str())
        .is_some_and(|entry| Arc::ptr_eq(&entry.slot, slot))
}

/// Rotates the window, evaluates it, and ticks ramps and cooldowns.
async fn drive(weak: Weak<Shared>) {
    let (tick, width, len) = match weak.upgrade() {
        Some(shared) => (
            shared.config.tick,
            shared.config.outlier.bucket_width(),
            shared.window.len,
        ),
        None => return,
    };
    let start = Instant::now();
    let mut next_tick = start + tick;
    let mut next_rotate = start + width;
    loop {
        sleep_until(next_tick.min(next_rotate)).await;
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut fleet = shared.fleet.lock();
        if now >= next_rotate {
            let mut rotations = 0;
            while next_rotate <= now {
                if rotations < len {
                    shared.rotate(&fleet);
                    rotations += 1;
                }
                next_rotate += width;
            }
            shared.evaluate(&mut fleet, now);
        }
        if now >= next_tick {
            shared.tick(&mut fleet, now);
            while next_tick <= now {
                next_tick += tick;
            }
        }
        shared.publish(&fleet, now);
    }
}

/// Runs one endpoint's probes and ejection timer.
async fn endpoint_task(shared: Weak<Shared>, id: EndpointId, incarnation: u64, wake: Arc<Notify>) {
    loop {
        let (plan, permits, timeout) = match shared.upgrade() {
            Some(shared) => (
                shared.plan(id.as_str(), incarnation),
                shared.probe_permits.clone(),
                shared.config.active.timeout,
            ),
            None => return,
        };
        match plan {
            Plan::Stop => return,
            Plan::Wait => wake.notified().await,
            Plan::Expire(at) => {
                tokio::select! {
                    () = sleep_until(at) => match shared.upgrade() {
                        Some(shared) => shared.expire(id.as_str(), incarnation),
                        None => return,
                    },
                    () = wake.notified() => {}
                }
            }
            Plan::Probe {
                at,
                probe,
                endpoint,
            } => {
                let check = async {
                    sleep_until(at).await;
                    let _permit = permits.acquire_owned().await;
                    match tokio::time::timeout(timeout, probe.probe(&endpoint)).await {
                        Ok(Ok(())) => ProbeResult::Passed,
                        Ok(Err(error)) => ProbeResult::Failed(error.to_string()),
                        Err(_) => ProbeResult::TimedOut,
                    }
                };
                tokio::select! {
                    result = check => match shared.upgrade() {
                        Some(shared) => shared.on_probe(id.as_str(), incarnation, result),
                        None => return,
                    },
                    () = wake.notified() => {}
                }
            }
        }
    }
}
