//! Rate limit settings shared by the local and Redis limiters.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Result, SchedulerError};
use keel_core::validate;

/// A GCRA rate: `amount` per `per`, with bursts of up to `burst` at once.
///
/// One unit is admitted every `per / amount`; an idle tenant may spend
/// `burst` units at once. A request whose cost is above `burst` is charged
/// as `burst` (it needs the whole bucket, and never waits forever).
///
/// ```
/// use std::time::Duration;
/// use keel_scheduler::Rate;
///
/// let rate = Rate::per_second(100).burst(20);
/// assert_eq!(rate.emission_interval(), Duration::from_millis(10));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Rate {
    /// Units admitted per `per`.
    pub amount: u32,
    /// The period `amount` is counted over.
    #[serde(with = "humantime_serde")]
    pub per: Duration,
    /// The most units admitted at once by an idle tenant.
    pub burst: u32,
}

impl Rate {
    /// `amount` per `per`, with a burst of `amount`.
    pub fn new(amount: u32, per: Duration) -> Self {
        Rate {
            amount,
            per,
            burst: amount,
        }
    }

    /// `amount` per second, with a burst of `amount`.
    pub fn per_second(amount: u32) -> Self {
        Rate::new(amount, Duration::from_secs(1))
    }

    /// `amount` per minute, with a burst of `amount`.
    pub fn per_minute(amount: u32) -> Self {
        Rate::new(amount, Duration::from_secs(60))
    }

    /// Sets [`burst`](Self::burst).
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// The time between two units at the sustained rate.
    pub fn emission_interval(&self) -> Duration {
        self.per / self.amount.max(1)
    }

    fn validate(&self, field: &'static str) -> Result<()> {
        if self.amount == 0 {
            return Err(SchedulerError::config(field, "`amount` must be at least 1"));
        }
        if self.burst == 0 {
            return Err(SchedulerError::config(field, "`burst` must be at least 1"));
        }
        if self.emission_interval() < Duration::from_micros(1) {
            return Err(SchedulerError::config(
                field,
                "`per / amount` must be at least 1 µs",
            ));
        }
        Ok(())
    }
}

/// The rates of one tenant: per request and per cost unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct TenantRates {
    /// Requests, whatever their cost. `None`: unlimited.
    pub requests: Option<Rate>,
    /// Cost units (tokens, say). `None`: unlimited.
    pub cost: Option<Rate>,
}

impl TenantRates {
    /// Limits requests.
    pub fn requests(mut self, rate: Rate) -> Self {
        self.requests = Some(rate);
        self
    }

    /// Limits cost units.
    pub fn cost(mut self, rate: Rate) -> Self {
        self.cost = Some(rate);
        self
    }
}

/// Settings of a rate limiter.
///
/// ```
/// use keel_scheduler::{Rate, RateLimitConfig, TenantRates};
///
/// let config = RateLimitConfig::new("gateway")
///     .default_rates(TenantRates::default().requests(Rate::per_second(50)))
///     .tenant("acme", TenantRates::default().requests(Rate::per_second(500)).cost(Rate::per_minute(100_000)));
/// assert!(config.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RateLimitConfig {
    /// The limiter's name: the `limiter` label of its metrics, and for the
    /// Redis limiter the key namespace shared by every instance. Default
    /// `"default"`.
    pub name: String,
    /// The rates of tenants without an override. Default: unlimited.
    pub default: TenantRates,
    /// Per-tenant rates, by tenant name; they replace `default` for that
    /// tenant.
    pub tenants: BTreeMap<String, TenantRates>,
    /// How often idle tenants' state is dropped, so memory is bounded by
    /// the tenants active within about one burst period. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub eviction_interval: Duration,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            name: "default".to_owned(),
            default: TenantRates::default(),
            tenants: BTreeMap::new(),
            eviction_interval: Duration::from_secs(10),
        }
    }
}

impl RateLimitConfig {
    /// Defaults with this name.
    pub fn new(name: impl Into<String>) -> Self {
        RateLimitConfig {
            name: name.into(),
            ..RateLimitConfig::default()
        }
    }

    /// Sets [`default`](Self::default).
    pub fn default_rates(mut self, rates: TenantRates) -> Self {
        self.default = rates;
        self
    }

    /// Adds or replaces one tenant's rates.
    pub fn tenant(mut self, name: impl Into<String>, rates: TenantRates) -> Self {
        self.tenants.insert(name.into(), rates);
        self
    }

    /// Sets [`eviction_interval`](Self::eviction_interval).
    pub fn eviction_interval(mut self, interval: Duration) -> Self {
        self.eviction_interval = interval;
        self
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`SchedulerError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        validate::key_name("name", &self.name)?;
        for rates in std::iter::once(&self.default).chain(self.tenants.values()) {
            if let Some(rate) = &rates.requests {
                rate.validate("requests")?;
            }
            if let Some(rate) = &rates.cost {
                rate.validate("cost")?;
            }
        }
        validate::positive_duration("eviction_interval", self.eviction_interval)?;
        Ok(())
    }

    /// The rates that apply to `tenant`.
    pub fn rates_of(&self, tenant: &str) -> &TenantRates {
        self.tenants.get(tenant).unwrap_or(&self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_fields_by_name() {
        let zero = RateLimitConfig::new("r")
            .default_rates(TenantRates::default().requests(Rate::per_second(0)));
        assert!(
            zero.validate()
                .unwrap_err()
                .to_string()
                .contains("`requests`")
        );
        let burst = RateLimitConfig::new("r").tenant(
            "a",
            TenantRates::default().cost(Rate::per_second(5).burst(0)),
        );
        assert!(burst.validate().unwrap_err().to_string().contains("`cost`"));
        assert!(RateLimitConfig::new("a{b}").validate().is_err());
    }

    #[test]
    fn reads_human_durations() {
        let config: RateLimitConfig = serde_json::from_str(
            r#"{"name":"gw","default":{"requests":{"amount":10,"per":"1s","burst":5}},
                "eviction_interval":"30s"}"#,
        )
        .unwrap();
        assert_eq!(config.default.requests, Some(Rate::per_second(10).burst(5)));
        assert_eq!(config.eviction_interval, Duration::from_secs(30));
        assert_eq!(config.rates_of("anyone"), &config.default);
    }
}
