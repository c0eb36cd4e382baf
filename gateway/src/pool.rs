//! One model's pool of upstreams: keel-health (active probes, passive
//! outlier ejection, slow start) feeding a keel-balancer (peak-EWMA P2C,
//! per-upstream slots, busy answers routed around) behind budgeted retries.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use hyper::body::Incoming;
use keel_balancer::retry::{RetryConfig, RetryLayer, RetryPolicy};
use keel_balancer::{Balancer, DefaultClassifier, Handle};
use keel_core::{BudgetConfig, ConfigError, EndpointId};
use keel_health::{
    ActiveConfig, Endpoint, Health, HealthConfig, HttpProbe, Outlier, OutlierConfig,
};
use pin_project_lite::pin_project;
use tower::Layer;
use tower::load::TrackCompletion;

use crate::config::{GatewayConfig, ModelConfig};
use crate::upstream::{HttpClient, Upstream};

/// The body of an upstream answer while the balancer still counts the
/// request as outstanding: the slot is freed when the body ends or is
/// dropped, not when the headers arrive.
pub type UpstreamBody = Held<Incoming>;

/// The response the pool's service answers with.
pub type UpstreamResponse = http::Response<UpstreamBody>;

pin_project! {
    /// A body that holds the balancer's [`Handle`] until it ends (or is
    /// dropped), so a streamed answer counts as outstanding to its end,
    /// while its latency sample (what peak-EWMA routes by) is its time to
    /// first token, or its longest stall between two chunks where that is
    /// longer ([`Handle::mark_progress`]).
    pub struct Held<B> {
        #[pin]
        body: B,
        handle: Option<Handle>,
    }
}

impl<B: Body> Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        match &polled {
            // A chunk: the first ends the upstream's latency sample (time to
            // first token for a stream); a later one that comes after a
            // longer stall raises it (inter-token latency). The slot stays
            // taken.
            Poll::Ready(Some(Ok(_))) => {
                if let Some(handle) = this.handle.as_mut() {
                    handle.mark_progress();
                }
            }
            // Cut mid-way: the upstream failed (health hears of it).
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut handle) = this.handle.take() {
                    handle.mark_failed();
                }
            }
            // Finished: free the slot now.
            Poll::Ready(None) => {
                this.handle.take();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Moves the balancer's handle into the response body.
#[derive(Clone, Copy, Debug, Default)]
pub struct HoldUntilBodyEnds;

impl<B> TrackCompletion<Handle, http::Response<B>> for HoldUntilBodyEnds {
    type Output = http::Response<Held<B>>;

    fn track_completion(&self, handle: Handle, response: http::Response<B>) -> Self::Output {
        response.map(|body| Held {
            body,
            handle: Some(handle),
        })
    }
}

/// The per-model service: retries over the balancer over health-checked
/// upstreams.
pub type PoolService = tower::retry::Retry<
    RetryPolicy,
    Balancer<
        EndpointId,
        Outlier<Upstream, DefaultClassifier>,
        DefaultClassifier,
        HoldUntilBodyEnds,
    >,
>;

/// One model's upstreams and the stack in front of them.
#[derive(Clone, Debug)]
pub struct ModelPool {
    /// The model's name at the gateway.
    pub name: String,
    /// Its name upstream.
    pub upstream_model: String,
    /// Whether chat/completions at temperature 0 may be cached.
    pub cache_deterministic: bool,
    /// Health of its upstreams.
    pub health: Health,
    /// The routed, retried service.
    pub service: PoolService,
    /// The client its upstreams share (for `/v1/models`).
    client: HttpClient,
}

impl std::fmt::Debug for Held<Incoming> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").finish_non_exhaustive()
    }
}

impl ModelPool {
    /// Builds the pool and starts probing its upstreams.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming a bad field.
    pub fn start(
        gateway: &GatewayConfig,
        model: &ModelConfig,
        client: &HttpClient,
    ) -> Result<ModelPool, ConfigError> {
        let probe_client = Upstream::new(&model.upstreams[0], client.clone())
            .map_err(|err| ConfigError::new("models[].upstreams", err.to_string()))?;
        let health = Health::builder(
            HealthConfig::new(format!("model-{}", model.name))
                .active(
                    ActiveConfig::default()
                        .interval(gateway.probe_interval)
                        .unhealthy_interval(gateway.probe_interval)
                        .timeout(gateway.probe_interval.min(Duration::from_secs(2))),
                )
                .outlier(
                    OutlierConfig::default()
                        .consecutive_failures(Some(3))
                        .ejection(gateway.ejection_time, gateway.ejection_time * 10),
                ),
        )
        .probe(HttpProbe::new(probe_client, model.health_path.clone()))
        .build()
        .map_err(|err| ConfigError::new("models[]", err.to_string()))?;
        for url in &model.upstreams {
            health
                .insert(Endpoint::new(url.as_str(), url.as_str()).capacity(model.slots))
                .map_err(|err| ConfigError::new("models[].upstreams", err.to_string()))?;
        }
        let make_client = client.clone();
        let discover = health.discover_with(
            move |endpoint: &Endpoint| {
                Upstream::new(endpoint.address(), make_client.clone())
                    .expect("upstream URLs are validated with the config")
            },
            DefaultClassifier,
        );
        let balancer = Balancer::builder()
            .name(model.name.clone())
            .policy(model.policy.clone())
            .max_outstanding_per_endpoint(model.slots)
            .max_wait(Duration::from_millis(500))
            .classifier(DefaultClassifier)
            .track_completion(HoldUntilBodyEnds)
            .build(discover)
            .map_err(|err| ConfigError::new("models[]", err.to_string()))?;
        let retry = RetryLayer::new(
            RetryConfig::default()
                .name(model.name.clone())
                .budget(BudgetConfig::default().ratio(gateway.retry_ratio)),
        )
        .map_err(|err| ConfigError::new("retry_ratio", err.to_string()))?;
        Ok(ModelPool {
            name: model.name.clone(),
            upstream_model: model
                .upstream_model
                .clone()
                .unwrap_or_else(|| model.name.clone()),
            cache_deterministic: model.cache_deterministic,
            health,
            service: retry.layer(balancer),
            client: client.clone(),
        })
    }

    /// This model's `/v1/models` entry: what an upstream in rotation says
    /// of the upstream model (`created`, `owned_by`, `max_model_len`, …)
    /// under the gateway's name. When no upstream is in rotation, or the
    /// one asked does not answer within `timeout` or does not list the
    /// model, the entry holds the name only (`owned_by: keel-gateway`).
    pub async fn describe(&self, timeout: Duration) -> serde_json::Value {
        let mut entry = serde_json::json!({
            "id": self.name,
            "object": "model",
            "owned_by": "keel-gateway",
        });
        let upstream = self
            .health
            .snapshot()
            .iter()
            .filter(|status| status.state.is_in_rotation())
            .find_map(|status| Upstream::new(status.endpoint.address(), self.client.clone()).ok());
        let Some(upstream) = upstream else {
            return entry;
        };
        match upstream.get_json("/v1/models", timeout).await {
            Ok(listing) => {
                let found = listing["data"].as_array().and_then(|models| {
                    models
                        .iter()
                        .find(|model| model["id"].as_str() == Some(self.upstream_model.as_str()))
                });
                if let (Some(serde_json::Value::Object(fields)), Some(merged)) =
                    (found, entry.as_object_mut())
                {
                    for (field, value) in fields {
                        if field != "id" {
                            merged.insert(field.clone(), value.clone());
                        }
                    }
                }
            }
            Err(err) => {
                tracing::debug!(model = %self.name, error = %err, "upstream model listing failed");
            }
        }
        entry
    }

    /// Whether at least one upstream is in rotation.
    pub fn ready(&self) -> bool {
        self.health
            .snapshot()
            .iter()
            .any(|status| status.state.is_in_rotation())
    }
}

/// A body type both halves of the gateway pass around.
pub type GatewayBody = Bytes;
