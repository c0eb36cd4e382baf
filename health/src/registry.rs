//! The endpoint registry: state machine, timers and publication.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::AbortHandle;
use tokio::time::{Instant, sleep_until};

use keel_core::{DefaultClassifier, EndpointId, EndpointKey, FailureKind, Outcome};

use crate::config::HealthConfig;
use crate::discover::HealthDiscover;
use crate::endpoint::{Endpoint, EndpointStatus, HealthState, Reason, Snapshot};
use crate::error::{HealthError, Result};
use crate::machine::{Check, Effect, Machine, Time, Window};
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
    seed: Option<u64>,
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

    /// Seeds the probe-interval jitter, so a run under paused time (a test,
    /// a simulation) is reproducible bit for bit. Unseeded by default.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Validates the config and starts the registry's driver task.
    ///
    /// # Errors
    ///
    /// [`HealthError::InvalidConfig`] naming the bad field.
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
        let snapshot = Snapshot::new(HashMap::new(), false, config.max_ejected(0), now);
        let (tx, _) = watch::channel(snapshot.clone());
        let rng = self
            .seed
            .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
        let machine = Machine::new(config.clone(), self.probe.is_some(), rng);
        let publish = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            window: Arc::new(WindowClock::new(config.outlier.buckets)),
            probe_permits: Arc::new(Semaphore::new(config.active.max_concurrent)),
            config,
            epoch: now,
            fleet: Mutex::new(Fleet {
                machine,
                entries: HashMap::new(),
                next_incarnation: 0,
                snapshot,
            }),
            tx,
            publish: publish.clone(),
            probe: self.probe,
            metrics,
            runtime,
            driver: Mutex::new(None),
        });
        let driver = shared
            .runtime
            .spawn(drive(Arc::downgrade(&shared), publish));
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
            seed: None,
        }
    }

    /// A registry without active checks; see [`HealthBuilder::build`].
    ///
    /// # Errors
    ///
    /// [`HealthError::InvalidConfig`] naming the bad field.
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
    /// [`HealthError::EndpointExists`] if the id is taken;
    /// [`HealthError::InvalidArgument`] for an empty id or a weight that is
    /// not a finite number above 0.
    pub fn insert(&self, endpoint: Endpoint) -> Result<()> {
        endpoint.check()?;
        let shared = &self.shared;
        let busy_total = shared.metrics.busy_counter(endpoint.id().as_str());
        let (id, state, reason) = shared.with_fleet(|fleet, now| {
            if fleet.entries.contains_key(endpoint.id()) {
                return (
                    Err(HealthError::EndpointExists(endpoint.id().to_string())),
                    Vec::new(),
                );
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
                busy_total,
            ));
            // An id inserted before (the same value, added again) keeps the
            // reporter it has, which finds the current incarnation by name.
            id.set_reporter(reporter(Arc::downgrade(shared), Arc::downgrade(&slot)));
            let wake = Arc::new(Notify::new());
            let task = shared.runtime.spawn(endpoint_task(
                Arc::downgrade(shared),
                id.clone(),
                incarnation,
                wake.clone(),
            ));
            let node = fleet.machine.insert(id.clone(), shared.at(now));
            let added = (id.clone(), node.state, node.reason.clone());
            fleet.entries.insert(
                id,
                Entry {
                    endpoint,
                    slot,
                    wake,
                    task: task.abort_handle(),
                },
            );
            (Ok(added), Vec::new())
        })?;
        tracing::info!(health = %shared.config.name, endpoint = %id, %state, "endpoint added");
        shared.metrics.state_change(id.as_str(), state, &reason);
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
    /// [`HealthError::UnknownEndpoint`] if no endpoint has this id.
    pub fn remove(&self, id: &str) -> Result<Endpoint> {
        let shared = &self.shared;
        let removed = shared.with_fleet(|fleet, now| {
            let Some(entry) = fleet.entries.remove(id) else {
                return (Err(HealthError::UnknownEndpoint(id.to_owned())), Vec::new());
            };
            entry.task.abort();
            entry
                .slot
                .retired
                .store(true, std::sync::atomic::Ordering::Relaxed);
            entry.endpoint.id().set_weight(0.0);
            let effects = fleet.machine.remove(id, shared.at(now));
            (Ok(entry.endpoint), effects)
        })?;
        tracing::info!(health = %shared.config.name, endpoint = %id, "endpoint removed");
        Ok(removed)
    }

    /// The latest snapshot: always current, even before subscribers of
    /// [`subscribe`](Self::subscribe) have been sent it.
    ///
    /// Never blocks on anything but a short internal lock, and never
    /// deadlocks, whatever `watch` borrows are held.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.fleet.lock().snapshot.clone()
    }

    /// A watch of the snapshot: the balancer reads weights from it
    /// (`receiver.borrow().weight(id)`) and awaits `changed()` to react.
    ///
    /// The registry never sends on this channel from the caller's thread:
    /// a state change (on the request path, in
    /// [`insert`](Self::insert), [`remove`](Self::remove), ...) is
    /// recorded at once (see [`snapshot`](Self::snapshot) and the ids'
    /// weight cells) and sent by the registry's own task, which holds no
    /// lock while sending. So holding a `borrow()` guard while calling
    /// into health or into endpoint services cannot deadlock; it only
    /// delays the next send until the guard is dropped. As for any
    /// `watch`, don't hold the guard across an `.await`.
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
        let shared = &self.shared;
        shared.with_fleet(|fleet, now| ((), shared.evaluate(fleet, now)));
    }
}

/// The reporter installed on every id the registry publishes: an outcome
/// the router reports through [`EndpointKey::report`] is recorded like
/// one the [`OutlierLayer`] saw (without a latency).
///
/// It runs on the request path: it holds the registry and the endpoint's
/// counters weakly (no `Arc` cycle through the id), records with a few
/// atomic operations, and takes the registry's lock only for the rare
/// transitions recording can cause (or to find the current incarnation
/// when its own was removed), never while calling out of the crate.
fn reporter(shared: Weak<Shared>, slot: Weak<Slot>) -> keel_core::Reporter {
    Arc::new(move |id: &EndpointId, outcome: Outcome| {
        let slot = match slot.upgrade() {
            Some(slot) if !slot.retired.load(std::sync::atomic::Ordering::Relaxed) => slot,
            _ => {
                // Removed and inserted again with this same id value: find
                // the current incarnation (the lock is released at once).
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let current = shared
                    .fleet
                    .lock()
                    .entries
                    .get(id.as_str())
                    .map(|entry| entry.slot.clone());
                match current {
                    Some(slot) => slot,
                    None => return,
                }
            }
        };
        Recorder::new(slot).record_untimed(outcome);
    })
}

/// The registry's state shared by handles, recorders and tasks.
pub(crate) struct Shared {
    config: HealthConfig,
    epoch: Instant,
    window: Arc<WindowClock>,
    fleet: Mutex<Fleet>,
    tx: watch::Sender<Snapshot>,
    /// Wakes the driver to send the latest snapshot on `tx`.
    publish: Arc<Notify>,
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

/// Everything behind the registry's lock.
struct Fleet {
    /// Who is in rotation and why: the pure state machine.
    machine: Machine,
    /// What the registry keeps per endpoint besides its state.
    entries: HashMap<EndpointId, Entry>,
    next_incarnation: u64,
    /// The latest snapshot, ahead of (or equal to) the watch's.
    snapshot: Snapshot,
}

struct Entry {
    endpoint: Endpoint,
    slot: Arc<Slot>,
    wake: Arc<Notify>,
    task: AbortHandle,
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

/// What a publication leaves for after the lock: gauges to set, and
/// whether the watch has something new.
struct Published {
    per_state: [usize; 4],
    counted: usize,
    panic: bool,
    changed: bool,
}

impl Shared {
    /// `now` as the machine's time.
    fn at(&self, now: Instant) -> Time {
        now.saturating_duration_since(self.epoch)
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(self.at(at).as_micros()).unwrap_or(u64::MAX)
    }

    /// Runs `f` on the fleet under its lock, then (still under the lock)
    /// applies the effects that touch endpoint counters and tasks and
    /// rebuilds the snapshot; then, with the lock released, traces and
    /// counts the effects and wakes the driver to send the snapshot.
    fn with_fleet<R>(&self, f: impl FnOnce(&mut Fleet, Instant) -> (R, Vec<Effect>)) -> R {
        let now = Instant::now();
        let (result, effects, published) = {
            let mut fleet = self.fleet.lock();
            let (result, effects) = f(&mut fleet, now);
            apply(&fleet, &effects);
            let published = self.publish(&mut fleet, now);
            (result, effects, published)
        };
        self.after(effects, published);
        result
    }

    /// Traces and counts effects, sets gauges, wakes the driver: all with
    /// no lock held.
    fn after(&self, effects: Vec<Effect>, published: Published) {
        for effect in effects {
            match effect {
                Effect::Changed {
                    id,
                    from,
                    to,
                    reason,
                    ..
                } => {
                    if to == HealthState::Degraded && matches!(reason, Reason::PanicRetained(_)) {
                        tracing::warn!(health = %self.config.name, endpoint = %id, %from, %to, %reason, "endpoint state changed");
                    } else {
                        tracing::info!(health = %self.config.name, endpoint = %id, %from, %to, %reason, "endpoint state changed");
                    }
                    self.metrics.state_change(id.as_str(), to, &reason);
                }
                Effect::Ejected { id, reason } => self.metrics.ejection(id.as_str(), &reason),
                Effect::PanicRefused { reason } => self.metrics.panic_refusal(&reason),
                Effect::Reset { .. } => {}
            }
        }
        self.metrics
            .publish(published.per_state, published.counted, published.panic);
        if published.changed {
            self.publish.notify_one();
        }
    }

    /// The request path's slow path: a run of failures reached the threshold.
    pub(crate) fn on_consecutive_failures(&self, slot: &Arc<Slot>, run: u32, kind: FailureKind) {
        self.with_fleet(|fleet, now| {
            if !current(fleet, slot) {
                return ((), Vec::new());
            }
            let effects =
                fleet
                    .machine
                    .consecutive_failures(slot.id.as_str(), run, kind, self.at(now));
            ((), effects)
        });
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
        self.with_fleet(|fleet, now| {
            let Some(entry) = fleet.entries.get(slot.id.as_str()) else {
                return ((), Vec::new());
            };
            if entry.slot.incarnation != slot.incarnation {
                return ((), Vec::new());
            }
            let effects = fleet
                .machine
                .busy(slot.id.as_str(), retry_after, self.at(now));
            ((), effects)
        });
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
    fn evaluate(&self, fleet: &mut Fleet, now: Instant) -> Vec<Effect> {
        let entries = &fleet.entries;
        fleet.machine.evaluate(self.at(now), |id| {
            let Some(entry) = entries.get(id.as_str()) else {
                return Window::default();
            };
            let stats = entry.slot.stats();
            Window {
                consecutive: entry.slot.consecutive_failures(),
                last_kind: entry.slot.last_failure_kind(),
                success: stats.success,
                failure: stats.failure,
                mean_latency: stats.mean_latency(),
            }
        })
    }

    /// Each tick: busy cooldowns over, slow-start ramps done.
    fn tick(&self, fleet: &mut Fleet, now: Instant) -> Vec<Effect> {
        let now_us = self.micros(now);
        let entries = &fleet.entries;
        fleet.machine.tick(self.at(now), |id| {
            entries.get(id.as_str()).is_some_and(|entry| {
                entry
                    .slot
                    .busy_until_us
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > now_us
            })
        })
    }

    /// Rebuilds the snapshot (kept if nothing changed) and writes every
    /// endpoint's weight into its id.
    fn publish(&self, fleet: &mut Fleet, now: Instant) -> Published {
        let now_us = self.micros(now);
        let max_weight = fleet
            .entries
            .values()
            .map(|e| e.endpoint.configured_weight())
            .fold(0.0_f64, f64::max);
        let mut per_state = [0usize; 4];
        let mut panic = false;
        let mut counted = 0;
        let mut endpoints: HashMap<EndpointId, EndpointStatus> =
            HashMap::with_capacity(fleet.entries.len());
        for (id, node) in fleet.machine.nodes() {
            let Some(entry) = fleet.entries.get(id.as_str()) else {
                continue;
            };
            per_state[HealthMetrics::state_index(node.state)] += 1;
            panic |= matches!(node.reason, Reason::PanicRetained(_));
            counted += usize::from(node.counted);
            let weight = if node.state.is_in_rotation() {
                let mut weight = entry.endpoint.configured_weight() / max_weight;
                if let Some(start) = node.ramp_start {
                    weight *= self
                        .config
                        .slow_start
                        .factor(self.at(now).saturating_sub(start));
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
            // The id the discover stream hands out: balancers read this.
            let key = entry.endpoint.id();
            if key.weight() != weight {
                key.set_weight(weight);
            }
            let status = EndpointStatus {
                endpoint: entry.endpoint.clone(),
                state: node.state,
                weight,
                reason: node.reason.clone(),
                since: self.epoch + node.since,
                ejections: node.ejections,
                incarnation: entry.slot.incarnation,
                counted: node.counted,
            };
            endpoints.insert(id.clone(), status);
        }
        let max = fleet.machine.max_ejected();
        debug_assert!(counted <= max, "{counted} ejected, max {max}");
        let snapshot = Snapshot::new(endpoints, panic, max, now);
        let changed = !fleet.snapshot.same_as(&snapshot);
        if changed {
            fleet.snapshot = snapshot;
        }
        Published {
            per_state,
            counted,
            panic,
            changed,
        }
    }

    /// Sends the latest snapshot to subscribers. Called by the driver only,
    /// with no lock held: a subscriber's `borrow()` guard can delay it,
    /// never deadlock it.
    fn send_latest(&self) {
        let latest = self.fleet.lock().snapshot.clone();
        self.tx.send_if_modified(|current| {
            if current.is(&latest) {
                false
            } else {
                *current = latest;
                true
            }
        });
    }

    /// What an endpoint's task should do next.
    fn plan(&self, id: &str, incarnation: u64) -> Plan {
        let fleet = self.fleet.lock();
        let (Some(entry), Some(node)) = (fleet.entries.get(id), fleet.machine.get(id)) else {
            return Plan::Stop;
        };
        if entry.slot.incarnation != incarnation {
            return Plan::Stop;
        }
        match node.state {
            // Probed while ejected where `outlier.uneject_on_probe` set a
            // next check before the ejection ends.
            HealthState::Ejected => match (node.eject_until, &self.probe, node.next_probe) {
                (Some(until), Some(probe), Some(at)) if at < until => Plan::Probe {
                    at: self.epoch + at,
                    probe: probe.clone(),
                    endpoint: entry.endpoint.clone(),
                },
                (Some(at), _, _) => Plan::Expire(self.epoch + at),
                (None, _, _) => Plan::Wait,
            },
            HealthState::Healthy | HealthState::Degraded | HealthState::Probing => {
                match (&self.probe, node.next_probe) {
                    (Some(probe), Some(at)) => Plan::Probe {
                        at: self.epoch + at,
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
        self.with_fleet(|fleet, now| {
            if !live(fleet, id, incarnation) {
                return ((), Vec::new());
            }
            ((), fleet.machine.expire(id, self.at(now)))
        });
    }

    /// One active check ended.
    fn on_probe(&self, id: &str, incarnation: u64, check: Check, error: Option<String>) {
        self.metrics.probe(match check {
            Check::Passed => "passed",
            Check::Failed => "failed",
            Check::TimedOut => "timeout",
        });
        if let Some(error) = error {
            tracing::debug!(health = %self.config.name, endpoint = %id, %error, "active check failed");
        }
        self.with_fleet(|fleet, now| {
            if !live(fleet, id, incarnation) {
                return ((), Vec::new());
            }
            ((), fleet.machine.probe(id, check, self.at(now)))
        });
    }
}

/// Applies the effects that touch endpoint counters and tasks (under the
/// fleet's lock: only atomics and wake-ups, no call out of the crate).
fn apply(fleet: &Fleet, effects: &[Effect]) {
    for effect in effects {
        match effect {
            Effect::Reset { id, busy } => {
                if let Some(entry) = fleet.entries.get(id.as_str()) {
                    entry.slot.reset();
                    if *busy {
                        entry
                            .slot
                            .busy_until_us
                            .store(0, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            Effect::Changed {
                id, replan: true, ..
            } => {
                if let Some(entry) = fleet.entries.get(id.as_str()) {
                    entry.wake.notify_one();
                }
            }
            Effect::Changed { .. } | Effect::Ejected { .. } | Effect::PanicRefused { .. } => {}
        }
    }
}

/// Whether `incarnation` of `id` is the registered one.
fn live(fleet: &Fleet, id: &str, incarnation: u64) -> bool {
    fleet
        .entries
        .get(id)
        .is_some_and(|entry| entry.slot.incarnation == incarnation)
}

/// Whether `slot` is the registered incarnation of its endpoint.
fn current(fleet: &Fleet, slot: &Arc<Slot>) -> bool {
    fleet
        .entries
        .get(slot.id.as_str())
        .is_some_and(|entry| Arc::ptr_eq(&entry.slot, slot))
}

/// Rotates the window, evaluates it, ticks ramps and cooldowns, and sends
/// new snapshots to subscribers (the only place that does).
async fn drive(weak: Weak<Shared>, publish: Arc<Notify>) {
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
        tokio::select! {
            () = sleep_until(next_tick.min(next_rotate)) => {}
            () = publish.notified() => {}
        }
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let now = Instant::now();
        if now >= next_rotate || now >= next_tick {
            shared.with_fleet(|fleet, now| {
                let mut effects = Vec::new();
                if now >= next_rotate {
                    let mut rotations = 0;
                    while next_rotate <= now {
                        if rotations < len {
                            shared.rotate(fleet);
                            rotations += 1;
                        }
                        next_rotate += width;
                    }
                    effects.extend(shared.evaluate(fleet, now));
                }
                if now >= next_tick {
                    effects.extend(shared.tick(fleet, now));
                    while next_tick <= now {
                        next_tick += tick;
                    }
                }
                ((), effects)
            });
        }
        shared.send_latest();
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
                        Ok(Ok(())) => (Check::Passed, None),
                        Ok(Err(error)) => (Check::Failed, Some(error.to_string())),
                        Err(_) => (Check::TimedOut, None),
                    }
                };
                tokio::select! {
                    (check, error) = check => match shared.upgrade() {
                        Some(shared) => shared.on_probe(id.as_str(), incarnation, check, error),
                        None => return,
                    },
                    () = wake.notified() => {}
                }
            }
        }
    }
}
