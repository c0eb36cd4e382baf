//! The metric names `keel-health` records.
//!
//! | name | kind | labels | meaning |
//! | --- | --- | --- | --- |
//! | `keel_health_state_changes_total` | counter | `health`, `endpoint`, `to`, `reason` | every endpoint state change |
//! | `keel_health_ejections_total` | counter | `health`, `endpoint`, `reason` | endpoints taken out of rotation |
//! | `keel_health_panic_total` | counter | `health`, `reason` | ejections refused because the max-ejection share was reached (the endpoint stayed in rotation) |
//! | `keel_health_busy_total` | counter | `health`, `endpoint` | busy outcomes (429/503) recorded |
//! | `keel_health_probes_total` | counter | `health`, `result` (`passed`, `failed`, `timeout`) | active checks run |
//! | `keel_health_endpoints` | gauge | `health`, `state` | endpoints per state, set on every publish |
//! | `keel_health_ejected` | gauge | `health` | endpoints counting toward the max-ejection share |
//! | `keel_health_panic` | gauge | `health` | 1 while an outlier is kept in rotation by the max-ejection share |
//! | `keel_health_breaker_transitions_total` | counter | `breaker`, `to` (`open`, `half_open`, `closed`) | circuit-breaker state changes |
//! | `keel_health_breaker_rejected_total` | counter | `breaker` | requests refused at once by an open (or full half-open) breaker |
//!
//! Counters with a fixed label set are registered when the registry or the
//! breaker is built, so install the `metrics` recorder first. Every state
//! change is also a `tracing` event (`info`, `warn` for panic mode) with the
//! endpoint, the old and new state and the reason.

use metrics::{Counter, Gauge};

use crate::endpoint::{HealthState, Reason};

/// Registered metric handles of one registry.
#[derive(Debug)]
pub(crate) struct HealthMetrics {
    name: String,
    probes_passed: Counter,
    probes_failed: Counter,
    probes_timeout: Counter,
    endpoints: [Gauge; 4],
    ejected: Gauge,
    panic: Gauge,
}

const STATES: [HealthState; 4] = [
    HealthState::Healthy,
    HealthState::Degraded,
    HealthState::Ejected,
    HealthState::Probing,
];

impl HealthMetrics {
    pub(crate) fn new(name: &str) -> Self {
        let health = name.to_owned();
        let probes = |result: &'static str| metrics::counter!("keel_health_probes_total", "health" => health.clone(), "result" => result);
        HealthMetrics {
            probes_passed: probes("passed"),
            probes_failed: probes("failed"),
            probes_timeout: probes("timeout"),
            endpoints: STATES.map(|state| {
                metrics::gauge!("keel_health_endpoints", "health" => health.clone(), "state" => state.as_str())
            }),
            ejected: metrics::gauge!("keel_health_ejected", "health" => health.clone()),
            panic: metrics::gauge!("keel_health_panic", "health" => health.clone()),
            name: health,
        }
    }

    pub(crate) fn busy_counter(&self, endpoint: &str) -> Counter {
        metrics::counter!("keel_health_busy_total", "health" => self.name.clone(), "endpoint" => endpoint.to_owned())
    }

    pub(crate) fn state_change(&self, endpoint: &str, to: HealthState, reason: &Reason) {
        metrics::counter!(
            "keel_health_state_changes_total",
            "health" => self.name.clone(),
            "endpoint" => endpoint.to_owned(),
            "to" => to.as_str(),
            "reason" => reason.as_str()
        )
        .increment(1);
    }

    pub(crate) fn ejection(&self, endpoint: &str, reason: &Reason) {
        metrics::counter!(
            "keel_health_ejections_total",
            "health" => self.name.clone(),
            "endpoint" => endpoint.to_owned(),
            "reason" => reason.as_str()
        )
        .increment(1);
    }

    pub(crate) fn panic_refusal(&self, reason: &Reason) {
        metrics::counter!(
            "keel_health_panic_total",
            "health" => self.name.clone(),
            "reason" => reason.as_str()
        )
        .increment(1);
    }

    pub(crate) fn probe(&self, result: &'static str) {
        match result {
            "passed" => self.probes_passed.increment(1),
            "timeout" => self.probes_timeout.increment(1),
            _ => self.probes_failed.increment(1),
        }
    }

    pub(crate) fn publish(&self, per_state: [usize; 4], ejected: usize, panic: bool) {
        for (gauge, count) in self.endpoints.iter().zip(per_state) {
            gauge.set(count as f64);
        }
        self.ejected.set(ejected as f64);
        self.panic.set(if panic { 1.0 } else { 0.0 });
    }

    pub(crate) fn state_index(state: HealthState) -> usize {
        match state {
            HealthState::Healthy => 0,
            HealthState::Degraded => 1,
            HealthState::Ejected => 2,
            HealthState::Probing => 3,
        }
    }
}

/// Registered metric handles of one circuit breaker.
#[derive(Debug)]
pub(crate) struct BreakerMetrics {
    pub(crate) to_open: Counter,
    pub(crate) to_half_open: Counter,
    pub(crate) to_closed: Counter,
    pub(crate) rejected: Counter,
}

impl BreakerMetrics {
    pub(crate) fn new(name: &str) -> Self {
        let transitions = |to: &'static str| metrics::counter!("keel_health_breaker_transitions_total", "breaker" => name.to_owned(), "to" => to);
        BreakerMetrics {
            to_open: transitions("open"),
            to_half_open: transitions("half_open"),
            to_closed: transitions("closed"),
            rejected: metrics::counter!("keel_health_breaker_rejected_total", "breaker" => name.to_owned()),
        }
    }
}
