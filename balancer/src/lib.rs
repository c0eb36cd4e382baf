#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod balance;
mod completion;
mod config;
pub mod deadline;
mod endpoint;
mod error;
pub mod hedge;
pub mod metrics;
mod policy;
mod request;
pub mod retry;
#[cfg(feature = "sim")]
#[cfg_attr(docsrs, doc(cfg(feature = "sim")))]
pub mod sim;

pub use balance::{BalanceFuture, Balancer, BalancerBuilder, LoadReports};
pub use completion::ReportCachedPrefix;
pub use config::{BalancerConfig, HashConfig, Policy, PrefixConfig};
pub use deadline::DeadlineLayer;
pub use endpoint::{EndpointIndex, EndpointSnapshot, Handle, LoadReport};
pub use error::{BalancerError, GiveUp};
/// The shared vocabulary the balancer speaks, re-exported from
/// [`keel_core`] (defined there once, for every Keel crate).
pub use keel_core::{
    BoxError, Classify, Deadline, DefaultClassifier, EndpointKey, FailureKind, Outcome,
    RequestExtensions, ResultClassifier,
};
pub use policy::{Candidate, Candidates, Pick};
pub use request::{AffinityKey, AvoidEndpoints, Prompt};
