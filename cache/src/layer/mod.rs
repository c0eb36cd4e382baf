//! A tower middleware that memoises a service in a [`Tiered`] cache.

mod future;
mod service;

use tower_layer::Layer;

pub use self::future::ResponseFuture;
pub use self::service::CacheService;
use crate::tiered::Tiered;

/// Wraps a service in a [`CacheService`]: responses of requests that map to
/// a key are served from the cache, loaded once per key through
/// [`Tiered::get_or_load_json`] (so concurrent equal requests reach the
/// service once); requests that map to `None` pass through.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), keel_cache::BoxError> {
/// use std::convert::Infallible;
/// use keel_cache::{CacheLayer, InferenceKey, Tiered, TieredConfig};
/// use tower::{Layer, Service, ServiceExt};
///
/// #[derive(Clone)]
/// struct Completion { model: String, prompt: String, temperature: f64 }
///
/// let model = tower::service_fn(|req: Completion| async move {
///     Ok::<_, Infallible>(format!("answer to {}", req.prompt))
/// });
/// let cache = Tiered::builder(TieredConfig::new("completions")).build()?;
/// // Only deterministic requests get a key; the others pass through.
/// let layer = CacheLayer::new(cache, |req: &Completion| {
///     if req.temperature != 0.0 {
///         return None;
///     }
///     let key = InferenceKey::new(&req.model).input(&req.prompt).param("temperature", 0).ok()?;
///     Some(key.build())
/// });
/// let mut service = layer.layer(model);
/// let request = Completion { model: "m@1".into(), prompt: "hi".into(), temperature: 0.0 };
/// let answer: String = service.ready().await?.call(request).await?;
/// assert_eq!(answer, "answer to hi");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct CacheLayer<K> {
    cache: Tiered,
    key: K,
}

impl<K> CacheLayer<K> {
    /// A layer caching in `cache`, keying requests with `key` (return
    /// `None` for requests that must not be cached, such as sampled
    /// generations; see [`InferenceKey`](crate::InferenceKey)).
    pub fn new(cache: Tiered, key: K) -> Self {
        CacheLayer { cache, key }
    }
}

impl<S, K: Clone> Layer<S> for CacheLayer<K> {
    type Service = CacheService<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        CacheService::new(inner, self.cache.clone(), self.key.clone())
    }
}
