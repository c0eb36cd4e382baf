//! The ejection state machine: which endpoints are in rotation, decided
//! from timestamped events.
//!
//! Pure: no clock, no task, no lock, no I/O. The registry feeds it events
//! (an endpoint added or removed, a run of failures, a window evaluation
//! with the counters it read, a probe result, an ejection timer, a busy
//! answer, a tick) with the time they happened, and applies the
//! [`Effect`]s it answers (tracing, metrics, counters reset, the endpoint's
//! task re-planned). Everything about eject / re-admit / the max-ejection
//! share / panic mode is decided here, and a property test drives it with
//! arbitrary event sequences.

use std::collections::HashMap;
use std::time::Duration;

use keel_core::{EndpointId, FailureKind};

use crate::config::HealthConfig;
use crate::endpoint::{HealthState, Reason};

/// A point in time, as the time since the registry's epoch.
pub(crate) type Time = Duration;

/// One endpoint's place in the machine.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub(crate) state: HealthState,
    pub(crate) reason: Reason,
    /// When it entered `state`.
    pub(crate) since: Time,
    /// Out of rotation for health reasons after being admitted: counts
    /// toward the max-ejection share.
    pub(crate) counted: bool,
    /// Ejections in the current streak.
    pub(crate) ejections: u32,
    /// When a passive ejection is over.
    pub(crate) eject_until: Option<Time>,
    /// When it last entered rotation (for the ejection streak's reset).
    admitted_at: Time,
    /// When its slow-start ramp began (`None`: no ramp running).
    pub(crate) ramp_start: Option<Time>,
    probe_passed: u32,
    probe_failed: u32,
    /// When its next active check is due (`None`: no probe).
    pub(crate) next_probe: Option<Time>,
}

impl Node {
    /// Moves a node to a new state (or reason), answering a [`Effect::Changed`].
    fn transition(
        &mut self,
        effects: &mut Vec<Effect>,
        id: &str,
        to: HealthState,
        reason: Reason,
        now: Time,
    ) {
        let from = self.state;
        if from == to && self.reason == reason {
            return;
        }
        if from != to {
            self.since = now;
        }
        let replan =
            from.is_in_rotation() != to.is_in_rotation() || (!from.is_in_rotation() && from != to);
        self.state = to;
        self.reason = reason.clone();
        effects.push(Effect::Changed {
            id: EndpointId::from(id),
            from,
            to,
            reason,
            replan,
        });
    }

    /// Starts the node's counters over (answering an [`Effect::Reset`]) and
    /// moves it to `to`.
    fn reset_to(
        &mut self,
        effects: &mut Vec<Effect>,
        id: &EndpointId,
        to: HealthState,
        reason: Reason,
        now: Time,
    ) {
        effects.push(Effect::Reset {
            id: id.clone(),
            busy: false,
        });
        self.transition(effects, id.as_str(), to, reason, now);
    }
}

/// How an ejection takes the endpoint out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Via {
    /// Passive detection: ejected for the (doubling) ejection time.
    Passive,
    /// Failed active checks: probing until it passes again.
    Active,
}

/// How one active check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    Passed,
    Failed,
    TimedOut,
}

/// What an endpoint's window says, read by the registry for an evaluation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Window {
    /// The current run of failures.
    pub(crate) consecutive: u32,
    /// The last failure's kind.
    pub(crate) last_kind: Option<FailureKind>,
    /// Successes in the window.
    pub(crate) success: u64,
    /// Failures in the window.
    pub(crate) failure: u64,
    /// Mean latency over the outcomes that carried one.
    pub(crate) mean_latency: Option<Duration>,
}

/// What the registry must do after an event.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Effect {
    /// The endpoint changed state or reason (trace it, count it).
    Changed {
        id: EndpointId,
        from: HealthState,
        to: HealthState,
        reason: Reason,
        /// Its timers changed: wake its task to plan again.
        replan: bool,
    },
    /// It was taken out of rotation.
    Ejected { id: EndpointId, reason: Reason },
    /// An ejection was refused because the max-ejection share is reached.
    PanicRefused { reason: Reason },
    /// Forget its window counters, and its busy cooldown when `busy`.
    Reset { id: EndpointId, busy: bool },
}

/// The fleet's ejection state.
#[derive(Debug)]
pub(crate) struct Machine {
    config: HealthConfig,
    /// Whether active checks run.
    probing: bool,
    rng: fastrand::Rng,
    nodes: HashMap<EndpointId, Node>,
    effects: Vec<Effect>,
}

impl Machine {
    pub(crate) fn new(config: HealthConfig, probing: bool, rng: fastrand::Rng) -> Self {
        Machine {
            config,
            probing,
            rng,
            nodes: HashMap::new(),
            effects: Vec::new(),
        }
    }

    pub(crate) fn get(&self, id: &str) -> Option<&Node> {
        self.nodes.get(id)
    }

    pub(crate) fn nodes(&self) -> impl Iterator<Item = (&EndpointId, &Node)> {
        self.nodes.iter()
    }

    /// Endpoints counting toward the max-ejection share.
    pub(crate) fn counted(&self) -> usize {
        self.nodes.values().filter(|n| n.counted).count()
    }

    /// The most endpoints that may be counted now.
    pub(crate) fn max_ejected(&self) -> usize {
        self.config.max_ejected(self.nodes.len())
    }

    fn jittered(&mut self, base: Duration) -> Duration {
        let jitter = self.config.active.jitter;
        if jitter == 0.0 {
            return base;
        }
        base.mul_f64(1.0 + jitter * (self.rng.f64() * 2.0 - 1.0))
    }

    /// An endpoint was added (the caller checked the id is free): probing
    /// first when active checks run, else in rotation through slow start.
    pub(crate) fn insert(&mut self, id: EndpointId, now: Time) -> &Node {
        let probing = self.probing;
        let node = Node {
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
            ramp_start: (!probing && !self.config.slow_start.window.is_zero()).then_some(now),
            probe_passed: 0,
            probe_failed: 0,
            next_probe: probing.then_some(now),
        };
        self.nodes.entry(id).insert_entry(node).into_mut()
    }

    /// An endpoint was removed. If the smaller fleet now has more
    /// endpoints counted than its share allows, the ones soonest to return
    /// are put back in rotation (panic mode) until the share holds.
    pub(crate) fn remove(&mut self, id: &str, now: Time) -> Vec<Effect> {
        if self.nodes.remove(id).is_some() {
            self.enforce_share(now);
        }
        self.take()
    }

    /// A run of `run` failures of which the last was `kind` reached the
    /// consecutive-failures threshold.
    pub(crate) fn consecutive_failures(
        &mut self,
        id: &str,
        run: u32,
        kind: FailureKind,
        now: Time,
    ) -> Vec<Effect> {
        let reason = Reason::ConsecutiveFailures { count: run, kind };
        self.try_eject(id, reason, Via::Passive, now);
        self.take()
    }

    /// The first busy answer of a cooldown.
    pub(crate) fn busy(
        &mut self,
        id: &str,
        retry_after: Option<Duration>,
        now: Time,
    ) -> Vec<Effect> {
        if let Some(node) = self.nodes.get_mut(id)
            && node.state == HealthState::Healthy
        {
            node.transition(
                &mut self.effects,
                id,
                HealthState::Degraded,
                Reason::Busy { retry_after },
                now,
            );
        }
        self.take()
    }

    /// Each tick: busy cooldowns over (`still_busy` says which are not),
    /// slow-start ramps done.
    pub(crate) fn tick(
        &mut self,
        now: Time,
        still_busy: impl Fn(&EndpointId) -> bool,
    ) -> Vec<Effect> {
        let window = self.config.slow_start.window;
        for (id, node) in &mut self.nodes {
            if matches!(node.reason, Reason::Busy { .. }) && !still_busy(id) {
                node.transition(
                    &mut self.effects,
                    id.as_str(),
                    HealthState::Healthy,
                    Reason::BusyCleared,
                    now,
                );
            }
            if let Some(start) = node.ramp_start
                && now.saturating_sub(start) >= window
            {
                node.ramp_start = None;
            }
        }
        self.take()
    }

    /// An ejection timer fired: over (at or after `eject_until`), the
    /// endpoint is probed back, or re-admitted without a probe. Early or
    /// stale timers change nothing.
    pub(crate) fn expire(&mut self, id: &str, now: Time) -> Vec<Effect> {
        let probing = self.probing;
        let Some(node) = self.nodes.get_mut(id) else {
            return self.take();
        };
        if node.state != HealthState::Ejected || node.eject_until.is_none_or(|at| at > now) {
            return self.take();
        }
        node.eject_until = None;
        if probing {
            node.probe_passed = 0;
            node.probe_failed = 0;
            node.next_probe = Some(now);
            let reason = node.reason.clone();
            node.transition(&mut self.effects, id, HealthState::Probing, reason, now);
        } else {
            self.readmit(id, Reason::EjectionExpired, now);
        }
        self.take()
    }

    /// One active check of `id` ended.
    pub(crate) fn probe(&mut self, id: &str, check: Check, now: Time) -> Vec<Effect> {
        let active = self.config.active.clone();
        // Only a registry that runs active checks probes an ejected
        // endpoint; without them an ejection ends on its timer alone.
        let uneject = self.probing && self.config.outlier.uneject_on_probe;
        let next_healthy = self.jittered(active.interval);
        let next_unhealthy = self.jittered(active.unhealthy_interval);
        let Some(node) = self.nodes.get_mut(id) else {
            return self.take();
        };
        let passed = check == Check::Passed;
        if passed {
            node.probe_passed += 1;
            node.probe_failed = 0;
        } else {
            node.probe_failed += 1;
            node.probe_passed = 0;
        }
        let failure_reason = |consecutive| match check {
            Check::TimedOut => Reason::ProbeTimeout { consecutive },
            Check::Passed | Check::Failed => Reason::ProbeFailed { consecutive },
        };
        match node.state {
            HealthState::Healthy | HealthState::Degraded => {
                node.next_probe = Some(now + next_healthy);
                if !passed && node.probe_failed >= active.unhealthy_threshold {
                    let reason = failure_reason(node.probe_failed);
                    self.try_eject(id, reason, Via::Active, now);
                }
            }
            HealthState::Probing => {
                // A new endpoint needs one pass; a counted one the threshold.
                let needed = if node.counted {
                    active.healthy_threshold
                } else {
                    1
                };
                if passed && node.probe_passed >= needed {
                    self.readmit(id, Reason::ProbePassed, now);
                } else {
                    node.next_probe = Some(now + next_unhealthy);
                    if !passed {
                        let reason = failure_reason(node.probe_failed);
                        node.transition(&mut self.effects, id, HealthState::Probing, reason, now);
                    }
                }
            }
            // Probed while ejected (`outlier.uneject_on_probe`): back as
            // soon as the checks pass, before the ejection time is over.
            HealthState::Ejected if uneject => {
                if passed && node.probe_passed >= active.healthy_threshold {
                    self.readmit(id, Reason::ProbePassed, now);
                } else {
                    node.next_probe = Some(now + next_unhealthy);
                }
            }
            HealthState::Ejected => node.next_probe = None,
        }
        self.take()
    }

    /// Judges the window of every endpoint in rotation (`window` reads its
    /// counters): endpoints still failing their active checks, consecutive
    /// failures, failure rate, latency against the fleet's median. Outliers
    /// are ejected in id order while the share allows, the rest kept in
    /// rotation (panic mode); those kept earlier that no longer look like
    /// outliers recover.
    pub(crate) fn evaluate(
        &mut self,
        now: Time,
        window: impl Fn(&EndpointId) -> Window,
    ) -> Vec<Effect> {
        let outlier = self.config.outlier.clone();
        let mut candidates: Vec<(EndpointId, Reason, Via)> = Vec::new();
        let mut latencies: Vec<(EndpointId, Duration)> = Vec::new();
        let mut retained: Vec<EndpointId> = Vec::new();
        for (id, node) in &self.nodes {
            if !node.state.is_in_rotation() {
                continue;
            }
            if matches!(node.reason, Reason::PanicRetained(_)) {
                retained.push(id.clone());
            }
            // Still failing its active checks (kept in rotation by panic mode).
            if self.probing && node.probe_failed >= self.config.active.unhealthy_threshold {
                let consecutive = node.probe_failed;
                candidates.push((id.clone(), Reason::ProbeFailed { consecutive }, Via::Active));
                continue;
            }
            let stats = window(id);
            if let Some(threshold) = outlier.consecutive_failures
                && stats.consecutive >= threshold
            {
                candidates.push((
                    id.clone(),
                    Reason::ConsecutiveFailures {
                        count: stats.consecutive,
                        kind: stats.last_kind.unwrap_or(FailureKind::Other),
                    },
                    Via::Passive,
                ));
                continue;
            }
            let volume = stats.success + stats.failure;
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
                if let Some(mean) = stats.mean_latency {
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
            self.try_eject(id.as_str(), reason.clone(), *via, now);
        }
        for id in retained {
            if candidates.iter().any(|(c, _, _)| *c == id) {
                continue;
            }
            if let Some(node) = self.nodes.get_mut(&id)
                && matches!(node.reason, Reason::PanicRetained(_))
            {
                node.reset_to(
                    &mut self.effects,
                    &id,
                    HealthState::Healthy,
                    Reason::Recovered,
                    now,
                );
            }
        }
        self.take()
    }

    fn take(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Takes an endpoint out of rotation unless that would count more than
    /// the allowed share; then it stays in rotation, `PanicRetained`.
    fn try_eject(&mut self, id: &str, reason: Reason, via: Via, now: Time) {
        let max = self.max_ejected();
        let counted = self.counted();
        let unhealthy_interval = self.config.active.unhealthy_interval;
        let next_probe = self.jittered(unhealthy_interval);
        let probing = self.probing;
        let Some(node) = self.nodes.get_mut(id) else {
            return;
        };
        if !node.state.is_in_rotation() {
            return;
        }
        if counted + 1 > max {
            // The evidence is spent on this decision: the window starts
            // over, so once the fleet recovers, the failures that kept it
            // here cannot eject it later (when the share frees up).
            self.effects.push(Effect::Reset {
                id: EndpointId::from(id),
                busy: false,
            });
            if !matches!(node.reason, Reason::PanicRetained(_)) {
                self.effects.push(Effect::PanicRefused {
                    reason: reason.clone(),
                });
                node.transition(
                    &mut self.effects,
                    id,
                    HealthState::Degraded,
                    Reason::PanicRetained(Box::new(reason)),
                    now,
                );
            }
            return;
        }
        if now.saturating_sub(node.admitted_at) >= self.config.outlier.max_ejection {
            node.ejections = 0;
        }
        node.ejections += 1;
        node.counted = true;
        node.ramp_start = None;
        node.probe_passed = 0;
        node.probe_failed = 0;
        let key = EndpointId::from(id);
        self.effects.push(Effect::Reset {
            id: key.clone(),
            busy: false,
        });
        self.effects.push(Effect::Ejected {
            id: key,
            reason: reason.clone(),
        });
        match via {
            Via::Passive => {
                node.eject_until = Some(now + self.config.outlier.ejection_for(node.ejections));
                // Probed while ejected only to come back early.
                node.next_probe =
                    (probing && self.config.outlier.uneject_on_probe).then_some(now + next_probe);
                node.transition(&mut self.effects, id, HealthState::Ejected, reason, now);
            }
            Via::Active => {
                node.eject_until = None;
                node.next_probe = Some(now + next_probe);
                node.transition(&mut self.effects, id, HealthState::Probing, reason, now);
            }
        }
    }

    /// Puts an endpoint back in rotation through slow start.
    fn readmit(&mut self, id: &str, reason: Reason, now: Time) {
        let next_probe = self.jittered(self.config.active.interval);
        let probing = self.probing;
        let ramp = !self.config.slow_start.window.is_zero();
        let Some(node) = self.nodes.get_mut(id) else {
            return;
        };
        node.counted = false;
        node.eject_until = None;
        node.admitted_at = now;
        node.ramp_start = ramp.then_some(now);
        node.probe_passed = 0;
        node.probe_failed = 0;
        node.next_probe = probing.then_some(now + next_probe);
        self.effects.push(Effect::Reset {
            id: EndpointId::from(id),
            busy: true,
        });
        node.transition(&mut self.effects, id, HealthState::Healthy, reason, now);
    }

    /// After the fleet shrank: puts counted endpoints back in rotation
    /// (soonest to return first) until the share holds again.
    fn enforce_share(&mut self, now: Time) {
        let max = self.max_ejected();
        let mut counted: Vec<(Option<Time>, EndpointId)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.counted)
            .map(|(id, n)| (n.eject_until, id.clone()))
            .collect();
        if counted.len() <= max {
            return;
        }
        counted.sort();
        let excess = counted.len() - max;
        for (_, id) in counted.into_iter().take(excess) {
            if let Some(node) = self.nodes.get_mut(&id) {
                let why = node.reason.clone();
                self.effects.push(Effect::PanicRefused {
                    reason: why.clone(),
                });
                node.counted = false;
                node.eject_until = None;
                node.admitted_at = now;
                node.reset_to(
                    &mut self.effects,
                    &id,
                    HealthState::Degraded,
                    Reason::PanicRetained(Box::new(why)),
                    now,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::config::{ActiveConfig, OutlierConfig};

    const IDS: usize = 8;

    #[derive(Clone, Debug)]
    enum Event {
        Advance(u64),
        Insert(usize),
        Remove(usize),
        Run(usize, u32),
        Evaluate(Vec<(u32, u64, u64, u64)>),
        Probe(usize, u8),
        Expire(usize),
        Busy(usize),
        Tick(Vec<bool>),
    }

    fn event() -> impl Strategy<Value = Event> {
        let windows = proptest::collection::vec((0u32..5, 0u64..30, 0u64..30, 1u64..400), IDS);
        prop_oneof![
            4 => (0u64..20_000).prop_map(Event::Advance),
            2 => (0..IDS).prop_map(Event::Insert),
            1 => (0..IDS).prop_map(Event::Remove),
            3 => (0..IDS, 1u32..6).prop_map(|(i, run)| Event::Run(i, run)),
            2 => windows.prop_map(Event::Evaluate),
            3 => (0..IDS, 0u8..3).prop_map(|(i, c)| Event::Probe(i, c)),
            3 => (0..IDS).prop_map(Event::Expire),
            1 => (0..IDS).prop_map(Event::Busy),
            1 => proptest::collection::vec(any::<bool>(), IDS).prop_map(Event::Tick),
        ]
    }

    fn id(i: usize) -> EndpointId {
        EndpointId::from(format!("n{i}"))
    }

    fn config(percent: u8) -> HealthConfig {
        HealthConfig::new("machine")
            .max_ejection_percent(percent)
            .active(
                ActiveConfig::default()
                    .healthy_threshold(2)
                    .unhealthy_threshold(2),
            )
            .outlier(
                OutlierConfig::default()
                    .consecutive_failures(Some(3))
                    .min_volume(10)
                    .latency_min_endpoints(2)
                    .ejection(Duration::from_secs(5), Duration::from_secs(40)),
            )
    }

    /// Runs `events`, checking the machine's promises after each one.
    fn run(
        percent: u8,
        probing: bool,
        fleet: usize,
        events: Vec<Event>,
    ) -> Result<(), TestCaseError> {
        let config = config(percent);
        let mut machine = Machine::new(config.clone(), probing, fastrand::Rng::with_seed(7));
        let mut now = Duration::ZERO;
        for i in 0..fleet {
            machine.insert(id(i), now);
        }
        // Consecutive passed checks per endpoint, as the test sees them.
        let mut passes: BTreeMap<EndpointId, u32> = BTreeMap::new();
        for event in events {
            let before: HashMap<EndpointId, Node> = machine
                .nodes()
                .map(|(id, node)| (id.clone(), node.clone()))
                .collect();
            let removal = matches!(event, Event::Remove(_));
            let effects = match event {
                Event::Advance(ms) => {
                    now += Duration::from_millis(ms);
                    Vec::new()
                }
                Event::Insert(i) => {
                    if machine.get(id(i).as_str()).is_none() {
                        passes.remove(&id(i));
                        let node = machine.insert(id(i), now);
                        prop_assert!(!node.counted);
                        prop_assert_eq!(node.state.is_in_rotation(), !probing);
                    }
                    Vec::new()
                }
                Event::Remove(i) => machine.remove(id(i).as_str(), now),
                Event::Run(i, run) => {
                    machine.consecutive_failures(id(i).as_str(), run, FailureKind::Timeout, now)
                }
                Event::Evaluate(windows) => machine.evaluate(now, |key| {
                    let i: usize = key.as_str()[1..].parse().unwrap();
                    let (consecutive, success, failure, latency) = windows[i];
                    Window {
                        consecutive,
                        last_kind: Some(FailureKind::Server),
                        success,
                        failure,
                        mean_latency: Some(Duration::from_millis(latency)),
                    }
                }),
                Event::Probe(i, code) => {
                    let check = match code {
                        0 => Check::Passed,
                        1 => Check::Failed,
                        _ => Check::TimedOut,
                    };
                    let counter = passes.entry(id(i)).or_default();
                    if check == Check::Passed {
                        *counter += 1;
                    } else {
                        *counter = 0;
                    }
                    machine.probe(id(i).as_str(), check, now)
                }
                Event::Expire(i) => machine.expire(id(i).as_str(), now),
                Event::Busy(i) => machine.busy(id(i).as_str(), None, now),
                Event::Tick(busy) => machine.tick(now, |key| {
                    let i: usize = key.as_str()[1..].parse().unwrap();
                    busy[i]
                }),
            };

            // The share is never exceeded.
            let max = machine.max_ejected();
            let counted = machine.counted();
            prop_assert!(counted <= max, "{counted} counted, max {max}");
            for (key, node) in machine.nodes() {
                // Counted endpoints are out of rotation; ejected ones have a
                // time to come back.
                if node.counted {
                    prop_assert!(!node.state.is_in_rotation(), "{key} counted in rotation");
                }
                prop_assert_eq!(
                    node.state == HealthState::Ejected,
                    node.eject_until.is_some(),
                    "{} {:?}",
                    key,
                    node
                );
                if node.state.is_in_rotation() && probing {
                    prop_assert!(node.next_probe.is_some());
                }
            }
            for effect in &effects {
                match effect {
                    // Refusing an ejection happens only with the share full.
                    Effect::PanicRefused { .. } => prop_assert_eq!(counted, max),
                    Effect::Ejected { id, .. } => {
                        let node = machine.get(id.as_str()).unwrap();
                        prop_assert!(node.counted);
                        if let Some(until) = node.eject_until {
                            let length = until - now;
                            prop_assert_eq!(length, config.outlier.ejection_for(node.ejections));
                            prop_assert!(length <= config.outlier.max_ejection);
                        }
                    }
                    Effect::Changed {
                        id,
                        from,
                        to,
                        reason,
                        ..
                    } => {
                        let was = &before[id];
                        prop_assert_eq!(was.state, *from);
                        // Back from an ejection only after its time (or
                        // kept in rotation when a removal shrank the share,
                        // or, with active checks and `uneject_on_probe`,
                        // after `healthy_threshold` passing checks).
                        if *from == HealthState::Ejected && *to != HealthState::Ejected {
                            let until = was.eject_until.unwrap();
                            let unejected = probing
                                && config.outlier.uneject_on_probe
                                && *reason == Reason::ProbePassed
                                && passes[id] >= config.active.healthy_threshold;
                            prop_assert!(
                                now >= until
                                    || unejected
                                    || (removal && matches!(reason, Reason::PanicRetained(_))),
                                "{} left its ejection at {:?}, before {:?}",
                                id,
                                now,
                                until
                            );
                        }
                        // Re-admitted after a counted outage only with
                        // `healthy_threshold` passes in a row.
                        if *reason == Reason::ProbePassed && was.counted {
                            prop_assert!(passes[id] >= config.active.healthy_threshold);
                        }
                        // Entering rotation starts a ramp (or the state is
                        // panic mode's, which keeps the old ramp).
                        if !from.is_in_rotation()
                            && to.is_in_rotation()
                            && !matches!(reason, Reason::PanicRetained(_))
                        {
                            prop_assert!(machine.get(id.as_str()).unwrap().ramp_start.is_some());
                        }
                    }
                    Effect::Reset { .. } => {}
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn the_machine_keeps_its_promises(
            percent in prop_oneof![Just(0u8), Just(34), Just(50), Just(100), 0u8..=100],
            probing in any::<bool>(),
            fleet in 1usize..=IDS,
            events in proptest::collection::vec(event(), 1..80),
        ) {
            run(percent, probing, fleet, events)?;
        }
    }

    #[test]
    fn a_full_share_keeps_outliers_in_rotation_and_they_recover() {
        let mut machine = Machine::new(config(50), false, fastrand::Rng::with_seed(1));
        let t = Duration::ZERO;
        for i in 0..4 {
            machine.insert(id(i), t);
        }
        let effects = machine.consecutive_failures("n0", 3, FailureKind::Transport, t);
        assert!(effects.iter().any(|e| matches!(e, Effect::Ejected { .. })));
        machine.consecutive_failures("n1", 3, FailureKind::Transport, t);
        let effects = machine.consecutive_failures("n2", 3, FailureKind::Transport, t);
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::PanicRefused { .. })),
            "{effects:?}"
        );
        let n2 = machine.get("n2").unwrap();
        assert_eq!(n2.state, HealthState::Degraded);
        assert!(matches!(n2.reason, Reason::PanicRetained(_)));
        assert_eq!(machine.counted(), 2);
        // Early timers do nothing; on time the ejection ends.
        assert!(machine.expire("n0", Duration::from_secs(4)).is_empty());
        machine.expire("n0", Duration::from_secs(5));
        assert_eq!(machine.get("n0").unwrap().reason, Reason::EjectionExpired);
        assert!(machine.get("n0").unwrap().ramp_start.is_some());
        // A clean window: the retained outlier recovers.
        machine.evaluate(Duration::from_secs(6), |_| Window::default());
        assert_eq!(machine.get("n2").unwrap().reason, Reason::Recovered);
    }

    #[test]
    fn an_ejected_endpoint_whose_checks_pass_comes_back_before_its_time() {
        for uneject in [true, false] {
            let mut config = config(50);
            config.outlier = config.outlier.uneject_on_probe(uneject);
            let mut machine = Machine::new(config, true, fastrand::Rng::with_seed(1));
            let t = Duration::ZERO;
            for i in 0..4 {
                machine.insert(id(i), t);
                machine.probe(id(i).as_str(), Check::Passed, t);
            }
            machine.consecutive_failures("n0", 3, FailureKind::Transport, t);
            let n0 = machine.get("n0").unwrap();
            assert_eq!(n0.state, HealthState::Ejected);
            // Probed while ejected only when unejecting on probes.
            assert_eq!(
                n0.next_probe.is_some_and(|at| at < Duration::from_secs(5)),
                uneject
            );
            // Two passing checks, well before the 5 s ejection is over.
            machine.probe("n0", Check::Passed, Duration::from_secs(2));
            machine.probe("n0", Check::Passed, Duration::from_secs(4));
            let n0 = machine.get("n0").unwrap();
            if uneject {
                assert_eq!(n0.state, HealthState::Healthy);
                assert_eq!(n0.reason, Reason::ProbePassed);
                assert!(n0.eject_until.is_none() && n0.ramp_start.is_some());
            } else {
                assert_eq!(n0.state, HealthState::Ejected);
            }
        }
    }

    #[test]
    fn a_removal_that_shrinks_the_share_readmits_the_soonest_back() {
        let mut machine = Machine::new(config(50), false, fastrand::Rng::with_seed(1));
        for i in 0..4 {
            machine.insert(id(i), Duration::ZERO);
        }
        machine.consecutive_failures("n0", 3, FailureKind::Transport, Duration::ZERO);
        machine.consecutive_failures("n1", 3, FailureKind::Transport, Duration::from_secs(1));
        machine.remove("n3", Duration::from_secs(2));
        // Three endpoints allow one ejected: n0 (back soonest) stays in.
        assert!(matches!(
            machine.get("n0").unwrap().reason,
            Reason::PanicRetained(_)
        ));
        assert_eq!(machine.get("n1").unwrap().state, HealthState::Ejected);
        assert_eq!(machine.counted(), 1);
    }
}
