//! A tower middleware that memoises a service in a [`Tiered`] cache.

mod future;
mod service;

use tower_layer::Layer;

pub use self::future::CacheFuture;
pub use self::service::{CacheService, ServiceError};
use crate::tiered::Tiered;

/// Wraps a service in a [`CacheService`]: responses of requests that map to
/// a key are served from the cache, loaded once per key through
/// [`Tiered::get_or_load_with_codec`] (so concurrent equal requests reach
/// the service once) and stored as `codec` encodes them; requests that map
/// to `None` pass through.
///
/// The codec fits the response type: [`BytesCodec`](crate::BytesCodec)
/// stores a `Bytes` body as it is, [`HttpCodec`](crate::HttpCodec) an
/// `http::Response` (status, headers worth keeping, body; only successful
/// responses are stored), [`JsonCodec`](crate::JsonCodec) any serde type.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), keel_cache::BoxError> {
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use keel_cache::{BytesCodec, CacheLayer, InferenceKey, Tiered, TieredConfig};
/// use tower::{Layer, Service, ServiceExt};
///
/// #[derive(Clone)]
/// struct Completion { model: String, prompt: String, temperature: f64 }
///
/// let model = tower::service_fn(|req: Completion| async move {
///     Ok::<_, Infallible>(Bytes::from(format!("answer to {}", req.prompt)))
/// });
/// let cache = Tiered::builder(TieredConfig::new("completions")).build()?;
/// // Only deterministic requests get a key; the others pass through.
/// let layer = CacheLayer::new(cache.clone(), |req: &Completion| {
///     if req.temperature != 0.0 {
///         return None;
///     }
///     let key = InferenceKey::new(&req.model).input(&req.prompt).param("temperature", 0).ok()?;
///     Some(key.build())
/// }, BytesCodec);
/// let mut service = layer.layer(model);
/// let request = Completion { model: "m@1".into(), prompt: "hi".into(), temperature: 0.0 };
/// let answer: Bytes = service.ready().await?.call(request).await?;
/// assert_eq!(answer, "answer to hi");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct CacheLayer<K, C> {
    cache: Tiered,
    key: K,
    codec: C,
}

impl<K, C> CacheLayer<K, C> {
    /// A layer caching in `cache`, keying requests with `key` (return
    /// `None` for requests that must not be cached, such as sampled
    /// generations; see [`InferenceKey`](crate::InferenceKey)), storing
    /// responses as `codec` encodes them.
    pub fn new(cache: Tiered, key: K, codec: C) -> Self {
        CacheLayer { cache, key, codec }
    }
}

impl<S, K: Clone, C: Clone> Layer<S> for CacheLayer<K, C> {
    type Service = CacheService<S, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CacheService::new(
            inner,
            self.cache.clone(),
            self.key.clone(),
            self.codec.clone(),
        )
    }
}
