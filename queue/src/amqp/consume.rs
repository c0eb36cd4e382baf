//! Consuming: one consumer per priority level filling the link's buffers,
//! `dequeue` taking deliveries from them under a lease, and an idle
//! handle giving its prefetch back.

use std::cmp::Reverse;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use tokio::time::Instant;

use super::AmqpQueue;
use super::codec::{now_ms, read_meta, without_broker_headers};
use super::lease::Lease;
use super::link::{Demand, Link};
use crate::error::{QueueError, Result};
use crate::types::{Delivery, DequeueOptions, Priority, Receipt};

impl AmqpQueue {
    pub(super) async fn take_deliveries(&self, options: DequeueOptions) -> Result<Vec<Delivery>> {
        options.validate()?;
        let give_up = Instant::now() + options.wait;
        let link = self.link().await?;
        let _demand = Demand::new(&link);
        self.ensure_consumers(&link).await?;
        loop {
            let arrived = link.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let taken: Vec<(usize, lapin::message::Delivery)> = {
                let mut buffers = link.buffers.lock();
                let mut taken = Vec::new();
                for level in (0..buffers.len()).rev() {
                    while taken.len() < options.max {
                        match buffers[level].pop_front() {
                            Some(raw) => taken.push((level, raw)),
                            None => break,
                        }
                    }
                }
                taken
            };
            if !taken.is_empty() {
                let now = Instant::now();
                let mut out = Vec::with_capacity(taken.len());
                let mut leases = self.inner.leases.lock();
                for (level, raw) in taken {
                    let Some((mut delivery, tag)) = self.admit(&link, level, raw) else {
                        continue;
                    };
                    let token = leases.next;
                    leases.next += 1;
                    delivery.receipt = Receipt::from_string(format!("a:{token}"));
                    let expires = now + options.lease;
                    leases.expiry.push(Reverse((expires, token)));
                    leases.map.insert(
                        token,
                        Lease {
                            generation: link.generation,
                            level,
                            tag,
                            expires,
                            delivery: delivery.clone(),
                        },
                    );
                    out.push(delivery);
                }
                drop(leases);
                if !out.is_empty() {
                    self.inner.lease_changed.notify_waiters();
                    self.inner.metrics.delivered.increment(out.len() as u64);
                    return Ok(out);
                }
                continue;
            }
            if !link.usable() {
                return Err(QueueError::Unavailable {
                    message:
                        "the rabbitmq connection dropped while waiting; the next call reconnects"
                            .into(),
                    source: None,
                });
            }
            if Instant::now() >= give_up {
                return Ok(Vec::new());
            }
            let _ = tokio::time::timeout_at(give_up, arrived).await;
        }
    }

    /// Starts one consumer per level on this link unless they run, then
    /// waits briefly until messages already queued have arrived, so a
    /// `dequeue` sees every level and serves priorities in order.
    async fn ensure_consumers(&self, link: &Arc<Link>) -> Result<()> {
        if link.consuming.load(Ordering::Acquire) {
            return Ok(());
        }
        // In a task of its own, so a dequeue dropped mid-setup cannot leave
        // half the consumers started.
        let (this, link) = (self.clone(), link.clone());
        tokio::spawn(async move { this.start_consumers(&link).await })
            .await
            .map_err(|err| QueueError::Backend {
                message: "starting the consumers failed".into(),
                source: Some(err.into()),
            })?
    }

    async fn start_consumers(&self, link: &Arc<Link>) -> Result<()> {
        let mut running = link.consumers.lock().await;
        if !running.is_empty() {
            return Ok(());
        }
        let levels = usize::from(self.inner.config.queue.priority_levels);
        let channels = link
            .channels
            .get_or_try_init(|| async {
                let mut channels = Vec::with_capacity(levels);
                for _ in 0..levels {
                    let channel = self
                        .timed(async {
                            let channel = link.connection.create_channel().await?;
                            channel
                                .basic_qos(self.inner.config.prefetch, BasicQosOptions::default())
                                .await?;
                            Ok(channel)
                        })
                        .await?;
                    channels.push(channel);
                }
                Ok::<_, QueueError>(channels)
            })
            .await?;
        let mut expected = Vec::with_capacity(levels);
        link.consuming.store(true, Ordering::Release);
        for (level, channel) in channels.iter().enumerate() {
            let tag = format!(
                "keel-{}-p{level}-{}",
                self.inner.ids.prefix(),
                self.inner.ids.next()
            );
            let started = self
                .timed(async {
                    let declared = channel
                        .queue_declare(
                            self.ready_queue(level).as_str().into(),
                            QueueDeclareOptions {
                                passive: true,
                                ..QueueDeclareOptions::default()
                            },
                            FieldTable::default(),
                        )
                        .await?;
                    let consumer = channel
                        .basic_consume(
                            self.ready_queue(level).as_str().into(),
                            tag.as_str().into(),
                            BasicConsumeOptions::default(),
                            FieldTable::default(),
                        )
                        .await?;
                    Ok((declared.message_count(), consumer))
                })
                .await;
            let (count, consumer) = match started {
                Ok(started) => started,
                Err(err) => {
                    link.mark_broken();
                    return Err(err);
                }
            };
            running.push((
                tag,
                tokio::spawn(pump(Arc::downgrade(link), level, consumer)),
            ));
            expected.push(count.min(u32::from(self.inner.config.prefetch)) as usize);
        }
        let settle = Instant::now() + Duration::from_millis(500);
        while Instant::now() < settle {
            let arrived = link.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let ready = {
                let buffers = link.buffers.lock();
                buffers.iter().zip(&expected).all(|(b, e)| b.len() >= *e)
            };
            if ready {
                break;
            }
            let _ = tokio::time::timeout_at(settle, arrived).await;
        }
        Ok(())
    }

    /// Pauses consumption when no `dequeue` has asked for jobs for
    /// `release_idle_after`, giving prefetched jobs back to the queue, so an
    /// idle (or stuck) handle never hoards jobs other consumers could run.
    pub(super) async fn release_if_idle(&self, link: &Arc<Link>) {
        let idle = self.inner.config.release_idle_after;
        let is_idle = || {
            link.waiting.load(Ordering::Acquire) == 0 && link.last_demand.lock().elapsed() >= idle
        };
        if !link.consuming.load(Ordering::Acquire) || !is_idle() {
            return;
        }
        let mut running = link.consumers.lock().await;
        if running.is_empty() || !is_idle() {
            return;
        }
        link.consuming.store(false, Ordering::Release);
        let channels = link.channels.get().cloned().unwrap_or_default();
        for ((tag, pump), channel) in running.drain(..).zip(&channels) {
            let _ = self
                .timed(async {
                    Ok(channel
                        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await?)
                })
                .await;
            let _ = tokio::time::timeout(self.inner.config.operation_timeout, pump).await;
        }
        let buffered: Vec<(usize, lapin::message::Delivery)> = {
            let mut buffers = link.buffers.lock();
            buffers
                .iter_mut()
                .enumerate()
                .flat_map(|(level, buffer)| buffer.drain(..).map(move |raw| (level, raw)))
                .collect()
        };
        if !buffered.is_empty() {
            tracing::debug!(
                count = buffered.len(),
                "idle handle: giving prefetched jobs back"
            );
        }
        for (level, raw) in buffered {
            let props = without_broker_headers(&raw.properties);
            let stored = self
                .store(link, level, None, &raw.data, props)
                .await
                .is_ok();
            let _ = self.settle_raw(link, level, raw.delivery_tag, stored).await;
        }
    }

    /// Turns a raw delivery into ours, or settles it at once when it must
    /// not be delivered (deadline passed, attempts used up).
    fn admit(
        &self,
        link: &Arc<Link>,
        level: usize,
        raw: lapin::message::Delivery,
    ) -> Option<(Delivery, u64)> {
        let meta = read_meta(&raw.properties);
        let redeliveries = meta.delivery_count.unwrap_or(u64::from(raw.redelivered));
        let attempt = (meta.previous_attempts + redeliveries + 1).min(u64::from(u32::MAX)) as u32;
        let delivery = Delivery {
            id: meta.id,
            payload: Bytes::from(raw.data),
            headers: meta.headers,
            receipt: Receipt::from_string(String::new()),
            attempt,
            enqueued_at: UNIX_EPOCH + Duration::from_millis(meta.enqueued_ms),
            priority: Priority(meta.priority),
            deadline: meta
                .deadline_ms
                .map(|d| UNIX_EPOCH + Duration::from_millis(d)),
        };
        let max = self.inner.config.queue.max_attempts;
        let reject = if meta.deadline_ms.is_some_and(|d| d <= now_ms()) {
            Some("deadline exceeded before delivery".to_owned())
        } else if attempt > max {
            Some(self.inner.config.queue.exhausted_reason(&format!(
                "redelivered {redeliveries} times after lease expiry or consumer crash"
            )))
        } else {
            None
        };
        let Some(reason) = reject else {
            return Some((delivery, raw.delivery_tag));
        };
        // Settle in the background so a dropped dequeue cannot strand it.
        let this = self.clone();
        let link = link.clone();
        let tag = raw.delivery_tag;
        tokio::spawn(async move {
            let attempts = attempt.saturating_sub(1);
            let result = this.publish_dead(&link, &delivery, attempts, &reason).await;
            let _ = this.settle_raw(&link, level, tag, result.is_ok()).await;
        });
        None
    }
}

/// Moves one level's deliveries into the link's buffer until the consumer
/// ends.
pub(super) async fn pump(link: Weak<Link>, level: usize, mut consumer: lapin::Consumer) {
    while let Some(item) = consumer.next().await {
        let Some(link) = link.upgrade() else {
            return;
        };
        match item {
            Ok(delivery) => {
                link.buffers.lock()[level].push_back(delivery);
                link.arrived.notify_waiters();
            }
            Err(err) => {
                if link.consuming.load(Ordering::Acquire) {
                    tracing::warn!(error = %err, level, "rabbitmq consumer failed; reconnecting on the next call");
                    link.mark_broken();
                }
                return;
            }
        }
    }
    if let Some(link) = link.upgrade()
        && link.consuming.load(Ordering::Acquire)
    {
        link.mark_broken();
    }
}
