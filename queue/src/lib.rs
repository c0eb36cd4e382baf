#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod error;
mod ext;
mod ids;
mod memory;
pub mod metrics;
mod queue;
mod sharded;
mod types;

#[cfg(feature = "amqp")]
mod amqp;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "amqp")]
pub use crate::amqp::{AmqpQueue, AmqpQueueConfig, AmqpQueueType};
#[cfg(feature = "redis")]
pub use crate::redis::{RedisQueue, RedisQueueConfig};

#[cfg(feature = "chaos")]
#[cfg_attr(docsrs, doc(cfg(feature = "chaos")))]
pub mod chaos;
#[cfg(feature = "conformance")]
pub mod conformance;

pub use config::{MAX_PRIORITY_LEVELS, QueueConfig};
pub(crate) use error::Result;
pub use error::{BoxError, QueueError};
pub use ext::{CONTENT_TYPE, JSON, QueueExt, TypedDelivery, deliveries_of};
pub use memory::MemoryQueue;
pub use queue::Queue;
pub use sharded::ShardedQueue;
pub use types::{
    DeadLetter, Delivery, DequeueOptions, Enqueued, Headers, Job, JobId, MAX_LEASE, Nack, Priority,
    QueueCapabilities, QueueStats, Receipt,
};
