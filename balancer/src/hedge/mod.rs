//! Hedged requests: when the first copy is slower than a latency percentile,
//! send one more copy to another endpoint, take whichever answers first and
//! cancel the other. Hedges are budgeted like retries.
//!
//! tower has a [`Hedge`](https://docs.rs/tower/latest/tower/hedge/struct.Hedge.html) middleware; Keel writes its
//! own because tower's has no budget (a slow fleet doubles its own load),
//! cannot send the copy away from the endpoint of the first one (it clones
//! the request before the first copy is dispatched), and does not honour a
//! deadline.
//!
//! ```
//! use std::time::Duration;
//! use keel_balancer::{Balancer, Policy};
//! use keel_balancer::hedge::{HedgeConfig, HedgeLayer};
//! use tower::{Layer, ServiceExt};
//! use tower::discover::ServiceList;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keel_balancer::BalancerError> {
//! let nodes: Vec<_> = (0..2)
//!     .map(|n| tower::service_fn(move |_: http::Request<()>| async move { Ok::<_, std::io::Error>(n) }))
//!     .collect();
//! let balancer = Balancer::builder().policy(Policy::PeakEwma).build(ServiceList::new(nodes))?;
//! let hedged = HedgeLayer::new(HedgeConfig::default().percentile(0.9))?.layer(balancer);
//! let answer = hedged.oneshot(http::Request::new(())).await?;
//! assert!(answer < 2);
//! # Ok(())
//! # }
//! ```

mod config;
mod future;
mod layer;
mod service;

pub use config::HedgeConfig;
pub use future::HedgeFuture;
pub use layer::HedgeLayer;
pub use service::Hedge;
