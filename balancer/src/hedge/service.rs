//! The hedge service.

use std::fmt;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{Either, select};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_service::Service;

use super::config::HedgeConfig;
use super::future::HedgeFuture;
use crate::error::{BalancerError, Result};
use crate::metrics::HedgeMetrics;
use keel_core::{Deadline, RequestExtensions, RetryBudget};

use crate::request::{AvoidEndpoints, DispatchTrace};

/// Recent latencies in microseconds, in two windows.
struct Latencies {
    current: Histogram<u64>,
    previous: Histogram<u64>,
    rotated: Instant,
}

/// What every clone of one hedge layer shares.
pub(crate) struct HedgeShared {
    config: HedgeConfig,
    pub(crate) budget: RetryBudget,
    latencies: Mutex<Latencies>,
    metrics: HedgeMetrics,
}

impl fmt::Debug for HedgeShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeShared")
            .field("config", &self.config)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 h at two significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("static histogram bounds are valid")
}

impl HedgeShared {
    pub(crate) fn new(config: HedgeConfig) -> Result<Self> {
        config.validate()?;
        Ok(HedgeShared {
            budget: RetryBudget::new(&config.budget)?,
            latencies: Mutex::new(Latencies {
                current: histogram(),
                previous: histogram(),
                rotated: Instant::now(),
            }),
            metrics: HedgeMetrics::new(&config.name),
            config,
        })
    }

    fn rotate(&self, latencies: &mut Latencies) {
        let elapsed = latencies.rotated.elapsed();
        if elapsed < self.config.window {
            return;
        }
        std::mem::swap(&mut latencies.current, &mut latencies.previous);
        latencies.current.reset();
        if elapsed >= self.config.window * 2 {
            latencies.previous.reset();
        }
        latencies.rotated = Instant::now();
    }

    /// The hedge delay now, if enough latencies are known.
    fn delay(&self) -> Option<Duration> {
        let mut latencies = self.latencies.lock();
        self.rotate(&mut latencies);
        let min = self.config.min_samples.max(1);
        let source = if latencies.previous.len() >= min {
            &latencies.previous
        } else if latencies.current.len() >= min {
            &latencies.current
        } else {
            return None;
        };
        let micros = source.value_at_quantile(self.config.percentile);
        Some(Duration::from_micros(micros).max(self.config.min_delay))
    }

    fn record(&self, latency: Duration) {
        let mut latencies = self.latencies.lock();
        self.rotate(&mut latencies);
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        latencies.current.saturating_record(micros);
    }
}

/// Sends a second copy of a request to another endpoint when the first is
/// slower than the configured percentile of recent latencies; answers with
/// whichever copy succeeds first and drops (cancels) the other.
///
/// A hedge is sent only if the hedge budget allows it and the hedge delay
/// ends before the request's [`Deadline`]; the copy carries the first
/// copy's endpoint in its [`AvoidEndpoints`]. If one copy fails, the other
/// is awaited. Requests must be `Clone`.
pub struct Hedge<S> {
    inner: S,
    shared: Arc<HedgeShared>,
}

impl<S> Hedge<S> {
    /// Wraps `inner` with a hedge layer of its own.
    ///
    /// # Errors
    ///
    /// [`BalancerError::InvalidConfig`] naming the bad field.
    pub fn new(inner: S, config: HedgeConfig) -> Result<Self> {
        Ok(Hedge {
            inner,
            shared: Arc::new(HedgeShared::new(config)?),
        })
    }

    pub(crate) fn from_shared(inner: S, shared: Arc<HedgeShared>) -> Self {
        Hedge { inner, shared }
    }

    /// The hedge budget.
    pub fn budget(&self) -> &RetryBudget {
        &self.shared.budget
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone> Clone for Hedge<S> {
    fn clone(&self) -> Self {
        Hedge {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Hedge<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hedge")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish()
    }
}

impl<S, Req> Service<Req> for Hedge<S>
where
    S: Service<Req, Error = BalancerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    Req: RequestExtensions + Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = BalancerError;
    type Future = HedgeFuture<S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BalancerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Req) -> Self::Future {
        let shared = self.shared.clone();
        shared.budget.deposit();
        shared.metrics.requests.increment(1);
        let delay = shared.delay().filter(|delay| {
            Deadline::of(&request).is_none_or(|d| Instant::now() + *delay < d.instant())
        });
        let trace = DispatchTrace::default();
        let copy = delay.map(|_| request.clone());
        if delay.is_some() {
            request.extensions_mut().insert(trace.clone());
        }
        // Call the clone that was polled ready; keep a fresh one for the hedge.
        let fresh = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, fresh);
        let primary = ready.call(request);
        let backup = self.inner.clone();
        HedgeFuture {
            inner: Box::pin(run(primary, backup, copy, delay, trace, shared)),
        }
    }
}

async fn run<S, Req>(
    primary: S::Future,
    mut backup: S,
    copy: Option<Req>,
    delay: Option<Duration>,
    trace: DispatchTrace,
    shared: Arc<HedgeShared>,
) -> Result<S::Response, BalancerError>
where
    S: Service<Req, Error = BalancerError>,
    Req: RequestExtensions,
{
    let started = Instant::now();
    let primary = pin!(primary);
    let (Some(delay), Some(mut copy)) = (delay, copy) else {
        let result = primary.await;
        if result.is_ok() {
            shared.record(started.elapsed());
        }
        return result;
    };
    let timer = pin!(tokio::time::sleep(delay));
    let primary = match select(primary, timer).await {
        Either::Left((result, _)) => {
            if result.is_ok() {
                shared.record(started.elapsed());
            }
            return result;
        }
        Either::Right(((), primary)) => primary,
    };
    if !shared.budget.withdraw() {
        shared.metrics.budget_exhausted.increment(1);
        let result = primary.await;
        if result.is_ok() {
            shared.record(started.elapsed());
        }
        return result;
    }
    let first = trace.endpoint();
    if let Some(endpoint) = first {
        AvoidEndpoints::add(&mut copy, endpoint);
    }
    shared.metrics.hedges.increment(1);
    tracing::debug!(?delay, avoid = ?first, "hedging a slow request");
    let hedge = pin!(async move {
        backup.ready().await?;
        backup.call(copy).await
    });
    match select(primary, hedge).await {
        Either::Left((Ok(response), _hedge)) => {
            shared.record(started.elapsed());
            Ok(response)
        }
        Either::Right((Ok(response), _primary)) => {
            // The first copy is cancelled when `_primary` drops; its
            // latency is at least this long.
            shared.metrics.wins.increment(1);
            shared.record(started.elapsed());
            Ok(response)
        }
        Either::Left((Err(_), hedge)) => {
            let result = hedge.await;
            if result.is_ok() {
                shared.metrics.wins.increment(1);
            }
            result
        }
        Either::Right((Err(_), primary)) => {
            let result = primary.await;
            if result.is_ok() {
                shared.record(started.elapsed());
            }
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_testkit::assert_refused;

    #[tokio::test(start_paused = true)]
    async fn delay_needs_samples_then_follows_the_percentile() {
        let shared =
            HedgeShared::new(HedgeConfig::default().min_samples(10).percentile(0.9)).unwrap();
        assert_eq!(shared.delay(), None);
        for ms in 1..=100 {
            shared.record(Duration::from_millis(ms));
        }
        let delay = shared.delay().unwrap();
        assert!(
            (Duration::from_millis(89)..=Duration::from_millis(91)).contains(&delay),
            "{delay:?}"
        );
        // Two windows later everything is forgotten.
        tokio::time::advance(Duration::from_secs(21)).await;
        assert_eq!(shared.delay(), None);
    }

    #[test]
    fn refuses_bad_fields_by_name() {
        assert_refused(
            HedgeConfig::validate,
            [
                (HedgeConfig::default().percentile(0.2), "percentile"),
                (HedgeConfig::default().percentile(1.0), "percentile"),
                (HedgeConfig::default().window(Duration::ZERO), "window"),
            ],
        );
    }
}
