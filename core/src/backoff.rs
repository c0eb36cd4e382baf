//! One exponential backoff with jitter, validated once: the queue's retry
//! delays, the worker's reconnects and the balancer's retries all use it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::validate;

/// How much of the exponential delay is drawn at random.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Jitter {
    /// Uniform in `[0, cap]` ("full jitter"): spreads a crowd of retries the
    /// most; the right choice for clients retrying against a shared server.
    #[default]
    Full,
    /// Half fixed, half random, uniform in `[cap/2, cap]` ("equal jitter"):
    /// still spreads a crowd, but never retries sooner than half the cap
    /// (a failed job is not handed straight back).
    Equal,
    /// No randomness: exactly the cap (for tests and simulations).
    None,
}

/// Exponential backoff: the cap of retry *n* (1-based) is
/// `min(max, base × 2^(n-1))`, and the delay is drawn under it by the
/// [`Jitter`].
///
/// ```
/// use std::time::Duration;
/// use keel_core::{Backoff, Jitter};
///
/// let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2))?;
/// assert_eq!(backoff.cap(1), Duration::from_millis(100));
/// assert_eq!(backoff.cap(4), Duration::from_millis(800));
/// assert_eq!(backoff.cap(30), Duration::from_secs(2));
/// assert!(backoff.delay(3) <= Duration::from_millis(400));
/// let equal = backoff.jitter(Jitter::Equal);
/// assert!(equal.delay(3) >= Duration::from_millis(200));
/// # Ok::<(), keel_core::ConfigError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "BackoffFields", into = "BackoffFields")]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: Jitter,
}

/// The serde shape of [`Backoff`] (validated on the way in).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct BackoffFields {
    #[serde(with = "humantime_serde")]
    base: Duration,
    #[serde(with = "humantime_serde")]
    max: Duration,
    #[serde(default)]
    jitter: Jitter,
}

impl TryFrom<BackoffFields> for Backoff {
    type Error = ConfigError;

    fn try_from(fields: BackoffFields) -> Result<Self, ConfigError> {
        Ok(Backoff::new(fields.base, fields.max)?.jitter(fields.jitter))
    }
}

impl From<Backoff> for BackoffFields {
    fn from(backoff: Backoff) -> Self {
        BackoffFields {
            base: backoff.base,
            max: backoff.max,
            jitter: backoff.jitter,
        }
    }
}

impl Backoff {
    /// A backoff from `base` doubling up to `max`, with [`Jitter::Full`].
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming `backoff.base` (zero) or `backoff.max`
    /// (below `base`, or over a day).
    pub fn new(base: Duration, max: Duration) -> Result<Self, ConfigError> {
        validate::positive_duration("backoff.base", base)?;
        if max < base {
            return Err(ConfigError::new(
                "backoff.max",
                format!("must be at least backoff.base ({base:?}), got {max:?}"),
            ));
        }
        if max > Duration::from_secs(86_400) {
            return Err(ConfigError::new("backoff.max", "must be at most 24h"));
        }
        Ok(Backoff {
            base,
            max,
            jitter: Jitter::Full,
        })
    }

    /// The same backoff with `jitter`.
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The first retry's cap.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The largest cap.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The jitter in use.
    pub fn jitter_kind(&self) -> Jitter {
        self.jitter
    }

    /// The cap of retry `retry` (1-based; 0 is taken as 1):
    /// `min(max, base × 2^(retry-1))`.
    pub fn cap(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(40);
        self.base
            .checked_mul(1u32 << doublings.min(31))
            .map_or(self.max, |d| d.min(self.max))
    }

    /// The delay before retry `retry`, drawn from a thread-local generator.
    pub fn delay(&self, retry: u32) -> Duration {
        self.draw(retry, fastrand::u64(..))
    }

    /// The delay before retry `retry`, drawn from `rng` (seed it for
    /// reproducible simulations).
    pub fn delay_with(&self, retry: u32, rng: &mut fastrand::Rng) -> Duration {
        self.draw(retry, rng.u64(..))
    }

    fn draw(&self, retry: u32, random: u64) -> Duration {
        let cap = self.cap(retry);
        let cap_nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        match self.jitter {
            Jitter::None => cap,
            Jitter::Full => Duration::from_nanos(random % cap_nanos.saturating_add(1)),
            Jitter::Equal => {
                let half = cap_nanos / 2;
                Duration::from_nanos(half + random % (cap_nanos - half).saturating_add(1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refuses_bad_fields_by_name() {
        let err = Backoff::new(Duration::ZERO, Duration::from_secs(1)).unwrap_err();
        assert_eq!(err.field, "backoff.base");
        let err = Backoff::new(Duration::from_secs(2), Duration::from_secs(1)).unwrap_err();
        assert_eq!(err.field, "backoff.max");
    }

    #[test]
    fn serde_validates() {
        let ok: Backoff = serde_json::from_str(r#"{"base":"10ms","max":"1s"}"#).unwrap();
        assert_eq!(ok.cap(2), Duration::from_millis(20));
        let bad = serde_json::from_str::<Backoff>(r#"{"base":"1s","max":"10ms"}"#).unwrap_err();
        assert!(bad.to_string().contains("backoff.max"), "{bad}");
    }

    proptest! {
        #[test]
        fn delays_stay_under_the_cap(retry in 0u32..100, base_ms in 1u64..10_000, seed in any::<u64>()) {
            let backoff = Backoff::new(Duration::from_millis(base_ms), Duration::from_secs(60)).unwrap();
            let mut rng = fastrand::Rng::with_seed(seed);
            let cap = backoff.cap(retry);
            prop_assert!(cap <= Duration::from_secs(60));
            prop_assert!(backoff.delay_with(retry, &mut rng) <= cap);
            let equal = backoff.jitter(Jitter::Equal).delay_with(retry, &mut rng);
            prop_assert!(equal >= cap / 2 && equal <= cap);
            prop_assert_eq!(backoff.jitter(Jitter::None).delay_with(retry, &mut rng), cap);
        }
    }
}
