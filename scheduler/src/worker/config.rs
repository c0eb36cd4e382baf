//! Settings of a [`Worker`](crate::Worker).

use std::time::Duration;

use keel_core::{Backoff, BudgetConfig, ConfigError, Jitter};
use serde::{Deserialize, Serialize};

use crate::error::{Result, SchedulerError};
use keel_core::validate;

/// The worker's default retry budget: 0.2 retries per job handled, plus a
/// floor of 100 retries per 10 s window.
fn default_budget() -> BudgetConfig {
    BudgetConfig::default()
        .ratio(0.2)
        .floor(100)
        .window(Duration::from_secs(10))
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
    /// the first of a batch are called while the service stays ready, and
    /// otherwise wait for readiness (on a clone of it), with their leases
    /// renewed. Default 1 (strict backpressure).
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
    /// with equal jitter, up to `reconnect_max` (a [`keel_core::Backoff`],
    /// see [`reconnect_backoff`](Self::reconnect_backoff)). Greater than
    /// zero. Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest delay between attempts while the broker is failing; at
    /// least `reconnect_min`, at most 24 h. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// The retry budget (a [`keel_core::RetryBudget`], exact whole-number
    /// counts): every job handed to the handler deposits, every retry
    /// withdraws, and a retry is made at once only while, over the
    /// `window`, retries stay within `floor + ⌊ratio × jobs⌋`. When the
    /// budget is spent (a downstream outage makes every job fail), retries
    /// are delayed by [`budget_exhausted_delay`](Self::budget_exhausted_delay)
    /// instead of coming straight back, so a failing dependency sees a
    /// trickle instead of a retry storm. Validated as `retry_budget.ratio`
    /// and `retry_budget.window`. Default: ratio 0.2, floor 100, window
    /// 10 s.
    pub retry_budget: BudgetConfig,
    /// The least delay of a retry made while the budget is spent.
    /// Default 60 s.
    #[serde(with = "humantime_serde")]
    pub budget_exhausted_delay: Duration,
    /// The first delay before trying a failed ack or nack again; doubles,
    /// with equal jitter, up to `settle_retry_max` (a [`keel_core::Backoff`],
    /// see [`settle_backoff`](Self::settle_backoff)). A settlement that
    /// fails with a retryable error is tried again for as long as the job's
    /// lease lasts, and the lease is renewed while the settlement waits
    /// when less than a third of it is left: an outage shorter than the
    /// lease costs no second run of any job. Only once the lease has run
    /// out does the worker give up (the job comes back, counted in
    /// `settle_errors`). Greater than zero. Default 50 ms.
    #[serde(with = "humantime_serde")]
    pub settle_retry_min: Duration,
    /// The longest delay between tries of a failing settlement; at least
    /// `settle_retry_min`, at most 24 h. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub settle_retry_max: Duration,
    /// Most acks sent in one `ack_batch` call. Acks are coalesced per round
    /// trip: each call takes every ack that arrived while the one before it
    /// was in flight, so no ack waits longer than one call for its turn.
    /// Default 256.
    pub ack_batch: usize,
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
            retry_budget: default_budget(),
            budget_exhausted_delay: Duration::from_secs(60),
            settle_retry_min: Duration::from_millis(50),
            settle_retry_max: Duration::from_secs(1),
            ack_batch: 256,
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
    pub fn retry_budget(mut self, budget: BudgetConfig) -> Self {
        self.retry_budget = budget;
        self
    }

    /// Sets [`budget_exhausted_delay`](Self::budget_exhausted_delay).
    pub fn budget_exhausted_delay(mut self, delay: Duration) -> Self {
        self.budget_exhausted_delay = delay;
        self
    }

    /// Sets [`settle_retry_min`](Self::settle_retry_min) and
    /// [`settle_retry_max`](Self::settle_retry_max).
    pub fn settle_retry(mut self, min: Duration, max: Duration) -> Self {
        self.settle_retry_min = min;
        self.settle_retry_max = max;
        self
    }

    /// Sets [`ack_batch`](Self::ack_batch).
    pub fn ack_batch(mut self, batch: usize) -> Self {
        self.ack_batch = batch;
        self
    }

    /// The backoff between tries of a failing ack or nack: from
    /// `settle_retry_min` doubling to `settle_retry_max`, with
    /// [`Jitter::Equal`]. Tries go on while the job's lease lasts.
    ///
    /// # Errors
    ///
    /// [`SchedulerError::InvalidConfig`] naming `settle_retry_min` or
    /// `settle_retry_max`.
    pub fn settle_backoff(&self) -> Result<Backoff> {
        Backoff::new(self.settle_retry_min, self.settle_retry_max)
            .map(|backoff| backoff.jitter(Jitter::Equal))
            .map_err(|err| {
                let field = match err.field {
                    "backoff.base" => "settle_retry_min",
                    "backoff.max" => "settle_retry_max",
                    other => other,
                };
                SchedulerError::InvalidConfig(ConfigError::new(field, err.reason))
            })
    }

    /// The backoff between `dequeue` attempts while the broker fails:
    /// from `reconnect_min` doubling to `reconnect_max`, with
    /// [`Jitter::Equal`] (never sooner than half the cap).
    ///
    /// # Errors
    ///
    /// [`SchedulerError::InvalidConfig`] naming `reconnect_min` or
    /// `reconnect_max`.
    pub fn reconnect_backoff(&self) -> Result<Backoff> {
        Backoff::new(self.reconnect_min, self.reconnect_max)
            .map(|backoff| backoff.jitter(Jitter::Equal))
            .map_err(|err| {
                let field = match err.field {
                    "backoff.base" => "reconnect_min",
                    "backoff.max" => "reconnect_max",
                    other => other,
                };
                SchedulerError::InvalidConfig(ConfigError::new(field, err.reason))
            })
    }

    /// The effective renewal interval.
    pub fn renew_every(&self) -> Duration {
        self.renew_interval.unwrap_or(self.lease / 3)
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`SchedulerError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        validate::non_empty("name", &self.name)?;
        validate::at_least("concurrency", self.concurrency, 1)?;
        validate::at_least("dequeue_batch", self.dequeue_batch, 1)?;
        if self.lease < Duration::from_millis(10) {
            return Err(SchedulerError::config("lease", "must be at least 10 ms"));
        }
        let renew = self.renew_every();
        if renew.is_zero() || renew >= self.lease {
            return Err(SchedulerError::config(
                "renew_interval",
                "must be greater than zero and shorter than `lease`",
            ));
        }
        self.reconnect_backoff()?;
        self.retry_budget.validate().map_err(|err| {
            let field = match err.field {
                "budget.ratio" => "retry_budget.ratio",
                "budget.window" => "retry_budget.window",
                "budget.floor" => "retry_budget.floor",
                other => other,
            };
            SchedulerError::InvalidConfig(ConfigError::new(field, err.reason))
        })?;
        self.settle_backoff()?;
        Ok(validate::at_least("ack_batch", self.ack_batch, 1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_testkit::assert_refused;

    #[test]
    fn refuses_bad_fields_by_name() {
        assert_refused(
            WorkerConfig::validate,
            [
                (WorkerConfig::new(""), "name"),
                (WorkerConfig::new("w").concurrency(0), "concurrency"),
                (
                    WorkerConfig::new("w")
                        .lease(Duration::from_secs(1))
                        .renew_interval(Duration::from_secs(2)),
                    "renew_interval",
                ),
                (
                    WorkerConfig::new("w")
                        .reconnect(Duration::from_secs(2), Duration::from_secs(1)),
                    "reconnect_max",
                ),
                (
                    WorkerConfig::new("w").reconnect(Duration::ZERO, Duration::from_secs(1)),
                    "reconnect_min",
                ),
                (
                    WorkerConfig::new("w").settle_retry(Duration::ZERO, Duration::from_secs(1)),
                    "settle_retry_min",
                ),
                (WorkerConfig::new("w").ack_batch(0), "ack_batch"),
                (
                    WorkerConfig::new("w").retry_budget(BudgetConfig::default().ratio(-1.0)),
                    "retry_budget.ratio",
                ),
                (
                    WorkerConfig::new("w")
                        .retry_budget(BudgetConfig::default().window(Duration::from_millis(1))),
                    "retry_budget.window",
                ),
            ],
        );
    }

    #[test]
    fn reads_human_durations() {
        let config: WorkerConfig =
            serde_json::from_str(r#"{"name":"w","lease":"90s","renew_interval":"20s"}"#).unwrap();
        assert_eq!(config.lease, Duration::from_secs(90));
        let budget: WorkerConfig = serde_json::from_str(
            r#"{"name":"w","retry_budget":{"ratio":0.5,"floor":3,"window":"30s"}}"#,
        )
        .unwrap();
        assert_eq!(budget.retry_budget.floor, 3);
        assert_eq!(budget.retry_budget.window, Duration::from_secs(30));
        budget.validate().unwrap();
        assert_eq!(config.renew_every(), Duration::from_secs(20));
        assert_eq!(
            WorkerConfig::default().renew_every(),
            Duration::from_secs(10)
        );
        config.validate().unwrap();
    }
}
