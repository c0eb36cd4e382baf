//! The broker-side names and declarations of a queue: its ready, dead,
//! registry and delay queues and their arguments, declared on connect (or
//! on first use, for delay queues) and deleted by `purge` and `delete`.

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};

use super::codec::{int, ms, text};
use super::error::AmqpFailure;
use super::link::Link;
use super::publish::{Stored, unroutable};
use super::{AmqpQueue, AmqpQueueType};
use crate::error::{QueueError, Result};

impl AmqpQueue {
    pub(super) fn name(&self) -> &str {
        &self.inner.config.queue.name
    }

    pub(super) fn ready_queue(&self, level: usize) -> String {
        format!("{}.p{level}", self.name())
    }

    pub(super) fn dead_queue(&self) -> String {
        format!("{}.dead", self.name())
    }

    /// The queue that records every delay queue declared, so `purge` and
    /// `delete` can find them (the broker cannot list queues over AMQP).
    pub(super) fn registry_queue(&self) -> String {
        format!("{}.delays", self.name())
    }
    fn queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        match self.inner.config.queue_type {
            AmqpQueueType::Quorum => {
                args.insert("x-queue-type".into(), text("quorum"));
            }
            AmqpQueueType::Classic => {
                args.insert("x-queue-type".into(), text("classic"));
            }
        }
        args
    }

    /// The dead-letter exchange, the dead, registry and ready queues,
    /// declared idempotently on a new connection's publisher channel.
    pub(super) async fn declare_topology(
        &self,
        connection: &Connection,
        publisher: &Channel,
    ) -> std::result::Result<(), AmqpFailure> {
        let config = &self.inner.config;
        let levels = usize::from(config.queue.priority_levels);
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let dlx = format!("{}.dlx", self.name());
        publisher
            .exchange_declare(
                dlx.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(AmqpFailure::Topology)?;
        publisher
            .queue_declare(
                self.dead_queue().as_str().into(),
                durable,
                self.queue_args(),
            )
            .await
            .map_err(AmqpFailure::Topology)?;
        publisher
            .queue_bind(
                self.dead_queue().as_str().into(),
                dlx.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.declare_registry(connection).await?;
        for level in 0..levels {
            let mut args = self.queue_args();
            args.insert("x-dead-letter-exchange".into(), text(&dlx));
            args.insert("x-overflow".into(), text("reject-publish"));
            if let Some(capacity) = config.queue.capacity {
                // A quorum queue enters its reject-publish state only
                // once its length passes the limit, so it accepts one
                // message beyond `x-max-length`; a classic queue does not.
                let limit = match config.queue_type {
                    AmqpQueueType::Quorum => capacity - 1,
                    AmqpQueueType::Classic => capacity,
                };
                args.insert("x-max-length".into(), int(limit));
            }
            if config.queue_type == AmqpQueueType::Quorum {
                args.insert(
                    "x-delivery-limit".into(),
                    int(u64::from(config.queue.max_attempts) + 5),
                );
            }
            publisher
                .queue_declare(self.ready_queue(level).as_str().into(), durable, args)
                .await
                .map_err(AmqpFailure::Topology)?;
        }
        Ok(())
    }

    /// Declares the registry of delay queues, on a channel of its own.
    ///
    /// The registry is a classic queue (its records expire one by one,
    /// which quorum queues on RabbitMQ 3.10 cannot do), so on a cluster it
    /// lives on one node. While that node is down the broker refuses to
    /// declare it (`NOT_FOUND`, home node down); the handle connects anyway,
    /// since jobs never pass through the registry: ready, dead and delay
    /// queues are quorum queues that survive the node. Only delayed
    /// enqueues, `purge` and `delete`, which write or read the registry,
    /// fail until the node is back.
    async fn declare_registry(
        &self,
        connection: &Connection,
    ) -> std::result::Result<(), AmqpFailure> {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("classic"));
        let channel = connection.create_channel().await?;
        let declared = channel
            .queue_declare(
                self.registry_queue().as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await;
        match declared {
            Ok(_) => {
                let _ = channel.close(200, "registry declared".into()).await;
                Ok(())
            }
            Err(err) if is_not_found(&err) => {
                tracing::warn!(
                    queue = %self.registry_queue(),
                    error = %err,
                    "the registry of delay queues is unavailable (its node is down?); \
                     delayed enqueues, purge and delete fail until it is back"
                );
                Ok(())
            }
            Err(err) => Err(AmqpFailure::Topology(err)),
        }
    }

    /// Where a job goes now: its ready queue, or a delay queue.
    pub(super) async fn route(
        &self,
        link: &Link,
        level: usize,
        delay: Option<Duration>,
    ) -> Result<String> {
        match delay.filter(|d| !d.is_zero()) {
            Some(delay) => self.delay_queue(link, level, delay).await,
            None => Ok(self.ready_queue(level)),
        }
    }

    /// The queue a message with this delay goes to, declared once per link.
    async fn delay_queue(&self, link: &Link, level: usize, delay: Duration) -> Result<String> {
        let delay_ms = ms(delay).max(1);
        let name = format!("{}.delay.p{level}.{delay_ms}ms", self.name());
        if link.declared_delays.lock().contains(&name) {
            return Ok(name);
        }
        let mut args = self.queue_args();
        args.insert("x-message-ttl".into(), int(delay_ms));
        args.insert("x-dead-letter-exchange".into(), text(""));
        args.insert(
            "x-dead-letter-routing-key".into(),
            text(&self.ready_queue(level)),
        );
        args.insert("x-expires".into(), int(delay_ms.saturating_add(60_000)));
        if self.inner.config.queue_type == AmqpQueueType::Quorum {
            args.insert("x-overflow".into(), text("reject-publish"));
            args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        }
        self.timed(async {
            link.publisher
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    args,
                )
                .await
                .map_err(AmqpFailure::Topology)
        })
        .await?;
        // Recorded for `purge` and `delete`, for as long as the delay queue
        // can live (it expires a minute after its delay, unused).
        let record = BasicProperties::default()
            .with_delivery_mode(2)
            .with_expiration(delay_ms.saturating_add(120_000).to_string().as_str().into());
        let registry = self.registry_queue();
        let confirm = self
            .publish(link, &registry, name.as_bytes(), record)
            .await?;
        if let Stored::Unroutable = self.confirmed(link, &registry, confirm).await? {
            return Err(unroutable(&self.registry_queue()));
        }
        link.declared_delays.lock().insert(name.clone());
        Ok(name)
    }

    /// Every delay queue recorded in the registry (taking the records) and
    /// declared by this handle.
    pub(super) async fn take_delay_queues(&self, link: &Link) -> Result<HashSet<String>> {
        let mut names: HashSet<String> = link.declared_delays.lock().drain().collect();
        let registry = self.registry_queue();
        let taken: Result<Vec<String>> = self
            .timed(async {
                let channel = link.connection.create_channel().await?;
                let mut out = Vec::new();
                while let Some(message) = channel
                    .basic_get(registry.as_str().into(), BasicGetOptions { no_ack: true })
                    .await?
                {
                    out.push(String::from_utf8_lossy(&message.delivery.data).into_owned());
                }
                let _ = channel.close(200, "registry read".into()).await;
                Ok(out)
            })
            .await;
        names.extend(taken?);
        Ok(names)
    }

    /// Deletes one queue on a channel of its own and answers how many
    /// messages it held; a queue that is not there counts as deleted.
    pub(super) async fn delete_queue(&self, link: &Link, name: &str) -> Result<u64> {
        let deleted = self
            .timed(async {
                let channel = link.connection.create_channel().await?;
                let deleted = channel
                    .queue_delete(name.into(), QueueDeleteOptions::default())
                    .await;
                let _ = channel.close(200, "deleted".into()).await;
                Ok(deleted)
            })
            .await?;
        match deleted {
            Ok(count) => Ok(u64::from(count)),
            // The channel failed but the connection stands: the broker
            // refused on this queue alone, which means it is not there.
            Err(_) if link.usable() => Ok(0),
            Err(err) => Err(QueueError::from(AmqpFailure::from(err))),
        }
    }
}

/// Whether the broker answered `NOT_FOUND`: on a declaration of a queue
/// that exists, that its home node is down.
fn is_not_found(err: &lapin::Error) -> bool {
    matches!(
        err.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
}
