//! [`ChaosQueue`]: a seeded fault-injecting decorator for any [`Queue`]
//! (feature `chaos`).
//!
//! It adds latency, fails operations with [`QueueError::Unavailable`] before
//! they reach the queue, and drops replies (the operation happens, the caller
//! gets [`QueueError::Unavailable`]: the ack that was applied but whose
//! answer was lost, the dequeue whose jobs were leased but never seen).
//! Faults are drawn by keel-core's [`FaultInjector`], from one generator
//! seeded by [`ChaosConfig::seed`], so a sequential run reproduces exactly;
//! concurrent callers draw in the order they arrive. [`ChaosQueue::only`]
//! aims the faults at some [`Operation`]s.
//!
//! With [`ChaosConfig::default`] (no faults) it passes the whole
//! conformance suite, so what it adds is only what is configured.
//!
//! ```
//! use std::time::Duration;
//! use keel_queue::chaos::{ChaosConfig, ChaosQueue, Operation};
//! use keel_queue::{Job, MemoryQueue, Queue, QueueConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keel_queue::QueueError> {
//! let queue = ChaosQueue::new(
//!     MemoryQueue::new(QueueConfig::new("jobs"))?,
//!     ChaosConfig::new(7)
//!         .latency(Duration::from_millis(1))
//!         .drop_rate(0.3),
//! )?;
//! queue.only(&[Operation::Ack]);
//! queue.enqueue(Job::new("hello")).await?; // enqueue is untouched
//! // A broker outage, then recovery, at run time:
//! queue.only(&[Operation::Dequeue]);
//! queue.set_config(ChaosConfig::new(7).error_rate(1.0))?;
//! assert!(queue.ping().await.is_ok());
//! queue.set_config(ChaosConfig::default())?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use async_trait::async_trait;
pub use keel_core::chaos::{ChaosConfig, ChaosStats};
use keel_core::chaos::{FaultInjector, Injected};

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

/// A [`Queue`] that injects the faults of a [`ChaosConfig`] into another
/// one; see the [module docs](crate::chaos).
///
/// Cheap to clone; clones share the queue, the faults and the generator.
pub struct ChaosQueue<Q> {
    inner: Arc<Q>,
    shared: Arc<Shared>,
}

struct Shared {
    faults: FaultInjector,
    /// The operations faults are aimed at, one bit per [`Operation`].
    aimed: AtomicU16,
}

impl<Q> Clone for ChaosQueue<Q> {
    fn clone(&self) -> Self {
        ChaosQueue {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<Q: fmt::Debug> fmt::Debug for ChaosQueue<Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let aimed = self.shared.aimed.load(Ordering::Relaxed);
        let operations: Vec<Operation> = Operation::ALL
            .into_iter()
            .filter(|op| aimed & op.bit() != 0)
            .collect();
        f.debug_struct("ChaosQueue")
            .field("inner", &self.inner)
            .field("config", &self.shared.faults.config())
            .field("operations", &operations)
            .field("injected", &self.injected())
            .finish()
    }
}

impl<Q> ChaosQueue<Q> {
    /// The wrapped queue.
    pub fn inner(&self) -> &Q {
        &self.inner
    }

    /// The current settings.
    pub fn config(&self) -> ChaosConfig {
        self.shared.faults.config()
    }

    /// What was injected so far.
    pub fn injected(&self) -> ChaosStats {
        self.shared.faults.stats()
    }

    /// Aims the faults at `operations` only, for every clone, from the next
    /// operation on (at first they are aimed at every operation). The
    /// others pass untouched and draw nothing from the generator.
    pub fn only(&self, operations: &[Operation]) {
        let aimed = operations.iter().fold(0, |m, op| m | op.bit());
        self.shared.aimed.store(aimed, Ordering::Relaxed);
    }
}

impl<Q: Queue> ChaosQueue<Q> {
    /// Wraps `inner` with the faults of `config`, aimed at every operation.
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidConfig`] naming a bad field.
    pub fn new(inner: Q, config: ChaosConfig) -> Result<Self> {
        Ok(ChaosQueue {
            inner: Arc::new(inner),
            shared: Arc::new(Shared {
                faults: FaultInjector::new(config)?,
                aimed: AtomicU16::new(Operation::ALL.iter().fold(0, |m, op| m | op.bit())),
            }),
        })
    }

    /// Replaces the faults for every clone, from the next operation on: an
    /// outage starts or ends. The generator is reseeded only if
    /// `config.seed` differs from the current seed.
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidConfig`] naming a bad field; the faults are kept.
    pub fn set_config(&self, config: ChaosConfig) -> Result<()> {
        Ok(self.shared.faults.set_config(config)?)
    }

    /// Runs `op` under the faults drawn for it, if they are aimed at it.
    async fn run<T>(
        &self,
        op: Operation,
        call: impl Future<Output = Result<T>> + Send,
    ) -> Result<T> {
        if self.shared.aimed.load(Ordering::Relaxed) & op.bit() == 0 {
            return call.await;
        }
        match self.shared.faults.run(call).await {
            Ok(result) => result,
            Err(Injected::Failure) => Err(QueueError::Unavailable {
                message: format!("chaos: injected failure of {}", op.name()),
                source: None,
            }),
            Err(Injected::LostReply(result)) => Err(QueueError::Unavailable {
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
            }),
        }
    }
}

#[async_trait]
impl<Q: Queue> Queue for ChaosQueue<Q> {
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
        let err = ChaosQueue::new(memory(), ChaosConfig::new(1).error_rate(1.5)).unwrap_err();
        assert!(matches!(err, QueueError::InvalidConfig(_)), "{err:?}");
        assert!(err.to_string().contains("error_rate"), "{err}");
    }

    #[tokio::test]
    async fn a_dropped_reply_still_takes_effect() {
        let queue = ChaosQueue::new(memory(), ChaosConfig::new(1).drop_rate(1.0)).unwrap();
        queue.only(&[Operation::Enqueue]);
        let err = queue.enqueue(Job::new("x")).await.unwrap_err();
        assert!(matches!(err, QueueError::Unavailable { .. }), "{err:?}");
        assert!(err.is_retryable());
        assert_eq!(queue.stats().await.unwrap().ready, 1, "it was enqueued");
        assert_eq!(queue.injected().dropped, 1);
    }

    #[tokio::test]
    async fn an_injected_error_does_not_reach_the_queue() {
        let queue = ChaosQueue::new(memory(), ChaosConfig::new(1).error_rate(1.0)).unwrap();
        queue.only(&[Operation::Enqueue]);
        assert!(queue.enqueue(Job::new("x")).await.is_err());
        assert_eq!(
            queue.stats().await.unwrap().ready,
            0,
            "nothing was enqueued"
        );
        queue.set_config(ChaosConfig::default()).unwrap();
        queue.enqueue(Job::new("y")).await.unwrap();
        assert_eq!(queue.inner().stats().await.unwrap().ready, 1);
    }

    #[tokio::test]
    async fn operations_not_aimed_at_pass_untouched() {
        let queue = ChaosQueue::new(memory(), ChaosConfig::new(1).error_rate(1.0)).unwrap();
        queue.only(&[Operation::Dequeue]);
        queue.enqueue(Job::new("x")).await.unwrap();
        queue.ping().await.unwrap();
        let err = queue.dequeue(DequeueOptions::new(1)).await.unwrap_err();
        assert!(
            err.to_string().contains("injected failure of dequeue"),
            "{err}"
        );
        assert_eq!(queue.injected().calls, 1, "only the dequeue drew");
    }

    #[tokio::test(start_paused = true)]
    async fn latency_is_added() {
        let queue = ChaosQueue::new(
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
