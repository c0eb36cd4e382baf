//! Retries bounded by a budget, with full-jitter backoff, never to the
//! endpoint that just failed and never past the request's deadline.
//!
//! The layer is tower's own [`tower::retry::Retry`] driven by Keel's
//! [`RetryPolicy`]; what tower lacks and Keel adds is the policy: the
//! whole-number [`RetryBudget`], full jitter through keel-core's
//! [`Backoff`] (tower's
//! [`ExponentialBackoff`](tower::retry::backoff::ExponentialBackoff) adds
//! jitter on top of the exponential delay instead of drawing the whole
//! delay at random), [`Deadline`](crate::Deadline) checks,
//! [`AvoidEndpoints`](crate::AvoidEndpoints), and the error wrapping that
//! keeps outer layers from multiplying attempts.
//!
//! ## Why a budget
//!
//! "Retry three times" quadruples the load on a fleet exactly when it is
//! failing, and stacked layers multiply it (retry storms of 12× are
//! reported by the inference routers Keel learned from). A budget allows
//! retries only as a fraction of live traffic plus a small floor: when a few
//! requests fail, each is retried; when everything fails, attempts per
//! request stay near `1 + ratio`.
//!
//! ```
//! use std::time::Duration;
//! use keel_balancer::{Balancer, Deadline, Policy};
//! use keel_balancer::retry::{RetryConfig, RetryLayer};
//! use tower::{Layer, ServiceExt};
//! use tower::discover::ServiceList;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keel_balancer::BalancerError> {
//! // Endpoint 0 is down; endpoint 1 answers.
//! let nodes: Vec<_> = (0..2)
//!     .map(|n| {
//!         tower::service_fn(move |_: http::Request<()>| async move {
//!             if n == 0 { Err(std::io::Error::other("down")) } else { Ok("ok") }
//!         })
//!     })
//!     .collect();
//! let balancer = Balancer::builder().policy(Policy::RoundRobin).build(ServiceList::new(nodes))?;
//! let client = RetryLayer::new(RetryConfig::default())?.layer(balancer);
//! for _ in 0..4 {
//!     let mut request = http::Request::new(());
//!     Deadline::after(Duration::from_secs(1)).apply(&mut request);
//!     assert_eq!(client.clone().oneshot(request).await?, "ok");
//! }
//! # Ok(())
//! # }
//! ```

mod layer;
mod policy;

/// The retry budget and backoff, from [`keel_core`] (one definition for
/// every Keel crate).
pub use keel_core::{Backoff, BudgetConfig, BudgetStats, Jitter, RetryBudget};
pub use layer::RetryLayer;
pub use policy::{RetryConfig, RetryPolicy};
