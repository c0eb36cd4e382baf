//! `stats`, `purge` and `delete`: counting, emptying and removing the
//! queues of the topology.

use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;

use super::AmqpQueue;
use crate::error::Result;
use crate::types::QueueStats;

impl AmqpQueue {
    pub(super) async fn count(&self) -> Result<QueueStats> {
        let link = self.link().await?;
        let levels = usize::from(self.inner.config.queue.priority_levels);
        let mut names: Vec<(String, bool)> =
            (0..levels).map(|l| (self.ready_queue(l), false)).collect();
        names.extend(
            link.declared_delays
                .lock()
                .iter()
                .map(|n| (n.clone(), true)),
        );
        let mut stats = QueueStats::default();
        for (name, delayed) in names {
            // A fresh channel per look: a missing (expired) delay queue
            // closes the channel it was asked on.
            let count = self
                .timed(async {
                    let channel = link.connection.create_channel().await?;
                    let declared = channel
                        .queue_declare(
                            name.as_str().into(),
                            QueueDeclareOptions {
                                passive: true,
                                ..QueueDeclareOptions::default()
                            },
                            FieldTable::default(),
                        )
                        .await;
                    let _ = channel.close(200, "stats".into()).await;
                    Ok(declared.map(|q| u64::from(q.message_count())).unwrap_or(0))
                })
                .await?;
            if delayed {
                stats.delayed += count;
            } else {
                stats.ready += count;
            }
        }
        stats.in_flight = self.inner.leases.lock().map.len() as u64
            + link
                .buffers
                .lock()
                .iter()
                .map(|b| b.len() as u64)
                .sum::<u64>();
        stats.dead = self
            .timed(async {
                let channel = link.connection.create_channel().await?;
                let declared = channel
                    .queue_declare(
                        self.dead_queue().as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                let _ = channel.close(200, "stats".into()).await;
                Ok(u64::from(declared.message_count()))
            })
            .await?;
        self.inner.metrics.record_stats(&stats);
        Ok(stats)
    }

    pub(super) async fn purge_all(&self) -> Result<u64> {
        let link = self.link().await?;
        let levels = usize::from(self.inner.config.queue.priority_levels);
        let mut removed = 0u64;
        for level in 0..levels {
            let name = self.ready_queue(level);
            removed += self
                .timed(async {
                    Ok(u64::from(
                        link.publisher
                            .queue_purge(name.as_str().into(), QueuePurgeOptions::default())
                            .await?,
                    ))
                })
                .await?;
        }
        // What this handle prefetched but nobody dequeued is waiting too.
        let buffered: Vec<(usize, u64)> = {
            let mut buffers = link.buffers.lock();
            buffers
                .iter_mut()
                .enumerate()
                .flat_map(|(level, buffer)| {
                    buffer.drain(..).map(move |raw| (level, raw.delivery_tag))
                })
                .collect()
        };
        for (level, tag) in buffered {
            self.settle_raw(&link, level, tag, true).await?;
            removed += 1;
        }
        // Delay queues go altogether: a later delay declares its queue
        // again.
        for name in self.take_delay_queues(&link).await? {
            removed += self.delete_queue(&link, &name).await?;
        }
        Ok(removed)
    }

    pub(super) async fn delete_all(&self) -> Result<()> {
        let link = self.link().await?;
        let levels = usize::from(self.inner.config.queue.priority_levels);
        let mut names: Vec<String> = (0..levels).map(|l| self.ready_queue(l)).collect();
        names.extend(self.take_delay_queues(&link).await?);
        names.push(self.dead_queue());
        names.push(self.registry_queue());
        for name in &names {
            self.delete_queue(&link, name).await?;
        }
        let dlx = format!("{}.dlx", self.name());
        self.timed(async {
            let channel = link.connection.create_channel().await?;
            let _ = channel
                .exchange_delete(dlx.as_str().into(), ExchangeDeleteOptions::default())
                .await;
            let _ = channel.close(200, "deleted".into()).await;
            Ok(())
        })
        .await?;
        // Nothing this handle held is valid any more; the next call
        // reconnects and declares the queue afresh.
        self.inner.leases.lock().map.clear();
        if let Some(link) = self.inner.link.lock().await.take() {
            link.retire();
        }
        Ok(())
    }
}
