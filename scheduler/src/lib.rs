#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod admission;
mod batch;
mod error;
mod future;
mod layer;
pub mod metrics;
mod rate;
mod service;
mod ticket;
mod worker;

pub use admission::{
    AimdConfig, ClassConfig, ConcurrencyConfig, Scheduler, SchedulerBuilder, SchedulerConfig,
    SchedulerStats, SheddingConfig, TenantConfig,
};
pub use batch::{BatchConfig, BatchFuture, Batcher};
pub use error::{BoxError, Rejection, SchedulerError};
pub use future::AdmissionFuture;
pub use keel_queue::Priority;
pub use layer::AdmissionLayer;
pub use rate::{LocalRateLimiter, Rate, RateDecision, RateLimit, RateLimitConfig, TenantRates};
#[cfg(feature = "redis")]
pub use rate::{RedisRateLimitConfig, RedisRateLimiter};
pub use service::Admission;
pub use ticket::{TenantId, Ticket};
pub use worker::{
    JobOutcome, JsonJobs, ShutdownReport, TypedItem, WorkItem, Worker, WorkerConfig, WorkerHandle,
    WorkerHealth, WorkerState, WorkerStats, json_jobs,
};
