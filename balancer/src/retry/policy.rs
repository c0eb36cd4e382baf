//! The retry policy: what to retry, when, and where not to.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel_core::{Backoff, BudgetConfig, Deadline, RequestExtensions, RetryBudget};
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, Sleep};

use crate::balance::mix;
use crate::error::{BalancerError, GiveUp, Result};
use crate::metrics::RetryMetrics;
use crate::request::AvoidEndpoints;
use keel_core::validate;

/// Settings of the [retry layer](super).
///
/// ```
/// use std::time::Duration;
/// use keel_balancer::retry::{Backoff, BudgetConfig, RetryConfig};
///
/// let config = RetryConfig::default()
///     .max_attempts(3)
///     .backoff(Backoff::new(Duration::from_millis(10), Duration::from_millis(500))?)
///     .budget(BudgetConfig::default().ratio(0.1).floor(10));
/// assert!(config.validate().is_ok());
/// # Ok::<(), keel_core::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RetryConfig {
    /// The `retry` label on this layer's metrics. Default `"default"`.
    pub name: String,
    /// Attempts per request, the first one included. At least 1. Default 3.
    pub max_attempts: u32,
    /// The delay before each retry: keel-core's [`Backoff`], validated when
    /// built (or deserialized). The delay before retry *n* is drawn from
    /// `[0, min(max, base × 2^(n-1))]` with the default
    /// [`Jitter::Full`](keel_core::Jitter::Full). Default 25 ms doubling
    /// to 1 s.
    pub backoff: Backoff,
    /// The retry budget, one per layer (per client). Default: 10% of
    /// requests plus 10 retries per 10 s window.
    pub budget: BudgetConfig,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            name: "default".to_owned(),
            max_attempts: 3,
            backoff: Backoff::new(Duration::from_millis(25), Duration::from_secs(1))
                .expect("the default backoff is valid"),
            budget: BudgetConfig::default(),
        }
    }
}

impl RetryConfig {
    /// Sets [`name`](Self::name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets [`max_attempts`](Self::max_attempts).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets [`backoff`](Self::backoff).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
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
        validate::at_least("max_attempts", self.max_attempts, 1)?;
        Ok(self.budget.validate()?)
    }
}

struct Shared {
    config: RetryConfig,
    budget: RetryBudget,
    seed: u64,
    sessions: AtomicU64,
    metrics: RetryMetrics,
}

/// The [`tower::retry::Policy`] behind [`RetryLayer`](super::RetryLayer).
///
/// For each failed attempt, in order:
///
/// 1. errors that are not [retryable](crate::BalancerError::is_retryable)
///    pass through untouched, spending no budget (including an inner layer's
///    `RetriesExhausted`, and [`BalancerError::NoEndpoints`] on a first
///    attempt: a retry would find the same empty fleet);
/// 2. after `max_attempts`, give up;
/// 3. draw a full-jitter backoff ([`Backoff`]); if sleeping it would pass
///    the request's [`Deadline`], give up;
/// 4. withdraw one retry from the budget; if it is empty, give up;
/// 5. add the failed endpoint to the request's [`AvoidEndpoints`] and retry
///    after the backoff.
///
/// Giving up returns [`BalancerError::RetriesExhausted`] (never retryable)
/// with the reason and the last failure as its source, so outer layers do not
/// multiply attempts and the caller sees the real cause. Each request
/// deposits once into the budget, when it enters the layer. When a retry
/// finds every endpoint already failed by this request (the balancer answers
/// [`BalancerError::NoEndpoints`] without any upstream call), the policy
/// gives up with [`GiveUp::NoEndpointLeft`] and the previous attempt's error.
///
/// Requests must be `Clone` to be retried (an `http::Request<Bytes>` is).
pub struct RetryPolicy {
    shared: Arc<Shared>,
    session: u64,
    attempts: u32,
    rng: Option<fastrand::Rng>,
    /// The last retried failure of this request (not cloned: a clone
    /// starts a request of its own).
    last: Option<BalancerError>,
}

impl Clone for RetryPolicy {
    fn clone(&self) -> Self {
        RetryPolicy {
            shared: self.shared.clone(),
            session: self.session,
            attempts: self.attempts,
            rng: self.rng.clone(),
            last: None,
        }
    }
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("config", &self.shared.config)
            .field("budget", &self.shared.budget)
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl RetryPolicy {
    /// A policy with its own budget.
    ///
    /// # Errors
    ///
    /// [`BalancerError::InvalidConfig`] naming the bad field.
    pub fn new(config: RetryConfig) -> Result<Self> {
        Self::with_seed(config, fastrand::u64(..))
    }

    /// A policy whose backoff jitter is drawn from `seed` (for reproducible
    /// simulations): request *n* gets the *n*-th stream.
    ///
    /// # Errors
    ///
    /// [`BalancerError::InvalidConfig`] naming the bad field.
    pub fn with_seed(config: RetryConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        Ok(RetryPolicy {
            shared: Arc::new(Shared {
                budget: RetryBudget::new(&config.budget)?,
                metrics: RetryMetrics::new(&config.name),
                config,
                seed,
                sessions: AtomicU64::new(0),
            }),
            session: 0,
            attempts: 0,
            rng: None,
            last: None,
        })
    }

    /// The budget every request of this policy shares.
    pub fn budget(&self) -> &RetryBudget {
        &self.shared.budget
    }

    /// The policy's configuration.
    pub fn config(&self) -> &RetryConfig {
        &self.shared.config
    }

    fn backoff(&mut self) -> Duration {
        let (seed, session) = (self.shared.seed, self.session);
        let rng = self
            .rng
            .get_or_insert_with(|| fastrand::Rng::with_seed(mix(seed, session)));
        self.shared.config.backoff.delay_with(self.attempts, rng)
    }

    fn give_up<Res>(&self, result: &mut Result<Res, BalancerError>, reason: GiveUp) {
        let metrics = &self.shared.metrics;
        match reason {
            GiveUp::Budget => metrics.gave_up_budget.increment(1),
            GiveUp::Deadline => metrics.gave_up_deadline.increment(1),
            GiveUp::MaxAttempts => metrics.gave_up_max_attempts.increment(1),
            GiveUp::NoEndpointLeft => metrics.gave_up_no_endpoint_left.increment(1),
        }
        if let Err(error) = std::mem::replace(result, Err(BalancerError::NoEndpoints)) {
            tracing::debug!(attempts = self.attempts, %reason, %error, "not retrying");
            *result = Err(BalancerError::RetriesExhausted {
                attempts: self.attempts,
                reason,
                source: Box::new(error),
            });
        }
    }
}

impl<Req, Res> tower::retry::Policy<Req, Res, BalancerError> for RetryPolicy
where
    Req: RequestExtensions + Clone,
{
    type Future = Sleep;

    fn retry(
        &mut self,
        request: &mut Req,
        result: &mut Result<Res, BalancerError>,
    ) -> Option<Sleep> {
        let error = match result {
            Ok(_) => return None,
            Err(error) => error,
        };
        self.attempts += 1;
        if matches!(error, BalancerError::NoEndpoints)
            && let Some(last) = self.last.take()
        {
            // A retry found every endpoint already failed: the cause is the
            // last failure, not an empty fleet.
            *result = Err(last);
            self.attempts -= 1;
            self.give_up(result, GiveUp::NoEndpointLeft);
            return None;
        }
        if !error.is_retryable() {
            return None;
        }
        if self.attempts >= self.shared.config.max_attempts {
            self.give_up(result, GiveUp::MaxAttempts);
            return None;
        }
        let backoff = self.backoff();
        let resume = Instant::now() + backoff;
        if Deadline::of(request).is_some_and(|d| resume >= d.instant()) {
            self.give_up(result, GiveUp::Deadline);
            return None;
        }
        if !self.shared.budget.withdraw() {
            self.give_up(result, GiveUp::Budget);
            return None;
        }
        let failed = result.as_ref().err().and_then(BalancerError::endpoint);
        if let Some(endpoint) = failed {
            AvoidEndpoints::add(request, endpoint);
        }
        // Keep the failure (tower drops a retried result) to name it if the
        // retry finds no endpoint left.
        self.last = std::mem::replace(result, Err(BalancerError::NoEndpoints)).err();
        self.shared.metrics.retries.increment(1);
        tracing::debug!(attempt = self.attempts + 1, ?backoff, avoid = ?failed, "retrying");
        Some(tokio::time::sleep_until(resume))
    }

    fn clone_request(&mut self, request: &Req) -> Option<Req> {
        if self.attempts == 0 {
            // First attempt of a new request (tower calls this on the
            // layer's template policy before cloning it for the request).
            self.session = self.shared.sessions.fetch_add(1, Ordering::Relaxed);
            self.shared.budget.deposit();
            self.shared.metrics.requests.increment(1);
        }
        Some(request.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::EndpointIndex;
    use keel_testkit::assert_refused;
    use tower::retry::Policy;

    fn failed(endpoint: u64) -> Result<(), BalancerError> {
        Err(BalancerError::Busy {
            endpoint: EndpointIndex::new(endpoint),
            retry_after: None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn retries_avoid_the_failed_endpoint_and_stop_at_max_attempts() {
        let mut template =
            RetryPolicy::with_seed(RetryConfig::default().max_attempts(3), 1).unwrap();
        let mut request = http::Extensions::new();
        let _ = Policy::<_, (), BalancerError>::clone_request(&mut template, &request);
        let mut session = template.clone();
        let mut result = failed(4);
        assert!(session.retry(&mut request, &mut result).is_some());
        assert!(
            AvoidEndpoints::get(&request)
                .unwrap()
                .contains(EndpointIndex::new(4))
        );
        let mut result = failed(5);
        assert!(session.retry(&mut request, &mut result).is_some());
        let mut result = failed(6);
        assert!(session.retry(&mut request, &mut result).is_none());
        let avoided = AvoidEndpoints::get(&request).unwrap();
        assert_eq!(
            avoided.as_slice(),
            &[EndpointIndex::new(4), EndpointIndex::new(5)]
        );
        match result {
            Err(BalancerError::RetriesExhausted {
                attempts: 3,
                reason: GiveUp::MaxAttempts,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn never_sleeps_past_the_deadline() {
        let config = RetryConfig::default()
            .backoff(Backoff::new(Duration::from_secs(5), Duration::from_secs(5)).unwrap());
        let mut template = RetryPolicy::with_seed(config, 9).unwrap();
        let mut request = http::Extensions::new();
        Deadline::after(Duration::from_millis(1)).apply(&mut request);
        let _ = Policy::<_, (), BalancerError>::clone_request(&mut template, &request);
        let mut session = template.clone();
        // A backoff drawn from [0, 5 s] lands past a 1 ms deadline unless it
        // is under 1 ms; seed 9 draws a long one.
        let mut result = failed(0);
        assert!(session.retry(&mut request, &mut result).is_none());
        assert!(matches!(
            result,
            Err(BalancerError::RetriesExhausted {
                reason: GiveUp::Deadline,
                ..
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn non_retryable_errors_pass_through() {
        let mut session = RetryPolicy::with_seed(RetryConfig::default(), 2).unwrap();
        let mut request = http::Extensions::new();
        let mut result: Result<(), BalancerError> = Err(BalancerError::DeadlineExceeded);
        assert!(session.retry(&mut request, &mut result).is_none());
        assert!(matches!(result, Err(BalancerError::DeadlineExceeded)));
    }

    #[test]
    fn backoff_is_core_full_jitter_under_the_cap() {
        let backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(300)).unwrap();
        let mut policy =
            RetryPolicy::with_seed(RetryConfig::default().backoff(backoff), 3).unwrap();
        policy.attempts = 2;
        let draws: Vec<_> = (0..1000).map(|_| policy.backoff()).collect();
        assert!(draws.iter().all(|d| *d <= backoff.cap(2)));
        assert_eq!(backoff.cap(2), Duration::from_millis(20));
        assert!(
            draws.iter().any(|d| *d < Duration::from_millis(2)),
            "reaches near zero"
        );
        assert!(
            draws.iter().any(|d| *d > Duration::from_millis(18)),
            "reaches near the cap"
        );
        // Seeded: the same session draws the same delays.
        let mut again = RetryPolicy::with_seed(RetryConfig::default().backoff(backoff), 3).unwrap();
        again.attempts = 2;
        assert_eq!(again.backoff(), draws[0]);
    }

    #[tokio::test(start_paused = true)]
    async fn no_endpoints_spends_no_budget_and_no_endpoint_left_names_the_failure() {
        let config = RetryConfig::default().budget(BudgetConfig::default().ratio(0.0).floor(5));
        let mut template = RetryPolicy::with_seed(config, 4).unwrap();
        let mut request = http::Extensions::new();
        let _ = Policy::<_, (), BalancerError>::clone_request(&mut template, &request);
        let mut session = template.clone();
        let mut result: Result<(), BalancerError> = Err(BalancerError::NoEndpoints);
        assert!(session.retry(&mut request, &mut result).is_none());
        assert!(
            matches!(result, Err(BalancerError::NoEndpoints)),
            "passed through"
        );
        assert_eq!(template.budget().stats().retries, 0, "no budget spent");

        // A retry that finds every endpoint already failed.
        let mut session = template.clone();
        let mut result = failed(1);
        assert!(session.retry(&mut request, &mut result).is_some());
        let mut result: Result<(), BalancerError> = Err(BalancerError::NoEndpoints);
        assert!(session.retry(&mut request, &mut result).is_none());
        match result {
            Err(BalancerError::RetriesExhausted {
                attempts: 1,
                reason: GiveUp::NoEndpointLeft,
                source,
            }) => assert!(matches!(*source, BalancerError::Busy { .. }), "{source:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_bad_fields_by_name() {
        assert_refused(
            RetryConfig::validate,
            [
                (RetryConfig::default().max_attempts(0), "max_attempts"),
                (
                    RetryConfig::default().budget(BudgetConfig::default().ratio(-0.5)),
                    "budget.ratio",
                ),
            ],
        );
    }
}
