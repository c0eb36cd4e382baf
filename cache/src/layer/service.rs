//! The service [`CacheLayer`](super::CacheLayer) produces.

use std::fmt;
use std::task::{Context, Poll};

use futures::FutureExt;
use tower_service::Service;

use super::future::CacheFuture;
use crate::codec::Codec;
use crate::error::BoxError;
use crate::tiered::Tiered;

/// Memoises the inner service's responses in a [`Tiered`] cache; see
/// [`CacheLayer`](super::CacheLayer).
///
/// # Readiness
///
/// `poll_ready` is always ready: a cache hit needs nothing from the inner
/// service. A miss clones the inner service and waits for its readiness
/// inside the load, so backpressure still applies to the requests that
/// reach it.
///
/// # Errors
///
/// A request that passes through (its key is `None`) fails with the inner
/// service's error unchanged (boxed). A cached request fails with a boxed
/// [`LoadFailed<ServiceError>`](crate::LoadFailed): its
/// [`Loader`](crate::LoadFailed::Loader) variant carries the inner
/// service's error (every coalesced caller gets the same one), its
/// [`Cached`](crate::LoadFailed::Cached) variant a remembered one, its
/// [`Cache`](crate::LoadFailed::Cache) variant the cache's own error
/// (a load timeout, a codec error). [`keel_core::kind_of`] finds the kind
/// of any of them through the source chain.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), keel_cache::BoxError> {
/// use bytes::Bytes;
/// use keel_cache::{BytesCodec, CacheLayer, LoadFailed, ServiceError, Tiered, TieredConfig};
/// use tower::{Layer, ServiceExt};
///
/// let failing = tower::service_fn(|_: String| async {
///     Err::<Bytes, _>(std::io::Error::other("node down"))
/// });
/// let cache = Tiered::builder(TieredConfig::new("layer")).build()?;
/// let service = CacheLayer::new(cache, |p: &String| Some(p.clone()), BytesCodec).layer(failing);
/// let err = service.oneshot("k".to_owned()).await.unwrap_err();
/// let failed = err.downcast_ref::<LoadFailed<ServiceError>>().expect("a cached request");
/// let io = failed.loader_error().and_then(|e| e.get_ref().downcast_ref::<std::io::Error>());
/// assert_eq!(io.map(|e| e.to_string()), Some("node down".to_owned()));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct CacheService<S, K, C> {
    inner: S,
    cache: Tiered,
    key: K,
    codec: C,
}

impl<S, K, C> CacheService<S, K, C> {
    /// Wraps `inner`.
    pub fn new(inner: S, cache: Tiered, key: K, codec: C) -> Self {
        CacheService {
            inner,
            cache,
            key,
            codec,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// The inner service's error as a cached request reports it, inside
/// [`LoadFailed::Loader`](crate::LoadFailed::Loader) (tower services fail
/// with a `BoxError`, which is not itself a `std::error::Error`).
///
/// Its source is the inner error, so [`keel_core::kind_of`] and error
/// reporters see through it.
#[derive(Debug)]
pub struct ServiceError(BoxError);

impl ServiceError {
    /// The inner service's error; downcast it to its type.
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.0.as_ref()
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the cached service failed")
    }
}

impl std::error::Error for ServiceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

async fn call_inner<S, Req>(mut inner: S, request: Req) -> Result<S::Response, BoxError>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    futures::future::poll_fn(|cx| inner.poll_ready(cx))
        .await
        .map_err(Into::into)?;
    inner.call(request).await.map_err(Into::into)
}

impl<S, K, C, Req> Service<Req> for CacheService<S, K, C>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    S::Error: Into<BoxError>,
    K: Fn(&Req) -> Option<String>,
    C: Codec<S::Response>,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = CacheFuture<S::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let inner = self.inner.clone();
        let Some(key) = (self.key)(&request) else {
            return CacheFuture::new(call_inner(inner, request).boxed());
        };
        let cache = self.cache.clone();
        let codec = self.codec.clone();
        CacheFuture::new(
            async move {
                let load =
                    move || async move { call_inner(inner, request).await.map_err(ServiceError) };
                cache
                    .get_or_load_with_codec(&key, &codec, load)
                    .await
                    .map_err(BoxError::from)
            }
            .boxed(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use tower::{Layer, ServiceExt};

    use super::super::CacheLayer;
    use super::ServiceError;
    use crate::codec::{BytesCodec, HttpCodec, JsonCodec};
    use crate::error::{CacheError, LoadFailed};
    use crate::tiered::{Tiered, TieredConfig};
    use crate::{Cache, MokaCache};

    /// A cache over a moka L2 the test can read.
    fn cache() -> (Tiered, Arc<MokaCache>) {
        let l2 = Arc::new(MokaCache::new(Default::default()).unwrap());
        let cache = Tiered::builder(TieredConfig::new("layer"))
            .l2(l2.clone())
            .build()
            .unwrap();
        (cache, l2)
    }

    #[tokio::test(start_paused = true)]
    async fn memoises_keyed_requests_and_passes_the_others() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let model = tower::service_fn(move |prompt: String| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok::<_, Infallible>(prompt.to_uppercase())
            }
        });
        let (cache, _) = cache();
        let service = CacheLayer::new(
            cache,
            |prompt: &String| (!prompt.starts_with("nocache")).then(|| format!("p:{prompt}")),
            JsonCodec,
        )
        .layer(model);

        let mut concurrent = Vec::new();
        for _ in 0..10 {
            concurrent.push(tokio::spawn(service.clone().oneshot("hello".to_owned())));
        }
        for task in concurrent {
            assert_eq!(task.await.unwrap().unwrap(), "HELLO");
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "ten equal requests, one call"
        );
        assert_eq!(
            service.clone().oneshot("hello".into()).await.unwrap(),
            "HELLO"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        for _ in 0..2 {
            service.clone().oneshot("nocache me".into()).await.unwrap();
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "unkeyed requests pass through"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_responses_are_stored_as_they_are() {
        let body = Bytes::from_static(b"\x00\x01\xff raw body, not a JSON array");
        let answer = body.clone();
        let model = tower::service_fn(move |_: String| {
            let answer = answer.clone();
            async move { Ok::<_, Infallible>(answer) }
        });
        let (cache, _) = cache();
        let service =
            CacheLayer::new(cache.clone(), |p: &String| Some(p.clone()), BytesCodec).layer(model);
        assert_eq!(service.clone().oneshot("k".into()).await.unwrap(), body);
        // The cache holds exactly the body's bytes.
        assert_eq!(cache.get("k").await.unwrap(), Some(body.clone()));
        cache.flush_l1();
        assert_eq!(service.oneshot("k".into()).await.unwrap(), body);
    }

    #[tokio::test(start_paused = true)]
    async fn http_responses_round_trip_and_errors_are_not_stored() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let model = tower::service_fn(move |path: String| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                let status = if path == "/busy" { 503 } else { 200 };
                let response = http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .header("x-node", "n1")
                    .header("set-cookie", "session=one-client-only")
                    .body(Bytes::from(format!("{{\"path\":\"{path}\"}}")))
                    .unwrap();
                Ok::<_, Infallible>(response)
            }
        });
        let (cache, l2) = cache();
        let service =
            CacheLayer::new(cache.clone(), |p: &String| Some(p.clone()), HttpCodec).layer(model);

        let first = service.clone().oneshot("/ok".into()).await.unwrap();
        assert_eq!(first.status(), 200);
        assert!(
            first.headers().get("set-cookie").is_none(),
            "the loading caller gets what the cache keeps"
        );
        cache.flush_l1();
        let again = service.clone().oneshot("/ok".into()).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "served from L2");
        assert_eq!(again.status(), 200);
        assert_eq!(again.headers()["content-type"], "application/json");
        assert_eq!(again.headers()["x-node"], "n1");
        assert_eq!(again.body(), &Bytes::from_static(b"{\"path\":\"/ok\"}"));
        assert!(l2.get("/ok").await.unwrap().is_some());

        for _ in 0..2 {
            let busy = service.clone().oneshot("/busy".into()).await.unwrap();
            assert_eq!(busy.status(), 503);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3, "a 503 is never cached");
        assert_eq!(cache.get("/busy").await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn inner_errors_reach_the_caller_typed() {
        let failing = tower::service_fn(|_: String| async {
            Err::<Bytes, _>(std::io::Error::other("backend down"))
        });
        let (cache, _) = cache();
        let service = CacheLayer::new(
            cache,
            |p: &String| (p != "raw").then(|| p.clone()),
            BytesCodec,
        )
        .layer(failing);
        let err = service.clone().oneshot("k".into()).await.unwrap_err();
        let failed = err
            .downcast_ref::<LoadFailed<ServiceError>>()
            .expect("a load failure");
        let io = failed
            .loader_error()
            .and_then(|e| e.get_ref().downcast_ref::<std::io::Error>())
            .expect("the inner error, typed");
        assert_eq!(io.to_string(), "backend down");
        assert_eq!(
            keel_core::kind_of(err.as_ref()),
            keel_core::ErrorKind::Upstream
        );
        let raw = service.oneshot("raw".into()).await.unwrap_err();
        assert!(
            raw.downcast::<std::io::Error>().is_ok(),
            "passes through unchanged"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn undecodable_cached_bytes_are_a_cache_error() {
        let model = tower::service_fn(|_: String| async { Ok::<_, Infallible>(vec![1u32]) });
        let (cache, _) = cache();
        cache
            .set("k", "not json".into(), Duration::from_secs(60))
            .await
            .unwrap();
        let service = CacheLayer::new(cache, |p: &String| Some(p.clone()), JsonCodec).layer(model);
        let err = service.oneshot("k".into()).await.unwrap_err();
        let failed = err.downcast_ref::<LoadFailed<ServiceError>>().unwrap();
        assert!(
            matches!(failed.cache_error(), Some(CacheError::Codec { .. })),
            "{failed:?}"
        );
    }
}
