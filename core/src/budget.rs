//! The retry budget: retries ≤ ratio × requests over a sliding window, plus
//! a floor, counted in whole numbers, and never more than that share of the
//! current slot's requests, so the window's savings cannot be spent at once.

use std::fmt;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::ConfigError;

/// Slots the window is divided into; the window slides one slot at a time.
const SLOTS: usize = 10;
const PPM: u128 = 1_000_000;

/// Settings of a [`RetryBudget`].
///
/// ```
/// use std::time::Duration;
/// use keel_core::BudgetConfig;
///
/// let config = BudgetConfig::default().ratio(0.2).floor(5).window(Duration::from_secs(30));
/// assert!(config.validate().is_ok());
/// assert!(BudgetConfig::default().ratio(-1.0).validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BudgetConfig {
    /// Retries allowed per request over the window: 0.1 allows one retry for
    /// every ten requests. 0.0 to 1000.0, kept to six decimals. Default 0.1.
    pub ratio: f64,
    /// Retries allowed per window on top of the ratio, so a client with
    /// little traffic can still retry. Default 10.
    pub floor: u32,
    /// The sliding window over which requests and retries are counted
    /// (in tenths). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: 0.1,
            floor: 10,
            window: Duration::from_secs(10),
        }
    }
}

impl BudgetConfig {
    /// Sets [`ratio`](Self::ratio).
    pub fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = ratio;
        self
    }

    /// Sets [`floor`](Self::floor).
    pub fn floor(mut self, floor: u32) -> Self {
        self.floor = floor;
        self
    }

    /// Sets [`window`](Self::window).
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.ratio.is_finite() && (0.0..=1000.0).contains(&self.ratio)) {
            return Err(ConfigError::new(
                "budget.ratio",
                "must be between 0.0 and 1000.0",
            ));
        }
        if self.window < Duration::from_millis(10) {
            return Err(ConfigError::new("budget.window", "must be at least 10ms"));
        }
        Ok(())
    }
}

/// A retry budget: a retry is allowed only while, over the sliding window,
/// `retries + 1 ≤ floor + ⌊ratio × requests⌋`, and, over the current slot
/// (a tenth of the window, the newest), `slot retries + 1 ≤ floor +
/// ⌊ratio × slot requests⌋`.
///
/// The second cap is what keeps the budget from bursting. A window of
/// healthy traffic saves up `ratio × requests` retries; without the slot
/// cap the first second of an outage could spend all ten seconds' worth at
/// once (2,000 attempts for 1,000 requests at ratio 0.1). With it, every
/// slot of an outage sees at most `1 + ratio` attempts per request, plus
/// the floor: the window allowance still bounds the total, the slot cap
/// bounds the rate.
///
/// Requests and retries are whole-number counts per tenth of the window;
/// the ratio is held in parts per million, so the allowance is exact
/// integer arithmetic: 1,000 requests at ratio 0.3 allow exactly 300
/// retries (plus the floor). That is why Keel does not reuse
/// [`tower::retry::budget::TpsBudget`]: it turns the ratio into an integer
/// cost per retry, `⌊1 / ratio⌋` deposits, so a ratio of 0.3 costs 3
/// deposits and allows 333 retries per 1,000 requests, 0.15 allows 166, and
/// only ratios of the form 1/n are kept; its window is also limited to 1 to
/// 60 s. Keel's budget implements tower's [`Budget`](tower::retry::budget::Budget)
/// trait, so it plugs into tower-style policies too.
///
/// One budget is per client: share it (it is behind an `Arc` in the
/// retry policy) across every request of one client
/// process, not across clients.
pub struct RetryBudget {
    ratio_ppm: u128,
    floor: u64,
    slot: Duration,
    state: Mutex<BudgetState>,
}

struct BudgetState {
    requests: [u64; SLOTS],
    retries: [u64; SLOTS],
    head: usize,
    head_start: Instant,
}

/// A [`RetryBudget`]'s counts over its current window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BudgetStats {
    /// Requests deposited in the window.
    pub requests: u64,
    /// Retries withdrawn in the window.
    pub retries: u64,
    /// Retries still allowed now: the smaller of the window's and the
    /// current slot's allowance.
    pub remaining: u64,
}

impl RetryBudget {
    /// A budget with these settings.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the bad field.
    pub fn new(config: &BudgetConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(RetryBudget {
            ratio_ppm: (config.ratio * 1e6).round() as u128,
            floor: u64::from(config.floor),
            slot: config.window / SLOTS as u32,
            state: Mutex::new(BudgetState {
                requests: [0; SLOTS],
                retries: [0; SLOTS],
                head: 0,
                head_start: Instant::now(),
            }),
        })
    }

    /// Counts one request (call it once per request, not per attempt).
    pub fn deposit(&self) {
        let mut state = self.state.lock();
        self.advance(&mut state);
        let head = state.head;
        state.requests[head] += 1;
    }

    /// Counts `n` requests at once: the same as `n` calls of
    /// [`deposit`](Self::deposit), with one lock instead of `n` (for
    /// callers that take requests in batches).
    pub fn deposit_many(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut state = self.state.lock();
        self.advance(&mut state);
        let head = state.head;
        state.requests[head] += n;
    }

    /// Takes one retry if the budget allows it; `false` means do not retry.
    pub fn withdraw(&self) -> bool {
        let mut state = self.state.lock();
        self.advance(&mut state);
        let (requests, retries) = totals(&state);
        let head = state.head;
        if retries < self.allowed(requests)
            && state.retries[head] < self.allowed(state.requests[head])
        {
            state.retries[head] += 1;
            true
        } else {
            false
        }
    }

    /// Counts over the current window.
    pub fn stats(&self) -> BudgetStats {
        let mut state = self.state.lock();
        self.advance(&mut state);
        let (requests, retries) = totals(&state);
        let head = state.head;
        let slot = self
            .allowed(state.requests[head])
            .saturating_sub(state.retries[head]);
        BudgetStats {
            requests,
            retries,
            remaining: self.allowed(requests).saturating_sub(retries).min(slot),
        }
    }

    fn allowed(&self, requests: u64) -> u64 {
        let by_ratio = u128::from(requests) * self.ratio_ppm / PPM;
        self.floor
            .saturating_add(u64::try_from(by_ratio).unwrap_or(u64::MAX))
    }

    /// Slides the window to now, clearing slots that fell out of it.
    fn advance(&self, state: &mut BudgetState) {
        let elapsed = state.head_start.elapsed();
        if elapsed < self.slot {
            return;
        }
        let steps = elapsed.as_nanos() / self.slot.as_nanos().max(1);
        for _ in 0..steps.min(SLOTS as u128) {
            state.head = (state.head + 1) % SLOTS;
            let head = state.head;
            state.requests[head] = 0;
            state.retries[head] = 0;
        }
        let remainder = elapsed.as_nanos() % self.slot.as_nanos().max(1);
        state.head_start = Instant::now() - Duration::from_nanos(remainder as u64);
    }
}

fn totals(state: &BudgetState) -> (u64, u64) {
    (state.requests.iter().sum(), state.retries.iter().sum())
}

impl tower::retry::budget::Budget for RetryBudget {
    fn deposit(&self) {
        RetryBudget::deposit(self);
    }

    fn withdraw(&self) -> bool {
        RetryBudget::withdraw(self)
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio_ppm", &self.ratio_ppm)
            .field("floor", &self.floor)
            .field("window", &(self.slot * SLOTS as u32))
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tower::retry::budget::{Budget, TpsBudget};

    fn budget(ratio: f64, floor: u32) -> RetryBudget {
        RetryBudget::new(&BudgetConfig::default().ratio(ratio).floor(floor)).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn whole_number_ratio_unlike_tower_tps_budget() {
        let ours = budget(0.3, 0);
        let tower = TpsBudget::new(Duration::from_secs(10), 0, 0.3);
        for _ in 0..1_000 {
            ours.deposit();
            Budget::deposit(&tower);
        }
        let ours_granted = (0..1_000).filter(|_| ours.withdraw()).count();
        let tower_granted = (0..1_000).filter(|_| Budget::withdraw(&tower)).count();
        assert_eq!(ours_granted, 300);
        // tower charges ⌊1/0.3⌋ = 3 deposits per retry.
        assert_eq!(tower_granted, 333);
    }

    #[tokio::test(start_paused = true)]
    async fn deposit_many_counts_as_many_deposits() {
        let (one_by_one, at_once) = (budget(0.3, 0), budget(0.3, 0));
        for _ in 0..1_000 {
            one_by_one.deposit();
        }
        at_once.deposit_many(1_000);
        at_once.deposit_many(0);
        assert_eq!(one_by_one.stats(), at_once.stats());
        let granted = (0..1_000).filter(|_| at_once.withdraw()).count();
        assert_eq!(granted, 300);
    }

    #[tokio::test(start_paused = true)]
    async fn floor_allows_retries_without_traffic_and_the_window_slides() {
        let b = budget(0.1, 2);
        assert!(b.withdraw());
        assert!(b.withdraw());
        assert!(!b.withdraw(), "the floor is spent");
        for _ in 0..10 {
            b.deposit();
        }
        assert!(b.withdraw(), "ten requests earn one retry");
        assert!(!b.withdraw());
        tokio::time::advance(Duration::from_secs(10)).await;
        let stats = b.stats();
        assert_eq!((stats.requests, stats.retries, stats.remaining), (0, 0, 2));
    }

    /// Ten seconds of healthy traffic at 2,000 requests/s save up 2,000
    /// retries; then every request fails and is retried while the budget
    /// allows (up to 3 times). Each second of the outage, the first
    /// included, stays at or below 1 + ratio attempts per request plus the
    /// floor's share.
    #[tokio::test(start_paused = true)]
    async fn an_outage_cannot_spend_the_window_savings_in_one_second() {
        let b = budget(0.1, 10);
        let tick = Duration::from_micros(500);
        for _ in 0..20_000 {
            b.deposit();
            tokio::time::advance(tick).await;
        }
        assert!(
            b.stats().requests >= 18_000,
            "the window saved up: {:?}",
            b.stats()
        );
        let mut per_second = Vec::new();
        for _second in 0..10 {
            let (mut requests, mut attempts) = (0u64, 0u64);
            for _ in 0..2_000 {
                b.deposit();
                requests += 1;
                attempts += 1;
                for _retry in 0..3 {
                    if !b.withdraw() {
                        break;
                    }
                    attempts += 1;
                }
                tokio::time::advance(tick).await;
            }
            per_second.push(attempts as f64 / requests as f64);
        }
        for (second, ratio) in per_second.iter().enumerate() {
            assert!(
                *ratio <= 1.11,
                "second {second}: {ratio} attempts/request ({per_second:?})"
            );
        }
        assert!(per_second[0] > 1.09, "retries still flow: {per_second:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn stats_remaining_is_the_smaller_of_window_and_slot() {
        let b = budget(0.5, 0);
        for _ in 0..100 {
            b.deposit();
        }
        assert_eq!(b.stats().remaining, 50);
        tokio::time::advance(Duration::from_secs(1)).await;
        // The window still holds 100 requests, the new slot none.
        let s = b.stats();
        assert_eq!((s.requests, s.remaining), (100, 0));
        assert!(!b.withdraw(), "the new slot has earned nothing yet");
        for _ in 0..10 {
            b.deposit();
        }
        assert_eq!(b.stats().remaining, 5);
    }

    #[test]
    fn refuses_bad_fields_by_name() {
        for (config, field) in [
            (BudgetConfig::default().ratio(f64::NAN), "budget.ratio"),
            (BudgetConfig::default().ratio(2000.0), "budget.ratio"),
            (
                BudgetConfig::default().window(Duration::from_millis(1)),
                "budget.window",
            ),
        ] {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
    }

    proptest! {
        /// At every grant, the window's retries stay within floor + ⌊ratio × requests⌋.
        #[test]
        fn grants_never_pass_the_allowance(
            ops in prop::collection::vec((0u8..3, 0u64..400), 1..400),
            ratio_pct in 0u32..100,
            floor in 0u32..5,
        ) {
            keel_testkit::paused_runtime().block_on(async {
                let ratio = f64::from(ratio_pct) / 100.0;
                let b = budget(ratio, floor);
                for (op, wait_ms) in ops {
                    tokio::time::advance(Duration::from_millis(wait_ms)).await;
                    if op == 0 {
                        if b.withdraw() {
                            let s = b.stats();
                            let allowed = u64::from(floor) + s.requests * u64::from(ratio_pct) / 100;
                            prop_assert!(s.retries <= allowed, "{s:?} allowed {allowed}");
                        }
                    } else {
                        b.deposit();
                    }
                }
                Ok(())
            })?;
        }
    }
}
