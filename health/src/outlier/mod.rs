//! Passive outlier detection as a tower middleware: [`OutlierLayer`] wraps
//! one endpoint's service so every completed request records its
//! [`Outcome`](crate::Outcome) and latency into that endpoint's
//! [`Recorder`](crate::Recorder).
//!
//! [`Health::discover`](crate::Health::discover) applies it for you; use the
//! layer directly when you build per-endpoint stacks yourself:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), keel_health::BoxError> {
//! use keel_health::{Endpoint, FailureKind, Health, HealthConfig, Outcome};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! let health = Health::new(HealthConfig::default())?;
//! health.insert(Endpoint::new("node-1", "10.0.0.1:8000"))?;
//! let layer = health.outlier_layer("node-1").expect("registered");
//! // Our responses are token counts, not HTTP: classify them ourselves.
//! let layer = layer.classifier(|result: &Result<usize, std::io::Error>| match result {
//!     Ok(_) => Outcome::Success,
//!     Err(_) => Outcome::failure(FailureKind::Transport),
//! });
//! let mut node = ServiceBuilder::new()
//!     .layer(layer)
//!     .service_fn(|prompt: String| async move { Ok::<_, std::io::Error>(prompt.len()) });
//! assert_eq!(node.ready().await?.call("hello".into()).await?, 5);
//! # Ok(())
//! # }
//! ```
//!
//! The response type must be classifiable: the default classifier needs
//! [`ResponseStatus`](crate::ResponseStatus) on it (`()`,
//! `http::Response<B>` with the `http` feature, or your own impl); pass a
//! closure with [`OutlierLayer::with_classifier`] for anything else. A
//! request whose future is dropped before it completes records nothing.

mod future;
mod layer;
mod service;

pub use self::future::OutlierFuture;
pub use self::layer::OutlierLayer;
pub use self::service::Outlier;
