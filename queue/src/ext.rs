//! Conveniences every [`Queue`] gets for free: typed JSON jobs and a stream
//! of deliveries.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{QueueError, Result};
use crate::queue::Queue;
use crate::types::{Delivery, DequeueOptions, Enqueued, Job, Nack};

/// The header naming a payload's encoding.
pub const CONTENT_TYPE: &str = "content-type";

/// The content type of JSON payloads.
pub const JSON: &str = "application/json";

impl Job {
    /// A job whose payload is `value` as JSON, with a `content-type` header.
    ///
    /// # Errors
    ///
    /// [`QueueError::Codec`] when `value` cannot be serialized.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Job> {
        let payload = serde_json::to_vec(value).map_err(|err| QueueError::Codec {
            message: "could not encode the job as JSON".into(),
            source: Some(err.into()),
        })?;
        Ok(Job::new(payload).header(CONTENT_TYPE, JSON))
    }
}

/// A delivery whose payload decoded as `T`.
#[derive(Debug, Clone)]
pub struct TypedDelivery<T> {
    /// The decoded payload.
    pub job: T,
    /// The delivery itself: receipt, attempt, headers and the raw payload.
    pub delivery: Delivery,
}

/// Typed and streaming conveniences over any [`Queue`].
///
/// Implemented for every `Queue` (including `dyn Queue`); never implement
/// it by hand.
#[async_trait]
pub trait QueueExt: Queue {
    /// Enqueues `value` as a JSON job with default options; use
    /// [`Job::json`] and [`Queue::enqueue`] to set options.
    ///
    /// # Errors
    ///
    /// [`QueueError::Codec`] when `value` cannot be serialized, else as
    /// [`Queue::enqueue`].
    ///
    /// # Cancel safety
    ///
    /// As [`Queue::enqueue`].
    async fn enqueue_json<T: Serialize + Sync + ?Sized>(&self, value: &T) -> Result<Enqueued> {
        self.enqueue(Job::json(value)?).await
    }

    /// Receives jobs and decodes their JSON payloads as `T`.
    ///
    /// # Behavior
    ///
    /// A payload that does not decode is never handed out and never lost:
    /// it is moved to the dead letters with the decode error as its reason,
    /// and the call returns the jobs that did decode (possibly none, before
    /// `wait` has passed).
    ///
    /// # Errors
    ///
    /// As [`Queue::dequeue`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe as [`Queue::dequeue`]: jobs taken but not returned come
    /// back after their lease.
    async fn dequeue_json<T: DeserializeOwned + Send>(
        &self,
        options: DequeueOptions,
    ) -> Result<Vec<TypedDelivery<T>>> {
        let deliveries = self.dequeue(options).await?;
        let mut out = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match serde_json::from_slice::<T>(&delivery.payload) {
                Ok(job) => out.push(TypedDelivery { job, delivery }),
                Err(err) => {
                    let reason = format!(
                        "undecodable payload: expected JSON for {}: {err}",
                        std::any::type_name::<T>()
                    );
                    tracing::warn!(job = %delivery.id, %reason, "dead-lettering a poison message");
                    if let Err(nack_err) = self
                        .nack(&delivery.receipt, Nack::dead_letter(reason))
                        .await
                    {
                        // The lease stays; the job comes back after it and
                        // is dead-lettered then. Never lost.
                        tracing::warn!(job = %delivery.id, error = %nack_err, "could not dead-letter; it will be redelivered");
                    }
                }
            }
        }
        Ok(out)
    }

    /// An endless stream of deliveries, fetched in batches of
    /// `options.max` with long polls of `options.wait`.
    ///
    /// Backend errors are yielded as items and the stream keeps going,
    /// pausing with exponential backoff (100 ms doubling to 5 s) after each
    /// consecutive error, so a dead backend is not hammered.
    ///
    /// Deliveries buffered in the stream when it is dropped are not lost:
    /// their leases expire and they are delivered again.
    fn deliveries(&self, options: DequeueOptions) -> BoxStream<'_, Result<Delivery>>
    where
        Self: Sized,
    {
        deliveries_of(self, options)
    }
}

impl<Q: Queue + ?Sized> QueueExt for Q {}

/// [`QueueExt::deliveries`] for unsized queues such as `dyn Queue`.
pub fn deliveries_of<Q: Queue + ?Sized>(
    queue: &Q,
    options: DequeueOptions,
) -> BoxStream<'_, Result<Delivery>> {
    struct State<'q, Q: ?Sized> {
        queue: &'q Q,
        buffer: VecDeque<Delivery>,
        errors: u32,
    }
    let state = State {
        queue,
        buffer: VecDeque::new(),
        errors: 0,
    };
    stream::unfold(state, move |mut state| async move {
        loop {
            if let Some(delivery) = state.buffer.pop_front() {
                return Some((Ok(delivery), state));
            }
            if state.errors > 0 {
                let pause = Duration::from_millis(100)
                    .saturating_mul(1 << state.errors.min(6))
                    .min(Duration::from_secs(5));
                tokio::time::sleep(pause).await;
            }
            match state.queue.dequeue(options).await {
                Ok(batch) => {
                    state.errors = 0;
                    state.buffer.extend(batch);
                }
                Err(err) => {
                    state.errors += 1;
                    return Some((Err(err), state));
                }
            }
        }
    })
    .boxed()
}
