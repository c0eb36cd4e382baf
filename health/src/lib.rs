#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod breaker;
mod config;
mod discover;
mod endpoint;
mod error;
mod machine;
pub mod metrics;
pub mod outlier;
mod probe;
mod recorder;
mod registry;

pub use breaker::{BreakerState, CircuitBreaker, CircuitBreakerLayer};
pub use config::{
    ActiveConfig, BreakerConfig, BusyConfig, ClassThresholds, HealthConfig, OutlierConfig,
    SlowStartConfig,
};
pub use discover::HealthDiscover;
pub use endpoint::{Endpoint, EndpointStatus, HealthState, Reason, Snapshot};
pub use error::HealthError;
// The shared vocabulary, re-exported from `keel-core` (defined there once,
// so health, the balancer and the gateway cannot disagree): endpoint ids
// with their live weight, capacity and reporter, outcome classification,
// and the error vocabulary.
pub use keel_core::{
    ArgumentError, BoxError, Classify, ClassifyError, ConfigError, DefaultClassifier, EndpointId,
    EndpointKey, ErrorKind, FailureKind, KeelError, Outcome, ResponseStatus, ResultClassifier,
};
pub use outlier::{Outlier, OutlierLayer};
#[cfg(feature = "http")]
pub use probe::HttpProbe;
pub use probe::{Probe, ProbeFn, ProbeFuture, ProbeService, probe_fn, probe_service};
pub use recorder::Recorder;
pub use registry::{Health, HealthBuilder};
