//! Settings of a [`Worker`](crate::Worker).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The retry budget: retries allowed as a share of recent jobs, plus a
/// floor (tower's `TpsBudget`).
///
/// Every job handed to the handler deposits into the budget; every retry
/// withdraws. When the budget is spent (a downstream outage makes every job
/// fail), retries are delayed by
/// [`WorkerConfig::budget_exhausted_delay`] instead of coming straight
/// back, so a failing dependency sees a trickle instead of a retry storm.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RetryBudgetConfig {
    /// How long a deposit counts. Between 1 s and 60 s. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Retries per second always allowed. Default 10.
    pub min_per_sec: u32,
    /// Retries allowed per job handled, between 0 and 1000. Default 0.2.
    pub retry_ratio: f32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            ttl: Duration::from_secs(10),
            min_per_sec: 10,
            retry_ratio: 0.2,
        }
    }
}

impl RetryBudgetConfig {
    /// A budget of `retry_ratio` retries per job and `min_per_sec` retries
    /// per second, over a 10 s window.
    pub fn new(min_per_sec: u32, retry_ratio: f32) -> Self {
        RetryBudgetConfig {
            min_per_sec,
            retry_ratio,
            ..RetryBudgetConfig::default()
        }
    }
}

/// Settings of a [`Worker`](crate::Worker).
///
/// Durations deserialize from human strings (`"30s"`).
///
/// ```
/// use std::time::Duration;
/// use keel_scheduler::WorkerConfig;
///
/// let config = WorkerConfig::new("embedder")
///     .concurrency(8)
///     .lease(Duration::from_secs(60))
///     .shutdown_grace(Duration::from_secs(20));
/// assert!(config.validate().is_ok());
/// assert!(WorkerConfig::new("w").concurrency(0).validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// The worker's name, the `worker` label of its metrics. Default
    /// `"default"`.
    pub name: String,
    /// Jobs handled at once. Default 16.
    pub concurrency: usize,
    /// Most jobs taken per `dequeue`, up to the free handler slots. The
    /// worker only dequeues after the service said it is ready; jobs past
    /// the first of a batch wait for readiness in their own task, with
    /// their leases renewed. Default 1 (strict backpressure).
    pub dequeue_batch: usize,
    /// The lease taken on each job. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often a running job's lease is extended (by `lease` from then).
    /// `None` (the default) renews every third of the lease.
    #[serde(with = "humantime_serde")]
    pub renew_interval: Option<Duration>,
    /// How long one `dequeue` waits for a job (a long poll). Default 1 s.
    #[serde(with = "humantime_serde")]
    pub poll_wait: Duration,
    /// On shutdown, how long in-flight jobs may run before they are
    /// cancelled and released back to the queue. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// First delay before dequeuing again after a broker error; doubles,
    /// with jitter, up to `reconnect_max`. Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest delay between attempts while the broker is failing.
    /// Default 5 s.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// The retry budget.
    pub retry_budget: RetryBudgetConfig,
    /// The least delay of a retry made while the budget is spent.
    /// Default 60 s.
    #[serde(with = "humantime_serde")]
    pub budget_exhausted_delay: Duration,
    /// Tries of an ack or nack that fails with a retryable error, while the
    /// lease lasts. Default 3.
    pub settle_attempts: u32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            name: "default".to_owned(),
            concurrency: 16,
            dequeue_batch: 1,
            lease: Duration::from_secs(30),
            renew_interval: None,
            poll_wait: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            retry_budget: RetryBudgetConfig::default(),
            budget_exhausted_delay: Duration::from_secs(60),
            settle_attempts: 3,
        }
    }
}

impl WorkerConfig {
    /// Defaults with this name.
    pub fn new(name: impl Into<String>) -> Self {
        WorkerConfig {
            name: name.into(),
            ..WorkerConfig::default()
        }
    }

    /// Sets [`concurrency`](Self::concurrency).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Sets [`dequeue_batch`](Self::dequeue_batch).
    pub fn dequeue_batch(mut self, batch: usize) -> Self {
        self.dequeue_batch = batch;
        self
    }

    /// Sets [`lease`](Self::lease).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets [`renew_interval`](Self::renew_interval).
    pub fn renew_interval(mut self, interval: Duration) -> Self {
        self.renew_interval = Some(interval);
        self
    }

    /// Sets [`poll_wait`](Self::poll_wait).
    pub fn poll_wait(mut self, wait: Duration) -> Self {
        self.poll_wait = wait;
        self
    }

    /// Sets [`shutdown_grace`](Self::shutdown_grace).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Sets [`reconnect_min`](Self::reconnect_min) and
    /// [`reconnect_max`](Self::reconnect_max).
    pub fn reconnect(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max;
        self
    }

    /// Sets [`retry_budget`](Self::retry_budget).
    pub fn retry_budget(mut self, budget: RetryBudgetConfig) -> Self {
        self.retry_budget = budget;
        self
    }

    /// Sets [`budget_exhausted_delay`](Self::budget_exhausted_delay).
    pub fn budget_exhausted_delay(mut self, delay: Duration) -> Self {
        self.budget_exhausted_delay = delay;
        self
    }

    /// The effective renewal interval.
    pub fn renew_every(&self) -> Duration {
        self.renew_interval.unwrap_or(self.lease / 3)
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty() {
            return Err(Error::config("name", "must not be empty"));
        }
        if self.concurrency == 0 {
            return Err(Error::config("concurrency", "must be at least 1"));
        }
        if self.dequeue_batch == 0 {
            return Err(Error::config("dequeue_batch", "must be at least 1"));
        }
        if self.lease < Duration::from_millis(10) {
            return Err(Error::config("lease", "must be at least 10 ms"));
        }
        let renew = self.renew_every();
        if renew.is_zero() || renew >= self.lease {
            return Err(Error::config(
                "renew_interval",
                "must be greater than zero and shorter than `lease`",
            ));
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return Err(Error::config(
                "reconnect_min",
                "must be greater than zero and at most `reconnect_max`",
            ));
        }
        let budget = &self.retry_budget;
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&budget.ttl) {
            return Err(Error::config(
                "retry_budget.ttl",
                "must be between 1 s and 60 s",
            ));
        }
        if !(0.0..=1000.0).contains(&budget.retry_ratio) {
            return Err(Error::config(
                "retry_budget.retry_ratio",
                "must be between 0 and 1000",
            ));
        }
        if budget.min_per_sec >= i32::MAX as u32 {
            return Err(Error::config(
                "retry_budget.min_per_sec",
                "must be below 2^31 - 1",
            ));
        }
        if self.settle_attempts == 0 {
            return Err(Error::config("settle_attempts", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_fields_by_name() {
        let cases = [
            (WorkerConfig::new(""), "name"),
            (WorkerConfig::new("w").concurrency(0), "concurrency"),
            (
                WorkerConfig::new("w")
                    .lease(Duration::from_secs(1))
                    .renew_interval(Duration::from_secs(2)),
                "renew_interval",
            ),
            (
                WorkerConfig::new("w").reconnect(Duration::from_secs(2), Duration::from_secs(1)),
                "reconnect_min",
            ),
            (
                WorkerConfig::new("w").retry_budget(RetryBudgetConfig::new(1, -1.0)),
                "retry_budget.retry_ratio",
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
    fn reads_human_durations() {
        let config: WorkerConfig =
            serde_json::from_str(r#"{"name":"w","lease":"90s","renew_interval":"20s"}"#).unwrap();
        assert_eq!(config.lease, Duration::from_secs(90));
        assert_eq!(config.renew_every(), Duration::from_secs(20));
        assert_eq!(
            WorkerConfig::default().renew_every(),
            Duration::from_secs(10)
        );
        config.validate().unwrap();
    }
}
