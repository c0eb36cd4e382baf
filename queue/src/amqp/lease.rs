//! Leases: what a receipt holds, and the keeper that requeues deliveries
//! whose lease expired and gives idle prefetch back.

#[allow(unused_imports)]
use super::*;

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
