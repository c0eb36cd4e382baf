//! Seeded fault injection (feature `chaos`): the config, the counters and
//! the fault decisions the chaos decorators share
//! (`keel_cache::chaos::ChaosCache`, `keel_queue::chaos::ChaosQueue`).
//!
//! A [`FaultInjector`] draws each call's faults from one generator seeded by
//! [`ChaosConfig::seed`]: added latency, a failure before the call runs, or
//! a lost reply after it ran. The same seed and the same sequence of calls
//! give the same faults, so a failing run reproduces; concurrent calls draw
//! in the order they arrive. A decorator turns the faults into its own
//! errors (or, for a lost reply, into whatever losing a reply means for it).
//!
//! ```
//! use std::time::Duration;
//! use keel_core::chaos::{ChaosConfig, FaultInjector, Injected};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let faults = FaultInjector::new(ChaosConfig::new(7).error_rate(1.0)).unwrap();
//! let ran = faults.run(async { "answer" }).await;
//! assert!(matches!(ran, Err(Injected::Failure)), "failed before it ran");
//!
//! // An outage ends: the next calls pass, after 10 ms each.
//! faults.set_config(ChaosConfig::new(7).latency(Duration::from_millis(10))).unwrap();
//! assert!(matches!(faults.run(async { "answer" }).await, Ok("answer")));
//! let stats = faults.stats();
//! assert_eq!((stats.calls, stats.errors, stats.delayed), (2, 1, 1));
//! # }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::validate;

/// The faults to inject: latency, failures and lost replies, each a share
/// of the calls between 0 and 1, drawn from a seeded generator.
///
/// The default injects none. Deserializes from a config file with every
/// field optional and durations as human strings (`"200ms"`).
///
/// ```
/// use std::time::Duration;
/// use keel_core::chaos::ChaosConfig;
///
/// let config = ChaosConfig::new(7)
///     .error_rate(0.1)
///     .latency(Duration::from_millis(200))
///     .latency_rate(0.5);
/// assert!(config.validate().is_ok());
/// assert!(ChaosConfig::new(7).drop_rate(1.5).validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ChaosConfig {
    /// Seeds the generator every fault is drawn from. Default 0.
    pub seed: u64,
    /// Added before a delayed call runs. Default zero.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Up to this much more latency, uniform, on top of `latency`.
    /// Default zero.
    #[serde(with = "humantime_serde")]
    pub latency_jitter: Duration,
    /// Share of calls delayed by `latency` (and jitter). Default 1: once a
    /// latency is set, every call.
    pub latency_rate: f64,
    /// Share of calls that fail without running. Default 0.
    pub error_rate: f64,
    /// Share of calls that run (and take effect) but whose reply is lost,
    /// drawn among the calls that did not fail. Default 0.
    pub drop_rate: f64,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        ChaosConfig {
            seed: 0,
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            latency_rate: 1.0,
            error_rate: 0.0,
            drop_rate: 0.0,
        }
    }
}

impl ChaosConfig {
    /// No faults yet, drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        ChaosConfig {
            seed,
            ..ChaosConfig::default()
        }
    }

    /// Sets [`latency`](Self::latency).
    #[must_use]
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Sets [`latency_jitter`](Self::latency_jitter).
    #[must_use]
    pub fn latency_jitter(mut self, jitter: Duration) -> Self {
        self.latency_jitter = jitter;
        self
    }

    /// Sets [`latency_rate`](Self::latency_rate).
    #[must_use]
    pub fn latency_rate(mut self, rate: f64) -> Self {
        self.latency_rate = rate;
        self
    }

    /// Sets [`error_rate`](Self::error_rate).
    #[must_use]
    pub fn error_rate(mut self, rate: f64) -> Self {
        self.error_rate = rate;
        self
    }

    /// Sets [`drop_rate`](Self::drop_rate).
    #[must_use]
    pub fn drop_rate(mut self, rate: f64) -> Self {
        self.drop_rate = rate;
        self
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming `latency_rate`, `error_rate` or `drop_rate`
    /// when it is outside 0.0 to 1.0.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate::ratio("latency_rate", self.latency_rate)?;
        validate::ratio("error_rate", self.error_rate)?;
        validate::ratio("drop_rate", self.drop_rate)
    }
}

/// What a [`FaultInjector`] has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChaosStats {
    /// Calls the faults were drawn for.
    pub calls: u64,
    /// Calls delayed.
    pub delayed: u64,
    /// Calls failed before they ran.
    pub errors: u64,
    /// Calls that ran but whose reply was lost.
    pub dropped: u64,
}

/// A fault a [`FaultInjector`] put in place of a call's reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injected<T> {
    /// The call failed before it ran: nothing reached the wrapped service.
    Failure,
    /// The call ran and took effect (this is what it answered), but the
    /// reply was lost on its way back.
    LostReply(T),
}

/// Draws seeded faults for calls and runs the calls under them; see the
/// [module docs](self).
///
/// Each call draws four numbers, always, so changing one rate does not
/// shift the sequence another rate sees.
#[derive(Debug)]
pub struct FaultInjector {
    state: Mutex<State>,
    calls: AtomicU64,
    delayed: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Debug)]
struct State {
    config: ChaosConfig,
    rng: fastrand::Rng,
}

/// One call's faults.
struct Draw {
    delay: Duration,
    fail: bool,
    drop: bool,
}

impl FaultInjector {
    /// Faults as `config` says.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming a bad rate.
    pub fn new(config: ChaosConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(FaultInjector {
            state: Mutex::new(State {
                rng: fastrand::Rng::with_seed(config.seed),
                config,
            }),
            calls: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    /// The current settings.
    pub fn config(&self) -> ChaosConfig {
        self.state.lock().config.clone()
    }

    /// Replaces the settings from the next call on: an outage starts or
    /// ends. The generator is reseeded only if `config.seed` differs from
    /// the current seed, so a run that keeps its seed keeps its sequence.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming a bad rate; the old settings stay.
    pub fn set_config(&self, config: ChaosConfig) -> Result<(), ConfigError> {
        config.validate()?;
        let mut state = self.state.lock();
        if state.config.seed != config.seed {
            state.rng = fastrand::Rng::with_seed(config.seed);
        }
        state.config = config;
        Ok(())
    }

    /// What has been injected so far.
    pub fn stats(&self) -> ChaosStats {
        ChaosStats {
            calls: self.calls.load(Ordering::Relaxed),
            delayed: self.delayed.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    /// Runs `call` under the faults drawn for it: sleeps the drawn latency,
    /// then either answers [`Injected::Failure`] without polling `call`, or
    /// runs it and answers its output, or [`Injected::LostReply`] with it.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before `call` ran drops `call` unpolled (the
    /// draw is spent); after that, as cancel safe as `call`.
    pub async fn run<F: Future>(&self, call: F) -> Result<F::Output, Injected<F::Output>> {
        let draw = self.draw();
        if !draw.delay.is_zero() {
            self.delayed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(draw.delay).await;
        }
        if draw.fail {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return Err(Injected::Failure);
        }
        let output = call.await;
        if draw.drop {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Err(Injected::LostReply(output));
        }
        Ok(output)
    }

    fn draw(&self) -> Draw {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock();
        let State { config, rng } = &mut *state;
        let (delay, jitter, fail, drop) = (rng.f64(), rng.f64(), rng.f64(), rng.f64());
        let fail = fail < config.error_rate;
        Draw {
            delay: if delay < config.latency_rate {
                config.latency + config.latency_jitter.mul_f64(jitter)
            } else {
                Duration::ZERO
            },
            fail,
            drop: !fail && drop < config.drop_rate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which of 64 sequential calls failed, for a seed.
    async fn pattern(seed: u64) -> Vec<bool> {
        let faults = FaultInjector::new(ChaosConfig::new(seed).error_rate(0.5)).unwrap();
        let mut out = Vec::new();
        for _ in 0..64 {
            out.push(faults.run(async {}).await.is_err());
        }
        out
    }

    #[tokio::test]
    async fn a_seed_reproduces_its_faults() {
        let a = pattern(42).await;
        assert_eq!(a, pattern(42).await);
        assert_ne!(a, pattern(43).await);
        let failed = a.iter().filter(|f| **f).count();
        assert!((16..=48).contains(&failed), "about half of 64: {failed}");
    }

    #[test]
    fn refuses_bad_rates_by_name() {
        for (config, field) in [
            (ChaosConfig::new(1).error_rate(1.5), "error_rate"),
            (ChaosConfig::new(1).drop_rate(-0.1), "drop_rate"),
            (ChaosConfig::new(1).latency_rate(f64::NAN), "latency_rate"),
        ] {
            let err = config.validate().unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
            assert!(FaultInjector::new(config).is_err());
        }
        let faults = FaultInjector::new(ChaosConfig::new(1)).unwrap();
        assert!(
            faults
                .set_config(ChaosConfig::new(1).error_rate(2.0))
                .is_err()
        );
        assert_eq!(
            faults.config(),
            ChaosConfig::new(1),
            "the old settings stay"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn faults_are_what_they_say() {
        let faults = FaultInjector::new(ChaosConfig::new(1).error_rate(1.0)).unwrap();
        let mut ran = false;
        let answer = faults.run(async { ran = true }).await;
        assert!(
            matches!(answer, Err(Injected::Failure)) && !ran,
            "never ran"
        );

        faults
            .set_config(ChaosConfig::new(1).drop_rate(1.0))
            .unwrap();
        assert_eq!(faults.run(async { 7 }).await, Err(Injected::LostReply(7)));

        faults
            .set_config(
                ChaosConfig::new(1)
                    .latency(Duration::from_millis(20))
                    .latency_jitter(Duration::from_millis(10)),
            )
            .unwrap();
        let start = tokio::time::Instant::now();
        assert_eq!(faults.run(async { 7 }).await, Ok(7));
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(20) && took <= Duration::from_millis(30),
            "{took:?}"
        );

        faults
            .set_config(
                ChaosConfig::new(1)
                    .latency(Duration::from_secs(1))
                    .latency_rate(0.0),
            )
            .unwrap();
        let start = tokio::time::Instant::now();
        faults.run(async {}).await.unwrap();
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "latency_rate 0: never delayed"
        );

        let stats = faults.stats();
        assert_eq!(
            (stats.calls, stats.errors, stats.dropped, stats.delayed),
            (4, 1, 1, 1)
        );
    }

    #[tokio::test]
    async fn the_same_seed_continues_its_sequence() {
        let faults = FaultInjector::new(ChaosConfig::new(9).error_rate(0.5)).unwrap();
        let mut a = Vec::new();
        for _ in 0..32 {
            a.push(faults.run(async {}).await.is_err());
        }
        // Same seed: no reseed, the sequence goes on; a new seed restarts.
        faults
            .set_config(ChaosConfig::new(9).error_rate(0.5))
            .unwrap();
        let mut b = Vec::new();
        for _ in 0..32 {
            b.push(faults.run(async {}).await.is_err());
        }
        assert_eq!([a, b].concat(), pattern(9).await);
    }

    #[test]
    fn reads_a_config_file() {
        let config: ChaosConfig =
            serde_json::from_str(r#"{"seed": 3, "latency": "200ms", "error_rate": 0.25}"#).unwrap();
        assert_eq!(
            config,
            ChaosConfig::new(3)
                .latency(Duration::from_millis(200))
                .error_rate(0.25)
        );
    }
}
