#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod breaker;
mod classify;
mod config;
mod discover;
mod endpoint;
mod error;
pub mod metrics;
pub mod outlier;
mod probe;
mod recorder;
mod registry;

pub use breaker::{BreakerState, CircuitBreaker, CircuitBreakerLayer};
pub use classify::{
    Classify, ClassifyError, DefaultClassifier, FailureKind, Outcome, ResponseStatus,
};
pub use config::{
    ActiveConfig, BreakerConfig, BusyConfig, ClassThresholds, HealthConfig, OutlierConfig,
    SlowStartConfig,
};
pub use discover::HealthDiscover;
pub use endpoint::{Endpoint, EndpointId, EndpointStatus, HealthState, Reason, Snapshot};
pub use error::{BoxError, Error, Result};
pub use outlier::{Outlier, OutlierLayer};
#[cfg(feature = "http")]
pub use probe::HttpProbe;
pub use probe::{Probe, ProbeFn, ProbeFuture, ProbeService, probe_fn, probe_service};
pub use recorder::Recorder;
pub use registry::{Health, HealthBuilder};
