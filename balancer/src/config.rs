//! The balancer's settings: the policy, per-endpoint capacity, waiting,
//! timeouts and the latency estimator.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{BalancerError, Result};
use keel_core::validate;

/// The built-in ways to pick an endpoint: a serde-friendly constructor for
/// the built-in [`Pick`](crate::Pick) implementations (see
/// [`Policy::build`]). A policy of your own implements
/// [`Pick`](crate::Pick) and is given to
/// [`BalancerBuilder::pick`](crate::BalancerBuilder::pick).
///
/// Every policy skips endpoints that are at their capacity, in a busy
/// cooldown, or in the request's [`AvoidEndpoints`](crate::AvoidEndpoints),
/// and gives weight-0 endpoints no new request while any endpoint has a
/// positive weight. Fractional weights (slow start, busy dampening) shape
/// [`Weighted`](Policy::Weighted), [`LeastOutstanding`](Policy::LeastOutstanding)
/// and [`PeakEwma`](Policy::PeakEwma); round-robin and random stay the
/// plain baselines they are.
///
/// Deserializes from `{"kind": "peak_ewma"}`,
/// `{"kind": "consistent_hash", "load_factor": 1.25}` and so on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Policy {
    /// Each endpoint in turn.
    RoundRobin,
    /// A uniformly random endpoint.
    Random,
    /// Power of two choices over outstanding requests divided by weight
    /// (Envoy's weighted least-request).
    LeastOutstanding,
    /// Power of two choices over the peak-EWMA latency times outstanding
    /// requests, divided by weight: the Finagle / linkerd / tower estimator,
    /// kept in atomics (see the crate docs on why).
    PeakEwma,
    /// A random endpoint with probability proportional to its weight.
    Weighted,
    /// Consistent hashing with bounded loads: a request's
    /// [`AffinityKey`](crate::AffinityKey) stays on one endpoint until that
    /// endpoint's load would pass `load_factor` × the mean, then spills to
    /// the next endpoint on the ring. Requests without a key fall back to
    /// least-outstanding.
    ConsistentHash(HashConfig),
    /// Prefix affinity (SGLang's cache-aware routing): send the request to
    /// the endpoint whose recent prompts share the longest prefix with its
    /// [`Prompt`](crate::Prompt), unless the fleet's load is imbalanced past
    /// a threshold, then to the least-loaded endpoint. Requests without a
    /// prompt fall back to least-outstanding.
    PrefixAffinity(PrefixConfig),
}

impl Default for Policy {
    /// [`Policy::PeakEwma`].
    fn default() -> Self {
        Policy::PeakEwma
    }
}

impl Policy {
    /// The policy's name, as used in metrics and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::Random => "random",
            Policy::LeastOutstanding => "least_outstanding",
            Policy::PeakEwma => "peak_ewma",
            Policy::Weighted => "weighted",
            Policy::ConsistentHash(_) => "consistent_hash",
            Policy::PrefixAffinity(_) => "prefix_affinity",
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        match self {
            Policy::ConsistentHash(config) => config.validate(),
            Policy::PrefixAffinity(config) => config.validate(),
            Policy::RoundRobin
            | Policy::Random
            | Policy::LeastOutstanding
            | Policy::PeakEwma
            | Policy::Weighted => Ok(()),
        }
    }
}

/// Settings of [`Policy::ConsistentHash`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct HashConfig {
    /// The bound `c`: an endpoint takes a keyed request only while its load
    /// plus this request stays within `⌈c × (total load + 1) / endpoints⌉`
    /// (Mirrokni, Thorup and Zadimoghaddam's consistent hashing with bounded
    /// loads). At least 1.0. Default 1.25.
    pub load_factor: f64,
    /// Points per endpoint on the ring; more points spread keys more evenly.
    /// 1 to 10,000. Default 160.
    pub vnodes: u32,
}

impl Default for HashConfig {
    fn default() -> Self {
        HashConfig {
            load_factor: 1.25,
            vnodes: 160,
        }
    }
}

impl HashConfig {
    /// Sets [`load_factor`](Self::load_factor).
    pub fn load_factor(mut self, c: f64) -> Self {
        self.load_factor = c;
        self
    }

    /// Sets [`vnodes`](Self::vnodes).
    pub fn vnodes(mut self, vnodes: u32) -> Self {
        self.vnodes = vnodes;
        self
    }

    fn validate(&self) -> Result<()> {
        if !(self.load_factor.is_finite() && self.load_factor >= 1.0) {
            return Err(BalancerError::config(
                "policy.load_factor",
                "must be a finite number of at least 1.0",
            ));
        }
        if !(1..=10_000).contains(&self.vnodes) {
            return Err(BalancerError::config(
                "policy.vnodes",
                "must be between 1 and 10000",
            ));
        }
        Ok(())
    }
}

/// Bytes of prompt text per token, roughly, for English text and BPE
/// tokenizers.
const BYTES_PER_TOKEN: u64 = 4;

/// Settings of [`Policy::PrefixAffinity`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct PrefixConfig {
    /// Bytes per prompt block (roughly 4 bytes a token). Default 64.
    pub block_bytes: usize,
    /// The share of the prompt's blocks the best endpoint must already have
    /// for the request to follow it; below it, the least-loaded endpoint
    /// gets the request. 0.0 to 1.0. Default 0.5 (SGLang's
    /// `cache_threshold`).
    pub min_match: f64,
    /// The endpoint holding the prefix keeps getting it while it carries
    /// at most this many requests more than the least-loaded endpoint…
    /// Default 16.
    ///
    /// Past its bound the least-loaded endpoint gets the request and learns
    /// the prefix, so a hot prefix spreads over as many endpoints as its
    /// load needs. Measured on the simulator's prefix trace
    /// (`sim::Scenario::prefix_trace`, feature `sim`: 8
    /// nodes of 32 slots, 20 prompts with Zipf popularity, 5,000 req/s):
    /// 16 and 1.25 keep 95–98 % of blocks cached with node loads within
    /// about 1.5× of each other; 8 and 1.5 (the former default) cache 87 %.
    pub balance_abs: u32,
    /// …or at most this many times the least-loaded one's load, whichever
    /// bound is higher. At least 1.0. Default 1.25.
    pub balance_rel: f64,
    /// Block hashes remembered per endpoint (an approximate LRU of two
    /// generations), at most. At least 2. Default 65,536.
    ///
    /// Where answers report how much of the prompt the node had cached
    /// ([`Handle::report_cached_prefix`](crate::Handle::report_cached_prefix),
    /// [`ReportCachedPrefix`](crate::ReportCachedPrefix)), each endpoint's
    /// index learns the node's cache size below this: on the simulator's
    /// prefix trace (nodes keep 4 prompts; 20 s at 5,000 req/s) it lifts
    /// the hit rate from 96.5 % to 99.8 % and cuts p99 from 62 ms to
    /// 26 ms. Where the prompts in use outnumber what the whole fleet can
    /// cache, there is little to learn, and reports neither help nor hurt
    /// much.
    pub index_blocks: usize,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        PrefixConfig {
            block_bytes: 64,
            min_match: 0.5,
            balance_abs: 16,
            balance_rel: 1.25,
            index_blocks: 65_536,
        }
    }
}

impl PrefixConfig {
    /// Sets [`block_bytes`](Self::block_bytes).
    pub fn block_bytes(mut self, bytes: usize) -> Self {
        self.block_bytes = bytes;
        self
    }

    /// Sets [`min_match`](Self::min_match).
    pub fn min_match(mut self, share: f64) -> Self {
        self.min_match = share;
        self
    }

    /// Sets [`balance_abs`](Self::balance_abs) and [`balance_rel`](Self::balance_rel).
    pub fn balance(mut self, abs: u32, rel: f64) -> Self {
        self.balance_abs = abs;
        self.balance_rel = rel;
        self
    }

    /// The prompt blocks `tokens` prompt tokens fill, for
    /// [`Handle::report_cached_prefix`](crate::Handle::report_cached_prefix)
    /// from a server that reports cached tokens: at about 4 bytes a token,
    /// rounded up (a server's cached tokens are whole blocks of its own,
    /// which rarely line up with [`block_bytes`](Self::block_bytes)).
    ///
    /// ```
    /// use keel_balancer::PrefixConfig;
    ///
    /// // 64-byte blocks hold about 16 tokens.
    /// assert_eq!(PrefixConfig::default().blocks_of_tokens(1_024), 64);
    /// assert_eq!(PrefixConfig::default().blocks_of_tokens(1_030), 65);
    /// ```
    pub fn blocks_of_tokens(&self, tokens: u64) -> usize {
        let bytes = tokens.saturating_mul(BYTES_PER_TOKEN);
        usize::try_from(bytes.div_ceil(self.block_bytes.max(1) as u64)).unwrap_or(usize::MAX)
    }

    /// Sets [`index_blocks`](Self::index_blocks).
    pub fn index_blocks(mut self, blocks: usize) -> Self {
        self.index_blocks = blocks;
        self
    }

    fn validate(&self) -> Result<()> {
        validate::at_least("policy.block_bytes", self.block_bytes, 1)?;
        validate::ratio("policy.min_match", self.min_match)?;
        if !(self.balance_rel.is_finite() && self.balance_rel >= 1.0) {
            return Err(BalancerError::config(
                "policy.balance_rel",
                "must be a finite number of at least 1.0",
            ));
        }
        if self.index_blocks < 2 {
            return Err(BalancerError::config(
                "policy.index_blocks",
                "must be at least 2",
            ));
        }
        Ok(())
    }
}

/// Settings of a [`Balancer`](crate::Balancer).
///
/// Durations deserialize from human strings (`"500ms"`, `"10s"`).
///
/// ```
/// use std::time::Duration;
/// use keel_balancer::{BalancerConfig, Policy};
///
/// let config = BalancerConfig::default()
///     .policy(Policy::LeastOutstanding)
///     .max_outstanding_per_endpoint(8)
///     .max_wait(Duration::from_millis(250));
/// assert!(config.validate().is_ok());
/// assert!(BalancerConfig::default().decay(Duration::ZERO).validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BalancerConfig {
    /// The `balancer` label on this balancer's metrics. Default `"default"`.
    pub name: String,
    /// How endpoints are picked. Default [`Policy::PeakEwma`].
    pub policy: Policy,
    /// Requests one endpoint may have outstanding at once (an inference
    /// node's batch slots) when its discovery key says nothing
    /// ([`EndpointKey::capacity`](keel_core::EndpointKey::capacity) is
    /// `None`). Requests beyond it go elsewhere, or wait. `None` (the
    /// default) is unbounded.
    pub max_outstanding_per_endpoint: Option<u32>,
    /// How long a request may wait in the balancer when every usable endpoint
    /// is at capacity or busy, before it fails with
    /// [`BalancerError::Overloaded`](crate::BalancerError::Overloaded), or
    /// while the fleet is empty (zero endpoints at start-up is normal:
    /// keel-health inserts an endpoint after its first probe), before it
    /// fails with
    /// [`BalancerError::NoEndpoints`](crate::BalancerError::NoEndpoints).
    /// Zero rejects at once. The request's deadline bounds it too. A freed
    /// slot wakes one waiter, but a request arriving at that moment may take
    /// the slot first: waiting is bounded, not first-in-first-out. Default 1
    /// s.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Requests that may wait at once; more are rejected `Overloaded` at
    /// once. Default 10,000.
    pub max_waiters: usize,
    /// How long one attempt may take before it is cancelled with
    /// [`BalancerError::Timeout`](crate::BalancerError::Timeout) (Envoy's
    /// per-try timeout). A timed-out attempt counts as a failure of its
    /// endpoint. `None` (the default) leaves attempts bounded by the
    /// request's deadline only.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Option<Duration>,
    /// The latency assumed for an endpoint before its first response while
    /// the fleet has answered nothing yet (afterwards a new or restarted
    /// endpoint starts from the fleet's estimate, see
    /// [`Balancer::fleet_latency_estimate`](crate::Balancer::fleet_latency_estimate)),
    /// and the least latency a failure is recorded as, together with twice
    /// the fleet's estimate (so a node that fails fast does not look fast).
    /// Default 1 s.
    #[serde(with = "humantime_serde")]
    pub default_rtt: Duration,
    /// The peak-EWMA decay time constant: how quickly an estimate decays
    /// toward zero while its endpoint gets no responses (so an idle or
    /// once-slow endpoint is tried again), and the least weight old samples
    /// keep when responses are sparse. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub decay: Duration,
    /// The peak-EWMA decay in samples: each response moves the estimate at
    /// least `1 / decay_samples` of the way to its latency (the first
    /// response replaces the starting estimate; a response slower than the
    /// estimate replaces it at once: the peak). With 10, an estimate moves
    /// 90 % of the way to a lower latency in 22 responses and to within
    /// 10 % of it in about 50 (from 800 ms to 35 ms), whatever the node's
    /// speed and the request rate. At least 1. Default 10.
    pub decay_samples: u32,
    /// How long a busy endpoint is routed around when it does not say how
    /// long (no `Retry-After`). Default 1 s.
    #[serde(with = "humantime_serde")]
    pub busy_cooldown: Duration,
    /// Reported load (see
    /// [`BalancerBuilder::load_reports`](crate::BalancerBuilder::load_reports))
    /// is trusted less as it ages, linearly, and ignored once this old.
    /// Default 5 s.
    #[serde(with = "humantime_serde")]
    pub load_report_max_age: Duration,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            name: "default".to_owned(),
            policy: Policy::PeakEwma,
            max_outstanding_per_endpoint: None,
            max_wait: Duration::from_secs(1),
            max_waiters: 10_000,
            attempt_timeout: None,
            default_rtt: Duration::from_secs(1),
            decay: Duration::from_secs(10),
            decay_samples: 10,
            busy_cooldown: Duration::from_secs(1),
            load_report_max_age: Duration::from_secs(5),
        }
    }
}

impl BalancerConfig {
    /// Sets [`name`](Self::name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets [`policy`](Self::policy).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets [`max_outstanding_per_endpoint`](Self::max_outstanding_per_endpoint).
    pub fn max_outstanding_per_endpoint(mut self, slots: u32) -> Self {
        self.max_outstanding_per_endpoint = Some(slots);
        self
    }

    /// Sets [`max_wait`](Self::max_wait).
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// Sets [`max_waiters`](Self::max_waiters).
    pub fn max_waiters(mut self, waiters: usize) -> Self {
        self.max_waiters = waiters;
        self
    }

    /// Sets [`attempt_timeout`](Self::attempt_timeout).
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// Sets [`default_rtt`](Self::default_rtt).
    pub fn default_rtt(mut self, rtt: Duration) -> Self {
        self.default_rtt = rtt;
        self
    }

    /// Sets [`decay`](Self::decay).
    pub fn decay(mut self, decay: Duration) -> Self {
        self.decay = decay;
        self
    }

    /// Sets [`decay_samples`](Self::decay_samples).
    pub fn decay_samples(mut self, samples: u32) -> Self {
        self.decay_samples = samples;
        self
    }

    /// Sets [`busy_cooldown`](Self::busy_cooldown).
    pub fn busy_cooldown(mut self, cooldown: Duration) -> Self {
        self.busy_cooldown = cooldown;
        self
    }

    /// Sets [`load_report_max_age`](Self::load_report_max_age).
    pub fn load_report_max_age(mut self, age: Duration) -> Self {
        self.load_report_max_age = age;
        self
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`BalancerError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        validate::non_empty("name", &self.name)?;
        self.policy.validate()?;
        if self.max_outstanding_per_endpoint == Some(0) {
            return Err(BalancerError::config(
                "max_outstanding_per_endpoint",
                "must be at least 1 (or unset for unbounded)",
            ));
        }
        if self.attempt_timeout.is_some_and(|t| t.is_zero()) {
            return Err(BalancerError::config(
                "attempt_timeout",
                "must be greater than zero (or unset)",
            ));
        }
        validate::positive_duration("default_rtt", self.default_rtt)?;
        validate::positive_duration("decay", self.decay)?;
        validate::at_least("decay_samples", self.decay_samples, 1)?;
        validate::positive_duration("load_report_max_age", self.load_report_max_age)?;
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
            BalancerConfig::validate,
            [
                (BalancerConfig::default().name(""), "name"),
                (
                    BalancerConfig::default().max_outstanding_per_endpoint(0),
                    "max_outstanding_per_endpoint",
                ),
                (
                    BalancerConfig::default().attempt_timeout(Duration::ZERO),
                    "attempt_timeout",
                ),
                (
                    BalancerConfig::default().default_rtt(Duration::ZERO),
                    "default_rtt",
                ),
                (BalancerConfig::default().decay_samples(0), "decay_samples"),
                (
                    BalancerConfig::default().policy(Policy::ConsistentHash(
                        HashConfig::default().load_factor(0.5),
                    )),
                    "policy.load_factor",
                ),
                (
                    BalancerConfig::default()
                        .policy(Policy::ConsistentHash(HashConfig::default().vnodes(0))),
                    "policy.vnodes",
                ),
                (
                    BalancerConfig::default().policy(Policy::PrefixAffinity(
                        PrefixConfig::default().min_match(2.0),
                    )),
                    "policy.min_match",
                ),
                (
                    BalancerConfig::default().policy(Policy::PrefixAffinity(
                        PrefixConfig::default().block_bytes(0),
                    )),
                    "policy.block_bytes",
                ),
            ],
        );
    }

    #[test]
    fn reads_policies_and_human_durations() {
        let config: BalancerConfig = serde_json::from_str(
            r#"{"policy": {"kind": "consistent_hash", "load_factor": 1.5},
                "max_wait": "250ms", "attempt_timeout": "2s"}"#,
        )
        .unwrap();
        assert_eq!(
            config.policy,
            Policy::ConsistentHash(HashConfig::default().load_factor(1.5))
        );
        assert_eq!(config.max_wait, Duration::from_millis(250));
        assert_eq!(config.attempt_timeout, Some(Duration::from_secs(2)));
        assert_eq!(config.decay, Duration::from_secs(10));
        let plain: BalancerConfig =
            serde_json::from_str(r#"{"policy": {"kind": "round_robin"}}"#).unwrap();
        assert_eq!(plain.policy, Policy::RoundRobin);
        assert_eq!(plain.policy.name(), "round_robin");
    }
}
