//! The scheduler-wide in-flight limit: none, fixed, or adaptive (AIMD).

use std::time::Duration;

use tokio::time::Instant;

use super::config::{AimdConfig, ConcurrencyConfig};

#[derive(Debug)]
pub(crate) enum Limit {
    Unlimited,
    Fixed(usize),
    Aimd(Aimd),
}

impl Limit {
    pub(crate) fn new(config: &ConcurrencyConfig) -> Self {
        match (&config.adaptive, config.max_in_flight) {
            (Some(aimd), _) => Limit::Aimd(Aimd::new(aimd.clone())),
            (None, Some(max)) => Limit::Fixed(max),
            (None, None) => Limit::Unlimited,
        }
    }

    /// How many requests may be in flight now.
    pub(crate) fn current(&self) -> usize {
        match self {
            Limit::Unlimited => usize::MAX,
            Limit::Fixed(max) => *max,
            Limit::Aimd(aimd) => aimd.current(),
        }
    }

    pub(crate) fn is_adaptive(&self) -> bool {
        matches!(self, Limit::Aimd(_))
    }

    /// Feeds one completed request: how long it took, when it was
    /// dispatched, and how many were in flight when it finished.
    pub(crate) fn sample(
        &mut self,
        latency: Duration,
        dispatched: Instant,
        in_flight: usize,
        now: Instant,
    ) {
        if let Limit::Aimd(aimd) = self {
            aimd.sample(latency, dispatched, in_flight, now);
        }
    }
}

#[derive(Debug)]
pub(crate) struct Aimd {
    config: AimdConfig,
    limit: f64,
    last_decrease: Option<Instant>,
}

impl Aimd {
    fn new(config: AimdConfig) -> Self {
        Aimd {
            limit: config.initial as f64,
            config,
            last_decrease: None,
        }
    }

    fn current(&self) -> usize {
        self.limit as usize
    }

    fn sample(&mut self, latency: Duration, dispatched: Instant, in_flight: usize, now: Instant) {
        let (min, max) = (self.config.min as f64, self.config.max as f64);
        if latency > self.config.latency_target {
            // Only requests sent after the last decrease may lower the limit
            // again: one decrease per round trip, not one per slow request.
            if self.last_decrease.is_none_or(|at| dispatched >= at) {
                self.limit = (self.limit * self.config.backoff_ratio).max(min);
                self.last_decrease = Some(now);
            }
        } else if in_flight as f64 * 2.0 >= self.limit {
            self.limit = (self.limit + 1.0 / self.limit).min(max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decreases_once_per_round_trip_and_recovers() {
        let t0 = Instant::now();
        let config = AimdConfig::new(Duration::from_millis(100)).limits(20, 2, 40);
        let mut limit = Limit::new(&ConcurrencyConfig::default().adaptive(config));
        assert_eq!(limit.current(), 20);
        let slow = Duration::from_millis(500);
        // Twenty slow answers to requests sent together: one decrease.
        for _ in 0..20 {
            limit.sample(slow, t0, 20, t0 + slow);
        }
        assert_eq!(limit.current(), 18);
        // A slow answer to a request sent after the decrease: another.
        limit.sample(slow, t0 + slow, 18, t0 + slow * 2);
        assert_eq!(limit.current(), 16);
        // Fast answers while the limit is in use: back up, slowly.
        for _ in 0..200 {
            limit.sample(Duration::from_millis(10), t0, 16, t0 + slow * 3);
        }
        assert!(limit.current() > 20, "recovered to {}", limit.current());
        // Fast answers with little in flight do not grow it.
        let before = limit.current();
        for _ in 0..200 {
            limit.sample(Duration::from_millis(10), t0, 1, t0 + slow * 4);
        }
        assert_eq!(limit.current(), before);
    }

    #[test]
    fn fixed_and_unlimited() {
        assert_eq!(
            Limit::new(&ConcurrencyConfig::default()).current(),
            usize::MAX
        );
        let fixed = Limit::new(&ConcurrencyConfig::default().max_in_flight(4));
        assert_eq!(fixed.current(), 4);
        assert!(!fixed.is_adaptive());
    }
}
