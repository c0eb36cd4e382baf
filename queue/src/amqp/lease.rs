//! Leases: what a receipt holds, and the keeper that requeues deliveries
//! whose lease expired and gives idle prefetch back.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Weak;
use std::time::Duration;

use tokio::time::Instant;

use super::{AmqpQueue, Inner};
use crate::error::{QueueError, Result};
use crate::types::{Delivery, Receipt};

/// One leased delivery: which link generation and level it came from, its
/// delivery tag, and when its lease ends.
pub(super) struct Lease {
    pub(super) generation: u64,
    pub(super) level: usize,
    pub(super) tag: u64,
    pub(super) expires: Instant,
    pub(super) delivery: Delivery,
}

/// The live leases of a queue handle, by receipt, with their expiries.
#[derive(Default)]
pub(super) struct Leases {
    pub(super) next: u64,
    pub(super) map: HashMap<u64, Lease>,
    pub(super) expiry: BinaryHeap<Reverse<(Instant, u64)>>,
}

/// How often the lease keeper looks for idle prefetch to give back.
pub(super) const IDLE_TICK: Duration = Duration::from_millis(250);

/// Requeues deliveries whose lease expired unacked.
pub(super) async fn lease_keeper(inner: Weak<Inner>) {
    let Some(lease_changed) = inner.upgrade().map(|i| i.lease_changed.clone()) else {
        return;
    };
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let changed = lease_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let now = Instant::now();
        let (expired, next) = {
            let mut leases = strong.leases.lock();
            let mut expired = Vec::new();
            while let Some(Reverse((at, token))) = leases.expiry.peek().copied() {
                if at > now {
                    break;
                }
                leases.expiry.pop();
                if leases.map.get(&token).is_some_and(|l| l.expires <= now) {
                    expired.push(leases.map.remove(&token).expect("just seen"));
                }
            }
            (expired, leases.expiry.peek().map(|Reverse((at, _))| *at))
        };
        let queue = AmqpQueue {
            inner: strong.clone(),
        };
        let link = strong.link.lock().await.clone();
        if let Some(link) = link.as_ref() {
            queue.release_if_idle(link).await;
        }
        for lease in expired {
            strong.metrics.lease_expired.increment(1);
            tracing::debug!(job = %lease.delivery.id, "lease expired; requeueing");
            if let Some(link) = link.as_ref().filter(|l| l.generation == lease.generation) {
                queue.requeue_expired(link, lease).await;
            }
        }
        drop(queue);
        // Hold only a weak reference while sleeping, so dropping the queue
        // ends this task. Wake at least every tick to release idle prefetch.
        let wake = next.map_or(now + IDLE_TICK, |at| at.min(now + IDLE_TICK));
        drop(strong);
        tokio::select! {
            () = &mut changed => {}
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

impl AmqpQueue {
    /// Removes a valid lease, or says why the receipt is not valid.
    pub(super) fn take_lease(&self, receipt: &Receipt) -> Result<Lease> {
        let token = receipt
            .as_str()
            .strip_prefix("a:")
            .and_then(|t| t.parse::<u64>().ok())
            .ok_or_else(|| {
                QueueError::InvalidReceipt(format!(
                    "`{}` is not an amqp-queue receipt",
                    receipt.as_str()
                ))
            })?;
        let mut leases = self.inner.leases.lock();
        match leases.map.get(&token) {
            Some(lease) if lease.expires > Instant::now() => {
                Ok(leases.map.remove(&token).expect("just seen"))
            }
            Some(_) => Err(QueueError::InvalidReceipt(
                "the lease expired; the job is being redelivered".into(),
            )),
            None => Err(QueueError::InvalidReceipt(
                "the lease expired or the delivery was already settled".into(),
            )),
        }
    }

    pub(super) fn renew_lease(&self, receipt: &Receipt, lease: Duration) -> Result<()> {
        crate::types::check_lease(lease)?;
        let mut held = self.take_lease(receipt)?;
        let token = receipt.as_str()[2..]
            .parse::<u64>()
            .expect("validated by take_lease");
        held.expires = Instant::now() + lease;
        let mut leases = self.inner.leases.lock();
        leases.expiry.push(Reverse((held.expires, token)));
        leases.map.insert(token, held);
        drop(leases);
        self.inner.lease_changed.notify_waiters();
        Ok(())
    }
}
