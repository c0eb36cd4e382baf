//! Dead letters: publishing a job to the dead queue with its reason, and
//! listing, replaying and purging them.

use std::collections::HashSet;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};

use super::codec::{H_FAILED, H_REASON, epoch_ms, int, now_ms, properties, read_meta, text};
use super::link::Link;
use super::publish::{Stored, unroutable};
use super::{AmqpQueue, REPLAY_SCAN_LIMIT};
use crate::error::Result;
use crate::types::{DeadLetter, Delivery, JobId, Priority};

impl AmqpQueue {
    pub(super) async fn publish_dead(
        &self,
        link: &Link,
        delivery: &Delivery,
        attempts: u32,
        reason: &str,
    ) -> Result<()> {
        let mut props = properties(
            &delivery.id,
            &delivery.headers,
            u64::from(attempts),
            epoch_ms(delivery.enqueued_at),
            None,
            delivery.priority.0,
        );
        let mut table = props.headers().clone().unwrap_or_default();
        table.insert(H_REASON.into(), text(reason));
        table.insert(H_FAILED.into(), int(now_ms()));
        props = props.with_headers(table);
        let dead = self.dead_queue();
        let confirm = self.publish(link, &dead, &delivery.payload, props).await?;
        if let Stored::Unroutable = self.confirmed(link, &dead, confirm).await? {
            return Err(unroutable(&dead));
        }
        self.inner.metrics.dead_lettered.increment(1);
        tracing::debug!(job = %delivery.id, %reason, "job dead-lettered");
        Ok(())
    }

    pub(super) async fn list_dead(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let link = self.link().await?;
        let dead = self.dead_queue();
        self.timed(async {
            // Read without acking, then close the channel: the broker puts
            // every message back.
            let channel = link.connection.create_channel().await?;
            let mut out = Vec::new();
            while out.len() < limit {
                let Some(message) = channel
                    .basic_get(dead.as_str().into(), BasicGetOptions::default())
                    .await?
                else {
                    break;
                };
                let delivery = message.delivery;
                let meta = read_meta(&delivery.properties);
                out.push(DeadLetter {
                    id: meta.id,
                    payload: Bytes::from(delivery.data),
                    headers: meta.headers,
                    reason: meta.reason.unwrap_or_else(|| "unknown".into()),
                    attempts: meta.previous_attempts.min(u64::from(u32::MAX)) as u32,
                    priority: Priority(meta.priority),
                    enqueued_at: UNIX_EPOCH + Duration::from_millis(meta.enqueued_ms),
                    failed_at: UNIX_EPOCH + Duration::from_millis(meta.failed_ms.unwrap_or(0)),
                });
            }
            let _ = channel.close(200, "listed".into()).await;
            Ok(out)
        })
        .await
    }

    pub(super) async fn replay_dead(&self, ids: &[JobId]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let link = self.link().await?;
        let dead = self.dead_queue();
        let wanted: HashSet<&JobId> = ids.iter().collect();
        let channel = self
            .timed(async { Ok(link.connection.create_channel().await?) })
            .await?;
        let mut replayed = 0u64;
        let mut scanned = 0usize;
        let result: Result<()> = async {
            while scanned < REPLAY_SCAN_LIMIT && (replayed as usize) < wanted.len() {
                let Some(message) = self
                    .timed(async {
                        Ok(channel
                            .basic_get(dead.as_str().into(), BasicGetOptions::default())
                            .await?)
                    })
                    .await?
                else {
                    break;
                };
                scanned += 1;
                let delivery = message.delivery;
                let meta = read_meta(&delivery.properties);
                if !wanted.contains(&meta.id) {
                    continue;
                }
                let level = usize::from(meta.priority)
                    .min(usize::from(self.inner.config.queue.priority_levels) - 1);
                let target = self.ready_queue(level);
                let props = properties(
                    &meta.id,
                    &meta.headers,
                    0,
                    meta.enqueued_ms,
                    None,
                    level as u8,
                );
                let confirm = self.publish(&link, &target, &delivery.data, props).await?;
                if let Stored::Unroutable = self.confirmed(&link, &target, confirm).await? {
                    return Err(unroutable(&target));
                }
                self.timed(async {
                    Ok(channel
                        .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                        .await?)
                })
                .await?;
                replayed += 1;
            }
            Ok(())
        }
        .await;
        let _ = channel.close(200, "replayed".into()).await;
        result.map(|()| replayed)
    }

    pub(super) async fn purge_dead(&self) -> Result<u64> {
        let link = self.link().await?;
        let dead = self.dead_queue();
        self.timed(async {
            let count = link
                .publisher
                .queue_purge(dead.as_str().into(), QueuePurgeOptions::default())
                .await?;
            Ok(u64::from(count))
        })
        .await
    }
}
