//! Settings of the admission [`Scheduler`](crate::Scheduler).

use std::collections::BTreeMap;
use std::time::Duration;

use keel_queue::MAX_PRIORITY_LEVELS;
use serde::{Deserialize, Serialize};

use crate::error::{Result, SchedulerError};

/// One priority class.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ClassConfig {
    /// The share of dispatches this class is guaranteed while it has work,
    /// even when higher classes are saturated: the anti-starvation floor.
    /// `0.0` is strict priority. The shares of all classes must add up to
    /// at most 1. Default `0.0`.
    pub min_share: f64,
}

impl Default for ClassConfig {
    fn default() -> Self {
        ClassConfig { min_share: 0.0 }
    }
}

impl ClassConfig {
    /// A class guaranteed `min_share` of dispatches while it has work.
    pub fn with_min_share(min_share: f64) -> Self {
        ClassConfig { min_share }
    }
}

/// Overrides for one tenant.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct TenantConfig {
    /// The tenant's weight in its class's round robin (cost served is
    /// proportional to weight). `None` uses
    /// [`SchedulerConfig::default_weight`].
    pub weight: Option<u32>,
    /// The most requests this tenant may have waiting. `None` uses
    /// [`SchedulerConfig::max_queued_per_tenant`].
    pub max_queued: Option<usize>,
    /// The most requests of this tenant in flight at once. `None` uses
    /// [`ConcurrencyConfig::max_in_flight_per_tenant`].
    pub max_in_flight: Option<usize>,
}

impl TenantConfig {
    /// Sets [`weight`](Self::weight).
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = Some(weight);
        self
    }

    /// Sets [`max_queued`](Self::max_queued).
    pub fn max_queued(mut self, max: usize) -> Self {
        self.max_queued = Some(max);
        self
    }

    /// Sets [`max_in_flight`](Self::max_in_flight).
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = Some(max);
        self
    }
}

/// An additive-increase, multiplicative-decrease concurrency limit driven
/// by latency (as in Netflix's concurrency-limits `AIMDLimit`).
///
/// Every completed request is a sample. Slower than `latency_target`, the
/// limit is multiplied by `backoff_ratio` (at most once per round trip:
/// only requests dispatched after the last decrease can lower it again).
/// Otherwise, while at least half the limit is in use, the limit grows by
/// `1 / limit`, about one per round trip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct AimdConfig {
    /// The starting limit. Default 16.
    pub initial: usize,
    /// The limit never goes below this. Default 1.
    pub min: usize,
    /// The limit never goes above this. Default 512.
    pub max: usize,
    /// Requests slower than this lower the limit. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub latency_target: Duration,
    /// The factor applied on a slow sample, in `(0, 1)`. Default 0.9.
    pub backoff_ratio: f64,
}

impl Default for AimdConfig {
    fn default() -> Self {
        AimdConfig {
            initial: 16,
            min: 1,
            max: 512,
            latency_target: Duration::from_secs(1),
            backoff_ratio: 0.9,
        }
    }
}

impl AimdConfig {
    /// Defaults with this latency target.
    pub fn new(latency_target: Duration) -> Self {
        AimdConfig {
            latency_target,
            ..AimdConfig::default()
        }
    }

    /// Sets [`initial`](Self::initial), [`min`](Self::min) and [`max`](Self::max).
    pub fn limits(mut self, initial: usize, min: usize, max: usize) -> Self {
        self.initial = initial;
        self.min = min;
        self.max = max;
        self
    }

    /// Sets [`backoff_ratio`](Self::backoff_ratio).
    pub fn backoff_ratio(mut self, ratio: f64) -> Self {
        self.backoff_ratio = ratio;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.min == 0 {
            return Err(SchedulerError::config(
                "concurrency.adaptive.min",
                "must be at least 1",
            ));
        }
        if self.min > self.max {
            return Err(SchedulerError::config(
                "concurrency.adaptive.min",
                "must not exceed `concurrency.adaptive.max`",
            ));
        }
        if !(self.min..=self.max).contains(&self.initial) {
            return Err(SchedulerError::config(
                "concurrency.adaptive.initial",
                "must lie between `min` and `max`",
            ));
        }
        if !(self.backoff_ratio > 0.0 && self.backoff_ratio < 1.0) {
            return Err(SchedulerError::config(
                "concurrency.adaptive.backoff_ratio",
                "must be between 0 and 1 (exclusive)",
            ));
        }
        if self.latency_target.is_zero() {
            return Err(SchedulerError::config(
                "concurrency.adaptive.latency_target",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// How many requests may be in flight (dispatched, not yet answered).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ConcurrencyConfig {
    /// A fixed limit for the whole scheduler. `None` (the default) leaves
    /// it to the service's readiness (or to `adaptive`).
    pub max_in_flight: Option<usize>,
    /// A fixed limit per tenant; a tenant at its limit is skipped by the
    /// round robin until one of its requests finishes. Default `None`.
    pub max_in_flight_per_tenant: Option<usize>,
    /// An adaptive limit for the whole scheduler; when set, it replaces
    /// `max_in_flight`. Default `None`.
    pub adaptive: Option<AimdConfig>,
}

impl ConcurrencyConfig {
    /// Sets [`max_in_flight`](Self::max_in_flight).
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = Some(max);
        self
    }

    /// Sets [`max_in_flight_per_tenant`](Self::max_in_flight_per_tenant).
    pub fn max_in_flight_per_tenant(mut self, max: usize) -> Self {
        self.max_in_flight_per_tenant = Some(max);
        self
    }

    /// Sets [`adaptive`](Self::adaptive).
    pub fn adaptive(mut self, aimd: AimdConfig) -> Self {
        self.adaptive = Some(aimd);
        self
    }
}

/// CoDel-style shedding on queueing delay, per priority class.
///
/// At the end of every `interval` the scheduler looks at the smallest
/// queueing delay of the requests each class dispatched in it (or, if the
/// class dispatched nothing while it had work, how long it has had work).
/// Above `target`, the class has a standing queue and is *shedding*: its
/// requests that have waited longer than `target` are answered
/// [`Overloaded`](crate::Rejection::Overloaded), and so are new ones while
/// its queue is older than `target`. Because higher classes are served
/// first, the lowest class builds a standing queue first and is shed first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct SheddingConfig {
    /// Turns shedding on. Default `true`.
    pub enabled: bool,
    /// The acceptable standing queueing delay. Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub target: Duration,
    /// How long the delay must stay above target before shedding, and how
    /// often it is re-evaluated. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// The longest `retry_after` answered. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
}

impl Default for SheddingConfig {
    fn default() -> Self {
        SheddingConfig {
            enabled: true,
            target: Duration::from_millis(100),
            interval: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

impl SheddingConfig {
    /// Shedding on, with this target and interval.
    pub fn new(target: Duration, interval: Duration) -> Self {
        SheddingConfig {
            enabled: true,
            target,
            interval,
            ..SheddingConfig::default()
        }
    }

    /// Shedding off.
    pub fn disabled() -> Self {
        SheddingConfig {
            enabled: false,
            ..SheddingConfig::default()
        }
    }
}

/// Settings of the admission [`Scheduler`](crate::Scheduler).
///
/// Durations deserialize from human strings (`"250ms"`, `"30s"`).
///
/// ```
/// use std::time::Duration;
/// use keel_scheduler::{ClassConfig, ConcurrencyConfig, SchedulerConfig, TenantConfig};
///
/// let config = SchedulerConfig::new("gateway")
///     .classes(vec![ClassConfig::with_min_share(0.05), ClassConfig::default(), ClassConfig::default()])
///     .max_queued(5_000)
///     .tenant("acme", TenantConfig::default().weight(3))
///     .concurrency(ConcurrencyConfig::default().max_in_flight(64));
/// assert!(config.validate().is_ok());
/// assert!(SchedulerConfig::new("g").max_queued(0).validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct SchedulerConfig {
    /// The scheduler's name, the `scheduler` label of its metrics. Default
    /// `"default"`.
    pub name: String,
    /// The priority classes, lowest first: a ticket's
    /// [`Priority`](crate::Priority) `p` lands in class `min(p, len - 1)`.
    /// Default three classes (low, normal, high, matching
    /// `keel_queue::Priority`), low guaranteed a 5 % share.
    pub classes: Vec<ClassConfig>,
    /// The most requests waiting in total; more are rejected
    /// [`QueueFull`](crate::Rejection::QueueFull). Default 10,000.
    pub max_queued: usize,
    /// The most requests one tenant may have waiting. Default 1,000.
    pub max_queued_per_tenant: usize,
    /// The longest a request may wait before it is answered
    /// [`DeadlineExceeded`](crate::SchedulerError::DeadlineExceeded), so
    /// nothing waits forever. A request with a deadline is answered at the
    /// earlier of the two exactly; one without is caught by a sweep that runs
    /// every eighth of `max_queue_time`, so it waits at most 9/8 of it (no
    /// timer per request). Default 30 s.
    #[serde(with = "humantime_serde")]
    pub max_queue_time: Duration,
    /// The scheduler's own deadline for every request: a request submitted
    /// at `t` gets the [`keel_core::Deadline`] `t + request_timeout`
    /// (unless it carries an earlier one). Its clock starts at **submit**,
    /// so the time spent queueing counts, and the deadline is set on
    /// requests that carry extensions, so retries and the balancer below
    /// enforce the same instant. Prefer it to a deadline layer *below*
    /// admission, whose clock only starts once the request leaves the
    /// queue. `None` (the default): only the caller's deadline and
    /// [`max_queue_time`](Self::max_queue_time) apply.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// The cost credited per round robin visit per unit of weight. It is
    /// raised to the largest cost seen, so each visit serves at least one
    /// request. Default 1.
    pub quantum: u64,
    /// The weight of tenants without an override. Default 1.
    pub default_weight: u32,
    /// Per-tenant overrides, by tenant name.
    pub tenants: BTreeMap<String, TenantConfig>,
    /// In-flight limits.
    pub concurrency: ConcurrencyConfig,
    /// Queueing-delay shedding.
    pub shedding: SheddingConfig,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            name: "default".to_owned(),
            classes: vec![
                ClassConfig::with_min_share(0.05),
                ClassConfig::default(),
                ClassConfig::default(),
            ],
            max_queued: 10_000,
            max_queued_per_tenant: 1_000,
            max_queue_time: Duration::from_secs(30),
            request_timeout: None,
            quantum: 1,
            default_weight: 1,
            tenants: BTreeMap::new(),
            concurrency: ConcurrencyConfig::default(),
            shedding: SheddingConfig::default(),
        }
    }
}

impl SchedulerConfig {
    /// Defaults with this name.
    pub fn new(name: impl Into<String>) -> Self {
        SchedulerConfig {
            name: name.into(),
            ..SchedulerConfig::default()
        }
    }

    /// Sets [`classes`](Self::classes).
    pub fn classes(mut self, classes: Vec<ClassConfig>) -> Self {
        self.classes = classes;
        self
    }

    /// Sets [`max_queued`](Self::max_queued).
    pub fn max_queued(mut self, max: usize) -> Self {
        self.max_queued = max;
        self
    }

    /// Sets [`max_queued_per_tenant`](Self::max_queued_per_tenant).
    pub fn max_queued_per_tenant(mut self, max: usize) -> Self {
        self.max_queued_per_tenant = max;
        self
    }

    /// Sets [`max_queue_time`](Self::max_queue_time).
    pub fn max_queue_time(mut self, max: Duration) -> Self {
        self.max_queue_time = max;
        self
    }

    /// Sets [`request_timeout`](Self::request_timeout).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// Sets [`quantum`](Self::quantum).
    pub fn quantum(mut self, quantum: u64) -> Self {
        self.quantum = quantum;
        self
    }

    /// Sets [`default_weight`](Self::default_weight).
    pub fn default_weight(mut self, weight: u32) -> Self {
        self.default_weight = weight;
        self
    }

    /// Adds or replaces the overrides of one tenant.
    pub fn tenant(mut self, name: impl Into<String>, tenant: TenantConfig) -> Self {
        self.tenants.insert(name.into(), tenant);
        self
    }

    /// Sets [`concurrency`](Self::concurrency).
    pub fn concurrency(mut self, concurrency: ConcurrencyConfig) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Sets [`shedding`](Self::shedding).
    pub fn shedding(mut self, shedding: SheddingConfig) -> Self {
        self.shedding = shedding;
        self
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`SchedulerError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty() {
            return Err(SchedulerError::config("name", "must not be empty"));
        }
        if self.classes.is_empty() || self.classes.len() > usize::from(MAX_PRIORITY_LEVELS) {
            return Err(SchedulerError::config(
                "classes",
                format!("must hold between 1 and {MAX_PRIORITY_LEVELS} classes"),
            ));
        }
        if self
            .classes
            .iter()
            .any(|c| !(0.0..=1.0).contains(&c.min_share))
        {
            return Err(SchedulerError::config(
                "classes.min_share",
                "must be between 0 and 1",
            ));
        }
        if self.classes.iter().map(|c| c.min_share).sum::<f64>() > 1.0 + 1e-9 {
            return Err(SchedulerError::config(
                "classes.min_share",
                "the shares of all classes must add up to at most 1",
            ));
        }
        if self.max_queued == 0 {
            return Err(SchedulerError::config("max_queued", "must be at least 1"));
        }
        if self.max_queued_per_tenant == 0 {
            return Err(SchedulerError::config(
                "max_queued_per_tenant",
                "must be at least 1",
            ));
        }
        if self.max_queue_time.is_zero() {
            return Err(SchedulerError::config(
                "max_queue_time",
                "must be greater than zero",
            ));
        }
        if self.request_timeout.is_some_and(|t| t.is_zero()) {
            return Err(SchedulerError::config(
                "request_timeout",
                "must be greater than zero (or unset)",
            ));
        }
        if self.quantum == 0 {
            return Err(SchedulerError::config("quantum", "must be at least 1"));
        }
        if self.default_weight == 0 {
            return Err(SchedulerError::config(
                "default_weight",
                "must be at least 1",
            ));
        }
        for tenant in self.tenants.values() {
            if tenant.weight == Some(0) {
                return Err(SchedulerError::config(
                    "tenants.weight",
                    "must be at least 1",
                ));
            }
            if tenant.max_queued == Some(0) {
                return Err(SchedulerError::config(
                    "tenants.max_queued",
                    "must be at least 1",
                ));
            }
            if tenant.max_in_flight == Some(0) {
                return Err(SchedulerError::config(
                    "tenants.max_in_flight",
                    "must be at least 1",
                ));
            }
        }
        if self.concurrency.max_in_flight == Some(0) {
            return Err(SchedulerError::config(
                "concurrency.max_in_flight",
                "must be at least 1 (or unset)",
            ));
        }
        if self.concurrency.max_in_flight_per_tenant == Some(0) {
            return Err(SchedulerError::config(
                "concurrency.max_in_flight_per_tenant",
                "must be at least 1 (or unset)",
            ));
        }
        if let Some(aimd) = &self.concurrency.adaptive {
            aimd.validate()?;
        }
        if self.shedding.enabled {
            if self.shedding.target.is_zero() {
                return Err(SchedulerError::config(
                    "shedding.target",
                    "must be greater than zero",
                ));
            }
            if self.shedding.interval.is_zero() {
                return Err(SchedulerError::config(
                    "shedding.interval",
                    "must be greater than zero",
                ));
            }
        }
        Ok(())
    }

    /// The class a priority lands in.
    pub(crate) fn class_of(&self, priority: keel_queue::Priority) -> usize {
        usize::from(priority.0).min(self.classes.len() - 1)
    }

    pub(crate) fn weight_of(&self, tenant: &str) -> u64 {
        u64::from(
            self.tenants
                .get(tenant)
                .and_then(|t| t.weight)
                .unwrap_or(self.default_weight),
        )
    }

    pub(crate) fn max_queued_of(&self, tenant: &str) -> usize {
        self.tenants
            .get(tenant)
            .and_then(|t| t.max_queued)
            .unwrap_or(self.max_queued_per_tenant)
    }

    pub(crate) fn max_in_flight_of(&self, tenant: &str) -> Option<usize> {
        self.tenants
            .get(tenant)
            .and_then(|t| t.max_in_flight)
            .or(self.concurrency.max_in_flight_per_tenant)
    }

    /// Whether any tenant has an in-flight limit (so tenants are counted).
    pub(crate) fn limits_tenants(&self) -> bool {
        self.concurrency.max_in_flight_per_tenant.is_some()
            || self.tenants.values().any(|t| t.max_in_flight.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_fields_by_name() {
        let cases = [
            (SchedulerConfig::new(""), "name"),
            (SchedulerConfig::new("s").classes(vec![]), "classes"),
            (
                SchedulerConfig::new("s").classes(vec![
                    ClassConfig::with_min_share(0.7),
                    ClassConfig::with_min_share(0.7),
                ]),
                "classes.min_share",
            ),
            (SchedulerConfig::new("s").max_queued(0), "max_queued"),
            (SchedulerConfig::new("s").quantum(0), "quantum"),
            (
                SchedulerConfig::new("s").tenant("a", TenantConfig::default().weight(0)),
                "tenants.weight",
            ),
            (
                SchedulerConfig::new("s").concurrency(
                    ConcurrencyConfig::default().adaptive(AimdConfig::default().limits(10, 20, 30)),
                ),
                "concurrency.adaptive.initial",
            ),
            (
                SchedulerConfig::new("s").concurrency(
                    ConcurrencyConfig::default().adaptive(AimdConfig::default().backoff_ratio(1.5)),
                ),
                "concurrency.adaptive.backoff_ratio",
            ),
            (
                SchedulerConfig::new("s")
                    .shedding(SheddingConfig::new(Duration::ZERO, Duration::from_secs(1))),
                "shedding.target",
            ),
        ];
        for (config, field) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{field}`")),
                "{err} should name {field}"
            );
        }
    }

    #[test]
    fn reads_human_durations_and_defaults() {
        let config: SchedulerConfig = serde_json::from_str(
            r#"{"name":"gw","max_queue_time":"5s","shedding":{"target":"20ms"},
                "tenants":{"acme":{"weight":4}}}"#,
        )
        .unwrap();
        assert_eq!(config.max_queue_time, Duration::from_secs(5));
        assert_eq!(config.shedding.target, Duration::from_millis(20));
        assert_eq!(config.shedding.interval, Duration::from_secs(1));
        assert_eq!(config.weight_of("acme"), 4);
        assert_eq!(config.weight_of("other"), 1);
        assert_eq!(config.classes.len(), 3);
        config.validate().unwrap();
    }

    #[test]
    fn priorities_map_onto_classes() {
        let config = SchedulerConfig::new("s").classes(vec![ClassConfig::default(); 2]);
        assert_eq!(config.class_of(keel_queue::Priority::LOW), 0);
        assert_eq!(config.class_of(keel_queue::Priority::HIGH), 1);
    }
}
