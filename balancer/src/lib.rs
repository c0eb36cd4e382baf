#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod balance;
mod classify;
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

pub use balance::{Balancer, BalancerBuilder, LoadReports, ResponseFuture, Weights};
pub use classify::{Classify, DefaultClassifier, HttpClassifier, Outcome};
pub use config::{BalancerConfig, HashConfig, Policy, PrefixConfig};
pub use deadline::DeadlineLayer;
pub use endpoint::{EndpointId, EndpointSnapshot, Handle, LoadReport};
pub use error::{BoxError, Error, GiveUp, Result};
pub use request::{AffinityKey, AvoidEndpoints, Deadline, Prompt, RequestExtensions};
