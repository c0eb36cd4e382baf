//! [`AdmissionLayer`]: admission in front of any service.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use tower::{Layer, Service};

use crate::admission::{SchedulerBuilder, SchedulerConfig};
use crate::error::{BoxError, Result};
use crate::rate::RateLimit;
use crate::service::{Admission, Classify};
use crate::ticket::Ticket;

/// Puts an admission [`Scheduler`](crate::Scheduler) in front of a service: every request is
/// classified into a [`Ticket`] (tenant, priority, deadline, cost), then
/// rate limited, queued in order and dispatched, or answered with a
/// rejection or an expiry. See [`Scheduler`](crate::Scheduler) for the guarantees.
///
/// Requests carry [`http::Extensions`] ([`keel_core::RequestExtensions`]:
/// `http::Request`, or a type of yours with one field): the
/// [`Deadline`](keel_core::Deadline) a request carries is read for expiry
/// and earliest-deadline ordering, merged with the ticket's and the
/// scheduler's [`request_timeout`](crate::SchedulerConfig::request_timeout)
/// (counted from the call, so queueing time counts), and set on the request
/// handed to the inner service, so retries and the balancer below enforce
/// the same instant. Put timeouts here, not in a deadline layer below
/// admission, whose clock would only start once the request left the queue.
///
/// The layered service is always ready: overload is answered per request (a
/// [`Rejection`](crate::Rejection) or
/// [`DeadlineExceeded`](crate::SchedulerError::DeadlineExceeded) boxed in the
/// error, downcast it to [`SchedulerError`](crate::SchedulerError)), never by
/// holding callers in `poll_ready`. The inner service's own errors come
/// through unchanged.
///
/// ```
/// use std::time::Duration;
/// use keel_scheduler::{AdmissionLayer, SchedulerConfig, Ticket};
/// use tower::{ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// // The tenant comes from a header; every request gets 30 s from the call.
/// let config = SchedulerConfig::new("gateway").request_timeout(Duration::from_secs(30));
/// let admission = AdmissionLayer::new(config, |request: &http::Request<String>| {
///     let tenant = request.headers().get("x-tenant").and_then(|v| v.to_str().ok());
///     Ticket::new(tenant.unwrap_or("anonymous"))
/// })?;
/// let service = ServiceBuilder::new()
///     .layer(admission)
///     .service_fn(|request: http::Request<String>| async move {
///         assert!(keel_core::Deadline::of(&request).is_some());
///         Ok::<_, tower::BoxError>(request.into_body().len())
///     });
/// let request = http::Request::builder().header("x-tenant", "acme").body("hello".to_owned())?;
/// assert_eq!(service.oneshot(request).await?, 5);
/// # Ok(())
/// # }
/// ```
pub struct AdmissionLayer<Req, F> {
    config: SchedulerConfig,
    limiter: Option<Arc<dyn RateLimit>>,
    classify: Arc<F>,
    _request: PhantomData<fn(Req)>,
}

impl<Req, F> Clone for AdmissionLayer<Req, F> {
    fn clone(&self) -> Self {
        AdmissionLayer {
            config: self.config.clone(),
            limiter: self.limiter.clone(),
            classify: self.classify.clone(),
            _request: PhantomData,
        }
    }
}

impl<Req, F> fmt::Debug for AdmissionLayer<Req, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdmissionLayer")
            .field("config", &self.config)
            .field("limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

impl<Req, F> AdmissionLayer<Req, F>
where
    F: Fn(&Req) -> Ticket + Send + Sync + 'static,
{
    /// Admission with `config`, classifying requests with `classify`.
    ///
    /// # Errors
    ///
    /// [`SchedulerError::InvalidConfig`](crate::SchedulerError::InvalidConfig)
    /// naming the bad field (checked here, so `layer` cannot fail).
    pub fn new(config: SchedulerConfig, classify: F) -> Result<Self> {
        config.validate()?;
        Ok(AdmissionLayer {
            config,
            limiter: None,
            classify: Arc::new(classify),
            _request: PhantomData,
        })
    }

    /// Charges every request to its tenant's rate limits first. Pass an
    /// `Arc` to share one limiter.
    pub fn rate_limit(mut self, limiter: impl RateLimit) -> Self {
        self.limiter = Some(Arc::new(limiter));
        self
    }
}

impl<S, Req, F> Layer<S> for AdmissionLayer<Req, F>
where
    S: Service<Req> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    S::Response: Send + 'static,
    Req: keel_core::RequestExtensions + Send + 'static,
    F: Fn(&Req) -> Ticket + Send + Sync + 'static,
{
    type Service = Admission<Req, S::Response>;

    /// Starts a scheduler (and its dispatcher task) around `inner`.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    fn layer(&self, inner: S) -> Self::Service {
        let mut builder = SchedulerBuilder::new(self.config.clone());
        if let Some(limiter) = &self.limiter {
            builder = builder.rate_limit(limiter.clone());
        }
        let scheduler = builder
            .build(inner)
            .expect("the config was validated by AdmissionLayer::new");
        let classify = self.classify.clone();
        let classify: Classify<Req> = Arc::new(move |req: &Req| classify(req));
        Admission::new(scheduler, classify)
    }
}
