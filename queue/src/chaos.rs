//! [`Chaos`]: a seeded fault-injecting decorator for any [`Queue`]
//! (feature `chaos`).
//!
//! It adds latency, fails operations with [`QueueError::Unavailable`] before
//! they reach the queue, and drops replies (the operation happens, the
//! caller gets [`QueueError::Unavailable`]: the ack that was applied but whose
//! answer was lost, the dequeue whose jobs were leased but never seen).
//! Faults are drawn from one generator seeded by [`ChaosConfig::seed`], so
//! a sequential run reproduces exactly; concurrent callers draw in the
//! order they arrive.
//!
//! With [`ChaosConfig::default`] (no faults) it passes the whole
//! conformance suite, so what it adds is only what is configured.
//!
//! ```
//! use std::time::Duration;
//! use keel_queue::chaos::{Chaos, ChaosConfig, Operation};
//! use keel_queue::{Job, MemoryQueue, Queue, QueueConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keel_queue::QueueError> {
//! let queue = Chaos::new(
//!     MemoryQueue::new(QueueConfig::new("jobs"))?,
//!     ChaosConfig::new(7)
//!         .latency(Duration::from_millis(1))
//!         .drop_rate(0.3)
//!         .only(&[Operation::Ack]),
//! )?;
//! queue.enqueue(Job::new("hello")).await?; // enqueue is untouched
//! // A broker outage, then recovery, at run time:
//! queue.set(ChaosConfig::new(7).error_rate(1.0).only(&[Operation::Dequeue]))?;
//! assert!(queue.ping().await.is_ok());
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::ConfigError;
use parking_lot::Mutex;

use crate::error::{QueueError, Result};
use crate::queue::Queue;
use crate::types::{
    DeadLetter, Delivery, DequeueOptions, Enqueued, Job, JobId, Nack, QueueCapabilities,
    QueueStats, Receipt,
};

/// One operation of the [`Queue`] trait, to aim faults at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// `enqueue` and `enqueue_batch`.
    Enqueue,
    /// `dequeue`.
    Dequeue,
    /// `ack` and `ack_batch`.
    Ack,
    /// `nack`.
    Nack,
    /// `extend_lease`.
    ExtendLease,
    /// `stats`.
    Stats,
    /// `dead_letters`, `replay_dead_letters` and `purge_dead_letters`.
    DeadLetters,
    /// `ping`.
    Ping,
    /// `purge` and `delete`.
    Admin,
}

impl Operation {
    const ALL: [Operation; 9] = [
        Operation::Enqueue,
        Operation::Dequeue,
        Operation::Ack,
        Operation::Nack,
        Operation::ExtendLease,
        Operation::Stats,
        Operation::DeadLetters,
        Operation::Ping,
        Operation::Admin,
    ];

    fn bit(self) -> u16 {
        1 << (self as u16)
    }

    fn name(self) -> &'static str {
        match self {
            Operation::Enqueue => "enqueue",
            Operation::Dequeue => "dequeue",
            Operation::Ack => "ack",
            Operation::Nack => "nack",
            Operation::ExtendLease => "extend_lease",
            Operation::Stats => "stats",
            Operation::DeadLetters => "dead_letters",
            Operation::Ping => "ping",
            Operation::Admin => "admin",
        }
    }
}

/// The faults a [`Chaos`] queue injects. The default injects none.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ChaosConfig {
    /// Seeds the generator every fault is drawn from. Default 0.
    pub seed: u64,
    /// Added before every affected operation. Default zero.
    pub latency: Duration,
    /// Up to this much more latency, uniform, on top of `latency`.
    /// Default zero.
    pub latency_jitter: Duration,
    /// Share of affected operations that fail with
    /// [`QueueError::Unavailable`] without reaching the queue, 0.0 to 1.0.
    /// Default 0.
    pub error_rate: f64,
    /// Share of affected operations that reach the queue and take effect,
    /// but whose reply is replaced by [`QueueError::Unavailable`], 0.0 to 1.0
    /// (drawn after `error_rate`). Default 0.
    pub drop_rate: f64,
    /// Which operations are affected (every one by default).
    pub operations: Vec<Operation>,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        ChaosConfig {
            seed: 0,
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            error_rate: 0.0,
            drop_rate: 0.0,
            operations: Operation::ALL.to_vec(),
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
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Sets [`latency_jitter`](Self::latency_jitter).
    pub fn latency_jitter(mut self, jitter: Duration) -> Self {
        self.latency_jitter = jitter;
        self
    }

    /// Sets [`error_rate`](Self::error_rate).
    pub fn error_rate(mut self, rate: f64) -> Self {
        self.error_rate = rate;
        self
    }

    /// Sets [`drop_rate`](Self::drop_rate).
    pub fn drop_rate(mut self, rate: f64) -> Self {
        self.drop_rate = rate;
        self
    }

    /// Affects only `operations`.
    pub fn only(mut self, operations: &[Operation]) -> Self {
        self.operations = operations.to_vec();
        self
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidConfig`] naming `error_rate` or `drop_rate` (outside
    /// 0.0 to 1.0).
    pub fn validate(&self) -> Result<()> {
        for (field, rate) in [
            ("error_rate", self.error_rate),
            ("drop_rate", self.drop_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ConfigError::new(field, "must be between 0.0 and 1.0").into());
            }
        }
        Ok(())
    }
}

/// What [`Chaos`] injected so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChaosStats {
    /// Operations failed before reaching the queue.
    pub errors: u64,
    /// Operations that took effect but whose reply was dropped.
    pub dropped: u64,
}

struct Faults {
    config: ChaosConfig,
    mask: u16,
    rng: fastrand::Rng,
}

struct Shared {
    faults: Mutex<Faults>,
    errors: AtomicU64,
    dropped: AtomicU64,
}

/// A [`Queue`] that injects the faults of a [`ChaosConfig`] into another
/// one; see the [module docs](crate::chaos).
///
/// Cheap to clone; clones share the queue, the faults and the generator.
pub struct Chaos<Q> {
    inner: Arc<Q>,
    shared: Arc<Shared>,
}

impl<Q> Clone for Chaos<Q> {
    fn clone(&self) -> Self {
        Chaos {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<Q: fmt::Debug> fmt::Debug for Chaos<Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chaos")
            .field("inner", &self.inner)
            .field("config", &self.shared.faults.lock().config)
            .field("injected", &self.injected())
            .finish()
    }
}

impl<Q> Chaos<Q> {
    /// The wrapped queue.
    pub fn inner(&self) -> &Q {
        &self.inner
    }

    /// What was injected so far.
    pub fn injected(&self) -> ChaosStats {
        ChaosStats {
            errors: self.shared.errors.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
        }
    }
}

/// What to do with one operation.
enum Fault {
    None,
    Fail,
    DropReply,
}

impl<Q: Queue> Chaos<Q> {
    /// Wraps `inner` with the faults of `config`.
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidConfig`] naming a bad field.
    pub fn new(inner: Q, config: ChaosConfig) -> Result<Self> {
        config.validate()?;
        Ok(Chaos {
            inner: Arc::new(inner),
            shared: Arc::new(Shared {
                faults: Mutex::new(Faults::from(config)),
                errors: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
            }),
        })
    }

    /// Replaces the faults (and reseeds the generator) for every clone,
    /// from the next operation on: an outage starts or ends.
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidConfig`] naming a bad field; the faults are kept.
    pub fn set(&self, config: ChaosConfig) -> Result<()> {
        config.validate()?;
        *self.shared.faults.lock() = Faults::from(config);
        Ok(())
    }

    /// Draws this operation's latency and fault, sleeps, and answers the
    /// fault.
    async fn before(&self, op: Operation) -> Result<Fault> {
        let (delay, fault) = {
            let mut faults = self.shared.faults.lock();
            if faults.mask & op.bit() == 0 {
                return Ok(Fault::None);
            }
            let Faults { config, rng, .. } = &mut *faults;
            let jitter = if config.latency_jitter.is_zero() {
                Duration::ZERO
            } else {
                config.latency_jitter.mul_f64(rng.f64())
            };
            let fault = if config.error_rate > 0.0 && rng.f64() < config.error_rate {
                Fault::Fail
            } else if config.drop_rate > 0.0 && rng.f64() < config.drop_rate {
                Fault::DropReply
            } else {
                Fault::None
            };
            (config.latency + jitter, fault)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Fault::Fail = fault {
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
            return Err(QueueError::Unavailable {
                message: format!("chaos: injected failure of {}", op.name()),
                source: None,
            });
        }
        Ok(fault)
    }

    /// Runs `op` under the faults drawn for it.
    async fn run<T>(
        &self,
        op: Operation,
        call: impl Future<Output = Result<T>> + Send,
    ) -> Result<T> {
        let fault = self.before(op).await?;
        let result = call.await;
        match fault {
            Fault::DropReply => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                Err(QueueError::Unavailable {
                    message: format!(
                        "chaos: the reply to {} was lost (the operation {})",
                        op.name(),
                        if result.is_ok() {
                            "took effect"
                        } else {
                            "failed anyway"
                        }
                    ),
                    source: None,
                })
            }
            Fault::None | Fault::Fail => result,
        }
    }
}

impl From<ChaosConfig> for Faults {
    fn from(config: ChaosConfig) -> Self {
        Faults {
            mask: config.operations.iter().fold(0, |m, op| m | op.bit()),
            rng: fastrand::Rng::with_seed(config.seed),
            config,
        }
    }
}

#[async_trait]
impl<Q: Queue> Queue for Chaos<Q> {
    async fn enqueue(&self, job: Job) -> Result<Enqueued> {
        self.run(Operation::Enqueue, self.inner.enqueue(job)).await
    }

    async fn enqueue_batch(&self, jobs: Vec<Job>) -> Result<Vec<Enqueued>> {
        self.run(Operation::Enqueue, self.inner.enqueue_batch(jobs))
            .await
    }

    async fn dequeue(&self, options: DequeueOptions) -> Result<Vec<Delivery>> {
        self.run(Operation::Dequeue, self.inner.dequeue(options))
            .await
    }

    async fn ack(&self, receipt: &Receipt) -> Result<()> {
        self.run(Operation::Ack, self.inner.ack(receipt)).await
    }

    async fn ack_batch(&self, receipts: &[Receipt]) -> Result<()> {
        self.run(Operation::Ack, self.inner.ack_batch(receipts))
            .await
    }

    async fn nack(&self, receipt: &Receipt, action: Nack) -> Result<()> {
        self.run(Operation::Nack, self.inner.nack(receipt, action))
            .await
    }

    async fn extend_lease(&self, receipt: &Receipt, lease: Duration) -> Result<()> {
        self.run(
            Operation::ExtendLease,
            self.inner.extend_lease(receipt, lease),
        )
        .await
    }

    async fn stats(&self) -> Result<QueueStats> {
        self.run(Operation::Stats, self.inner.stats()).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        self.run(Operation::DeadLetters, self.inner.dead_letters(limit))
            .await
    }

    async fn replay_dead_letters(&self, ids: &[JobId]) -> Result<u64> {
        self.run(Operation::DeadLetters, self.inner.replay_dead_letters(ids))
            .await
    }

    async fn purge_dead_letters(&self) -> Result<u64> {
        self.run(Operation::DeadLetters, self.inner.purge_dead_letters())
            .await
    }

    async fn purge(&self) -> Result<u64> {
        self.run(Operation::Admin, self.inner.purge()).await
    }

    async fn delete(&self) -> Result<()> {
        self.run(Operation::Admin, self.inner.delete()).await
    }

    fn capabilities(&self) -> QueueCapabilities {
        self.inner.capabilities()
    }

    async fn ping(&self) -> Result<()> {
        self.run(Operation::Ping, self.inner.ping()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemoryQueue, QueueConfig};

    fn memory() -> MemoryQueue {
        MemoryQueue::new(QueueConfig::new("chaos")).unwrap()
    }

    #[test]
    fn refuses_bad_rates_by_name() {
        let err = ChaosConfig::new(1).error_rate(1.5).validate().unwrap_err();
        assert!(err.to_string().contains("error_rate"), "{err}");
        let err = ChaosConfig::new(1).drop_rate(-0.1).validate().unwrap_err();
        assert!(err.to_string().contains("drop_rate"), "{err}");
    }

    /// The faults each of a run of operations gets, for a seed.
    async fn pattern(seed: u64) -> Vec<bool> {
        let queue = Chaos::new(memory(), ChaosConfig::new(seed).error_rate(0.5)).unwrap();
        let mut out = Vec::new();
        for _ in 0..64 {
            out.push(queue.ping().await.is_err());
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

    #[tokio::test]
    async fn a_dropped_reply_still_takes_effect() {
        let queue = Chaos::new(
            memory(),
            ChaosConfig::new(1)
                .drop_rate(1.0)
                .only(&[Operation::Enqueue]),
        )
        .unwrap();
        let err = queue.enqueue(Job::new("x")).await.unwrap_err();
        assert!(matches!(err, QueueError::Unavailable { .. }), "{err:?}");
        assert!(err.is_retryable());
        assert_eq!(queue.stats().await.unwrap().ready, 1, "it was enqueued");
        assert_eq!(queue.injected().dropped, 1);
    }

    #[tokio::test]
    async fn an_injected_error_does_not_reach_the_queue() {
        let queue = Chaos::new(
            memory(),
            ChaosConfig::new(1)
                .error_rate(1.0)
                .only(&[Operation::Enqueue]),
        )
        .unwrap();
        assert!(queue.enqueue(Job::new("x")).await.is_err());
        assert_eq!(
            queue.stats().await.unwrap().ready,
            0,
            "nothing was enqueued"
        );
        queue.set(ChaosConfig::default()).unwrap();
        queue.enqueue(Job::new("y")).await.unwrap();
        assert_eq!(queue.inner().stats().await.unwrap().ready, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn latency_is_added() {
        let queue = Chaos::new(
            memory(),
            ChaosConfig::new(1)
                .latency(Duration::from_millis(20))
                .latency_jitter(Duration::from_millis(10)),
        )
        .unwrap();
        let start = tokio::time::Instant::now();
        queue.ping().await.unwrap();
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(20) && took <= Duration::from_millis(30),
            "{took:?}"
        );
    }
}
