//! The service [`CacheLayer`](super::CacheLayer) produces.

use std::task::{Context, Poll};

use futures::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tower_service::Service;

use super::future::ResponseFuture;
use crate::error::{BoxError, LoadError};
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
/// service's error unchanged (boxed). A cached request fails with a
/// [`crate::Error`] (boxed): [`Load`](crate::Error::Load) carries the inner
/// error as its source, and coalesced callers all see it.
#[derive(Clone, Debug)]
pub struct CacheService<S, K> {
    inner: S,
    cache: Tiered,
    key: K,
}

impl<S, K> CacheService<S, K> {
    /// Wraps `inner`.
    pub fn new(inner: S, cache: Tiered, key: K) -> Self {
        CacheService { inner, cache, key }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
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

impl<S, K, Req> Service<Req> for CacheService<S, K>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Serialize + DeserializeOwned + Send + 'static,
    S::Error: Into<BoxError>,
    K: Fn(&Req) -> Option<String>,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let inner = self.inner.clone();
        let Some(key) = (self.key)(&request) else {
            return ResponseFuture::new(call_inner(inner, request).boxed());
        };
        let cache = self.cache.clone();
        ResponseFuture::new(
            async move {
                let loader = move || async move {
                    call_inner(inner, request).await.map_err(LoadError::boxed)
                };
                cache
                    .get_or_load_json(&key, loader)
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

    use tower::{Layer, ServiceExt};

    use super::super::CacheLayer;
    use crate::tiered::{Tiered, TieredConfig};

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
        let cache = Tiered::builder(TieredConfig::new("layer")).build().unwrap();
        let service = CacheLayer::new(cache, |prompt: &String| {
            (!prompt.starts_with("nocache")).then(|| format!("p:{prompt}"))
        })
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
    async fn inner_errors_reach_the_caller() {
        let failing = tower::service_fn(|_: String| async {
            Err::<String, _>(std::io::Error::other("backend down"))
        });
        let cache = Tiered::builder(TieredConfig::new("layer")).build().unwrap();
        let service =
            CacheLayer::new(cache, |p: &String| (p != "raw").then(|| p.clone())).layer(failing);
        let err = service.clone().oneshot("k".into()).await.unwrap_err();
        let err = err.downcast::<crate::Error>().expect("a cache error");
        assert!(
            matches!(*err, crate::Error::Load { cached: false, .. }),
            "{err:?}"
        );
        let raw = service.oneshot("raw".into()).await.unwrap_err();
        assert!(
            raw.downcast::<std::io::Error>().is_ok(),
            "passes through unchanged"
        );
    }
}
