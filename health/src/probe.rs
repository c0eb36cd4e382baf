//! Active checks: the [`Probe`] trait and its adapters.
//!
//! A probe answers one question: is this endpoint alive? Give it its own
//! client (its own connections and concurrency), never the request path's
//! service, so a full endpoint's queue never fails its health check and a
//! health check never takes a slot from a request. The registry runs at
//! most `active.max_concurrent` probes at once and stops each after
//! `active.timeout`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use tower::ServiceExt;
use tower_service::Service;

use crate::endpoint::Endpoint;
use keel_core::BoxError;

/// The future a [`Probe`] returns.
pub type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'static>>;

/// Checks one endpoint. `Ok(())` passes; an error (or running past
/// `active.timeout`) fails.
///
/// Use [`probe_fn`] for an async closure, [`probe_service`] for a
/// `tower::Service<Endpoint>`, or `HttpProbe` (feature `http`).
pub trait Probe: Send + Sync + 'static {
    /// Starts one check of `endpoint`.
    fn probe(&self, endpoint: &Endpoint) -> ProbeFuture;
}

/// A [`Probe`] from an async closure; see [`probe_fn`].
#[derive(Clone)]
pub struct ProbeFn<F> {
    f: F,
}

impl<F> fmt::Debug for ProbeFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeFn").finish_non_exhaustive()
    }
}

/// A [`Probe`] from an async closure called with the endpoint.
///
/// ```
/// use keel_health::{Endpoint, probe_fn};
///
/// let probe = probe_fn(|endpoint: Endpoint| async move {
///     // Connect to endpoint.address() with a client of the probe's own.
///     let _ = endpoint.address();
///     Ok::<_, std::io::Error>(())
/// });
/// # let _ = probe;
/// ```
pub fn probe_fn<F, Fut, E>(f: F) -> ProbeFn<F>
where
    F: Fn(Endpoint) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    ProbeFn { f }
}

impl<F, Fut, E> Probe for ProbeFn<F>
where
    F: Fn(Endpoint) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    fn probe(&self, endpoint: &Endpoint) -> ProbeFuture {
        let fut = (self.f)(endpoint.clone());
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

/// A [`Probe`] from a `tower::Service<Endpoint>`; see [`probe_service`].
#[derive(Clone, Debug)]
pub struct ProbeService<S> {
    service: S,
}

/// A [`Probe`] from a `tower::Service<Endpoint>`: each check clones the
/// service, waits for it to be ready and calls it; any `Ok` response passes.
pub fn probe_service<S>(service: S) -> ProbeService<S>
where
    S: Service<Endpoint> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    ProbeService { service }
}

impl<S> Probe for ProbeService<S>
where
    S: Service<Endpoint> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    fn probe(&self, endpoint: &Endpoint) -> ProbeFuture {
        let service = self.service.clone();
        let endpoint = endpoint.clone();
        Box::pin(async move {
            service
                .oneshot(endpoint)
                .await
                .map(drop)
                .map_err(Into::into)
        })
    }
}

#[cfg(feature = "http")]
pub use self::http_probe::HttpProbe;

#[cfg(feature = "http")]
mod http_probe {
    use std::fmt;
    use std::marker::PhantomData;

    use tower::ServiceExt;
    use tower_service::Service;

    use super::{Probe, ProbeFuture};
    use crate::endpoint::Endpoint;
    use keel_core::BoxError;

    /// An HTTP probe: `GET http://{address}{path}`, passing on any 2xx.
    ///
    /// Generic over the HTTP client: give it any
    /// `tower::Service<http::Request<B>, Response = http::Response<R>>`
    /// (a hyper client, a tower-http stack), one of its own rather than the
    /// request path's. An address that already has a scheme
    /// (`https://node:8443`) is used as is.
    ///
    /// ```
    /// use keel_health::{Endpoint, HttpProbe, Probe};
    ///
    /// // Any tower service from http::Request to http::Response; here a fake.
    /// let client = tower::service_fn(|req: http::Request<()>| async move {
    ///     let status = if req.uri().path() == "/health" { 200 } else { 404 };
    ///     Ok::<_, std::io::Error>(http::Response::builder().status(status).body(()).unwrap())
    /// });
    /// let probe = HttpProbe::new(client, "/health");
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// assert!(probe.probe(&Endpoint::new("a", "10.0.0.1:8000")).await.is_ok());
    /// # });
    /// ```
    pub struct HttpProbe<S, B = ()> {
        client: S,
        path: String,
        _body: PhantomData<fn() -> B>,
    }

    impl<S: Clone, B> Clone for HttpProbe<S, B> {
        fn clone(&self) -> Self {
            HttpProbe {
                client: self.client.clone(),
                path: self.path.clone(),
                _body: PhantomData,
            }
        }
    }

    impl<S, B> fmt::Debug for HttpProbe<S, B> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("HttpProbe")
                .field("path", &self.path)
                .finish_non_exhaustive()
        }
    }

    impl<S, B> HttpProbe<S, B> {
        /// A probe that GETs `path` (for example `"/health"`) with `client`.
        pub fn new(client: S, path: impl Into<String>) -> Self {
            let mut path = path.into();
            if !path.starts_with('/') {
                path.insert(0, '/');
            }
            HttpProbe {
                client,
                path,
                _body: PhantomData,
            }
        }

        fn uri(&self, endpoint: &Endpoint) -> String {
            let address = endpoint.address().trim_end_matches('/');
            if address.contains("://") {
                format!("{address}{}", self.path)
            } else {
                format!("http://{address}{}", self.path)
            }
        }
    }

    /// Why an HTTP probe failed on a non-2xx answer.
    #[derive(Debug)]
    struct BadStatus(u16);

    impl fmt::Display for BadStatus {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "health check answered HTTP {}", self.0)
        }
    }

    impl std::error::Error for BadStatus {}

    impl<S, B, R> Probe for HttpProbe<S, B>
    where
        S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + Sync + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
        B: Default + Send + 'static,
        R: 'static,
    {
        fn probe(&self, endpoint: &Endpoint) -> ProbeFuture {
            let client = self.client.clone();
            let request = http::Request::get(self.uri(endpoint)).body(B::default());
            Box::pin(async move {
                let request = request?;
                let response = client.oneshot(request).await.map_err(Into::into)?;
                let status = response.status();
                if status.is_success() {
                    Ok(())
                } else {
                    Err(BadStatus(status.as_u16()).into())
                }
            })
        }
    }
}
