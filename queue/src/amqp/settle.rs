//! Settling a delivery: acking or requeueing it on its channel, and a
//! nack's retry, release or dead letter, stored before the original goes.

use lapin::options::{BasicAckOptions, BasicNackOptions};

use super::AmqpQueue;
use super::codec::{epoch_ms, properties};
use super::lease::Lease;
use super::link::Link;
use crate::error::{QueueError, Result};
use crate::types::{Nack, Receipt};

impl AmqpQueue {
    pub(super) async fn nack_receipt(&self, receipt: &Receipt, action: Nack) -> Result<()> {
        let lease = self.take_lease(receipt)?;
        let (generation, level, tag) = (lease.generation, lease.level, lease.tag);
        // Finish even if the caller stops waiting, so the delivery is never
        // left unsettled on the channel.
        let this = self.clone();
        match tokio::spawn(async move { this.nack_inner(lease, action).await }).await {
            Ok(result) => result,
            Err(err) => {
                // The task failed before settling: hand the original back
                // to the broker, so the job is never stranded.
                if let Some(link) = self.inner.link.lock().await.clone()
                    && link.generation == generation
                {
                    let _ = self.settle_raw(&link, level, tag, false).await;
                }
                Err(QueueError::Backend {
                    message: "the nack task failed; the job was handed back".into(),
                    source: Some(err.into()),
                })
            }
        }
    }

    /// Acks (`true`) or requeues (`false`) a raw delivery on its level's
    /// channel.
    pub(super) async fn settle_raw(
        &self,
        link: &Link,
        level: usize,
        tag: u64,
        ack: bool,
    ) -> Result<()> {
        let Some(channel) = link.channels.get().and_then(|c| c.get(level)) else {
            return Err(QueueError::InvalidReceipt(
                "no consumer channel for this delivery".into(),
            ));
        };
        self.timed(async {
            if ack {
                channel.basic_ack(tag, BasicAckOptions::default()).await?;
            } else {
                channel
                    .basic_nack(
                        tag,
                        BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        },
                    )
                    .await?;
            }
            Ok(())
        })
        .await
    }

    /// Puts a job whose lease expired back at the tail of its level as a
    /// fresh message counting the attempt, then drops the original; if that
    /// fails, hands the original back to the broker.
    pub(super) async fn requeue_expired(&self, link: &Link, lease: Lease) {
        let d = &lease.delivery;
        let props = properties(
            &d.id,
            &d.headers,
            u64::from(d.attempt),
            epoch_ms(d.enqueued_at),
            d.deadline.map(epoch_ms),
            d.priority.0,
        );
        let stored = self
            .store(link, lease.level, None, &d.payload, props)
            .await
            .is_ok();
        let _ = self.settle_raw(link, lease.level, lease.tag, stored).await;
    }

    async fn nack_inner(&self, lease: Lease, action: Nack) -> Result<()> {
        let link = self.link_of(&lease).await?;
        let config = &self.inner.config.queue;
        let attempt = lease.delivery.attempt;
        let outcome = match action {
            Nack::DeadLetter { reason } => {
                self.publish_dead(&link, &lease.delivery, attempt, &reason)
                    .await
            }
            Nack::Retry { reason, .. } if attempt >= config.max_attempts => {
                self.publish_dead(
                    &link,
                    &lease.delivery,
                    attempt,
                    &config.exhausted_reason(&reason),
                )
                .await
            }
            Nack::Retry { after, .. } => {
                let delay = after.unwrap_or_else(|| config.backoff_for(attempt));
                let d = &lease.delivery;
                let props = properties(
                    &d.id,
                    &d.headers,
                    u64::from(attempt),
                    epoch_ms(d.enqueued_at),
                    d.deadline.map(epoch_ms),
                    d.priority.0,
                );
                let result = self
                    .store(&link, lease.level, Some(delay), &d.payload, props)
                    .await;
                if result.is_ok() {
                    self.inner.metrics.retried.increment(1);
                }
                result
            }
            Nack::Release { reason } => {
                // Untried: a fresh message at the tail of its ready queue
                // that does not count this delivery, so the next one
                // repeats its attempt number. Never dead-lettered.
                let d = &lease.delivery;
                let props = properties(
                    &d.id,
                    &d.headers,
                    u64::from(attempt.saturating_sub(1)),
                    epoch_ms(d.enqueued_at),
                    d.deadline.map(epoch_ms),
                    d.priority.0,
                );
                let result = self
                    .store(&link, lease.level, None, &d.payload, props)
                    .await;
                if result.is_ok() {
                    self.inner.metrics.released.increment(1);
                    tracing::debug!(job = %d.id, %reason, "job released");
                }
                result
            }
        };
        // The copy is safely stored: drop the original. If storing failed,
        // give the original back to the broker instead (never stranded).
        let settled = self
            .settle_raw(&link, lease.level, lease.tag, outcome.is_ok())
            .await;
        outcome.and(settled)
    }
}
