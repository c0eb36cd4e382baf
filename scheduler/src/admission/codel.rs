//! CoDel-style detection of standing queues, per priority class.

use std::time::Duration;

use tokio::time::Instant;

use super::config::SheddingConfig;

#[derive(Debug, Clone, Copy, Default)]
struct ClassDelay {
    /// Smallest queueing delay dispatched in the current interval.
    min: Option<Duration>,
    /// While shedding: the standing delay measured, answered as
    /// `retry_after`.
    shedding: Option<Duration>,
}

/// Per-class standing-queue detector.
#[derive(Debug)]
pub(crate) struct Codel {
    config: SheddingConfig,
    next_eval: Instant,
    classes: Vec<ClassDelay>,
}

impl Codel {
    pub(crate) fn new(config: SheddingConfig, classes: usize, now: Instant) -> Self {
        Codel {
            next_eval: now + config.interval,
            config,
            classes: vec![ClassDelay::default(); classes],
        }
    }

    pub(crate) fn target(&self) -> Duration {
        self.config.target
    }

    /// When the current interval ends.
    pub(crate) fn next_eval(&self) -> Instant {
        self.next_eval
    }

    /// Records the queueing delay of a dispatched request.
    pub(crate) fn record(&mut self, class: usize, sojourn: Duration) {
        let slot = &mut self.classes[class].min;
        *slot = Some(slot.map_or(sojourn, |m| m.min(sojourn)));
    }

    /// Ends the interval if it is over: decides which classes shed. Answers
    /// whether it evaluated. `nonempty_since(c)` says since when class `c`
    /// has had work.
    pub(crate) fn evaluate(
        &mut self,
        now: Instant,
        nonempty_since: impl Fn(usize) -> Option<Instant>,
    ) -> bool {
        if !self.config.enabled || now < self.next_eval {
            return false;
        }
        for (c, class) in self.classes.iter_mut().enumerate() {
            let sample = class.min.take().or_else(|| {
                // Nothing dispatched while it had work: the request that
                // made it non-empty is still waiting.
                nonempty_since(c).map(|since| now.saturating_duration_since(since))
            });
            class.shedding = sample
                .filter(|delay| *delay > self.config.target)
                .map(|delay| {
                    delay
                        .max(self.config.interval)
                        .min(self.config.max_retry_after)
                });
        }
        // Keep a steady cadence, but never fall behind by more than one
        // interval (after a long idle stretch).
        self.next_eval = (self.next_eval + self.config.interval).max(now);
        if self.next_eval <= now {
            self.next_eval = now + self.config.interval;
        }
        true
    }

    /// The `retry_after` to answer if `class` is shedding.
    pub(crate) fn shedding(&self, class: usize) -> Option<Duration> {
        self.classes[class].shedding
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn standing_delay_above_target_sheds_until_it_falls() {
        let start = Instant::now();
        let mut codel = Codel::new(SheddingConfig::new(ms(10), ms(100)), 2, start);
        codel.record(0, ms(50));
        codel.record(0, ms(30));
        codel.record(1, ms(1));
        codel.record(1, ms(40));
        assert!(
            !codel.evaluate(start + ms(50), |_| None),
            "interval not over"
        );
        assert!(codel.evaluate(start + ms(100), |_| None));
        assert_eq!(
            codel.shedding(0),
            Some(ms(100)),
            "retry_after at least an interval"
        );
        assert_eq!(
            codel.shedding(1),
            None,
            "a fast dispatch means no standing queue"
        );
        codel.record(0, ms(5));
        codel.evaluate(start + ms(200), |_| None);
        assert_eq!(codel.shedding(0), None);
    }

    #[test]
    fn a_starved_class_counts_its_wait() {
        let start = Instant::now();
        let mut codel = Codel::new(SheddingConfig::new(ms(10), ms(100)), 1, start);
        codel.evaluate(start + ms(100), |_| Some(start + ms(20)));
        assert_eq!(codel.shedding(0), Some(ms(100)));
        codel.evaluate(start + ms(200), |_| None);
        assert_eq!(codel.shedding(0), None, "an empty class does not shed");
    }

    #[test]
    fn disabled_never_sheds() {
        let start = Instant::now();
        let mut codel = Codel::new(SheddingConfig::disabled(), 1, start);
        codel.record(0, Duration::from_secs(10));
        assert!(!codel.evaluate(start + Duration::from_secs(10), |_| None));
        assert_eq!(codel.shedding(0), None);
    }
}
