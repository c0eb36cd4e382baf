//! Settings: [`HealthConfig`] (probes, outlier detection, busy dampening,
//! slow start, max ejection) and [`BreakerConfig`] for the circuit breaker.
//!
//! Every struct is serde with human durations (`"30s"`, `"250ms"`), has a
//! documented `Default`, builder setters, and a `validate()` that names the
//! first bad field.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{HealthError, Result};
use keel_core::FailureKind;
use keel_core::validate;

/// Settings of a [`Health`](crate::Health) registry.
///
/// ```
/// use std::time::Duration;
/// use keel_health::{ActiveConfig, HealthConfig, OutlierConfig};
///
/// let config = HealthConfig::new("gpu-pool")
///     .max_ejection_percent(30)
///     .active(ActiveConfig::default().interval(Duration::from_secs(5)).unhealthy_threshold(2))
///     .outlier(OutlierConfig::default().consecutive_failures(Some(3)));
/// assert!(config.validate().is_ok());
/// assert!(HealthConfig::new("gpu-pool").max_ejection_percent(101).validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct HealthConfig {
    /// Name used as the `health` label of every metric. Default `"default"`.
    pub name: String,
    /// How often the registry advances slow-start ramps, expires busy
    /// dampening and publishes changed weights. Default 500 ms.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// The largest share of the fleet, in percent, that may be out of
    /// rotation for health reasons at once: at most
    /// `floor(endpoints × percent / 100)` endpoints are ejected. An ejection
    /// beyond that keeps the endpoint in rotation (state `Degraded`, reason
    /// `PanicRetained`) and counts it: Envoy's panic threshold. Default 50.
    pub max_ejection_percent: u8,
    /// Active checks (used only when a probe is configured).
    pub active: ActiveConfig,
    /// Passive outlier detection from real request outcomes.
    pub outlier: OutlierConfig,
    /// What a "busy" outcome (HTTP 429/503) does to an endpoint's weight.
    pub busy: BusyConfig,
    /// The weight ramp of a new or re-admitted endpoint.
    pub slow_start: SlowStartConfig,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            name: "default".to_owned(),
            tick: Duration::from_millis(500),
            max_ejection_percent: 50,
            active: ActiveConfig::default(),
            outlier: OutlierConfig::default(),
            busy: BusyConfig::default(),
            slow_start: SlowStartConfig::default(),
        }
    }
}

impl HealthConfig {
    /// Defaults with this name.
    pub fn new(name: impl Into<String>) -> Self {
        HealthConfig {
            name: name.into(),
            ..HealthConfig::default()
        }
    }

    /// Sets [`tick`](Self::tick).
    pub fn tick(mut self, tick: Duration) -> Self {
        self.tick = tick;
        self
    }

    /// Sets [`max_ejection_percent`](Self::max_ejection_percent).
    pub fn max_ejection_percent(mut self, percent: u8) -> Self {
        self.max_ejection_percent = percent;
        self
    }

    /// Sets [`active`](Self::active).
    pub fn active(mut self, active: ActiveConfig) -> Self {
        self.active = active;
        self
    }

    /// Sets [`outlier`](Self::outlier).
    pub fn outlier(mut self, outlier: OutlierConfig) -> Self {
        self.outlier = outlier;
        self
    }

    /// Sets [`busy`](Self::busy).
    pub fn busy(mut self, busy: BusyConfig) -> Self {
        self.busy = busy;
        self
    }

    /// Sets [`slow_start`](Self::slow_start).
    pub fn slow_start(mut self, slow_start: SlowStartConfig) -> Self {
        self.slow_start = slow_start;
        self
    }

    /// The most endpoints that may be ejected at once in a fleet of `endpoints`.
    pub fn max_ejected(&self, endpoints: usize) -> usize {
        endpoints * usize::from(self.max_ejection_percent) / 100
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`HealthError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        validate::non_empty("name", &self.name)?;
        validate::positive_duration("tick", self.tick)?;
        if self.max_ejection_percent > 100 {
            return Err(HealthError::config(
                "max_ejection_percent",
                "must be between 0 and 100",
            ));
        }
        self.active.validate()?;
        self.outlier.validate()?;
        self.busy.validate()?;
        self.slow_start.validate()
    }
}

/// Active checks: a user-supplied probe run per endpoint on an interval.
///
/// Hysteresis: an endpoint in rotation leaves it only after
/// `unhealthy_threshold` consecutive failed probes, and an endpoint out of
/// rotation comes back only after `healthy_threshold` consecutive passed
/// probes (a newly added endpoint needs one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ActiveConfig {
    /// Time between probes of an endpoint in rotation. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Time between probes of an endpoint out of rotation (probing for
    /// re-admission). Default 2 s.
    #[serde(with = "humantime_serde")]
    pub unhealthy_interval: Duration,
    /// Each wait is scaled by a random factor in `[1 − jitter, 1 + jitter]`
    /// so the fleet's probes spread out. Between 0 and 1; default 0.1.
    pub jitter: f64,
    /// A probe that takes longer fails (reason `ProbeTimeout`). Default 1 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive passed probes that bring an endpoint back. Default 2.
    pub healthy_threshold: u32,
    /// Consecutive failed probes that take an endpoint out. Default 3.
    pub unhealthy_threshold: u32,
    /// Probes running at once across the fleet, so health checks never
    /// load the fleet. Default 16.
    pub max_concurrent: usize,
}

impl Default for ActiveConfig {
    fn default() -> Self {
        ActiveConfig {
            interval: Duration::from_secs(10),
            unhealthy_interval: Duration::from_secs(2),
            jitter: 0.1,
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            max_concurrent: 16,
        }
    }
}

impl ActiveConfig {
    /// Sets [`interval`](Self::interval).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Sets [`unhealthy_interval`](Self::unhealthy_interval).
    pub fn unhealthy_interval(mut self, interval: Duration) -> Self {
        self.unhealthy_interval = interval;
        self
    }

    /// Sets [`jitter`](Self::jitter).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Sets [`timeout`](Self::timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`healthy_threshold`](Self::healthy_threshold).
    pub fn healthy_threshold(mut self, n: u32) -> Self {
        self.healthy_threshold = n;
        self
    }

    /// Sets [`unhealthy_threshold`](Self::unhealthy_threshold).
    pub fn unhealthy_threshold(mut self, n: u32) -> Self {
        self.unhealthy_threshold = n;
        self
    }

    /// Sets [`max_concurrent`](Self::max_concurrent).
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n;
        self
    }

    fn validate(&self) -> Result<()> {
        validate::positive_duration("active.interval", self.interval)?;
        validate::positive_duration("active.unhealthy_interval", self.unhealthy_interval)?;
        validate::ratio("active.jitter", self.jitter)?;
        validate::positive_duration("active.timeout", self.timeout)?;
        validate::at_least("active.healthy_threshold", self.healthy_threshold, 1)?;
        validate::at_least("active.unhealthy_threshold", self.unhealthy_threshold, 1)?;
        validate::at_least("active.max_concurrent", self.max_concurrent, 1)?;
        Ok(())
    }
}

/// Passive outlier detection: what real request outcomes eject an endpoint.
///
/// Three detectors, each disabled by `None`:
///
/// - **consecutive failures**: ejects at once when an endpoint's run of
///   failures (no success in between; busy outcomes don't count either way)
///   reaches the threshold;
/// - **failure rate**: over a sliding window of `window` split into
///   `buckets`, an endpoint with at least `min_volume` outcomes and a
///   failure share at or above the threshold is ejected (checked each time
///   the window advances by one bucket);
/// - **latency**: when at least `latency_min_endpoints` endpoints have
///   `min_volume` outcomes in the window, one whose mean latency is above
///   `latency_factor` × the fleet's median mean (and above
///   `latency_floor`) is ejected.
///
/// The n-th ejection of an endpoint lasts `base_ejection × 2^(n−1)`, at most
/// `max_ejection`; the count starts over once the endpoint has stayed in
/// rotation for `max_ejection`. When the ejection ends the endpoint is
/// probed (if a probe is configured) and comes back through slow start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct OutlierConfig {
    /// Consecutive failures that eject. Default `Some(5)`.
    pub consecutive_failures: Option<u32>,
    /// Failure share in `(0, 1]` over the window that ejects. Default `Some(0.5)`.
    pub failure_rate: Option<f64>,
    /// Length of the sliding window. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Buckets the window is split into (its resolution). 1 to 60; default 10.
    pub buckets: u32,
    /// Outcomes an endpoint needs in the window before its failure rate or
    /// latency is judged. Default 20.
    pub min_volume: u64,
    /// Mean-latency multiple of the fleet median that ejects. Above 1;
    /// default `Some(3.0)`.
    pub latency_factor: Option<f64>,
    /// Endpoints with enough volume needed before latency is judged. Default 3.
    pub latency_min_endpoints: usize,
    /// An endpoint is never a latency outlier below this mean. Default 50 ms.
    #[serde(with = "humantime_serde")]
    pub latency_floor: Duration,
    /// Length of the first ejection. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    /// Longest ejection. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
    /// With active checks configured, an endpoint ejected by outlier
    /// detection keeps being probed (every `active.unhealthy_interval`) and
    /// comes back through slow start as soon as `active.healthy_threshold`
    /// checks in a row pass, before its ejection time is over (Envoy's
    /// `successful_active_health_check_uneject_host`). After an outage that
    /// hit the whole fleet this brings the ejected half back within a second
    /// or two instead of leaving the kept half overloaded. An endpoint whose
    /// checks pass while its requests fail (a gray failure) then cycles
    /// between rotation and ejection; turn this off where checks cannot see
    /// such failures. Default `true`.
    pub uneject_on_probe: bool,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: Some(5),
            failure_rate: Some(0.5),
            window: Duration::from_secs(10),
            buckets: 10,
            min_volume: 20,
            latency_factor: Some(3.0),
            latency_min_endpoints: 3,
            latency_floor: Duration::from_millis(50),
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            uneject_on_probe: true,
        }
    }
}

impl OutlierConfig {
    /// Sets [`consecutive_failures`](Self::consecutive_failures).
    pub fn consecutive_failures(mut self, n: Option<u32>) -> Self {
        self.consecutive_failures = n;
        self
    }

    /// Sets [`failure_rate`](Self::failure_rate).
    pub fn failure_rate(mut self, rate: Option<f64>) -> Self {
        self.failure_rate = rate;
        self
    }

    /// Sets [`window`](Self::window) and [`buckets`](Self::buckets).
    pub fn window(mut self, window: Duration, buckets: u32) -> Self {
        self.window = window;
        self.buckets = buckets;
        self
    }

    /// Sets [`min_volume`](Self::min_volume).
    pub fn min_volume(mut self, n: u64) -> Self {
        self.min_volume = n;
        self
    }

    /// Sets [`latency_factor`](Self::latency_factor).
    pub fn latency_factor(mut self, factor: Option<f64>) -> Self {
        self.latency_factor = factor;
        self
    }

    /// Sets [`latency_min_endpoints`](Self::latency_min_endpoints).
    pub fn latency_min_endpoints(mut self, n: usize) -> Self {
        self.latency_min_endpoints = n;
        self
    }

    /// Sets [`latency_floor`](Self::latency_floor).
    pub fn latency_floor(mut self, floor: Duration) -> Self {
        self.latency_floor = floor;
        self
    }

    /// Sets [`base_ejection`](Self::base_ejection) and [`max_ejection`](Self::max_ejection).
    pub fn ejection(mut self, base: Duration, max: Duration) -> Self {
        self.base_ejection = base;
        self.max_ejection = max;
        self
    }

    /// Sets [`uneject_on_probe`](Self::uneject_on_probe).
    pub fn uneject_on_probe(mut self, uneject: bool) -> Self {
        self.uneject_on_probe = uneject;
        self
    }

    /// The length of the `n`-th ejection (1-based): `base × 2^(n−1)`, capped.
    pub fn ejection_for(&self, n: u32) -> Duration {
        let exp = n.saturating_sub(1).min(31);
        self.base_ejection
            .saturating_mul(1u32 << exp)
            .min(self.max_ejection)
    }

    /// Length of one bucket of the window.
    pub(crate) fn bucket_width(&self) -> Duration {
        self.window / self.buckets
    }

    fn validate(&self) -> Result<()> {
        if self.consecutive_failures == Some(0) {
            return Err(HealthError::config(
                "outlier.consecutive_failures",
                "must be at least 1 (or null to disable)",
            ));
        }
        if let Some(rate) = self.failure_rate
            && !(rate > 0.0 && rate <= 1.0)
        {
            return Err(HealthError::config(
                "outlier.failure_rate",
                "must be in (0, 1] (or null to disable)",
            ));
        }
        if !(1..=60).contains(&self.buckets) {
            return Err(HealthError::config(
                "outlier.buckets",
                "must be between 1 and 60",
            ));
        }
        if self.window.is_zero() || self.bucket_width().is_zero() {
            return Err(HealthError::config(
                "outlier.window",
                "must be greater than zero (and at least 1 ns per bucket)",
            ));
        }
        validate::at_least("outlier.min_volume", self.min_volume, 1)?;
        if let Some(factor) = self.latency_factor
            && !(factor > 1.0 && factor.is_finite())
        {
            return Err(HealthError::config(
                "outlier.latency_factor",
                "must be a finite number above 1 (or null to disable)",
            ));
        }
        if self.latency_min_endpoints < 2 {
            return Err(HealthError::config(
                "outlier.latency_min_endpoints",
                "must be at least 2 (a median of one is itself)",
            ));
        }
        validate::positive_duration("outlier.base_ejection", self.base_ejection)?;
        if self.base_ejection > self.max_ejection {
            return Err(HealthError::config(
                "outlier.base_ejection",
                "must not exceed `outlier.max_ejection`",
            ));
        }
        Ok(())
    }
}

/// Backpressure handling: a busy outcome (HTTP 429/503, or what the
/// classifier calls busy) multiplies the endpoint's weight by `weight` for
/// `cooldown`, or for the response's `Retry-After` when that is longer (at
/// most `max_cooldown`). It never counts toward ejection or the breaker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BusyConfig {
    /// Weight multiplier while busy, in `[0, 1]`. Default 0.1.
    pub weight: f64,
    /// How long a busy outcome dampens the weight. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Longest dampening, whatever `Retry-After` asks. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub max_cooldown: Duration,
}

impl Default for BusyConfig {
    fn default() -> Self {
        BusyConfig {
            weight: 0.1,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(30),
        }
    }
}

impl BusyConfig {
    /// Sets [`weight`](Self::weight).
    pub fn weight(mut self, weight: f64) -> Self {
        self.weight = weight;
        self
    }

    /// Sets [`cooldown`](Self::cooldown) and [`max_cooldown`](Self::max_cooldown).
    pub fn cooldown(mut self, cooldown: Duration, max: Duration) -> Self {
        self.cooldown = cooldown;
        self.max_cooldown = max;
        self
    }

    fn validate(&self) -> Result<()> {
        validate::ratio("busy.weight", self.weight)?;
        if self.cooldown > self.max_cooldown {
            return Err(HealthError::config(
                "busy.cooldown",
                "must not exceed `busy.max_cooldown`",
            ));
        }
        Ok(())
    }
}

/// Slow start: a new or re-admitted endpoint's weight ramps from
/// `min_weight` to full over `window`, so a recovered node is not hit by the
/// whole fleet's traffic at once.
///
/// The factor at time `t` after admission is Envoy's
/// `max(min_weight, (t / window)^(1 / aggression))`: `aggression` 1 is a
/// straight line, above 1 ramps faster early, below 1 slower.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct SlowStartConfig {
    /// Ramp length; zero disables slow start. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// The ramp's starting factor, in `(0, 1]`. Default 0.1.
    pub min_weight: f64,
    /// Ramp shape, above 0. Default 1.0 (linear).
    pub aggression: f64,
}

impl Default for SlowStartConfig {
    fn default() -> Self {
        SlowStartConfig {
            window: Duration::from_secs(30),
            min_weight: 0.1,
            aggression: 1.0,
        }
    }
}

impl SlowStartConfig {
    /// Sets [`window`](Self::window).
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Sets [`min_weight`](Self::min_weight).
    pub fn min_weight(mut self, min_weight: f64) -> Self {
        self.min_weight = min_weight;
        self
    }

    /// Sets [`aggression`](Self::aggression).
    pub fn aggression(mut self, aggression: f64) -> Self {
        self.aggression = aggression;
        self
    }

    /// The weight factor `elapsed` after admission, in `[min_weight, 1]`.
    pub fn factor(&self, elapsed: Duration) -> f64 {
        if self.window.is_zero() || elapsed >= self.window {
            return 1.0;
        }
        let t = elapsed.as_secs_f64() / self.window.as_secs_f64();
        t.powf(1.0 / self.aggression).clamp(self.min_weight, 1.0)
    }

    fn validate(&self) -> Result<()> {
        if !(self.min_weight > 0.0 && self.min_weight <= 1.0) {
            return Err(HealthError::config(
                "slow_start.min_weight",
                "must be in (0, 1]",
            ));
        }
        if !(self.aggression > 0.0 && self.aggression.is_finite()) {
            return Err(HealthError::config(
                "slow_start.aggression",
                "must be a finite number above 0",
            ));
        }
        Ok(())
    }
}

/// Per-class failure thresholds of the circuit breaker: the consecutive
/// failures of one [`FailureKind`] that open it. `None` means that class
/// never opens the breaker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ClassThresholds {
    /// Connection and transport errors. Default `Some(5)`.
    pub transport: Option<u32>,
    /// Timeouts. Default `Some(5)`.
    pub timeout: Option<u32>,
    /// Server errors (HTTP 5xx other than 503). Default `Some(5)`.
    pub server: Option<u32>,
    /// Failures the classifier could not place. Default `Some(5)`.
    pub other: Option<u32>,
}

impl Default for ClassThresholds {
    fn default() -> Self {
        ClassThresholds::all(Some(5))
    }
}

impl ClassThresholds {
    /// The same threshold for every class.
    pub fn all(n: Option<u32>) -> Self {
        ClassThresholds {
            transport: n,
            timeout: n,
            server: n,
            other: n,
        }
    }

    /// Sets the threshold of one class.
    pub fn set(mut self, kind: FailureKind, n: Option<u32>) -> Self {
        *self.slot_mut(kind) = n;
        self
    }

    /// The threshold of one class.
    pub fn get(&self, kind: FailureKind) -> Option<u32> {
        match kind {
            FailureKind::Transport => self.transport,
            FailureKind::Timeout => self.timeout,
            FailureKind::Server => self.server,
            // `Other`, and any kind a later keel-core adds.
            _ => self.other,
        }
    }

    fn slot_mut(&mut self, kind: FailureKind) -> &mut Option<u32> {
        match kind {
            FailureKind::Transport => &mut self.transport,
            FailureKind::Timeout => &mut self.timeout,
            FailureKind::Server => &mut self.server,
            _ => &mut self.other,
        }
    }
}

/// Settings of a [`CircuitBreakerLayer`](crate::breaker::CircuitBreakerLayer).
///
/// Closed: failures of each class are counted in a run (a success resets
/// every run; busy outcomes touch nothing); a run reaching its class's
/// threshold opens the breaker. Open: every request is refused at once with
/// a retryable [`HealthError::Unavailable`] for `open_for`, doubling on each
/// consecutive re-open up to `max_open_for`. Half-open: at most
/// `half_open_trials` trial requests are admitted; when all of them succeed
/// the breaker closes, and any failure (a trial running past
/// `trial_timeout` is one) opens it again.
///
/// ```
/// use std::time::Duration;
/// use keel_health::{BreakerConfig, ClassThresholds, FailureKind};
///
/// let config = BreakerConfig::new("llm-node-1")
///     .thresholds(ClassThresholds::all(Some(5)).set(FailureKind::Timeout, Some(2)))
///     .half_open_trials(3)
///     .trial_timeout(Duration::from_secs(5));
/// assert!(config.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Name used as the `breaker` label of its metrics. Default `"default"`.
    pub name: String,
    /// Consecutive failures per class that open the breaker.
    pub thresholds: ClassThresholds,
    /// How long the breaker stays open the first time. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// Longest open period after repeated re-opens. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub max_open_for: Duration,
    /// Trial requests admitted while half-open; all must succeed to close.
    /// Default 1.
    pub half_open_trials: u32,
    /// A trial request still running after this fails (the breaker
    /// re-opens and the caller gets [`HealthError::Timeout`]). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub trial_timeout: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            name: "default".to_owned(),
            thresholds: ClassThresholds::default(),
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(60),
            half_open_trials: 1,
            trial_timeout: Duration::from_secs(10),
        }
    }
}

impl BreakerConfig {
    /// Defaults with this name.
    pub fn new(name: impl Into<String>) -> Self {
        BreakerConfig {
            name: name.into(),
            ..BreakerConfig::default()
        }
    }

    /// Sets [`thresholds`](Self::thresholds).
    pub fn thresholds(mut self, thresholds: ClassThresholds) -> Self {
        self.thresholds = thresholds;
        self
    }

    /// Sets [`open_for`](Self::open_for) and [`max_open_for`](Self::max_open_for).
    pub fn open_for(mut self, open_for: Duration, max: Duration) -> Self {
        self.open_for = open_for;
        self.max_open_for = max;
        self
    }

    /// Sets [`half_open_trials`](Self::half_open_trials).
    pub fn half_open_trials(mut self, n: u32) -> Self {
        self.half_open_trials = n;
        self
    }

    /// Sets [`trial_timeout`](Self::trial_timeout).
    pub fn trial_timeout(mut self, timeout: Duration) -> Self {
        self.trial_timeout = timeout;
        self
    }

    /// The open period after `reopens` consecutive re-opens (0 the first time).
    pub(crate) fn open_period(&self, reopens: u32) -> Duration {
        self.open_for
            .saturating_mul(1u32 << reopens.min(31))
            .min(self.max_open_for)
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`HealthError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        validate::non_empty("name", &self.name)?;
        for kind in FailureKind::ALL {
            if self.thresholds.get(kind) == Some(0) {
                return Err(HealthError::config(
                    "thresholds",
                    format!("the `{kind}` threshold must be at least 1 (or null)"),
                ));
            }
        }
        validate::positive_duration("open_for", self.open_for)?;
        if self.open_for > self.max_open_for {
            return Err(HealthError::config(
                "open_for",
                "must not exceed `max_open_for`",
            ));
        }
        validate::at_least("half_open_trials", self.half_open_trials, 1)?;
        validate::positive_duration("trial_timeout", self.trial_timeout)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_testkit::assert_refused;

    #[test]
    fn refuses_bad_fields_by_name() {
        assert_refused(
            HealthConfig::validate,
            [
                (HealthConfig::default().tick(Duration::ZERO), "tick"),
                (
                    HealthConfig::default().max_ejection_percent(120),
                    "max_ejection_percent",
                ),
                (
                    HealthConfig::default().active(ActiveConfig::default().jitter(2.0)),
                    "active.jitter",
                ),
                (
                    HealthConfig::default()
                        .outlier(OutlierConfig::default().failure_rate(Some(0.0))),
                    "outlier.failure_rate",
                ),
                (
                    HealthConfig::default().outlier(
                        OutlierConfig::default()
                            .ejection(Duration::from_secs(10), Duration::from_secs(1)),
                    ),
                    "outlier.base_ejection",
                ),
                (
                    HealthConfig::default().busy(BusyConfig::default().weight(1.5)),
                    "busy.weight",
                ),
                (
                    HealthConfig::default().slow_start(SlowStartConfig::default().min_weight(0.0)),
                    "slow_start.min_weight",
                ),
            ],
        );
        let err = BreakerConfig::default()
            .half_open_trials(0)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("half_open_trials"), "{err}");
    }

    #[test]
    fn reads_human_durations() {
        let config: HealthConfig = serde_json::from_str(
            r#"{"name":"pool","tick":"250ms","outlier":{"base_ejection":"10s","consecutive_failures":null}}"#,
        )
        .unwrap();
        assert_eq!(config.tick, Duration::from_millis(250));
        assert_eq!(config.outlier.base_ejection, Duration::from_secs(10));
        assert_eq!(config.outlier.consecutive_failures, None);
        assert_eq!(config.active, ActiveConfig::default());
        config.validate().unwrap();
    }

    #[test]
    fn ejection_doubles_and_caps() {
        let config =
            OutlierConfig::default().ejection(Duration::from_secs(1), Duration::from_secs(5));
        let got: Vec<u64> = (1..=5).map(|n| config.ejection_for(n).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 5, 5]);
    }

    #[test]
    fn max_ejected_rounds_down() {
        let config = HealthConfig::default().max_ejection_percent(50);
        assert_eq!(config.max_ejected(10), 5);
        assert_eq!(config.max_ejected(3), 1);
        assert_eq!(config.max_ejected(1), 0);
    }
}
