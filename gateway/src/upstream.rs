//! One upstream server as a `tower::Service`: the gateway's request, sent
//! to the upstream's base URL over a pooled HTTP/1 client.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keel_core::BoxError;

/// The HTTP client every upstream of a gateway shares (one connection pool).
#[derive(Clone, Debug)]
pub struct HttpClient(Client<HttpConnector, Full<Bytes>>);

impl HttpClient {
    /// A pooled HTTP/1 client: connections kept alive 90 s idle, TCP
    /// no-delay, connect timeout `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector);
        HttpClient(client)
    }
}

/// One upstream: forwards `http::Request<Bytes>` to the same path on its
/// base URL. The response body streams (SSE passes through chunk by
/// chunk); dropping it closes the upstream connection, which is how a
/// client that goes away cancels the upstream request.
#[derive(Clone, Debug)]
pub struct Upstream {
    authority: Authority,
    client: HttpClient,
}

impl Upstream {
    /// The upstream at `base_url` (`http://host:port`).
    ///
    /// # Errors
    ///
    /// When `base_url` is not an `http://host:port` URL.
    pub fn new(base_url: &str, client: HttpClient) -> Result<Self, BoxError> {
        let uri: http::Uri = base_url.parse()?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(format!("`{base_url}` is not an http:// URL").into());
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{base_url}` has no host"))?;
        Ok(Upstream { authority, client })
    }

    /// `host:port`.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// `GET path` on this upstream, its body parsed as JSON, all within
    /// `timeout`.
    ///
    /// # Errors
    ///
    /// When the upstream does not answer within `timeout`, answers with a
    /// status other than 2xx, or with a body that is not JSON.
    pub async fn get_json(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value, BoxError> {
        let uri = http::Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()?;
        let request = http::Request::get(uri).body(Full::new(Bytes::new()))?;
        let fetch = async {
            let response = self.client.0.request(request).await?;
            let status = response.status();
            let body = http_body_util::BodyExt::collect(response.into_body()).await?;
            if !status.is_success() {
                return Err(format!("{} answered {status} to GET {path}", self.authority).into());
            }
            Ok::<_, BoxError>(serde_json::from_slice(&body.to_bytes())?)
        };
        tokio::time::timeout(timeout, fetch).await.map_err(|_| {
            format!(
                "{} did not answer GET {path} within {timeout:?}",
                self.authority
            )
        })?
    }
}

impl tower::Service<http::Request<Bytes>> for Upstream {
    type Response = http::Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Bytes>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let uri = http::Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path)
            .build();
        let client = self.client.0.clone();
        Box::pin(async move {
            parts.uri = uri?;
            parts.headers.remove(http::header::HOST);
            // Our own extensions stay here; the upstream sees headers only.
            let request = http::Request::from_parts(parts, Full::new(body));
            Ok(client.request(request).await?)
        })
    }
}
