//! The in-process limiter: `governor`'s keyed GCRA on Tokio's clock.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use governor::clock::Clock;
use governor::state::keyed::DashMapStateStore;
use governor::{NotUntil, Quota};
use parking_lot::Mutex;
use tokio::time::Instant;

use super::config::{Rate, RateLimitConfig, TenantRates};
use super::{RateDecision, RateLimit};
use crate::error::Result;
use crate::metrics::LimiterMetrics;
use crate::ticket::TenantId;

/// `governor`'s clock, read from `tokio::time` so paused-time tests drive
/// it: the time since the limiter was built.
#[derive(Clone, Copy, Debug)]
struct TokioClock {
    origin: Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

type Keyed = governor::RateLimiter<
    TenantId,
    DashMapStateStore<TenantId>,
    TokioClock,
    governor::middleware::NoOpMiddleware<Duration>,
>;

/// The limiters of one set of rates: requests and cost units.
struct Limiters {
    requests: Option<(Keyed, u32)>,
    cost: Option<(Keyed, u32)>,
}

impl Limiters {
    fn new(rates: &TenantRates, clock: TokioClock) -> Self {
        let make = |rate: &Rate| {
            let quota = Quota::with_period(rate.emission_interval())
                .expect("validated: the interval is not zero")
                .allow_burst(NonZeroU32::new(rate.burst).expect("validated: burst ≥ 1"));
            (Keyed::dashmap_with_clock(quota, clock), rate.burst)
        };
        Limiters {
            requests: rates.requests.as_ref().map(make),
            cost: rates.cost.as_ref().map(make),
        }
    }

    fn all(&self) -> impl Iterator<Item = &Keyed> {
        self.requests.iter().chain(self.cost.iter()).map(|(l, _)| l)
    }
}

/// Per-tenant GCRA rate limits in this process, on the
/// [`governor`](https://docs.rs/governor) crate.
///
/// Each tenant is limited on requests and on cost units as its
/// [`TenantRates`] say. Requests are checked first, then cost; a request
/// refused on cost has used one request unit (governor cannot refund).
///
/// [`settle`](RateLimit::settle) is applied to the tenant's next charge:
/// an overdraft is added to it (so that request waits for the units owed),
/// a refund is taken off it (credit up to one burst).
///
/// Idle tenants' state is dropped every
/// [`eviction_interval`](RateLimitConfig::eviction_interval) (any tenant
/// whose bucket has refilled is indistinguishable from a new one), so
/// memory stays bounded by the tenants active recently, however many tenant
/// names are ever seen. Time is `tokio::time`, so tests can pause it.
///
/// ```
/// use keel_scheduler::{LocalRateLimiter, Rate, RateDecision, RateLimit, RateLimitConfig, TenantId, TenantRates};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), keel_scheduler::SchedulerError> {
/// let limiter = LocalRateLimiter::new(
///     RateLimitConfig::new("api").default_rates(TenantRates::default().requests(Rate::per_second(10).burst(2))),
/// )?;
/// let acme = TenantId::new("acme");
/// assert_eq!(limiter.acquire(&acme, 1).await?, RateDecision::Allow);
/// assert_eq!(limiter.acquire(&acme, 1).await?, RateDecision::Allow);
/// assert!(matches!(limiter.acquire(&acme, 1).await?, RateDecision::Limited { .. }));
/// # Ok(())
/// # }
/// ```
pub struct LocalRateLimiter {
    config: RateLimitConfig,
    clock: TokioClock,
    default: Limiters,
    overrides: HashMap<String, Limiters>,
    /// When the last eviction sweep ran, in nanoseconds since `clock.origin`.
    last_sweep: AtomicU64,
    /// Settlements not yet applied, per tenant: positive units are owed
    /// (an overdraft), negative ones are credit (a refund). `governor`
    /// cannot refund or force a charge, so a settlement is applied to the
    /// tenant's next charge.
    ledger: Mutex<HashMap<TenantId, i64>>,
    /// Whether `ledger` may be non-empty (skips its lock on the common path).
    owed: AtomicBool,
    metrics: LimiterMetrics,
}

impl fmt::Debug for LocalRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalRateLimiter")
            .field("config", &self.config)
            .field("tenants", &self.tenants())
            .finish_non_exhaustive()
    }
}

impl LocalRateLimiter {
    /// Builds the limiter.
    ///
    /// # Errors
    ///
    /// [`SchedulerError::InvalidConfig`](crate::SchedulerError::InvalidConfig)
    /// naming the bad field.
    pub fn new(config: RateLimitConfig) -> Result<Self> {
        config.validate()?;
        let clock = TokioClock {
            origin: Instant::now(),
        };
        let overrides = config
            .tenants
            .iter()
            .map(|(name, rates)| (name.clone(), Limiters::new(rates, clock)))
            .collect();
        Ok(LocalRateLimiter {
            default: Limiters::new(&config.default, clock),
            overrides,
            clock,
            last_sweep: AtomicU64::new(0),
            ledger: Mutex::new(HashMap::new()),
            owed: AtomicBool::new(false),
            metrics: LimiterMetrics::new(&config.name),
            config,
        })
    }

    /// The configuration the limiter was built with.
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// How many tenants have state (an upper bound until the next sweep).
    pub fn tenants(&self) -> usize {
        self.default
            .all()
            .chain(self.overrides.values().flat_map(Limiters::all))
            .map(|l| l.len())
            .max()
            .unwrap_or(0)
    }

    /// Drops the state of every tenant whose buckets have refilled now,
    /// rather than waiting for the next periodic sweep.
    pub fn evict_idle(&self) {
        for limiter in self
            .default
            .all()
            .chain(self.overrides.values().flat_map(Limiters::all))
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        self.metrics.keys.set(self.tenants() as f64);
    }

    fn maybe_sweep(&self, now: Duration) {
        let now_ns = now.as_nanos().min(u128::from(u64::MAX)) as u64;
        let last = self.last_sweep.load(Ordering::Relaxed);
        let interval = self.config.eviction_interval.as_nanos() as u64;
        if now_ns.saturating_sub(last) >= interval
            && self
                .last_sweep
                .compare_exchange(last, now_ns, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.evict_idle();
        }
    }

    /// Checks one limit; `Some(retry_after)` when it refuses.
    fn check(
        limiter: &(Keyed, u32),
        tenant: &TenantId,
        units: u64,
        now: Duration,
    ) -> Option<Duration> {
        let (limiter, burst) = limiter;
        // A cost above the burst is charged as the whole burst.
        let units = units.clamp(1, u64::from(*burst)) as u32;
        let n = NonZeroU32::new(units).expect("clamped to at least 1");
        match limiter.check_key_n(tenant, n) {
            Ok(Ok(())) => None,
            Ok(Err(not_until)) => Some(wait(&not_until, now)),
            // Unreachable after the clamp; refuse for one interval if not.
            Err(_insufficient) => Some(Duration::from_secs(1)),
        }
    }
}

fn wait(not_until: &NotUntil<Duration>, now: Duration) -> Duration {
    not_until.wait_time_from(now)
}

impl LocalRateLimiter {
    fn take_owed(&self, tenant: &TenantId) -> i64 {
        if !self.owed.load(Ordering::Acquire) {
            return 0;
        }
        let mut ledger = self.ledger.lock();
        let owed = ledger.remove(tenant).unwrap_or(0);
        if ledger.is_empty() {
            self.owed.store(false, Ordering::Release);
        }
        owed
    }

    fn owe(&self, tenant: &TenantId, units: i64) {
        if units == 0 {
            return;
        }
        let mut ledger = self.ledger.lock();
        *ledger.entry(tenant.clone()).or_insert(0) += units;
        self.owed.store(true, Ordering::Release);
    }
}

#[async_trait]
impl RateLimit for LocalRateLimiter {
    async fn acquire(&self, tenant: &TenantId, cost: u64) -> Result<RateDecision> {
        let now = self.clock.now();
        self.maybe_sweep(now);
        let limiters = self.overrides.get(tenant.as_str()).unwrap_or(&self.default);
        let owed = self.take_owed(tenant);
        let units = i64::try_from(cost).unwrap_or(i64::MAX).saturating_add(owed);
        let refused = limiters
            .requests
            .as_ref()
            .and_then(|l| Self::check(l, tenant, 1, now))
            .or_else(|| {
                let limit = limiters.cost.as_ref()?;
                if units <= 0 {
                    // Paid from credit; what is left stays for later.
                    self.owe(tenant, units);
                    return None;
                }
                Self::check(limit, tenant, units as u64, now)
            });
        if refused.is_some() && owed != 0 {
            self.owe(tenant, owed);
        }
        Ok(match refused {
            None => RateDecision::Allow,
            Some(retry_after) => {
                self.metrics.limited.increment(1);
                RateDecision::Limited { retry_after }
            }
        })
    }

    async fn settle(&self, tenant: &TenantId, reserved: u64, actual: u64) -> Result<()> {
        let limiters = self.overrides.get(tenant.as_str()).unwrap_or(&self.default);
        let Some((_, burst)) = &limiters.cost else {
            return Ok(());
        };
        let delta = super::settlement(reserved, actual, *burst);
        // Credit never exceeds one burst.
        let floor = -i64::from(*burst);
        if delta != 0 {
            let mut ledger = self.ledger.lock();
            let entry = ledger.entry(tenant.clone()).or_insert(0);
            *entry = (*entry + delta).max(floor);
            self.owed.store(true, Ordering::Release);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn settlement_applies_to_the_next_charge() {
        let limiter = limiter(TenantRates::default().cost(Rate::per_minute(100).burst(100)));
        let acme = TenantId::new("acme");
        assert_eq!(
            limiter.acquire(&acme, 80).await.unwrap(),
            RateDecision::Allow
        );
        // Reserved 80, used 30: 50 back, so 60 more fit at once.
        limiter.settle(&acme, 80, 30).await.unwrap();
        assert_eq!(
            limiter.acquire(&acme, 60).await.unwrap(),
            RateDecision::Allow
        );
        assert!(matches!(
            limiter.acquire(&acme, 20).await.unwrap(),
            RateDecision::Limited { .. }
        ));
        // A minute refills the bucket; an overdraft of 90 then leaves 10.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            limiter.acquire(&acme, 10).await.unwrap(),
            RateDecision::Allow
        );
        limiter.settle(&acme, 10, 100).await.unwrap();
        assert!(matches!(
            limiter.acquire(&acme, 20).await.unwrap(),
            RateDecision::Limited { .. }
        ));
        // The refused charge kept the debt: 90 owed + 1 needs 91, 90 are left.
        assert_eq!(
            limiter.acquire(&acme, 1).await.unwrap(),
            RateDecision::Limited {
                retry_after: Duration::from_millis(600)
            }
        );
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(
            limiter.acquire(&acme, 1).await.unwrap(),
            RateDecision::Allow
        );
        // The debt is paid: the bucket is empty now.
        assert!(matches!(
            limiter.acquire(&acme, 1).await.unwrap(),
            RateDecision::Limited { .. }
        ));
    }

    fn limiter(rates: TenantRates) -> LocalRateLimiter {
        LocalRateLimiter::new(RateLimitConfig::new("t").default_rates(rates)).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn sustained_rate_and_burst() {
        let l = limiter(TenantRates::default().requests(Rate::per_second(10).burst(5)));
        let t = TenantId::new("a");
        let mut allowed = 0;
        // Offer 100/s for 10 s: the burst of 5, then 10/s.
        for _ in 0..1_000 {
            if l.acquire(&t, 1).await.unwrap() == RateDecision::Allow {
                allowed += 1;
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert!((104..=106).contains(&allowed), "allowed {allowed}");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_when_it_fits() {
        let l = limiter(TenantRates::default().requests(Rate::per_second(2).burst(1)));
        let t = TenantId::new("a");
        assert_eq!(l.acquire(&t, 1).await.unwrap(), RateDecision::Allow);
        let RateDecision::Limited { retry_after } = l.acquire(&t, 1).await.unwrap() else {
            panic!("second request within 500 ms allowed");
        };
        assert_eq!(retry_after, Duration::from_millis(500));
        tokio::time::advance(retry_after).await;
        assert_eq!(l.acquire(&t, 1).await.unwrap(), RateDecision::Allow);
    }

    #[tokio::test(start_paused = true)]
    async fn cost_units_and_overrides() {
        let config = RateLimitConfig::new("t")
            .default_rates(TenantRates::default().cost(Rate::per_second(100)))
            .tenant("big", TenantRates::default().cost(Rate::per_second(1_000)));
        let l = LocalRateLimiter::new(config).unwrap();
        let (small, big) = (TenantId::new("small"), TenantId::new("big"));
        assert_eq!(l.acquire(&small, 80).await.unwrap(), RateDecision::Allow);
        assert!(matches!(
            l.acquire(&small, 80).await.unwrap(),
            RateDecision::Limited { .. }
        ));
        for _ in 0..12 {
            assert_eq!(l.acquire(&big, 80).await.unwrap(), RateDecision::Allow);
        }
        // Above the burst: charged as the whole burst, so it fits an idle
        // tenant once.
        let huge = TenantId::new("huge");
        assert_eq!(l.acquire(&huge, 5_000).await.unwrap(), RateDecision::Allow);
        assert!(matches!(
            l.acquire(&huge, 1).await.unwrap(),
            RateDecision::Limited { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_tenants_are_evicted() {
        let l = LocalRateLimiter::new(
            RateLimitConfig::new("t")
                .default_rates(TenantRates::default().requests(Rate::per_second(10)))
                .eviction_interval(Duration::from_secs(5)),
        )
        .unwrap();
        for i in 0..10_000 {
            l.acquire(&TenantId::new(format!("t{i}")), 1).await.unwrap();
        }
        assert_eq!(l.tenants(), 10_000);
        // Every bucket refills within a second; the next sweep is due at 5 s.
        tokio::time::advance(Duration::from_secs(6)).await;
        l.acquire(&TenantId::new("active"), 1).await.unwrap();
        assert!(l.tenants() <= 1, "{} tenants kept", l.tenants());
    }
}
