//! A small circuit breaker in front of L2: after repeated failures it skips
//! L2 for a cooldown, then lets one probe call through.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::metrics::TieredMetrics;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out; if it never reports (its caller was cancelled),
    /// another is allowed after a cooldown.
    HalfOpen {
        probe_sent: Instant,
    },
}

#[derive(Debug)]
pub(crate) struct Breaker {
    /// Locked for a few instructions, never across an await.
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
    metrics: TieredMetrics,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration, metrics: TieredMetrics) -> Self {
        metrics.breaker_state.set(0.0);
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold,
            cooldown,
            metrics,
        }
    }

    /// Whether an L2 call may go out now.
    pub(crate) fn allow(&self) -> bool {
        let mut state = self.state.lock();
        let now = Instant::now();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } if now >= until => {
                *state = State::HalfOpen { probe_sent: now };
                self.metrics.breaker_state.set(2.0);
                tracing::info!("l2 breaker half-open: probing");
                true
            }
            State::Open { .. } => false,
            State::HalfOpen { probe_sent } if now >= probe_sent + self.cooldown => {
                *state = State::HalfOpen { probe_sent: now };
                true
            }
            State::HalfOpen { .. } => false,
        }
    }

    pub(crate) fn success(&self) {
        let mut state = self.state.lock();
        if !matches!(*state, State::Closed { failures: 0 }) {
            if !matches!(*state, State::Closed { .. }) {
                tracing::info!("l2 breaker closed: l2 answers again");
                self.metrics.breaker_state.set(0.0);
            }
            *state = State::Closed { failures: 0 };
        }
    }

    pub(crate) fn failure(&self) {
        let mut state = self.state.lock();
        let open = match *state {
            State::Closed { failures } if failures + 1 >= self.threshold => true,
            State::Closed { failures } => {
                *state = State::Closed {
                    failures: failures + 1,
                };
                false
            }
            State::HalfOpen { .. } => true,
            // A call that went out before the breaker opened.
            State::Open { .. } => false,
        };
        if open {
            *state = State::Open {
                until: Instant::now() + self.cooldown,
            };
            self.metrics.breaker_state.set(1.0);
            self.metrics.breaker_opened.increment(1);
            tracing::warn!(cooldown = ?self.cooldown, "l2 breaker open: skipping l2");
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        !matches!(*self.state.lock(), State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_and_probes_back() {
        let breaker = Breaker::new(3, Duration::from_secs(5), TieredMetrics::new("t"));
        for _ in 0..2 {
            assert!(breaker.allow());
            breaker.failure();
        }
        assert!(!breaker.is_open());
        breaker.success();
        for _ in 0..3 {
            assert!(breaker.allow());
            breaker.failure();
        }
        assert!(breaker.is_open());
        assert!(!breaker.allow());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(breaker.allow(), "one probe after the cooldown");
        assert!(!breaker.allow(), "only one probe");
        breaker.failure();
        assert!(!breaker.allow(), "a failed probe reopens");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(breaker.allow());
        breaker.success();
        assert!(!breaker.is_open());
        assert!(breaker.allow() && breaker.allow());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_probe_is_replaced() {
        let breaker = Breaker::new(1, Duration::from_secs(1), TieredMetrics::new("t"));
        breaker.failure();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(breaker.allow());
        // The probe's caller was cancelled: it never reports.
        assert!(!breaker.allow());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(breaker.allow());
    }
}
