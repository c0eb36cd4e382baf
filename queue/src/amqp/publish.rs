//! Publishing: jobs into their ready or delay queue, with mandatory
//! routing and publisher confirms, and `enqueue_batch`.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};

use super::codec::{epoch_ms, now_ms, properties};
use super::link::Link;
use super::{AmqpQueue, BACKEND, LIMITS};
use crate::error::{QueueError, Result};
use crate::types::{Enqueued, Job};

/// How a confirmed publish ended.
pub(super) enum Stored {
    Yes,
    /// `mandatory` publish with no queue to route to.
    Unroutable,
}

pub(super) fn unroutable(target: &str) -> QueueError {
    QueueError::Backend {
        message: format!("message was unroutable: queue `{target}` does not exist"),
        source: None,
    }
}

impl AmqpQueue {
    pub(super) async fn publish_jobs(&self, jobs: Vec<Job>) -> Result<Vec<Enqueued>> {
        let config = &self.inner.config.queue;
        for job in &jobs {
            config.check_priority(job.priority)?;
            crate::types::check_job(job, &LIMITS)?;
            if job.idempotency_key.is_some() {
                return Err(QueueError::Unsupported {
                    backend: BACKEND,
                    what: "idempotency keys (RabbitMQ has no deduplication); enqueue without one or use the redis backend".into(),
                });
            }
        }
        let link = self.link().await?;
        let enqueued_ms = now_ms();
        // Publish the whole batch, then wait for the confirms.
        let mut pending = Vec::with_capacity(jobs.len());
        for job in &jobs {
            let id = job.id.clone().unwrap_or_else(|| self.inner.ids.next());
            let level = usize::from(job.priority.0);
            let target = self.route(&link, level, job.delay).await?;
            let props = properties(
                &id,
                &job.headers,
                0,
                enqueued_ms,
                job.deadline.map(epoch_ms),
                job.priority.0,
            );
            let confirm = self
                .publish(&link, &target, &job.payload, props.clone())
                .await?;
            pending.push((id, job, props, target, confirm));
        }
        let mut out = Vec::with_capacity(pending.len());
        for (id, job, props, target, confirm) in pending {
            if let Stored::Unroutable = self.confirmed(&link, &target, confirm).await? {
                let level = usize::from(job.priority.0);
                self.store(&link, level, job.delay, &job.payload, props)
                    .await?;
            }
            self.inner.metrics.enqueued.increment(1);
            out.push(Enqueued {
                id,
                duplicate: false,
            });
        }
        Ok(out)
    }

    /// Publishes and waits for the broker's confirm.
    pub(super) async fn publish(
        &self,
        link: &Link,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<lapin::PublisherConfirm> {
        self.timed(async {
            Ok(link
                .publisher
                .basic_publish(
                    "".into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    payload,
                    properties,
                )
                .await?)
        })
        .await
    }

    /// Waits for the broker's confirm of one publish to `target`.
    pub(super) async fn confirmed(
        &self,
        link: &Link,
        target: &str,
        confirm: lapin::PublisherConfirm,
    ) -> Result<Stored> {
        match self.timed(async { Ok(confirm.await?) }).await? {
            Confirmation::Ack(None) => Ok(Stored::Yes),
            Confirmation::Ack(Some(_)) => Ok(Stored::Unroutable),
            Confirmation::Nack(_) => Err(self.refused(link, target).await),
            Confirmation::NotRequested => Err(QueueError::Backend {
                message: "the broker did not confirm the publish".into(),
                source: None,
            }),
        }
    }

    /// What a negative confirm of a publish to `target` means. A ready
    /// queue at capacity refuses publishes (`x-overflow: reject-publish`):
    /// `Full`. Otherwise the broker could not store the job: a quorum
    /// queue refuses publishes while it has no leader, and on RabbitMQ 3.10
    /// a channel that published across its leader's death goes on being
    /// refused long after a new leader is elected, until the channel is
    /// replaced. So the link is retired (the next call reconnects, to the
    /// next node when several are configured) and the answer is
    /// `Unavailable`, which a retry resolves.
    async fn refused(&self, link: &Link, target: &str) -> QueueError {
        let levels = usize::from(self.inner.config.queue.priority_levels);
        if let Some(capacity) = self.inner.config.queue.capacity
            && (0..levels).any(|level| self.ready_queue(level) == target)
            && let Ok(ready) = self.ready_count(link, target).await
            // A quorum queue takes one message past `x-max-length`.
            && ready.saturating_add(1) >= capacity
        {
            self.inner.metrics.full.increment(1);
            return QueueError::Full { capacity };
        }
        link.retire();
        QueueError::Unavailable {
            message: format!(
                "rabbitmq refused to store the job in `{target}` though it is not full (a quorum \
                 queue without a leader while a node fails?); the connection is replaced on the \
                 next call"
            ),
            source: None,
        }
    }

    /// How many messages the broker holds ready in `queue`.
    async fn ready_count(&self, link: &Link, queue: &str) -> Result<u64> {
        self.timed(async {
            let channel = link.connection.create_channel().await?;
            let declared = channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            let _ = channel.close(200, "count".into()).await;
            Ok(u64::from(declared?.message_count()))
        })
        .await
    }

    /// Publishes to `target` and waits for the confirm; a delay queue that
    /// expired since it was declared is declared again and the publish
    /// retried once.
    pub(super) async fn store(
        &self,
        link: &Link,
        level: usize,
        delay: Option<Duration>,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<()> {
        for first in [true, false] {
            let target = self.route(link, level, delay).await?;
            let confirm = self.publish(link, &target, payload, props.clone()).await?;
            match self.confirmed(link, &target, confirm).await? {
                Stored::Yes => return Ok(()),
                Stored::Unroutable if first && target != self.ready_queue(level) => {
                    link.declared_delays.lock().remove(&target);
                }
                Stored::Unroutable => return Err(unroutable(&target)),
            }
        }
        Err(unroutable("delay queue"))
    }
}
