//! Settings every backend shares: capacity, priority levels, retries, dedup.

use std::time::Duration;

use keel_core::{ArgumentError, Backoff, ConfigError, Jitter};
use serde::{Deserialize, Serialize};

use crate::error::{QueueError, Result};
use keel_core::validate;

/// The highest number of priority levels a queue may have.
pub const MAX_PRIORITY_LEVELS: u8 = 16;

/// Settings shared by every backend.
///
/// Durations deserialize from human strings (`"30s"`, `"5m"`).
///
/// ```
/// use std::time::Duration;
/// use keel_queue::QueueConfig;
///
/// let config = QueueConfig::new("embeddings")
///     .capacity(100_000)
///     .max_attempts(5)
///     .backoff(Duration::from_millis(500), Duration::from_secs(60));
/// assert!(config.validate().is_ok());
/// assert!(QueueConfig::new("").validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct QueueConfig {
    /// The queue's name; backends derive their keys or queue names from it.
    /// Default `"default"`.
    pub name: String,
    /// Maximum jobs held (ready + delayed + in flight); `enqueue` answers
    /// `Full` beyond it. `None` (the default) is unbounded for the memory
    /// backend's tests only — set one in production.
    pub capacity: Option<u64>,
    /// Number of priority levels, 1 to 16. Default 3.
    pub priority_levels: u8,
    /// Deliveries before a failing job is dead-lettered. Default 5.
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt (a [`keel_core::Backoff`]
    /// with equal jitter, see [`retry_backoff`](Self::retry_backoff)).
    /// Greater than zero. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest retry delay; at least `backoff_base`, at most 24 h.
    /// Default 5 min.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// How long an idempotency key is remembered. Default 1 h.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            name: "default".to_owned(),
            capacity: None,
            priority_levels: 3,
            max_attempts: 5,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            dedup_window: Duration::from_secs(3600),
        }
    }
}

impl QueueConfig {
    /// Defaults with this queue name.
    pub fn new(name: impl Into<String>) -> Self {
        QueueConfig {
            name: name.into(),
            ..QueueConfig::default()
        }
    }

    /// Sets [`capacity`](Self::capacity).
    pub fn capacity(mut self, capacity: u64) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// Sets [`priority_levels`](Self::priority_levels).
    pub fn priority_levels(mut self, levels: u8) -> Self {
        self.priority_levels = levels;
        self
    }

    /// Sets [`max_attempts`](Self::max_attempts).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets [`backoff_base`](Self::backoff_base) and [`backoff_max`](Self::backoff_max).
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max;
        self
    }

    /// Sets [`dedup_window`](Self::dedup_window).
    pub fn dedup_window(mut self, window: Duration) -> Self {
        self.dedup_window = window;
        self
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        validate::key_name("name", &self.name)?;
        if self.capacity == Some(0) {
            return Err(QueueError::config(
                "capacity",
                "must be at least 1 (or unset)",
            ));
        }
        if !(1..=MAX_PRIORITY_LEVELS).contains(&self.priority_levels) {
            return Err(QueueError::config(
                "priority_levels",
                format!("must be between 1 and {MAX_PRIORITY_LEVELS}"),
            ));
        }
        validate::at_least("max_attempts", self.max_attempts, 1)?;
        self.try_backoff()?;
        validate::positive_duration("dedup_window", self.dedup_window)?;
        Ok(())
    }

    /// The retry backoff: exponential from `backoff_base`, capped at
    /// `backoff_max`, with [`Jitter::Equal`] (half fixed, half random), so
    /// retries of jobs that failed together spread out instead of returning
    /// together, and a failed job is never handed straight back.
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidConfig`] naming `backoff_base` or `backoff_max`.
    pub fn retry_backoff(&self) -> Result<Backoff> {
        self.try_backoff()
    }

    fn try_backoff(&self) -> Result<Backoff> {
        Backoff::new(self.backoff_base, self.backoff_max)
            .map(|backoff| backoff.jitter(Jitter::Equal))
            .map_err(|err| {
                // Name the field as this config spells it.
                let field = match err.field {
                    "backoff.base" => "backoff_base",
                    "backoff.max" => "backoff_max",
                    other => other,
                };
                QueueError::InvalidConfig(ConfigError::new(field, err.reason))
            })
    }

    /// The retry delay after failed delivery number `attempt` (1-based),
    /// drawn from [`retry_backoff`](Self::retry_backoff). Backends validate
    /// their config when built; a config that fails
    /// [`validate`](Self::validate) gets `backoff_base`.
    pub fn backoff_for(&self, attempt: u32) -> Duration {
        self.try_backoff()
            .map_or(self.backoff_base, |backoff| backoff.delay(attempt))
    }

    /// The reason a job is dead-lettered after its last attempt failed.
    pub(crate) fn exhausted_reason(&self, last: &str) -> String {
        format!("max attempts ({}) exceeded: {last}", self.max_attempts)
    }

    /// Checks a job's priority against the configured levels.
    pub(crate) fn check_priority(&self, priority: crate::Priority) -> Result<()> {
        if priority.0 >= self.priority_levels {
            return Err(QueueError::InvalidArgument(ArgumentError::new(
                "priority",
                format!(
                    "level {} is out of range; this queue has levels 0..{}",
                    priority.0, self.priority_levels
                ),
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_testkit::assert_refused;
    use proptest::prelude::*;

    #[test]
    fn refuses_bad_fields_by_name() {
        assert_refused(
            QueueConfig::validate,
            [
                (QueueConfig::new("q").priority_levels(0), "priority_levels"),
                (QueueConfig::new("q").max_attempts(0), "max_attempts"),
                (QueueConfig::new("q{x}"), "name"),
                (
                    QueueConfig::new("q").backoff(Duration::from_secs(2), Duration::from_secs(1)),
                    "backoff_max",
                ),
                (
                    QueueConfig::new("q").backoff(Duration::ZERO, Duration::from_secs(1)),
                    "backoff_base",
                ),
            ],
        );
    }

    #[test]
    fn config_reads_human_durations() {
        let config: QueueConfig =
            serde_json::from_str(r#"{"name":"q","backoff_base":"250ms","dedup_window":"10m"}"#)
                .unwrap();
        assert_eq!(config.backoff_base, Duration::from_millis(250));
        assert_eq!(config.dedup_window, Duration::from_secs(600));
        assert_eq!(config.max_attempts, 5);
    }

    proptest! {
        #[test]
        fn backoff_stays_between_half_and_full(attempt in 1u32..64, base_ms in 1u64..10_000) {
            let config = QueueConfig::new("q").backoff(Duration::from_millis(base_ms), Duration::from_secs(600));
            let full = Duration::from_millis(base_ms).saturating_mul(1u32 << (attempt - 1).min(31)).min(Duration::from_secs(600));
            let d = config.backoff_for(attempt);
            prop_assert!(d >= full / 2 && d <= full, "{d:?} outside [{:?}, {full:?}]", full / 2);
        }
    }
}
