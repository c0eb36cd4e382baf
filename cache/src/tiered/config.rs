//! Settings of [`Tiered`](crate::Tiered).

use std::collections::BTreeMap;
use std::time::Duration;

use keel_core::ErrorKind;
use serde::{Deserialize, Serialize};

use crate::cache::MAX_TTL;
use crate::error::{CacheError, KINDS, Result, kind_named};

/// Settings of [`Tiered`](crate::Tiered).
///
/// Durations deserialize from human strings (`"5m"`, `"50ms"`); so do the
/// values of [`negative_ttl`](Self::negative_ttl).
///
/// ```
/// use std::time::Duration;
/// use keel_cache::TieredConfig;
/// use keel_core::ErrorKind;
///
/// let config = TieredConfig::new("embeddings")
///     .ttl(Duration::from_secs(600))
///     .stale_for(Duration::from_secs(60))
///     .negative_ttl(ErrorKind::NotFound, Duration::from_secs(5));
/// assert!(config.validate().is_ok());
///
/// let err = TieredConfig::new("x").ttl(Duration::from_secs(10)).validate().unwrap_err();
/// assert!(err.to_string().contains("l1_ttl"), "{err}");
///
/// let from_file: TieredConfig =
///     serde_json::from_str(r#"{"name": "e", "ttl": "10m", "negative_ttl": {"not_found": "5s"}}"#)
///         .unwrap();
/// assert_eq!(from_file.negative_ttl["not_found"], Duration::from_secs(5));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct TieredConfig {
    /// The `cache` label of this cache's metrics. Default `"default"`.
    pub name: String,
    /// How long a loaded value is fresh, before jitter. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long after it stops being fresh a value may still be served
    /// while one background refresh runs (stale-while-revalidate); past
    /// that it is a miss. Also how long a stale value can stand in when the
    /// refresh fails. Default 0 (off).
    #[serde(with = "humantime_serde")]
    pub stale_for: Duration,
    /// The longest an entry stays in this process's memory (L1) before it is
    /// read again from L2: bounds how stale L1 can be if an invalidation is
    /// missed. Must not exceed [`ttl`](Self::ttl). Default 30 s.
    #[serde(with = "humantime_serde")]
    pub l1_ttl: Duration,
    /// L1 capacity in bytes of keys and values (plus 64 bytes per entry).
    /// Default 64 MiB.
    pub l1_capacity_bytes: u64,
    /// Loaded values get a fresh TTL randomly shortened by up to this
    /// fraction of [`ttl`](Self::ttl), so keys loaded together do not expire
    /// together. 0 to 0.5. Default 0.1. Explicit `set` TTLs are kept exact.
    pub ttl_jitter: f64,
    /// Probabilistic early refresh (XFetch): a fresh hit starts a
    /// background refresh with a probability that grows as expiry nears,
    /// scaled by how long the last load took and by this factor. 0 turns it
    /// off; 1 is the paper's default. Default 0.
    pub early_refresh_beta: f64,
    /// How long a caller that found a stale value waits for the refresh
    /// before it takes the stale value (the refresh goes on in the
    /// background). 0 serves stale at once. Default 0.
    #[serde(with = "humantime_serde")]
    pub soft_timeout: Duration,
    /// Hard bound on one loader call: past it the load is abandoned and
    /// callers get a stale value if there is one, else
    /// [`CacheError::LoadTimeout`]. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub load_timeout: Duration,
    /// Loader errors to cache (negative caching), by the name of their
    /// [`ErrorKind`] ([`ErrorKind::as_str`]: `"not_found"`,
    /// `"invalid_input"`, …), and for how long.
    ///
    /// A loader error's kind is what [`keel_core::find_kind`] finds in it:
    /// the kind of the first registered Keel error in its source chain (a
    /// Keel crate's error, or your own type implementing
    /// [`keel_core::KeelError`] and registered with
    /// [`keel_core::register_error_kind!`]). Errors of other kinds, or of no
    /// known kind, are never cached. Default empty.
    #[serde(with = "duration_map")]
    pub negative_ttl: BTreeMap<String, Duration>,
    /// Bound on one L2 call, on top of the L2 backend's own timeout. Default
    /// 100 ms.
    #[serde(with = "humantime_serde")]
    pub l2_timeout: Duration,
    /// Consecutive L2 failures that open the breaker, which then skips L2
    /// for [`breaker_cooldown`](Self::breaker_cooldown). Default 5.
    pub breaker_failures: u32,
    /// How long the open breaker skips L2 before one probe call tests it
    /// again. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
}

impl Default for TieredConfig {
    fn default() -> Self {
        TieredConfig {
            name: "default".to_owned(),
            ttl: Duration::from_secs(300),
            stale_for: Duration::ZERO,
            l1_ttl: Duration::from_secs(30),
            l1_capacity_bytes: 64 << 20,
            ttl_jitter: 0.1,
            early_refresh_beta: 0.0,
            soft_timeout: Duration::ZERO,
            load_timeout: Duration::from_secs(30),
            negative_ttl: BTreeMap::new(),
            l2_timeout: Duration::from_millis(100),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(5),
        }
    }
}

impl TieredConfig {
    /// Defaults with this name.
    pub fn new(name: impl Into<String>) -> Self {
        TieredConfig {
            name: name.into(),
            ..TieredConfig::default()
        }
    }

    /// Sets [`ttl`](Self::ttl).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets [`stale_for`](Self::stale_for).
    #[must_use]
    pub fn stale_for(mut self, stale_for: Duration) -> Self {
        self.stale_for = stale_for;
        self
    }

    /// Sets [`l1_ttl`](Self::l1_ttl).
    #[must_use]
    pub fn l1_ttl(mut self, l1_ttl: Duration) -> Self {
        self.l1_ttl = l1_ttl;
        self
    }

    /// Sets [`l1_capacity_bytes`](Self::l1_capacity_bytes).
    #[must_use]
    pub fn l1_capacity_bytes(mut self, bytes: u64) -> Self {
        self.l1_capacity_bytes = bytes;
        self
    }

    /// Sets [`ttl_jitter`](Self::ttl_jitter).
    #[must_use]
    pub fn ttl_jitter(mut self, fraction: f64) -> Self {
        self.ttl_jitter = fraction;
        self
    }

    /// Sets [`early_refresh_beta`](Self::early_refresh_beta).
    #[must_use]
    pub fn early_refresh_beta(mut self, beta: f64) -> Self {
        self.early_refresh_beta = beta;
        self
    }

    /// Sets [`soft_timeout`](Self::soft_timeout).
    #[must_use]
    pub fn soft_timeout(mut self, timeout: Duration) -> Self {
        self.soft_timeout = timeout;
        self
    }

    /// Sets [`load_timeout`](Self::load_timeout).
    #[must_use]
    pub fn load_timeout(mut self, timeout: Duration) -> Self {
        self.load_timeout = timeout;
        self
    }

    /// Caches loader errors of `kind` for `ttl` (see
    /// [`negative_ttl`](Self::negative_ttl)).
    #[must_use]
    pub fn negative_ttl(mut self, kind: ErrorKind, ttl: Duration) -> Self {
        self.negative_ttl.insert(kind.as_str().to_owned(), ttl);
        self
    }

    /// How long a loader error of `kind` is cached, if it is.
    pub(crate) fn negative_ttl_of(&self, kind: ErrorKind) -> Option<Duration> {
        if self.negative_ttl.is_empty() {
            return None;
        }
        self.negative_ttl.get(kind.as_str()).copied()
    }

    /// Sets [`l2_timeout`](Self::l2_timeout).
    #[must_use]
    pub fn l2_timeout(mut self, timeout: Duration) -> Self {
        self.l2_timeout = timeout;
        self
    }

    /// Sets [`breaker_failures`](Self::breaker_failures) and
    /// [`breaker_cooldown`](Self::breaker_cooldown).
    #[must_use]
    pub fn breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.breaker_failures = failures;
        self.breaker_cooldown = cooldown;
        self
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let positive = |field: &'static str, value: Duration| {
            if value < Duration::from_millis(1) {
                Err(CacheError::config(field, "must be at least 1 ms"))
            } else if value > MAX_TTL {
                Err(CacheError::config(field, "must be at most 10 years"))
            } else {
                Ok(())
            }
        };
        positive("ttl", self.ttl)?;
        positive("l1_ttl", self.l1_ttl)?;
        positive("load_timeout", self.load_timeout)?;
        positive("l2_timeout", self.l2_timeout)?;
        positive("breaker_cooldown", self.breaker_cooldown)?;
        if self.stale_for > MAX_TTL {
            return Err(CacheError::config("stale_for", "must be at most 10 years"));
        }
        if self.l1_ttl > self.ttl {
            return Err(CacheError::config(
                "l1_ttl",
                format!(
                    "must not exceed `ttl` ({}): L1 may not outlive L2",
                    humantime::format_duration(self.ttl)
                ),
            ));
        }
        if self.l1_capacity_bytes == 0 {
            return Err(CacheError::config(
                "l1_capacity_bytes",
                "must be at least 1",
            ));
        }
        if !(0.0..=0.5).contains(&self.ttl_jitter) {
            return Err(CacheError::config(
                "ttl_jitter",
                "must be between 0 and 0.5",
            ));
        }
        if !(self.early_refresh_beta.is_finite() && self.early_refresh_beta >= 0.0) {
            return Err(CacheError::config(
                "early_refresh_beta",
                "must be a finite number >= 0",
            ));
        }
        if self.soft_timeout > self.load_timeout {
            return Err(CacheError::config(
                "soft_timeout",
                "must not exceed `load_timeout`",
            ));
        }
        for (kind, ttl) in &self.negative_ttl {
            if kind_named(kind).is_none() {
                let known: Vec<&str> = KINDS.iter().map(ErrorKind::as_str).collect();
                return Err(CacheError::config(
                    "negative_ttl",
                    format!(
                        "`{kind}` is not an error kind; expected one of {}",
                        known.join(", ")
                    ),
                ));
            }
            if *ttl < Duration::from_millis(1) || *ttl > MAX_TTL {
                return Err(CacheError::config(
                    "negative_ttl",
                    format!("the TTL of kind `{kind}` must be between 1 ms and 10 years"),
                ));
            }
        }
        if self.breaker_failures == 0 {
            return Err(CacheError::config("breaker_failures", "must be at least 1"));
        }
        Ok(())
    }
}

/// A map of human-readable durations (`{"not_found": "5s"}`).
mod duration_map {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(
        map: &BTreeMap<String, Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        map.iter()
            .map(|(k, v)| (k.clone(), humantime::format_duration(*v).to_string()))
            .collect::<BTreeMap<_, _>>()
            .serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<String, Duration>, D::Error> {
        BTreeMap::<String, String>::deserialize(deserializer)?
            .into_iter()
            .map(|(k, v)| {
                humantime::parse_duration(&v)
                    .map(|d| (k, d))
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        TieredConfig::default().validate().unwrap();
    }

    #[test]
    fn refuses_bad_fields_by_name() {
        let cases = [
            (TieredConfig::default().ttl(Duration::ZERO), "ttl"),
            (
                TieredConfig::default().l1_ttl(Duration::from_secs(600)),
                "l1_ttl",
            ),
            (TieredConfig::default().ttl_jitter(0.9), "ttl_jitter"),
            (
                TieredConfig::default().early_refresh_beta(f64::NAN),
                "early_refresh_beta",
            ),
            (
                TieredConfig::default().soft_timeout(Duration::from_secs(60)),
                "soft_timeout",
            ),
            (
                TieredConfig::default().negative_ttl(ErrorKind::NotFound, Duration::ZERO),
                "negative_ttl",
            ),
            (
                serde_json::from_str(r#"{"negative_ttl": {"notfound": "5s"}}"#).unwrap(),
                "negative_ttl",
            ),
            (
                TieredConfig::default().breaker(0, Duration::from_secs(1)),
                "breaker_failures",
            ),
            (
                TieredConfig::default().l1_capacity_bytes(0),
                "l1_capacity_bytes",
            ),
        ];
        for (config, field) in cases {
            let err = config.validate().unwrap_err();
            assert!(
                matches!(&err, CacheError::InvalidConfig(e) if e.field == field),
                "expected `{field}`, got {err}"
            );
        }
    }

    #[test]
    fn round_trips_through_json() {
        let config = TieredConfig::new("x")
            .stale_for(Duration::from_secs(30))
            .negative_ttl(ErrorKind::NotFound, Duration::from_millis(1500));
        let text = serde_json::to_string(&config).unwrap();
        assert!(text.contains(r#""not_found":"1s 500ms""#), "{text}");
        let back: TieredConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back, config);
    }
}
