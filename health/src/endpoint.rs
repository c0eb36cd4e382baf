//! Endpoints and the published view of their health.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use keel_core::{ArgumentError, EndpointId, FailureKind};

use crate::error::{HealthError, Result};

/// An endpoint to keep healthy: an id, an address, a relative capacity
/// weight, its batch slots and free-form metadata. Cheap to clone.
///
/// The id is keel-core's [`EndpointId`], and it is the very value (clones
/// share its cells) that [`Health::discover`](crate::Health::discover)
/// hands the balancer as the endpoint's key: the registry keeps its live
/// weight current (slow start, busy dampening, 0 while out of rotation)
/// and installs a reporter on it, so outcomes the balancer imposes (an
/// attempt timeout) reach passive outlier detection.
///
/// ```
/// use keel_health::{Endpoint, EndpointKey};
///
/// let endpoint = Endpoint::new("node-1", "10.0.0.7:8000")
///     .weight(2.0) // twice the GPUs of a weight-1 node
///     .capacity(8) // serves 8 requests at once
///     .meta("zone", "eu-west-1a");
/// assert_eq!(endpoint.id().as_str(), "node-1");
/// assert_eq!(endpoint.id().capacity(), Some(8));
/// assert_eq!(endpoint.metadata().get("zone").map(String::as_str), Some("eu-west-1a"));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    id: EndpointId,
    address: Arc<str>,
    weight: f64,
    metadata: Arc<BTreeMap<String, String>>,
}

impl Endpoint {
    /// An endpoint with weight 1 and no metadata.
    pub fn new(id: impl Into<EndpointId>, address: impl Into<String>) -> Self {
        Endpoint {
            id: id.into(),
            address: Arc::from(address.into()),
            weight: 1.0,
            metadata: Arc::default(),
        }
    }

    /// Sets the relative capacity weight (finite, above 0; default 1).
    /// [`Health::insert`](crate::Health::insert) refuses other values.
    /// The weight published for the endpoint (in its snapshot status and in
    /// its id's weight cell) is this divided by the fleet's largest, times
    /// slow start and busy dampening.
    pub fn weight(mut self, weight: f64) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the requests this endpoint serves at once (its batch slots); a
    /// balancer reading discovery keys never sends more. Written into the
    /// id's capacity cell ([`EndpointKey::capacity`](keel_core::EndpointKey::capacity)),
    /// shared by every clone of the id. `0` means not known (the
    /// balancer's configured capacity applies).
    pub fn capacity(self, slots: u32) -> Self {
        self.id.set_capacity(Some(slots));
        self
    }

    /// Adds one metadata entry.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.metadata).insert(key.into(), value.into());
        self
    }

    /// The id: the key the discover stream hands the balancer, with the
    /// live weight, capacity and reporter health keeps on it.
    pub fn id(&self) -> &EndpointId {
        &self.id
    }

    /// The address (for probes and the services you build per endpoint).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The configured relative capacity weight.
    pub fn configured_weight(&self) -> f64 {
        self.weight
    }

    /// The metadata.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.id.as_str().is_empty() {
            return Err(HealthError::InvalidArgument(ArgumentError::new(
                "id",
                "must not be empty",
            )));
        }
        if !(self.weight > 0.0 && self.weight.is_finite()) {
            return Err(HealthError::InvalidArgument(ArgumentError::new(
                "weight",
                format!("must be a finite number above 0, got {}", self.weight),
            )));
        }
        Ok(())
    }
}

/// Where an endpoint stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HealthState {
    /// In rotation, nothing known against it.
    Healthy,
    /// In rotation with a known problem: busy (weight dampened), or an
    /// outlier kept in rotation because the max-ejection share is reached.
    Degraded,
    /// Out of rotation until its ejection time is over.
    Ejected,
    /// Out of rotation, being probed: newly added, or waiting to be
    /// re-admitted after an ejection or failed active checks.
    Probing,
}

impl HealthState {
    /// Whether traffic should go to the endpoint (`Healthy` or `Degraded`).
    pub fn is_in_rotation(self) -> bool {
        match self {
            HealthState::Healthy | HealthState::Degraded => true,
            HealthState::Ejected | HealthState::Probing => false,
        }
    }

    /// The state's name as used in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Degraded => "degraded",
            HealthState::Ejected => "ejected",
            HealthState::Probing => "probing",
        }
    }
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an endpoint is in its state.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Reason {
    /// Just added (probing first when a probe is configured).
    Added,
    /// Passed the active checks (the endpoint came back).
    ProbePassed,
    /// Failed this many active checks in a row.
    ProbeFailed {
        /// Consecutive failed probes.
        consecutive: u32,
    },
    /// Active checks timed out this many times in a row.
    ProbeTimeout {
        /// Consecutive failed probes (the last one a timeout).
        consecutive: u32,
    },
    /// This many request failures in a row.
    ConsecutiveFailures {
        /// The run's length.
        count: u32,
        /// The last failure's kind.
        kind: FailureKind,
    },
    /// The failure share over the sliding window crossed the threshold.
    FailureRate {
        /// The failure share in `[0, 1]`.
        rate: f64,
        /// Outcomes in the window.
        volume: u64,
    },
    /// Mean latency far above the fleet's median.
    LatencyOutlier {
        /// The endpoint's mean latency over the window.
        mean: Duration,
        /// The fleet's median of means.
        median: Duration,
    },
    /// The ejection time is over and no probe is configured.
    EjectionExpired,
    /// The endpoint answered busy; its weight is dampened until the
    /// cooldown (or its `Retry-After`) is over.
    Busy {
        /// The `Retry-After` it sent, if any.
        retry_after: Option<Duration>,
    },
    /// The busy cooldown is over.
    BusyCleared,
    /// An outlier kept in rotation by panic mode no longer looks like one.
    Recovered,
    /// It should be ejected, but the max-ejection share is reached, so it
    /// stays in rotation (panic mode). The inner reason is why it would go.
    PanicRetained(Box<Reason>),
}

impl Reason {
    /// A short, stable name for metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Added => "added",
            Reason::ProbePassed => "probe_passed",
            Reason::ProbeFailed { .. } => "probe_failed",
            Reason::ProbeTimeout { .. } => "probe_timeout",
            Reason::ConsecutiveFailures { .. } => "consecutive_failures",
            Reason::FailureRate { .. } => "failure_rate",
            Reason::LatencyOutlier { .. } => "latency_outlier",
            Reason::EjectionExpired => "ejection_expired",
            Reason::Busy { .. } => "busy",
            Reason::BusyCleared => "busy_cleared",
            Reason::Recovered => "recovered",
            Reason::PanicRetained(_) => "panic_retained",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Added => f.write_str("added"),
            Reason::ProbePassed => f.write_str("active checks passed"),
            Reason::ProbeFailed { consecutive } => {
                write!(f, "{consecutive} active checks failed in a row")
            }
            Reason::ProbeTimeout { consecutive } => {
                write!(
                    f,
                    "{consecutive} active checks failed in a row (last timed out)"
                )
            }
            Reason::ConsecutiveFailures { count, kind } => {
                write!(f, "{count} request failures in a row (last: {kind})")
            }
            Reason::FailureRate { rate, volume } => {
                write!(
                    f,
                    "failure rate {:.1}% over {volume} requests",
                    rate * 100.0
                )
            }
            Reason::LatencyOutlier { mean, median } => {
                write!(
                    f,
                    "mean latency {mean:?} against a fleet median of {median:?}"
                )
            }
            Reason::EjectionExpired => f.write_str("ejection time over"),
            Reason::Busy {
                retry_after: Some(after),
            } => write!(f, "busy (retry after {after:?})"),
            Reason::Busy { retry_after: None } => f.write_str("busy"),
            Reason::BusyCleared => f.write_str("busy cooldown over"),
            Reason::Recovered => f.write_str("no longer an outlier"),
            Reason::PanicRetained(why) => {
                write!(f, "kept in rotation, max ejection reached ({why})")
            }
        }
    }
}

/// One endpoint's published state.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct EndpointStatus {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Where it stands.
    pub state: HealthState,
    /// The effective weight in `[0, 1]`: the configured weight divided by
    /// the fleet's largest configured weight, times the slow-start ramp,
    /// times the busy dampening; 0 when out of rotation. Route in
    /// proportion to it.
    pub weight: f64,
    /// Why it is in this state.
    pub reason: Reason,
    /// When it entered this state.
    pub since: Instant,
    /// Ejections so far in the current streak (resets after a quiet
    /// `outlier.max_ejection`).
    pub ejections: u32,
    /// Changes when the endpoint is removed and added again under the same id.
    pub(crate) incarnation: u64,
    /// Counts toward the max-ejection share (out of rotation for health
    /// reasons after having been admitted).
    pub(crate) counted: bool,
}

/// A point-in-time view of every endpoint, published on a
/// `tokio::sync::watch` channel by [`Health::subscribe`](crate::Health::subscribe).
///
/// Cheap to clone and read: the map is behind an `Arc`, and a new snapshot
/// is only built when something changed.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), keel_health::HealthError> {
/// use keel_health::{Endpoint, Health, HealthConfig};
///
/// let health = Health::new(HealthConfig::default())?;
/// health.insert(Endpoint::new("a", "10.0.0.1:80"))?;
/// let snapshot = health.snapshot();
/// assert!(snapshot.get("a").unwrap().state.is_in_rotation());
/// // Slow start: a new endpoint begins at the ramp's floor.
/// assert!(snapshot.weight("a") > 0.0 && snapshot.weight("a") < 1.0);
/// assert_eq!(snapshot.weight("unknown"), 0.0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Snapshot {
    endpoints: Arc<HashMap<EndpointId, EndpointStatus>>,
    panic: bool,
    max_ejected: usize,
    taken_at: Instant,
}

impl Snapshot {
    pub(crate) fn new(
        endpoints: HashMap<EndpointId, EndpointStatus>,
        panic: bool,
        max_ejected: usize,
        taken_at: Instant,
    ) -> Self {
        Snapshot {
            endpoints: Arc::new(endpoints),
            panic,
            max_ejected,
            taken_at,
        }
    }

    /// One endpoint's status.
    pub fn get(&self, id: &str) -> Option<&EndpointStatus> {
        self.endpoints.get(id)
    }

    /// One endpoint's effective weight in `[0, 1]`; 0 if unknown or out of rotation.
    pub fn weight(&self, id: &str) -> f64 {
        self.endpoints.get(id).map_or(0.0, |s| s.weight)
    }

    /// Every endpoint, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &EndpointStatus> {
        self.endpoints.values()
    }

    /// The endpoints in rotation.
    pub fn in_rotation(&self) -> impl Iterator<Item = &EndpointStatus> {
        self.iter().filter(|s| s.state.is_in_rotation())
    }

    /// How many endpoints are out of rotation for health reasons (ejected,
    /// or probing after an ejection or failed checks; newly added endpoints
    /// probing for the first time are not counted).
    pub fn ejected_count(&self) -> usize {
        self.iter().filter(|s| s.counted).count()
    }

    /// The most endpoints that may be ejected at once in this fleet.
    pub fn max_ejected(&self) -> usize {
        self.max_ejected
    }

    /// Whether an ejection was refused because the max-ejection share is
    /// reached and an endpoint that should be out is kept in rotation.
    pub fn is_panic(&self) -> bool {
        self.panic
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether there are no endpoints.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// When this snapshot was built.
    pub fn taken_at(&self) -> Instant {
        self.taken_at
    }

    /// The very same snapshot (one built once and cloned).
    pub(crate) fn is(&self, other: &Snapshot) -> bool {
        Arc::ptr_eq(&self.endpoints, &other.endpoints)
    }

    /// Same endpoints in the same states with the same weights (ignores
    /// `taken_at`).
    pub(crate) fn same_as(&self, other: &Snapshot) -> bool {
        self.panic == other.panic
            && self.max_ejected == other.max_ejected
            && *self.endpoints == *other.endpoints
    }
}
