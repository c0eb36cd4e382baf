//! A circuit breaker as a tower middleware: [`CircuitBreakerLayer`].
//!
//! Closed, the breaker counts failures per [`FailureKind`] in runs (a
//! success resets every run; **busy answers touch nothing**: backpressure is
//! not failure). When a class's run reaches its threshold the breaker
//! opens: every request is answered at once with a retryable
//! [`HealthError::Unavailable`], without touching the
//! endpoint. After `open_for` (doubling on each consecutive re-open, up to
//! `max_open_for`) it is half-open: at most `half_open_trials` trial requests
//! go through, others are refused. When all trials succeed it closes; any
//! failure re-opens it. It cannot stay stuck half-open: a trial running past
//! `trial_timeout` is a failure (the caller gets
//! [`HealthError::Timeout`]), and a trial whose future is
//! dropped gives its slot back.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use keel_health::{BreakerConfig, BreakerState, CircuitBreakerLayer, ClassThresholds};
//! use tower::{Layer, Service, ServiceExt};
//!
//! let layer = CircuitBreakerLayer::new(
//!     BreakerConfig::new("node-1").thresholds(ClassThresholds::all(Some(2))),
//! )
//! .unwrap();
//! let mut svc = layer.layer(tower::service_fn(|_: ()| async {
//!     Err::<(), _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
//! }));
//! for _ in 0..2 {
//!     assert!(svc.ready().await.unwrap().call(()).await.is_err());
//! }
//! assert_eq!(svc.state(), BreakerState::Open);
//! let refused = svc.ready().await.unwrap().call(()).await.unwrap_err();
//! let refused = refused.downcast_ref::<keel_health::HealthError>().unwrap();
//! assert!(matches!(refused, keel_health::HealthError::Unavailable { .. }));
//! assert!(refused.is_retryable());
//! # }
//! ```
//!
//! Each service the layer wraps gets its own breaker (clones of that
//! service share it), so layer each endpoint's service, not the balancer.
//! The service's error type is `BoxError`, as for tower's own middleware.
//! Like tower's `LoadShed`, `poll_ready` is the inner service's: a refused
//! request does not call the inner service.

mod error;
mod future;
mod layer;
mod service;

use std::fmt;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

pub use self::future::BreakerFuture;
pub use self::layer::CircuitBreakerLayer;
pub use self::service::CircuitBreaker;
use crate::config::BreakerConfig;
use crate::error::HealthError;
use crate::metrics::BreakerMetrics;
use keel_core::{FailureKind, Outcome};

/// Where a circuit breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BreakerState {
    /// Requests flow; failures are counted.
    Closed,
    /// Requests are refused at once.
    Open,
    /// A bounded number of trial requests decide whether to close.
    HalfOpen,
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        })
    }
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { admitted: u32, succeeded: u32 },
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    runs: [u32; 4],
    reopens: u32,
    /// Changes on every phase change, so results of requests admitted in an
    /// earlier phase are not counted in a later one.
    generation: u64,
}

/// What the breaker decided for one request.
#[derive(Debug)]
pub(crate) enum Admission {
    Normal(u64),
    Trial(u64),
    Rejected(HealthError),
}

/// One breaker's state, shared by the clones of its service.
#[derive(Debug)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
    metrics: BreakerMetrics,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        let metrics = BreakerMetrics::new(&config.name);
        Breaker {
            config,
            inner: Mutex::new(Inner {
                phase: Phase::Closed,
                runs: [0; 4],
                reopens: 0,
                generation: 0,
            }),
            metrics,
        }
    }

    pub(crate) fn config(&self) -> &BreakerConfig {
        &self.config
    }

    pub(crate) fn state(&self) -> BreakerState {
        match self.inner.lock().phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    pub(crate) fn admit(&self) -> Admission {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        match inner.phase {
            Phase::Closed => Admission::Normal(inner.generation),
            Phase::Open { until } if now >= until => {
                inner.phase = Phase::HalfOpen {
                    admitted: 1,
                    succeeded: 0,
                };
                inner.generation += 1;
                self.metrics.to_half_open.increment(1);
                tracing::info!(breaker = %self.config.name, "circuit breaker half-open");
                Admission::Trial(inner.generation)
            }
            Phase::Open { until } => {
                self.metrics.rejected.increment(1);
                Admission::Rejected(error::open(until - now))
            }
            Phase::HalfOpen {
                ref mut admitted, ..
            } if *admitted < self.config.half_open_trials => {
                *admitted += 1;
                Admission::Trial(inner.generation)
            }
            Phase::HalfOpen { .. } => {
                self.metrics.rejected.increment(1);
                Admission::Rejected(error::trials_taken())
            }
        }
    }

    /// A request admitted in `generation` finished with `outcome`.
    pub(crate) fn record(&self, trial: bool, generation: u64, outcome: Outcome) {
        let mut inner = self.inner.lock();
        if inner.generation != generation {
            return;
        }
        match (&mut inner.phase, trial) {
            (Phase::Closed, false) => match outcome {
                Outcome::Success => inner.runs = [0; 4],
                Outcome::Failure { kind, .. } => {
                    let run = &mut inner.runs[kind.index()];
                    *run += 1;
                    if self.config.thresholds.get(kind).is_some_and(|t| *run >= t) {
                        inner.reopens = 0;
                        self.open(&mut inner, Some(kind));
                    }
                }
                // Busy is backpressure, cancelled says nothing about the
                // endpoint (as will anything `Outcome` gains later).
                _ => {}
            },
            (
                Phase::HalfOpen {
                    admitted,
                    succeeded,
                },
                true,
            ) => match outcome {
                Outcome::Success => {
                    *succeeded += 1;
                    if *succeeded >= self.config.half_open_trials {
                        self.close(&mut inner);
                    }
                }
                Outcome::Failure { kind, .. } => {
                    inner.reopens += 1;
                    self.open(&mut inner, Some(kind));
                }
                // Alive but full, or nothing learned: give the slot back.
                _ => *admitted -= 1,
            },
            _ => {}
        }
    }

    /// A trial's future was dropped before it finished: free its slot.
    pub(crate) fn cancel_trial(&self, generation: u64) {
        let mut inner = self.inner.lock();
        if inner.generation != generation {
            return;
        }
        if let Phase::HalfOpen { admitted, .. } = &mut inner.phase {
            *admitted -= 1;
        }
    }

    /// A trial ran past `trial_timeout`: a failure.
    pub(crate) fn trial_timed_out(&self, generation: u64) {
        self.record(true, generation, Outcome::failure(FailureKind::Timeout));
    }

    fn open(&self, inner: &mut Inner, kind: Option<FailureKind>) {
        let period: Duration = self.config.open_period(inner.reopens);
        inner.phase = Phase::Open {
            until: Instant::now() + period,
        };
        inner.runs = [0; 4];
        inner.generation += 1;
        self.metrics.to_open.increment(1);
        tracing::warn!(
            breaker = %self.config.name,
            kind = kind.map_or("", FailureKind::as_str),
            reopens = inner.reopens,
            open_for = ?period,
            "circuit breaker open"
        );
    }

    fn close(&self, inner: &mut Inner) {
        inner.phase = Phase::Closed;
        inner.runs = [0; 4];
        inner.reopens = 0;
        inner.generation += 1;
        self.metrics.to_closed.increment(1);
        tracing::info!(breaker = %self.config.name, "circuit breaker closed");
    }
}
