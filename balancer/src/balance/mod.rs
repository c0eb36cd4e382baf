//! The [`Balancer`] service: picks an endpoint from a
//! [`Discover`](tower::discover::Discover) set for each request.

mod future;

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use futures::Stream;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use tower::discover::{Change, Discover};
use tower::load::{CompleteOnResponse, TrackCompletion};
use tower_service::Service;

pub use self::future::ResponseFuture;
use crate::classify::{Classify, DefaultClassifier};
use crate::config::{BalancerConfig, Policy};
use crate::endpoint::{Common, EndpointId, EndpointSnapshot, EndpointState, Handle, LoadReport};
use crate::error::{BoxError, Error, Result};
use crate::policy::{Picker, Ring};
use crate::request::RequestExtensions;

/// Per-key weights in [0, 1], published by whoever owns slow start and busy
/// dampening (keel-health, or your own control loop). Keys missing from the
/// map weigh 1.0.
pub type Weights<K> = HashMap<K, f64>;

/// Per-key load reports; see [`BalancerBuilder::load_reports`].
pub type LoadReports<K> = HashMap<K, LoadReport>;

type DiscoverStream<K, S> = Pin<Box<dyn Stream<Item = Result<Change<K, S>, BoxError>> + Send>>;

/// Picks an endpoint for each request from a
/// [`Discover`](tower::discover::Discover) set, by a [`Policy`], honouring
/// per-endpoint capacity, busy signals, weights, the request's
/// [`Deadline`](crate::Deadline) and [`AvoidEndpoints`](crate::AvoidEndpoints).
///
/// A `tower::Service` whose clones share one endpoint set, so it stacks
/// under [`tower::retry::Retry`], [`Hedge`](crate::hedge::Hedge) or a
/// per-connection axum handler without a `Buffer`. `poll_ready` applies
/// discovery changes and is always ready; backpressure comes from the
/// capacity wait in the response future, which ends in
/// [`Error::Overloaded`] instead of waiting forever.
///
/// Endpoint services must be `Clone + Send + Sync` (a tonic `Channel`, a
/// hyper client, `tower::buffer::Buffer`): each request drives a clone of
/// its endpoint's service. Dropping the response future drops the
/// endpoint's future — the upstream call is cancelled and its slot freed.
///
/// Build one with [`Balancer::builder`].
pub struct Balancer<K, S, C = DefaultClassifier, T = CompleteOnResponse> {
    shared: Arc<Shared<K, S>>,
    snapshot: Arc<Snapshot<K, S>>,
    version: u64,
    picker: Picker,
    weights: Option<watch::Receiver<Weights<K>>>,
    reports: Option<watch::Receiver<LoadReports<K>>>,
    classifier: C,
    completion: T,
}

/// The endpoint set at one version.
pub(crate) struct Snapshot<K, S> {
    pub(crate) keys: Vec<K>,
    pub(crate) states: Vec<Arc<EndpointState>>,
    pub(crate) services: Vec<S>,
    pub(crate) ring: Option<Ring>,
}

impl<K, S> Snapshot<K, S> {
    fn empty() -> Self {
        Snapshot {
            keys: Vec::new(),
            states: Vec::new(),
            services: Vec::new(),
            ring: None,
        }
    }
}

/// What every clone of one balancer shares.
pub(crate) struct Shared<K, S> {
    pub(crate) config: BalancerConfig,
    pub(crate) common: Arc<Common>,
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
    weights: Option<watch::Receiver<Weights<K>>>,
}

impl<K, S> Shared<K, S>
where
    K: Hash + Eq + Clone + fmt::Debug,
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
                    break;
                }
                Poll::Pending => break,
            }
        }
        if changes.is_empty() {
            return;
        }
        let current = self.snapshot.read().clone();
        let next = self.apply(&mut control, &current, changes);
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
        let prefix_blocks = match &self.config.policy {
            Policy::PrefixAffinity(config) => Some(config.index_blocks),
            _ => None,
        };
        for change in changes {
            match change {
                Change::Insert(key, service) => {
                    let id = EndpointId::new(control.next_id);
                    control.next_id += 1;
                    let weight = control
                        .weights
                        .as_ref()
                        .and_then(|rx| rx.borrow().get(&key).copied())
                        .unwrap_or(1.0);
                    let state = Arc::new(EndpointState::new(
                        id,
                        format!("{key:?}"),
                        weight,
                        self.common.clone(),
                        prefix_blocks,
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
        let ring = match &self.config.policy {
            Policy::ConsistentHash(config) => Some(Ring::new(&keys, config.vnodes)),
            _ => None,
        };
        Snapshot {
            keys,
            states,
            services,
            ring,
        }
    }

    pub(crate) fn current(&self) -> Arc<Snapshot<K, S>> {
        self.snapshot.read().clone()
    }

    fn picker(&self) -> Picker {
        let n = self.clones.fetch_add(1, Ordering::Relaxed);
        Picker::new(mix(self.seed, n))
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
    /// [`DefaultClassifier`] and [`CompleteOnResponse`]; the endpoint
    /// service type comes from the `Discover` given to
    /// [`build`](BalancerBuilder::build).
    pub fn builder() -> BalancerBuilder<K> {
        BalancerBuilder::new()
    }
}

impl<K> BalancerBuilder<K> {
    /// Same as [`Balancer::builder`].
    pub fn new() -> Self {
        BalancerBuilder {
            config: BalancerConfig::default(),
            weights: None,
            reports: None,
            classifier: DefaultClassifier,
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
    K: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
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

    /// The key of endpoint `id`, if it is still in the set.
    pub fn key_of(&self, id: EndpointId) -> Option<K> {
        let snapshot = self.shared.current();
        snapshot
            .states
            .iter()
            .position(|s| s.id == id)
            .map(|i| snapshot.keys[i].clone())
    }

    /// The balancer's configuration.
    pub fn config(&self) -> &BalancerConfig {
        &self.shared.config
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
        if let Some(rx) = &mut self.weights
            && (changed || rx.has_changed().unwrap_or(false))
        {
            let weights = rx.borrow_and_update();
            for (key, state) in self.snapshot.keys.iter().zip(&self.snapshot.states) {
                state.set_weight(weights.get(key).copied().unwrap_or(1.0));
            }
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
    K: Hash + Eq + Clone + fmt::Debug,
    S: Clone,
    C: Clone,
    T: Clone,
{
    fn clone(&self) -> Self {
        Balancer {
            shared: self.shared.clone(),
            snapshot: self.snapshot.clone(),
            version: self.version,
            picker: self.shared.picker(),
            weights: self.weights.clone(),
            reports: self.reports.clone(),
            classifier: self.classifier.clone(),
            completion: self.completion.clone(),
        }
    }
}

impl<K, S, C, T> fmt::Debug for Balancer<K, S, C, T>
where
    K: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("name", &self.shared.config.name)
            .field("policy", &self.shared.config.policy)
            .field("endpoints", &self.snapshot.keys)
            .finish_non_exhaustive()
    }
}

impl<K, S, C, T, Req> Service<Req> for Balancer<K, S, C, T>
where
    K: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    S: Service<Req> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    C: Classify<S::Response, S::Error>,
    T: TrackCompletion<Handle, S::Response>,
    Req: RequestExtensions + Send + 'static,
{
    type Response = T::Output;
    type Error = Error;
    type Future = ResponseFuture<S, Req, C, T>;

    /// Applies discovery changes, weights and load reports; always ready.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.refresh();
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        future::dispatch(self, request)
    }
}

/// Builds a [`Balancer`].
///
/// ```
/// use std::collections::HashMap;
/// use keel_balancer::{Balancer, Policy};
/// use tokio::sync::watch;
/// use tower::discover::ServiceList;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> keel_balancer::Result<()> {
/// let nodes: Vec<_> = (0..2)
///     .map(|n| tower::service_fn(move |_: http::Request<()>| async move { Ok::<_, std::io::Error>(n) }))
///     .collect();
/// // Slow start and busy dampening from keel-health, or your own loop.
/// let (weights, rx) = watch::channel(HashMap::new());
/// let balancer = Balancer::builder()
///     .policy(Policy::LeastOutstanding)
///     .max_outstanding_per_endpoint(8)
///     .weights(rx)
///     .build(ServiceList::new(nodes))?;
/// weights.send_replace(HashMap::from([(0usize, 0.1)]));
/// # drop(balancer);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct BalancerBuilder<K, C = DefaultClassifier, T = CompleteOnResponse> {
    config: BalancerConfig,
    weights: Option<watch::Receiver<Weights<K>>>,
    reports: Option<watch::Receiver<LoadReports<K>>>,
    classifier: C,
    completion: T,
    seed: Option<u64>,
}

impl<K, C, T> BalancerBuilder<K, C, T> {
    /// Replaces the whole configuration.
    pub fn config(mut self, config: BalancerConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets [`BalancerConfig::policy`].
    pub fn policy(mut self, policy: Policy) -> Self {
        self.config.policy = policy;
        self
    }

    /// Sets [`BalancerConfig::max_outstanding_per_endpoint`].
    pub fn max_outstanding_per_endpoint(mut self, slots: u32) -> Self {
        self.config.max_outstanding_per_endpoint = Some(slots);
        self
    }

    /// Sets [`BalancerConfig::max_wait`].
    pub fn max_wait(mut self, wait: std::time::Duration) -> Self {
        self.config.max_wait = wait;
        self
    }

    /// Sets [`BalancerConfig::attempt_timeout`].
    pub fn attempt_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.config.attempt_timeout = Some(timeout);
        self
    }

    /// Per-key weights in [0, 1] (keel-health's slow start and busy
    /// dampening, or any control loop). Read on every `poll_ready` when the
    /// channel changed, and when an endpoint is inserted; keys missing from
    /// the map weigh 1.0.
    pub fn weights(mut self, weights: watch::Receiver<Weights<K>>) -> Self {
        self.weights = Some(weights);
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

    /// How endpoint results are classified; see [`Classify`].
    pub fn classifier<C2>(self, classifier: C2) -> BalancerBuilder<K, C2, T> {
        BalancerBuilder {
            config: self.config,
            weights: self.weights,
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
            weights: self.weights,
            reports: self.reports,
            classifier: self.classifier,
            completion,
            seed: self.seed,
        }
    }

    /// Builds the balancer over `discover`.
    ///
    /// Nothing is read from `discover` until the first `poll_ready`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the bad field.
    pub fn build<D>(self, discover: D) -> Result<Balancer<K, D::Service, C, T>>
    where
        D: Discover<Key = K> + Send + 'static,
        D::Error: Into<BoxError>,
        D::Service: Clone,
        K: Hash + Eq + Clone + fmt::Debug,
    {
        self.config.validate()?;
        // Apply the channels' current values at the first `poll_ready`.
        let weights = self.weights.map(|mut rx| {
            rx.mark_changed();
            rx
        });
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
                weights: weights.clone(),
            }),
            snapshot: RwLock::new(Arc::new(Snapshot::empty())),
            version: AtomicU64::new(0),
            seed,
            clones: AtomicU64::new(1),
            common,
            config: self.config,
        });
        let snapshot = shared.current();
        Ok(Balancer {
            picker: Picker::new(mix(seed, 0)),
            shared,
            snapshot,
            version: 0,
            weights,
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
