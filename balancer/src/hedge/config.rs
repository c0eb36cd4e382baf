//! Settings of the hedge layer.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{BalancerError, Result};
use keel_core::BudgetConfig;
use keel_core::validate;

/// Settings of the [hedge layer](super).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct HedgeConfig {
    /// The `hedge` label on this layer's metrics. Default `"default"`.
    pub name: String,
    /// Hedge a request still unanswered after this latency percentile of
    /// recent requests. Between 0.5 and 1.0 (exclusive). Default 0.95.
    pub percentile: f64,
    /// Latencies recorded before any hedge is sent. Default 50.
    pub min_samples: u64,
    /// The shortest hedge delay, whatever the percentile says. Default 1 ms.
    #[serde(with = "humantime_serde")]
    pub min_delay: Duration,
    /// Latencies are kept in two windows of this length; the delay comes
    /// from the last full window once there is one. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// The hedge budget: hedges ≤ ratio × requests + floor per window.
    /// Default 5% plus 5 per 10 s.
    pub budget: BudgetConfig,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        HedgeConfig {
            name: "default".to_owned(),
            percentile: 0.95,
            min_samples: 50,
            min_delay: Duration::from_millis(1),
            window: Duration::from_secs(10),
            budget: BudgetConfig::default().ratio(0.05).floor(5),
        }
    }
}

impl HedgeConfig {
    /// Sets [`name`](Self::name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets [`percentile`](Self::percentile).
    pub fn percentile(mut self, percentile: f64) -> Self {
        self.percentile = percentile;
        self
    }

    /// Sets [`min_samples`](Self::min_samples).
    pub fn min_samples(mut self, samples: u64) -> Self {
        self.min_samples = samples;
        self
    }

    /// Sets [`min_delay`](Self::min_delay).
    pub fn min_delay(mut self, delay: Duration) -> Self {
        self.min_delay = delay;
        self
    }

    /// Sets [`window`](Self::window).
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Sets [`budget`](Self::budget).
    pub fn budget(mut self, budget: BudgetConfig) -> Self {
        self.budget = budget;
        self
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`BalancerError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        validate::non_empty("name", &self.name)?;
        if !(self.percentile >= 0.5 && self.percentile < 1.0) {
            return Err(BalancerError::config(
                "percentile",
                "must be at least 0.5 and below 1.0",
            ));
        }
        validate::positive_duration("window", self.window)?;
        Ok(self.budget.validate()?)
    }
}
