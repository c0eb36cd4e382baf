//! The [`Balancer`] service: picks an endpoint from a
//! [`Discover`](tower::discover::Discover) set for each request.

mod future;

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::Stream;
use keel_core::{BoxError, Classify, EndpointKey, RequestExtensions, ResultClassifier};
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use tokio::time::Instant;
use tower::discover::{Change, Discover};
use tower::load::{CompleteOnResponse, TrackCompletion};
use tower_service::Service;

pub use self::future::BalanceFuture;
use crate::config::{BalancerConfig, Policy};
use crate::endpoint::{Common, EndpointIndex, EndpointSnapshot, EndpointState, Handle, LoadReport};
use crate::error::{BalancerError, Result};
use crate::policy::{Candidates, Pick};

/// Per-key load reports; see [`BalancerBuilder::load_reports`].
pub type LoadReports<K> = HashMap<K, LoadReport>;

type DiscoverStream<K, S> = Pin<Box<dyn Stream<Item = Result<Change<K, S>, BoxError>> + Send>>;

/// Picks an endpoint for each request from a
/// [`Discover`](tower::discover::Discover) set, by a [`Policy`] (or any
/// [`Pick`]), honouring per-endpoint capacity, busy signals, weights, the
/// request's [`Deadline`](crate::Deadline) and
/// [`AvoidEndpoints`](crate::AvoidEndpoints).
///
/// Each endpoint's weight and capacity are read live from its discovery
/// key ([`EndpointKey`]): keel-health's `Discover` hands out
/// [`keel_core::EndpointId`] keys whose weight it keeps current (slow
/// start, busy dampening), so a balancer built over it follows health with
/// no task of yours. Timeouts the balancer imposes (an attempt timeout, a
/// deadline that passed while the call was in flight) are reported back
/// through [`EndpointKey::report`], once per attempt.
///
/// A `tower::Service` whose clones share one endpoint set, so it stacks
/// under [`tower::retry::Retry`], [`Hedge`](crate::hedge::Hedge) or a
/// per-connection axum handler without a `Buffer`. `poll_ready` applies
/// discovery changes and is always ready; backpressure comes from the
/// capacity wait in the response future, which ends in
/// [`BalancerError::Overloaded`] instead of waiting forever.
///
/// Endpoint services must be `Clone + Send + Sync` (a tonic `Channel`, a
/// hyper client, `tower::buffer::Buffer`): each request drives a clone of
/// its endpoint's service. Dropping the response future drops the
/// endpoint's future — the upstream call is cancelled and its slot freed.
///
/// Build one with [`Balancer::builder`].
pub struct Balancer<K, S, C = ResultClassifier, T = CompleteOnResponse> {
    shared: Arc<Shared<K, S>>,
    snapshot: Arc<Snapshot<K, S>>,
    version: u64,
    rng: fastrand::Rng,
    reports: Option<watch::Receiver<LoadReports<K>>>,
    classifier: C,
    completion: T,
}

/// The endpoint set at one version.
pub(crate) struct Snapshot<K, S> {
    pub(crate) keys: Vec<K>,
    pub(crate) states: Vec<Arc<EndpointState>>,
    pub(crate) services: Vec<S>,
    pub(crate) positions: HashMap<EndpointIndex, usize>,
}

impl<K, S> Snapshot<K, S> {
    fn empty() -> Self {
        Snapshot {
            keys: Vec::new(),
            states: Vec::new(),
            services: Vec::new(),
            positions: HashMap::new(),
        }
    }

    pub(crate) fn candidates<'a>(
        &'a self,
        avoid: Option<&'a crate::AvoidEndpoints>,
        common: &'a Common,
    ) -> Candidates<'a, K> {
        Candidates::new(&self.keys, &self.states, &self.positions, avoid, common)
    }
}

/// What every clone of one balancer shares.
pub(crate) struct Shared<K, S> {
    pub(crate) config: BalancerConfig,
    pub(crate) pick: Box<dyn Pick<K>>,
    pub(crate) common: Arc<Common>,
    /// The discovery stream ended: the endpoint set is final.
    pub(crate) ended: AtomicBool,
    control: Mutex<Control<K, S>>,
    snapshot: RwLock<Arc<Snapshot<K, S>>>,
    version: AtomicU64,
    seed: u64,
    clones: AtomicU64,
}

/// The discovery side, touched only when the stream has news.
struct Control<K, S> {
    discover: DiscoverStream<K, S>,
    ended: bool,
    next_id: u64,
    waker: Waker,
}

impl<K, S> Shared<K, S>
where
    K: EndpointKey + Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    S: Clone,
{
    /// Reads pending discovery changes, if the stream woke us. Whoever gets
    /// the lock does the work; everyone else keeps the current set.
    pub(crate) fn sync_discover(&self) {
        if !self.common.dirty.load(Ordering::Acquire) {
            return;
        }
        let Some(mut control) = self.control.try_lock() else {
            return;
        };
        self.common.dirty.store(false, Ordering::Release);
        if control.ended {
            return;
        }
        let waker = control.waker.clone();
        let mut cx = Context::from_waker(&waker);
        let mut changes = Vec::new();
        let mut ended = false;
        loop {
            match control.discover.as_mut().poll_next(&mut cx) {
                Poll::Ready(Some(Ok(change))) => changes.push(change),
                Poll::Ready(Some(Err(error))) => {
                    self.common.metrics.discover_errors.increment(1);
                    tracing::warn!(balancer = %self.config.name, %error, "discovery error; keeping the current endpoint set");
                    // The stream did not register the waker: look again next time.
                    self.common.dirty.store(true, Ordering::Release);
                    break;
                }
                Poll::Ready(None) => {
                    tracing::debug!(balancer = %self.config.name, "discovery stream ended; the endpoint set is final");
                    control.ended = true;
                    ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if !changes.is_empty() {
            self.publish(&mut control, changes);
        }
        // Only once the final set is published: a caller that sees the
        // stream ended must find its last endpoints in the snapshot.
        if ended {
            self.ended.store(true, Ordering::Release);
        }
    }

    /// Applies `changes` and publishes the new endpoint set.
    fn publish(&self, control: &mut Control<K, S>, changes: Vec<Change<K, S>>) {
        let current = self.snapshot.read().clone();
        let next = self.apply(control, &current, changes);
        self.pick
            .endpoints_changed(&next.candidates(None, &self.common));
        self.common.metrics.endpoints.set(next.states.len() as f64);
        tracing::debug!(balancer = %self.config.name, endpoints = next.states.len(), "endpoint set changed");
        *self.snapshot.write() = Arc::new(next);
        self.version.fetch_add(1, Ordering::Release);
        if self.common.waiters.load(Ordering::Relaxed) > 0 {
            self.common.notify.notify_waiters();
        }
    }

    fn apply(
        &self,
        control: &mut Control<K, S>,
        current: &Snapshot<K, S>,
        changes: Vec<Change<K, S>>,
    ) -> Snapshot<K, S> {
        let mut keys = current.keys.clone();
        let mut states = current.states.clone();
        let mut services = current.services.clone();
        let mut index: HashMap<K, usize> = keys
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, k)| (k, i))
            .collect();
        for change in changes {
            match change {
                Change::Insert(key, service) => {
                    let id = EndpointIndex::new(control.next_id);
                    control.next_id += 1;
                    let state = Arc::new(EndpointState::new(
                        id,
                        format!("{key:?}"),
                        Arc::new(key.clone()),
                        self.common.clone(),
                    ));
                    tracing::debug!(balancer = %self.config.name, endpoint = ?key, %id, "endpoint inserted");
                    match index.get(&key) {
                        Some(&i) => {
                            states[i] = state;
                            services[i] = service;
                        }
                        None => {
                            index.insert(key.clone(), keys.len());
                            keys.push(key);
                            states.push(state);
                            services.push(service);
                        }
                    }
                }
                Change::Remove(key) => {
                    if let Some(i) = index.remove(&key) {
                        tracing::debug!(balancer = %self.config.name, endpoint = ?key, id = %states[i].id, "endpoint removed");
                        keys.remove(i);
                        states.remove(i);
                        services.remove(i);
                        for slot in index.values_mut() {
                            if *slot > i {
                                *slot -= 1;
                            }
                        }
                    }
                }
            }
        }
        let positions = states.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
        Snapshot {
            keys,
            states,
            services,
            positions,
        }
    }

    pub(crate) fn current(&self) -> Arc<Snapshot<K, S>> {
        self.snapshot.read().clone()
    }

    /// A generator of its own for a new clone (or a waiting request).
    pub(crate) fn rng(&self) -> fastrand::Rng {
        let n = self.clones.fetch_add(1, Ordering::Relaxed);
        fastrand::Rng::with_seed(mix(self.seed, n))
    }
}

/// SplitMix64 of `seed + n`: independent, reproducible streams per clone.
pub(crate) fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed.wrapping_add(n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<K> Balancer<K, ()> {
    /// A builder with [`BalancerConfig::default`], the
    /// [`ResultClassifier`] and [`CompleteOnResponse`]; the endpoint
    /// service type comes from the `Discover` given to
    /// [`build`](BalancerBuilder::build).
    pub fn builder() -> BalancerBuilder<K> {
        BalancerBuilder::new()
    }
}

impl<K> BalancerBuilder<K> {
    /// Same as [`Balancer::builder`].
    pub fn new() -> Self {
        BalancerBuilder::from_config(BalancerConfig::default())
    }

    /// A builder starting from `config` (read from a file, say); setters
    /// called afterwards change single fields of it.
    ///
    /// This is the only way to hand the builder a whole config, so no
    /// setter is ever silently undone by a config given after it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keel_balancer::{BalancerBuilder, BalancerConfig, Policy};
    ///
    /// let from_file: BalancerConfig = serde_json::from_str(r#"{"max_wait": "250ms"}"#).unwrap();
    /// let builder = BalancerBuilder::<usize>::from_config(from_file)
    ///     .policy(Policy::LeastOutstanding);
    /// assert_eq!(builder.config().max_wait, Duration::from_millis(250));
    /// assert_eq!(builder.config().policy, Policy::LeastOutstanding);
    /// ```
    pub fn from_config(config: BalancerConfig) -> Self {
        BalancerBuilder {
            config,
            pick: None,
            reports: None,
            classifier: ResultClassifier,
            completion: CompleteOnResponse::default(),
            seed: None,
        }
    }
}

impl<K> Default for BalancerBuilder<K> {
    fn default() -> Self {
        BalancerBuilder::new()
    }
}

impl<K, S, C, T> Balancer<K, S, C, T>
where
    K: EndpointKey + Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    S: Clone + Send + Sync + 'static,
{
    /// What every endpoint looks like now, in discovery order.
    ///
    /// Applies pending discovery changes first.
    pub fn endpoints(&self) -> Vec<EndpointSnapshot<K>> {
        self.shared.sync_discover();
        let snapshot = self.shared.current();
        snapshot
            .keys
            .iter()
            .zip(&snapshot.states)
            .map(|(key, state)| state.snapshot(key.clone()))
            .collect()
    }

    /// The key of the endpoint with this index, if it is still in the set.
    pub fn key_of(&self, index: EndpointIndex) -> Option<K> {
        let snapshot = self.shared.current();
        snapshot
            .positions
            .get(&index)
            .map(|&i| snapshot.keys[i].clone())
    }

    /// The fleet's latency estimate: an exponentially weighted average of
    /// recent successful response times across every endpoint (each
    /// response moving it at least `1 / decay_samples` of the way), decayed
    /// like an endpoint's estimate while nothing answers; `default_rtt`
    /// until anything answered. A new or restarted endpoint is assumed to
    /// take this long until its own first response.
    pub fn fleet_latency_estimate(&self) -> Duration {
        let common = &self.shared.common;
        Duration::from_nanos(common.fleet_ns(common.ns_of(Instant::now())) as u64)
    }

    /// The balancer's configuration.
    pub fn config(&self) -> &BalancerConfig {
        &self.shared.config
    }

    /// The name of the policy in use ([`Pick::name`]).
    pub fn policy_name(&self) -> &str {
        self.shared.pick.name()
    }

    /// Takes the latest endpoint set, weights and load reports.
    fn refresh(&mut self) {
        self.shared.sync_discover();
        let version = self.shared.version.load(Ordering::Acquire);
        let mut changed = false;
        if version != self.version {
            self.snapshot = self.shared.current();
            self.version = version;
            changed = true;
        }
        if let Some(rx) = &mut self.reports
            && (changed || rx.has_changed().unwrap_or(false))
        {
            let reports = rx.borrow_and_update();
            for (key, state) in self.snapshot.keys.iter().zip(&self.snapshot.states) {
                if let Some(report) = reports.get(key) {
                    state.apply_report(report);
                }
            }
        }
    }
}

impl<K, S, C, T> Clone for Balancer<K, S, C, T>
where
    K: EndpointKey + Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    S: Clone,
    C: Clone,
    T: Clone,
{
    fn clone(&self) -> Self {
        Balancer {
            shared: self.shared.clone(),
            snapshot: self.snapshot.clone(),
            version: self.version,
            rng: self.shared.rng(),
            reports: self.reports.clone(),
            classifier: self.classifier.clone(),
            completion: self.completion.clone(),
        }
    }
}

impl<K, S, C, T> fmt::Debug for Balancer<K, S, C, T>
where
    K: fmt::Debug + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("name", &self.shared.config.name)
            .field("policy", &self.shared.pick.name())
            .field("endpoints", &self.snapshot.keys)
            .finish_non_exhaustive()
    }
}

impl<K, S, C, T, Req> Service<Req> for Balancer<K, S, C, T>
where
    K: EndpointKey + Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    S: Service<Req> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    C: Classify<S::Response, S::Error> + Clone,
    T: TrackCompletion<Handle, S::Response>,
    Req: RequestExtensions + Send + 'static,
{
    type Response = T::Output;
    type Error = BalancerError;
    type Future = BalanceFuture<S, Req, C, T>;

    /// Applies discovery changes, weights and load reports; always ready.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BalancerError>> {
        self.refresh();
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        future::dispatch(self, request)
    }
}

/// Builds a [`Balancer`].
///
/// Every [`BalancerConfig`] field has a setter here, and setters may be
/// called in any order; a whole config is given only up front
/// ([`BalancerBuilder::from_config`]), so nothing undoes a setter.
///
/// ```
/// use keel_balancer::{Balancer, Policy};
/// use keel_core::EndpointId;
/// use tower::discover::Change;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), keel_balancer::BalancerError> {
/// // Discovery keys carry each endpoint's live weight and capacity
/// // (keel-health's `Discover` hands out such keys and keeps them current).
/// let keys = [EndpointId::new("node-a").with_capacity(16), EndpointId::new("node-b")];
/// let nodes: Vec<_> = keys
///     .iter()
///     .map(|key| {
///         let name = key.to_string();
///         let svc = tower::service_fn(move |_: http::Request<()>| {
///             let name = name.clone();
///             async move { Ok::<_, std::io::Error>(name) }
///         });
///         (key.clone(), svc)
///     })
///     .collect();
/// let discover = futures::stream::iter(
///     nodes.into_iter().map(|(key, svc)| Ok::<_, std::io::Error>(Change::Insert(key, svc))),
/// );
/// let balancer = Balancer::builder()
///     .policy(Policy::LeastOutstanding)
///     .max_outstanding_per_endpoint(8) // node-b's capacity: its key says nothing
///     .decay_samples(8)
///     .build(discover)?;
/// keys[1].set_weight(0.1); // slow start: node-b gets a tenth of its share
/// # drop(balancer);
/// # Ok(())
/// # }
/// ```
pub struct BalancerBuilder<K, C = ResultClassifier, T = CompleteOnResponse> {
    config: BalancerConfig,
    pick: Option<Box<dyn Pick<K>>>,
    reports: Option<watch::Receiver<LoadReports<K>>>,
    classifier: C,
    completion: T,
    seed: Option<u64>,
}

impl<K: fmt::Debug + 'static, C: fmt::Debug, T: fmt::Debug> fmt::Debug
    for BalancerBuilder<K, C, T>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalancerBuilder")
            .field("config", &self.config)
            .field("pick", &self.pick.as_ref().map(|p| p.name().to_owned()))
            .field("classifier", &self.classifier)
            .field("completion", &self.completion)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl<K, C, T> BalancerBuilder<K, C, T> {
    /// The configuration as set so far.
    pub fn config(&self) -> &BalancerConfig {
        &self.config
    }

    /// Sets [`BalancerConfig::name`].
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// Sets [`BalancerConfig::policy`], one of the built-in policies (and
    /// drops a [`pick`](Self::pick) given before).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.config.policy = policy;
        self.pick = None;
        self
    }

    /// Picks endpoints with a policy of your own (a KV-cache aware router,
    /// say) instead of [`BalancerConfig::policy`]; see [`Pick`]. A later
    /// [`policy`](Self::policy) replaces it.
    pub fn pick(mut self, pick: impl Pick<K>) -> Self {
        self.pick = Some(Box::new(pick));
        self
    }

    /// Sets [`BalancerConfig::max_outstanding_per_endpoint`]: the capacity
    /// of endpoints whose key says nothing.
    pub fn max_outstanding_per_endpoint(mut self, slots: u32) -> Self {
        self.config.max_outstanding_per_endpoint = Some(slots);
        self
    }

    /// Sets [`BalancerConfig::max_wait`].
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.config.max_wait = wait;
        self
    }

    /// Sets [`BalancerConfig::max_waiters`].
    pub fn max_waiters(mut self, waiters: usize) -> Self {
        self.config.max_waiters = waiters;
        self
    }

    /// Sets [`BalancerConfig::attempt_timeout`].
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.config.attempt_timeout = Some(timeout);
        self
    }

    /// Sets [`BalancerConfig::default_rtt`].
    pub fn default_rtt(mut self, rtt: Duration) -> Self {
        self.config.default_rtt = rtt;
        self
    }

    /// Sets [`BalancerConfig::decay`].
    pub fn decay(mut self, decay: Duration) -> Self {
        self.config.decay = decay;
        self
    }

    /// Sets [`BalancerConfig::decay_samples`].
    pub fn decay_samples(mut self, samples: u32) -> Self {
        self.config.decay_samples = samples;
        self
    }

    /// Sets [`BalancerConfig::busy_cooldown`].
    pub fn busy_cooldown(mut self, cooldown: Duration) -> Self {
        self.config.busy_cooldown = cooldown;
        self
    }

    /// Sets [`BalancerConfig::load_report_max_age`].
    pub fn load_report_max_age(mut self, age: Duration) -> Self {
        self.config.load_report_max_age = age;
        self
    }

    /// Load the endpoints report about themselves (queue depth, running
    /// batch), shared by every client. The balancer keeps the part of a
    /// report that is not its own outstanding requests, ages it linearly to
    /// zero over [`BalancerConfig::load_report_max_age`], and adds its own
    /// live count: a stale "idle" report cannot attract a herd.
    pub fn load_reports(mut self, reports: watch::Receiver<LoadReports<K>>) -> Self {
        self.reports = Some(reports);
        self
    }

    /// Seeds the balancer's random choices, for reproducible runs (the
    /// simulator). Default: a random seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// How endpoint results are classified; see [`Classify`]. Default
    /// [`ResultClassifier`] (every `Ok` a success); for HTTP responses use
    /// [`DefaultClassifier`](keel_core::DefaultClassifier) (429/503 busy
    /// with `Retry-After` in both forms, 5xx failures).
    pub fn classifier<C2>(self, classifier: C2) -> BalancerBuilder<K, C2, T> {
        BalancerBuilder {
            config: self.config,
            pick: self.pick,
            reports: self.reports,
            classifier,
            completion: self.completion,
            seed: self.seed,
        }
    }

    /// When a request counts as finished (its slot freed, its latency
    /// recorded): tower's [`TrackCompletion`]. The default,
    /// [`CompleteOnResponse`], finishes it when the response arrives; a
    /// streaming response can carry the [`Handle`] in its body instead.
    pub fn track_completion<T2>(self, completion: T2) -> BalancerBuilder<K, C, T2> {
        BalancerBuilder {
            config: self.config,
            pick: self.pick,
            reports: self.reports,
            classifier: self.classifier,
            completion,
            seed: self.seed,
        }
    }

    /// Builds the balancer over `discover`, whose keys say each endpoint's
    /// weight and capacity ([`EndpointKey`]).
    ///
    /// Nothing is read from `discover` until the first `poll_ready`.
    ///
    /// # Errors
    ///
    /// [`BalancerError::InvalidConfig`] naming the bad field.
    pub fn build<D>(self, discover: D) -> Result<Balancer<K, D::Service, C, T>>
    where
        D: Discover<Key = K> + Send + 'static,
        D::Error: Into<BoxError>,
        D::Service: Clone,
        K: EndpointKey + Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    {
        self.config.validate()?;
        let pick = match self.pick {
            Some(pick) => pick,
            None => self.config.policy.build::<K>(),
        };
        // Apply the channel's current value at the first `poll_ready`.
        let reports = self.reports.map(|mut rx| {
            rx.mark_changed();
            rx
        });
        let common = Arc::new(Common::new(&self.config));
        let stream: DiscoverStream<K, D::Service> = Box::pin(DiscoverAdapter { discover });
        let seed = self.seed.unwrap_or_else(|| fastrand::u64(..));
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                discover: stream,
                ended: false,
                next_id: 0,
                waker: Waker::from(common.clone()),
            }),
            snapshot: RwLock::new(Arc::new(Snapshot::empty())),
            version: AtomicU64::new(0),
            seed,
            clones: AtomicU64::new(1),
            pick,
            ended: AtomicBool::new(false),
            common,
            config: self.config,
        });
        let snapshot = shared.current();
        Ok(Balancer {
            rng: fastrand::Rng::with_seed(mix(seed, 0)),
            shared,
            snapshot,
            version: 0,
            reports,
            classifier: self.classifier,
            completion: self.completion,
        })
    }
}

pin_project_lite::pin_project! {
    /// A [`Discover`] as a `Stream` with boxed errors.
    struct DiscoverAdapter<D> {
        #[pin]
        discover: D,
    }
}

impl<D> Stream for DiscoverAdapter<D>
where
    D: Discover,
    D::Error: Into<BoxError>,
{
    type Item = Result<Change<D::Key, D::Service>, BoxError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.project()
            .discover
            .poll_discover(cx)
            .map(|change| change.map(|change| change.map_err(Into::into)))
    }
}
