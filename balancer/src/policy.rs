//! Picking an endpoint: the open [`Pick`] trait, the view of the
//! candidates it picks from, the built-in policies, the hash ring and the
//! prefix index.

use std::cell::{Cell, OnceCell};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_core::{stable_hash, stable_hash_seeded};
use parking_lot::{Mutex, RwLock};

use crate::config::{HashConfig, Policy, PrefixConfig};
use crate::endpoint::{Common, EndpointIndex, EndpointState, LazyNow};
use crate::request::{AffinityKey, AvoidEndpoints, Prompt};

/// How a [`Balancer`](crate::Balancer) picks an endpoint for a request: the
/// open trait behind every [`Policy`], so a policy of your own (a KV-cache
/// aware router that reads a cache index, a tenant pinning) plugs in with
/// [`BalancerBuilder::pick`](crate::BalancerBuilder::pick).
///
/// The balancer calls [`pick`](Pick::pick) for each request with a view of
/// every endpoint ([`Candidates`]): its key, outstanding requests, capacity,
/// weight, peak-EWMA latency estimate and reported load, computed lazily so
/// a policy pays only for what it reads. Return the position of an
/// [available](Candidate::is_available) candidate; the balancer takes a
/// slot on it and dispatches (if it lost a race for the last slot it asks
/// again). Return `None` when nothing is acceptable now: the request waits
/// for a slot or a new endpoint, up to `max_wait`.
///
/// ```
/// use keel_balancer::{Balancer, Candidates, Pick};
/// use tower::discover::ServiceList;
///
/// /// Always the first available endpoint (a toy; see the built-ins).
/// struct First;
///
/// impl<K> Pick<K> for First {
///     fn pick(
///         &self,
///         candidates: &Candidates<'_, K>,
///         _request: &http::Extensions,
///         _rng: &mut fastrand::Rng,
///     ) -> Option<usize> {
///         candidates.iter().find(|c| c.is_available()).map(|c| c.position())
///     }
/// }
///
/// # fn main() -> Result<(), keel_balancer::BalancerError> {
/// let nodes = vec![tower::service_fn(|_: http::Request<()>| async { Ok::<_, std::io::Error>(()) })];
/// let balancer = Balancer::builder().pick(First).build(ServiceList::new(nodes))?;
/// # drop(balancer);
/// # Ok(())
/// # }
/// ```
///
/// One value per balancer: [`endpoints_changed`](Pick::endpoints_changed)
/// tells it about that balancer's endpoint set.
pub trait Pick<K>: Send + Sync + 'static {
    /// The position in `candidates` of the endpoint to send the request
    /// to, or `None` to make it wait. `request` holds the request's
    /// extensions ([`AffinityKey`], [`Prompt`], your own hints); `rng` is the
    /// balancer's seeded generator (reproducible runs draw from it only).
    ///
    /// Called on the request path, under no lock: keep it cheap.
    fn pick(
        &self,
        candidates: &Candidates<'_, K>,
        request: &http::Extensions,
        rng: &mut fastrand::Rng,
    ) -> Option<usize>;

    /// The endpoint set changed; `endpoints` is the new set (its
    /// per-request values are not meaningful here). Called once per change,
    /// before any request sees the new set, under the balancer's discovery
    /// lock. Default: nothing.
    fn endpoints_changed(&self, endpoints: &Candidates<'_, K>) {
        let _ = endpoints;
    }

    /// The policy's name, for logs. Default `"custom"`.
    fn name(&self) -> &str {
        "custom"
    }
}

/// `Arc<P>` and `Box<P>` pick as `P` does, so a shared or boxed policy
/// (`Box<dyn Pick<K>>`, as [`Policy::build`] answers) plugs in as is.
macro_rules! forward_pick {
    ($($ptr:ident),*) => {$(
        impl<K, P: Pick<K> + ?Sized> Pick<K> for $ptr<P> {
            fn pick(
                &self,
                candidates: &Candidates<'_, K>,
                request: &http::Extensions,
                rng: &mut fastrand::Rng,
            ) -> Option<usize> {
                (**self).pick(candidates, request, rng)
            }

            fn endpoints_changed(&self, endpoints: &Candidates<'_, K>) {
                (**self).endpoints_changed(endpoints);
            }

            fn name(&self) -> &str {
                (**self).name()
            }
        }
    )*};
}

forward_pick!(Arc, Box);

impl Policy {
    /// The built-in [`Pick`] this policy names, for one balancer: to
    /// compose with a policy of your own (fall back to it), or to give to
    /// [`BalancerBuilder::pick`](crate::BalancerBuilder::pick).
    pub fn build<K: fmt::Debug + 'static>(&self) -> Box<dyn Pick<K>> {
        match self {
            Policy::RoundRobin => Box::new(RoundRobin::default()),
            Policy::Random => Box::new(Random),
            Policy::LeastOutstanding => Box::new(P2c {
                name: "least_outstanding",
                ewma: false,
            }),
            Policy::PeakEwma => Box::new(P2c {
                name: "peak_ewma",
                ewma: true,
            }),
            Policy::Weighted => Box::new(Weighted),
            Policy::ConsistentHash(config) => Box::new(Hashed {
                config: config.clone(),
                ring: RwLock::new(Ring::default()),
            }),
            Policy::PrefixAffinity(config) => Box::new(PrefixAffinity {
                config: config.clone(),
            }),
        }
    }
}

/// Every endpoint of the balancer as one request sees it, for
/// [`Pick::pick`]: positions `0..len()` in discovery order.
///
/// Values are read when asked for (the clock at most once per request), so
/// a policy that compares two endpoints pays for two.
pub struct Candidates<'a, K> {
    keys: &'a [K],
    states: &'a [Arc<EndpointState>],
    positions: &'a HashMap<EndpointIndex, usize>,
    avoid: Option<&'a AvoidEndpoints>,
    now: LazyNow<'a>,
    /// The sum of every endpoint's weight, read on first need.
    weight_sum: OnceCell<f64>,
    /// What prefix affinity claimed for its pick: (leading blocks the
    /// picked endpoint's index held, the prompt's blocks).
    prefix_claim: Cell<Option<(usize, usize)>>,
}

impl<'a, K> Candidates<'a, K> {
    pub(crate) fn new(
        keys: &'a [K],
        states: &'a [Arc<EndpointState>],
        positions: &'a HashMap<EndpointIndex, usize>,
        avoid: Option<&'a AvoidEndpoints>,
        common: &'a Common,
    ) -> Self {
        Candidates {
            keys,
            states,
            positions,
            avoid,
            now: LazyNow::new(common),
            weight_sum: OnceCell::new(),
            prefix_claim: Cell::new(None),
        }
    }

    /// How many endpoints the balancer has (available or not).
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Whether the balancer has no endpoint at all.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// The endpoint at `position`.
    ///
    /// # Panics
    ///
    /// If `position >= len()`.
    pub fn get(&self, position: usize) -> Candidate<'_, K> {
        let state = &*self.states[position];
        Candidate {
            position,
            key: &self.keys[position],
            state,
            avoided: self.avoid.is_some_and(|a| a.contains(state.id)),
            now: &self.now,
            all: self.states,
            weight_sum: &self.weight_sum,
        }
    }

    /// Every endpoint, in position order.
    pub fn iter(&self) -> impl Iterator<Item = Candidate<'_, K>> + '_ {
        (0..self.len()).map(move |i| self.get(i))
    }

    /// The position of the endpoint with this index, if it is in the set.
    pub fn position_of(&self, index: EndpointIndex) -> Option<usize> {
        self.positions.get(&index).copied()
    }

    /// What prefix affinity's last pick claimed the endpoint had cached:
    /// (leading blocks, prompt blocks).
    pub(crate) fn prefix_claim(&self) -> Option<(usize, usize)> {
        self.prefix_claim.get()
    }

    /// The clock reading made while picking, if any.
    pub(crate) fn read_clock(&self) -> Option<tokio::time::Instant> {
        self.now.read()
    }

    /// Whether any endpoint is not excluded by the request's
    /// [`AvoidEndpoints`] (so waiting may help).
    pub(crate) fn any_allowed(&self) -> bool {
        match self.avoid {
            None => !self.is_empty(),
            Some(avoid) => self.states.iter().any(|s| !avoid.contains(s.id)),
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for Candidates<'_, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// One endpoint as [`Pick::pick`] sees it; see [`Candidates`].
pub struct Candidate<'c, K> {
    position: usize,
    key: &'c K,
    state: &'c EndpointState,
    avoided: bool,
    now: &'c LazyNow<'c>,
    all: &'c [Arc<EndpointState>],
    weight_sum: &'c OnceCell<f64>,
}

/// How far past its weight's share of recent dispatches an endpoint in
/// slow start (or busy dampening) may go before it is passed over.
const SHARE_SLACK: f64 = 1.2;
/// Below this many recent dispatches fleet-wide, shares are too noisy to
/// enforce.
const SHARE_MIN_VOLUME: f64 = 20.0;

impl<'c, K> Candidate<'c, K> {
    /// Its position in [`Candidates`]: what [`Pick::pick`] returns.
    pub fn position(&self) -> usize {
        self.position
    }

    /// The balancer's index for it (what errors and
    /// [`AvoidEndpoints`] carry).
    pub fn index(&self) -> EndpointIndex {
        self.state.id
    }

    /// Its discovery key.
    pub fn key(&self) -> &'c K {
        self.key
    }

    /// Requests this balancer has outstanding on it.
    pub fn outstanding(&self) -> u32 {
        self.state.outstanding()
    }

    /// The requests it may have outstanding now: its key's capacity, else
    /// the configured `max_outstanding_per_endpoint`, lowered after a busy
    /// answer; `None` when unbounded.
    pub fn capacity(&self) -> Option<u32> {
        let cap = self.state.cap();
        (cap != u32::MAX).then_some(cap)
    }

    /// Its weight in [0, 1], read live from its key (slow start, busy
    /// dampening). Weight 0: send it nothing while anything else is usable.
    pub fn weight(&self) -> f64 {
        self.state.weight()
    }

    /// Its peak-EWMA latency estimate (the fleet's, until its first
    /// response).
    pub fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_ns() as u64)
    }

    /// What other clients reported it carries, aged linearly to zero over
    /// `load_report_max_age`
    /// ([`BalancerBuilder::load_reports`](crate::BalancerBuilder::load_reports)).
    pub fn reported_load(&self) -> f64 {
        self.state.reported_load(self.now)
    }

    /// Its load: [`outstanding`](Self::outstanding) plus
    /// [`reported_load`](Self::reported_load).
    pub fn load(&self) -> f64 {
        self.state.load(self.now)
    }

    /// Whether it is in a busy cooldown (it answered 429/503 recently).
    pub fn is_busy(&self) -> bool {
        self.state.is_busy(self.now)
    }

    /// Whether the request must not go there
    /// ([`AvoidEndpoints`]: it already failed there).
    pub fn is_avoided(&self) -> bool {
        self.avoided
    }

    /// Whether it is at its [`capacity`](Self::capacity).
    pub fn is_full(&self) -> bool {
        self.state.outstanding() >= self.state.cap()
    }

    /// Whether the request may be sent there now: not avoided, not full,
    /// not busy.
    pub fn is_available(&self) -> bool {
        !self.avoided && !self.is_full() && !self.is_busy()
    }

    pub(crate) fn latency_ns(&self) -> f64 {
        self.state.latency_ns(self.now.ns())
    }

    /// Whether it already took more than its weight's share of the
    /// fleet's recent dispatches (decayed over about a second). Only an
    /// endpoint with weight below 1 (slow start, busy dampening) can be
    /// over its share: a fresh endpoint looks cheap next to loaded peers,
    /// and without this cap the cost alone would pile requests onto it.
    pub fn is_over_share(&self) -> bool {
        let weight = self.weight();
        if weight >= 1.0 || weight <= 0.0 {
            return false;
        }
        let now = self.now.ns();
        let total = self.state.common().recent_dispatches(now);
        if total < SHARE_MIN_VOLUME {
            return false;
        }
        let sum = *self
            .weight_sum
            .get_or_init(|| self.all.iter().map(|s| s.weight()).sum::<f64>());
        if sum <= 0.0 {
            return false;
        }
        let mine = self.state.recent_dispatches(now);
        (mine + 1.0) / (total + 1.0) > SHARE_SLACK * weight / sum
    }

    /// The weight the cost functions divide by: 0 (drain it while anything
    /// else is usable) when [over its share](Self::is_over_share).
    fn share_weight(&self) -> f64 {
        if self.is_over_share() {
            0.0
        } else {
            self.weight()
        }
    }

    fn avail(&self) -> Avail {
        if self.avoided {
            Avail::Excluded
        } else if self.is_full() || self.is_busy() {
            Avail::Full
        } else {
            Avail::Usable
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for Candidate<'_, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Candidate")
            .field("position", &self.position)
            .field("index", &self.index())
            .field("key", self.key)
            .field("outstanding", &self.outstanding())
            .field("capacity", &self.capacity())
            .field("weight", &self.weight())
            .field("latency", &self.latency())
            .field("load", &self.load())
            .field("available", &self.is_available())
            .finish()
    }
}

/// The result of one pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Choice {
    /// Dispatch to this position.
    Pick(usize),
    /// Some endpoint could take the request later: all usable ones are at
    /// capacity or busy (or the policy said wait).
    Full,
    /// No endpoint may take the request (none known, or all avoided).
    Empty,
}

/// Asks `pick` and checks its answer: only an available candidate is a
/// pick; otherwise the request waits if any endpoint is allowed at all.
pub(crate) fn choose<K: 'static>(
    pick: &dyn Pick<K>,
    candidates: &Candidates<'_, K>,
    request: &http::Extensions,
    rng: &mut fastrand::Rng,
) -> Choice {
    if candidates.is_empty() {
        return Choice::Empty;
    }
    match pick.pick(candidates, request, rng) {
        Some(i) if i < candidates.len() && candidates.get(i).is_available() => Choice::Pick(i),
        _ if candidates.any_allowed() => Choice::Full,
        _ => Choice::Empty,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Avail {
    Usable,
    Full,
    Excluded,
}

type Cost<K> = fn(&Candidate<'_, K>) -> f64;

fn least_outstanding_cost<K>(c: &Candidate<'_, K>) -> f64 {
    (c.load() + 1.0) / c.share_weight()
}

fn peak_ewma_cost<K>(c: &Candidate<'_, K>) -> f64 {
    c.latency_ns() * (c.load() + 1.0) / c.share_weight()
}

/// Power of two choices over a cost (least-outstanding, peak-EWMA).
struct P2c {
    name: &'static str,
    ewma: bool,
}

impl<K: 'static> Pick<K> for P2c {
    fn pick(
        &self,
        candidates: &Candidates<'_, K>,
        _request: &http::Extensions,
        rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        if self.ewma {
            p2c(candidates, rng, peak_ewma_cost)
        } else {
            p2c(candidates, rng, least_outstanding_cost)
        }
    }

    fn name(&self) -> &str {
        self.name
    }
}

/// Power of two choices: compare two distinct random endpoints, take the
/// cheaper. Falls back to a scan when the sample is unusable.
fn p2c<K>(candidates: &Candidates<'_, K>, rng: &mut fastrand::Rng, cost: Cost<K>) -> Option<usize> {
    let n = candidates.len();
    if n < 2 {
        return scan(candidates, cost);
    }
    let a = rng.usize(..n);
    let mut b = rng.usize(..n - 1);
    if b >= a {
        b += 1;
    }
    let (ea, eb) = (candidates.get(a), candidates.get(b));
    let best = match (ea.avail(), eb.avail()) {
        (Avail::Usable, Avail::Usable) => {
            let (ca, cb) = (cost(&ea), cost(&eb));
            if ca <= cb { (a, ca) } else { (b, cb) }
        }
        (Avail::Usable, _) => (a, cost(&ea)),
        (_, Avail::Usable) => (b, cost(&eb)),
        _ => return scan(candidates, cost),
    };
    if best.1.is_finite() {
        Some(best.0)
    } else {
        // A weight-0 endpoint: only if no positive-weight one is usable.
        scan(candidates, cost)
    }
}

/// The cheapest usable endpoint; weight-0 ones (infinite cost) only if no
/// other is usable, then by load.
fn scan<K>(candidates: &Candidates<'_, K>, cost: Cost<K>) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    let mut zero_weight: Option<(usize, f64)> = None;
    for c in candidates.iter() {
        if c.avail() != Avail::Usable {
            continue;
        }
        let cost = cost(&c);
        if cost.is_finite() {
            if best.is_none_or(|(_, b)| cost < b) {
                best = Some((c.position(), cost));
            }
        } else {
            let load = c.load();
            if zero_weight.is_none_or(|(_, l)| load < l) {
                zero_weight = Some((c.position(), load));
            }
        }
    }
    best.or(zero_weight).map(|(i, _)| i)
}

/// Walks the endpoints in order from `start` and takes the first usable one
/// with weight, else the first usable one with weight zero. Answers the
/// pick and, for a pick with weight, how many steps it took.
fn walk_from<K>(candidates: &Candidates<'_, K>, start: usize) -> (Option<usize>, Option<usize>) {
    let n = candidates.len();
    let mut zero_weight = None;
    for step in 0..n {
        let c = candidates.get(start.wrapping_add(step) % n);
        if c.avail() == Avail::Usable {
            if c.weight() > 0.0 {
                return (Some(c.position()), Some(step));
            }
            zero_weight.get_or_insert(c.position());
        }
    }
    (zero_weight, None)
}

/// Each endpoint in turn (one cursor shared by every clone of the
/// balancer).
#[derive(Default)]
struct RoundRobin {
    cursor: AtomicUsize,
}

impl<K: 'static> Pick<K> for RoundRobin {
    fn pick(
        &self,
        candidates: &Candidates<'_, K>,
        _request: &http::Extensions,
        _rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let (choice, step) = walk_from(candidates, start);
        if let Some(step) = step.filter(|&s| s > 0) {
            // Skipped full endpoints: continue after the one taken.
            self.cursor
                .store(start.wrapping_add(step).wrapping_add(1), Ordering::Relaxed);
        }
        choice
    }

    fn name(&self) -> &str {
        "round_robin"
    }
}

/// A uniformly random endpoint.
struct Random;

impl<K: 'static> Pick<K> for Random {
    fn pick(
        &self,
        candidates: &Candidates<'_, K>,
        _request: &http::Extensions,
        rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        for _ in 0..n.min(8) {
            let c = candidates.get(rng.usize(..n));
            if c.avail() == Avail::Usable && c.weight() > 0.0 {
                return Some(c.position());
            }
        }
        // Unlucky draws or a crowded fleet: walk from a random start.
        walk_from(candidates, rng.usize(..n)).0
    }

    fn name(&self) -> &str {
        "random"
    }
}

/// A usable endpoint with probability proportional to its weight.
struct Weighted;

impl<K: 'static> Pick<K> for Weighted {
    fn pick(
        &self,
        candidates: &Candidates<'_, K>,
        _request: &http::Extensions,
        rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        let mut usable: Vec<(usize, f64)> = Vec::with_capacity(candidates.len());
        let mut total = 0.0;
        for c in candidates.iter() {
            if c.avail() == Avail::Usable {
                let w = c.weight();
                total += w;
                usable.push((c.position(), w));
            }
        }
        if usable.is_empty() {
            return None;
        }
        if total <= 0.0 {
            return Some(usable[rng.usize(..usable.len())].0);
        }
        let mut point = rng.f64() * total;
        for &(i, w) in &usable {
            if point < w {
                return Some(i);
            }
            point -= w;
        }
        // Rounding left the point past the end: the last positive weight.
        usable
            .iter()
            .rev()
            .find(|(_, w)| *w > 0.0)
            .map(|u| u.0)
            .or(Some(usable[0].0))
    }

    fn name(&self) -> &str {
        "weighted"
    }
}

/// The hash ring of [`Policy::ConsistentHash`]: `vnodes` points per endpoint,
/// sorted.
///
/// Endpoint *e*'s points are `stable_hash_seeded(v.to_le_bytes(), base)` for
/// `v` in `0..vnodes`, where `base` is the [`stable_hash`] of its key's
/// `Debug` form (its metric label: `3` for a `usize` key, `"node-1"` for a
/// `String` or [`keel_core::EndpointId`]); so every balancer, in every
/// version and on every platform, puts a key on the same endpoint.
#[derive(Debug, Default)]
pub(crate) struct Ring {
    points: Vec<(u64, EndpointIndex)>,
}

impl Ring {
    pub(crate) fn new<'k, K: fmt::Debug + 'k>(
        endpoints: impl IntoIterator<Item = (&'k K, EndpointIndex)>,
        vnodes: u32,
    ) -> Self {
        let mut points = Vec::new();
        for (key, index) in endpoints {
            let base = stable_hash(format!("{key:?}").as_bytes());
            for v in 0..vnodes {
                points.push((stable_hash_seeded(&v.to_le_bytes(), base), index));
            }
        }
        points.sort_unstable();
        Ring { points }
    }
}

/// Consistent hashing with bounded loads.
struct Hashed {
    config: HashConfig,
    ring: RwLock<Ring>,
}

impl<K: fmt::Debug + 'static> Pick<K> for Hashed {
    fn pick(
        &self,
        candidates: &Candidates<'_, K>,
        request: &http::Extensions,
        rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        match request.get::<AffinityKey>() {
            Some(key) => hashed(&self.config, candidates, &self.ring.read(), *key),
            None => p2c(candidates, rng, least_outstanding_cost),
        }
    }

    fn endpoints_changed(&self, endpoints: &Candidates<'_, K>) {
        let ring = Ring::new(
            endpoints.iter().map(|c| (c.key(), c.index())),
            self.config.vnodes,
        );
        *self.ring.write() = ring;
    }

    fn name(&self) -> &str {
        "consistent_hash"
    }
}

/// Consistent hashing with bounded loads: walk the ring clockwise from the
/// key's point to the first usable endpoint whose load after this request
/// stays within `⌈c × (total + 1) / n⌉`.
fn hashed<K>(
    config: &HashConfig,
    candidates: &Candidates<'_, K>,
    ring: &Ring,
    key: AffinityKey,
) -> Option<usize> {
    let mut total = 0.0;
    let mut counted = 0usize;
    for c in candidates.iter() {
        if !c.is_avoided() {
            total += c.load();
            counted += 1;
        }
    }
    if counted == 0 || ring.points.is_empty() {
        return None;
    }
    let bound = (config.load_factor * (total + 1.0) / counted as f64).ceil();
    let start = ring.points.partition_point(|&(p, _)| p < key.0);
    let len = ring.points.len();
    let mut zero_weight = None;
    for step in 0..len {
        let Some(i) = candidates.position_of(ring.points[(start + step) % len].1) else {
            continue;
        };
        let c = candidates.get(i);
        if c.avail() == Avail::Usable && c.load() + 1.0 <= bound {
            if c.weight() > 0.0 {
                return Some(i);
            }
            zero_weight.get_or_insert(i);
        }
    }
    // Nothing under the bound is usable (capacities, busy cooldowns): the
    // least-loaded usable endpoint, or wait.
    zero_weight.or_else(|| scan(candidates, least_outstanding_cost))
}

/// Prefix affinity (SGLang's cache-aware routing).
struct PrefixAffinity {
    config: PrefixConfig,
}

impl<K: 'static> Pick<K> for PrefixAffinity {
    fn pick(
        &self,
        candidates: &Candidates<'_, K>,
        request: &http::Extensions,
        rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        let blocks = request
            .get::<Prompt>()
            .map(|p| p.block_hashes(self.config.block_bytes))
            .unwrap_or_default();
        if blocks.is_empty() {
            return p2c(candidates, rng, least_outstanding_cost);
        }
        prefix(&self.config, candidates, &blocks)
    }

    fn name(&self) -> &str {
        "prefix_affinity"
    }
}

/// Prefix affinity: the endpoint with the longest cached prefix wins
/// unless the match is too short or that endpoint is over its load bound
/// (`max(balance_rel × least, least + balance_abs)`); then the least-loaded
/// endpoint.
fn prefix<K>(
    config: &PrefixConfig,
    candidates: &Candidates<'_, K>,
    blocks: &[u64],
) -> Option<usize> {
    let mut usable: Vec<(usize, f64, f64)> = Vec::with_capacity(candidates.len());
    let mut any_positive = false;
    for c in candidates.iter() {
        if c.avail() == Avail::Usable {
            let weight = c.weight();
            any_positive |= weight > 0.0;
            usable.push((c.position(), c.load(), weight));
        }
    }
    if any_positive {
        usable.retain(|&(_, _, w)| w > 0.0);
    }
    if usable.is_empty() {
        return None;
    }
    let min = usable.iter().map(|c| c.1).fold(f64::MAX, f64::min);
    let least = usable
        .iter()
        .min_by(|x, y| {
            let cx = (x.1 + 1.0) / x.2.max(f64::MIN_POSITIVE);
            let cy = (y.1 + 1.0) / y.2.max(f64::MIN_POSITIVE);
            cx.total_cmp(&cy)
        })
        .map_or(usable[0].0, |c| c.0);
    let index_of = |i: usize| {
        candidates.states[i]
            .prefix
            .get_or_init(|| Mutex::new(PrefixIndex::new(config.index_blocks)))
    };
    // The endpoint holding the longest prefix (the least loaded of those
    // that hold as much)...
    let mut best = (usable[0].0, 0usize, f64::MAX);
    for &(i, load, _) in &usable {
        let matched = candidates.states[i]
            .prefix
            .get()
            .map_or(0, |index| index.lock().matched(blocks));
        if matched > best.1 || (matched == best.1 && load < best.2) {
            best = (i, matched, load);
        }
    }
    // ...gets the request unless the match is too short or that endpoint
    // carries more than its bound over the least loaded one: then the
    // least loaded gets it (and learns the prefix, so a hot prefix spreads
    // over as many endpoints as its load needs).
    let bound = (config.balance_rel * min).max(min + f64::from(config.balance_abs));
    let (chosen, claimed) =
        if best.1 > 0 && best.1 as f64 >= config.min_match * blocks.len() as f64 && best.2 <= bound
        {
            (best.0, best.1)
        } else {
            let matched = candidates.states[least]
                .prefix
                .get()
                .map_or(0, |index| index.lock().matched(blocks));
            (least, matched)
        };
    index_of(chosen).lock().insert(blocks);
    candidates.prefix_claim.set(Some((claimed, blocks.len())));
    Some(chosen)
}

/// Block hashes are already uniform: use them as their own hash.
#[derive(Default)]
pub(crate) struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type BlockSet = HashSet<u64, BuildHasherDefault<IdentityHasher>>;

/// The blocks recently sent to one endpoint: an approximate LRU of two
/// generations (the current one rotates out when it holds half the
/// capacity; a block seen again is copied into the current generation).
///
/// The capacity is learned from what the endpoint reports it had cached
/// ([`Handle::report_cached_prefix`](crate::Handle::report_cached_prefix)):
/// an answer that had more than one block less of the prompt cached than
/// the index claimed halves it (the node evicted what the index still
/// remembers; one block of slack because servers cache whole blocks and
/// the prompt's last block is usually partial), an answer with about as
/// much grows it by half the prompt's length, up to
/// [`PrefixConfig::index_blocks`] (TCP's AIMD on the node's cache size).
/// Without reports it stays at `index_blocks`.
#[derive(Debug)]
pub(crate) struct PrefixIndex {
    current: BlockSet,
    previous: BlockSet,
    /// The learned capacity, halved: `current` rotates at this size.
    half: usize,
    /// `index_blocks / 2`: the most `half` grows to.
    max_half: usize,
}

/// The least a learned index keeps per generation.
const MIN_HALF: usize = 8;

impl PrefixIndex {
    pub(crate) fn new(capacity: usize) -> Self {
        let half = (capacity / 2).max(1);
        PrefixIndex {
            current: BlockSet::default(),
            previous: BlockSet::default(),
            half,
            max_half: half,
        }
    }

    fn contains(&self, block: u64) -> bool {
        self.current.contains(&block) || self.previous.contains(&block)
    }

    /// How many leading blocks of the chain this endpoint has seen.
    pub(crate) fn matched(&self, blocks: &[u64]) -> usize {
        blocks.iter().take_while(|&&b| self.contains(b)).count()
    }

    pub(crate) fn insert(&mut self, blocks: &[u64]) {
        for &block in blocks {
            if !self.current.contains(&block) {
                if self.current.len() >= self.half {
                    self.previous = std::mem::take(&mut self.current);
                }
                self.current.insert(block);
            }
        }
    }

    /// Learns from one answer: the index claimed `claimed` leading blocks
    /// of a `len`-block prompt when it routed it here, and the endpoint
    /// says it had `cached`.
    pub(crate) fn learn(&mut self, claimed: usize, len: usize, cached: usize) {
        if cached + 1 < claimed {
            // The node evicted blocks the index still claims: remember
            // less, and drop the older generation at once.
            self.half = (self.half / 2).max(MIN_HALF.min(self.max_half));
            self.previous = std::mem::take(&mut self.current);
            if self.previous.len() > self.half {
                self.previous.clear();
            }
        } else if cached > 0 || claimed > 0 {
            self.half = (self.half + len.max(1).div_ceil(2)).min(self.max_half);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BalancerConfig;
    use crate::endpoint::Handle;
    use keel_core::EndpointId;
    use proptest::prelude::*;

    struct Fleet {
        keys: Vec<EndpointId>,
        states: Vec<Arc<EndpointState>>,
        positions: HashMap<EndpointIndex, usize>,
        common: Arc<Common>,
    }

    fn fleet(n: usize, config: &BalancerConfig) -> Fleet {
        let common = Arc::new(Common::new(config));
        let keys: Vec<_> = (0..n).map(|i| EndpointId::new(format!("e{i}"))).collect();
        let states: Vec<_> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                Arc::new(EndpointState::new(
                    EndpointIndex::new(i as u64),
                    format!("{key:?}"),
                    Arc::new(key.clone()),
                    common.clone(),
                ))
            })
            .collect();
        let positions = states.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
        Fleet {
            keys,
            states,
            positions,
            common,
        }
    }

    impl Fleet {
        fn candidates<'a>(&'a self, ext: &'a http::Extensions) -> Candidates<'a, EndpointId> {
            Candidates::new(
                &self.keys,
                &self.states,
                &self.positions,
                ext.get::<AvoidEndpoints>(),
                &self.common,
            )
        }

        fn pick(
            &self,
            pick: &dyn Pick<EndpointId>,
            ext: &http::Extensions,
            rng: &mut fastrand::Rng,
        ) -> Choice {
            choose(pick, &self.candidates(ext), ext, rng)
        }

        fn built(&self, policy: &Policy) -> Box<dyn Pick<EndpointId>> {
            let pick = policy.build::<EndpointId>();
            pick.endpoints_changed(&self.candidates(&http::Extensions::new()));
            pick
        }
    }

    const PLAIN: [Policy; 5] = [
        Policy::RoundRobin,
        Policy::Random,
        Policy::LeastOutstanding,
        Policy::PeakEwma,
        Policy::Weighted,
    ];

    #[test]
    fn round_robin_cycles_and_skips_full_endpoints() {
        let config = BalancerConfig::default().max_outstanding_per_endpoint(1);
        let f = fleet(3, &config);
        let rr = f.built(&Policy::RoundRobin);
        let mut rng = fastrand::Rng::with_seed(7);
        let ext = http::Extensions::new();
        assert_eq!(f.pick(&*rr, &ext, &mut rng), Choice::Pick(0));
        assert_eq!(f.pick(&*rr, &ext, &mut rng), Choice::Pick(1));
        // Fill the third endpoint: round-robin steps over it.
        assert!(f.states[2].try_acquire());
        assert_eq!(f.pick(&*rr, &ext, &mut rng), Choice::Pick(0));
        assert_eq!(f.pick(&*rr, &ext, &mut rng), Choice::Pick(1));
        for e in &f.states {
            let _ = e.try_acquire();
        }
        assert_eq!(f.pick(&*rr, &ext, &mut rng), Choice::Full);
        let _handles: Vec<_> = f
            .states
            .iter()
            .map(|e| Handle::new(e.clone(), 0, None))
            .collect();
    }

    #[test]
    fn avoided_endpoints_are_never_picked() {
        let f = fleet(2, &BalancerConfig::default());
        let mut ext = http::Extensions::new();
        crate::AvoidEndpoints::add(&mut ext, EndpointIndex::new(0));
        let mut rng = fastrand::Rng::with_seed(1);
        for policy in PLAIN {
            let pick = f.built(&policy);
            for _ in 0..20 {
                assert_eq!(f.pick(&*pick, &ext, &mut rng), Choice::Pick(1));
            }
        }
        crate::AvoidEndpoints::add(&mut ext, EndpointIndex::new(1));
        let pick = f.built(&Policy::PeakEwma);
        assert_eq!(f.pick(&*pick, &ext, &mut rng), Choice::Empty);
    }

    #[test]
    fn weight_zero_is_drained_unless_nothing_else_is_usable() {
        let f = fleet(3, &BalancerConfig::default());
        f.keys[0].set_weight(0.0);
        let mut rng = fastrand::Rng::with_seed(3);
        let ext = http::Extensions::new();
        for policy in PLAIN {
            let pick = f.built(&policy);
            for _ in 0..50 {
                assert_ne!(
                    f.pick(&*pick, &ext, &mut rng),
                    Choice::Pick(0),
                    "{policy:?}"
                );
            }
        }
        for key in &f.keys {
            key.set_weight(0.0);
        }
        let pick = f.built(&Policy::LeastOutstanding);
        assert!(matches!(f.pick(&*pick, &ext, &mut rng), Choice::Pick(_)));
    }

    #[test]
    fn weighted_follows_the_keys_weights() {
        let f = fleet(2, &BalancerConfig::default());
        f.keys[0].set_weight(0.25);
        let pick = f.built(&Policy::Weighted);
        let mut rng = fastrand::Rng::with_seed(11);
        let ext = http::Extensions::new();
        let first = (0..10_000)
            .filter(|_| f.pick(&*pick, &ext, &mut rng) == Choice::Pick(0))
            .count();
        // 0.25 / 1.25 = 20%.
        assert!((1_700..2_300).contains(&first), "{first}");
    }

    /// Slow start caps the share of requests, not only the weight: a fresh
    /// endpoint at weight 0.1 among nine loaded peers looks cheap to
    /// peak-EWMA (no queue, the fleet's latency), yet takes about its
    /// weight's share of dispatches (0.1 / 9.1), at most 1.2× that.
    #[tokio::test(start_paused = true)]
    async fn an_endpoint_in_slow_start_takes_about_its_weights_share() {
        let f = fleet(10, &BalancerConfig::default());
        f.keys[0].set_weight(0.1);
        let pick = f.built(&Policy::PeakEwma);
        let mut rng = fastrand::Rng::with_seed(5);
        let ext = http::Extensions::new();
        // Every peer carries 10 requests; the fresh one none.
        let mut held = Vec::new();
        for state in &f.states[1..] {
            for _ in 0..10 {
                assert!(state.try_acquire());
                held.push(Handle::new(state.clone(), 0, None));
            }
        }
        let mut fresh = 0u32;
        let picks = 2_000;
        for _ in 0..picks {
            tokio::time::advance(Duration::from_millis(2)).await;
            let Choice::Pick(i) = f.pick(&*pick, &ext, &mut rng) else {
                panic!("an endpoint is usable");
            };
            let state = &f.states[i];
            assert!(state.try_acquire());
            let now = state.common().ns_of(tokio::time::Instant::now());
            // Dispatched and answered at once: the loads stay as they are.
            drop(Handle::new(state.clone(), now, None));
            fresh += u32::from(i == 0);
        }
        let share = f64::from(fresh) / f64::from(picks);
        let weight_share = 0.1 / 9.1;
        assert!(
            share <= 1.5 * weight_share && share >= 0.5 * weight_share,
            "share {share} vs weight share {weight_share}"
        );
        drop(held);
    }

    #[test]
    fn a_pick_of_an_unavailable_endpoint_waits() {
        struct Always(usize);
        impl Pick<EndpointId> for Always {
            fn pick(
                &self,
                _: &Candidates<'_, EndpointId>,
                _: &http::Extensions,
                _: &mut fastrand::Rng,
            ) -> Option<usize> {
                Some(self.0)
            }
        }
        let f = fleet(
            2,
            &BalancerConfig::default().max_outstanding_per_endpoint(1),
        );
        let mut rng = fastrand::Rng::with_seed(1);
        let ext = http::Extensions::new();
        assert_eq!(f.pick(&Always(1), &ext, &mut rng), Choice::Pick(1));
        assert!(f.states[1].try_acquire());
        assert_eq!(f.pick(&Always(1), &ext, &mut rng), Choice::Full, "full");
        assert_eq!(
            f.pick(&Always(9), &ext, &mut rng),
            Choice::Full,
            "out of range"
        );
        let _handle = Handle::new(f.states[1].clone(), 0, None);
    }

    /// Pinned: the ring is built from `stable_hash` of each key's `Debug`
    /// form, so these assignments hold in every build, version and
    /// platform. Changing them breaks affinity across a rolling deploy.
    #[test]
    fn ring_assignments_are_pinned() {
        let f = fleet(4, &BalancerConfig::default());
        let pick = f.built(&Policy::ConsistentHash(HashConfig::default()));
        let mut rng = fastrand::Rng::with_seed(0);
        let homes: Vec<_> = [
            "session-42",
            "tenant-a",
            "tenant-b",
            "",
            "You are a helpful assistant.",
        ]
        .iter()
        .map(|key| {
            let mut ext = http::Extensions::new();
            ext.insert(AffinityKey::of(key));
            match f.pick(&*pick, &ext, &mut rng) {
                Choice::Pick(i) => f.keys[i].to_string(),
                other => panic!("{other:?}"),
            }
        })
        .collect();
        assert_eq!(homes, PINNED_HOMES);
        let ring = Ring::new(f.keys.iter().zip((0..4).map(EndpointIndex::new)), 160);
        assert_eq!(ring.points.len(), 640);
        assert_eq!(ring.points[0], PINNED_FIRST_POINT);
    }

    const PINNED_HOMES: [&str; 5] = ["e2", "e1", "e0", "e0", "e1"];
    const PINNED_FIRST_POINT: (u64, EndpointIndex) =
        (13_955_272_399_391_171, EndpointIndex::new(1));

    #[test]
    fn prefix_index_remembers_recent_chains() {
        let mut index = PrefixIndex::new(8);
        index.insert(&[1, 2, 3]);
        assert_eq!(index.matched(&[1, 2, 3, 4]), 3);
        assert_eq!(index.matched(&[2, 3]), 2);
        assert_eq!(index.matched(&[9, 1]), 0);
        index.insert(&[10, 11, 12, 13, 14]);
        index.insert(&[20, 21, 22, 23]);
        assert_eq!(
            index.matched(&[1]),
            0,
            "two rotations forgot the oldest chain"
        );
        assert_eq!(index.matched(&[20, 21, 22, 23]), 4);
    }

    #[test]
    fn prefix_index_learns_the_nodes_cache_size() {
        let mut index = PrefixIndex::new(1024);
        assert_eq!(index.half, 512);
        // The node had 4 of the 16 blocks the index claimed: it evicted
        // them. The index halves and forgets its older generation. One
        // block short is not an eviction (a partial last block).
        index.learn(16, 16, 15);
        assert_eq!(index.half, 512);
        index.insert(&(0..16).collect::<Vec<_>>());
        index.learn(16, 16, 4);
        assert_eq!(index.half, 256);
        assert_eq!(
            index.matched(&(0..16).collect::<Vec<_>>()),
            16,
            "the newest chain stays"
        );
        for _ in 0..10 {
            index.learn(16, 16, 0);
        }
        assert_eq!(index.half, MIN_HALF, "never below the floor");
        // Answers that had what was claimed grow it back, by half a prompt
        // each, up to index_blocks.
        index.learn(16, 16, 16);
        assert_eq!(index.half, MIN_HALF + 8);
        index.learn(0, 16, 0);
        assert_eq!(
            index.half,
            MIN_HALF + 8,
            "no claim, nothing cached: no news"
        );
        for _ in 0..1000 {
            index.learn(4, 16, 16);
        }
        assert_eq!(index.half, 512);
    }

    proptest! {
        /// Bounded loads: whatever the loads, a keyed pick never pushes an
        /// endpoint past ⌈c × (total + 1) / n⌉.
        #[test]
        fn hashing_never_exceeds_the_bound(loads in prop::collection::vec(0u32..20, 2..12), key: u64, c in 1.0f64..2.0) {
            let f = fleet(loads.len(), &BalancerConfig::default());
            let mut handles = Vec::new();
            for (e, &load) in f.states.iter().zip(&loads) {
                for _ in 0..load {
                    prop_assert!(e.try_acquire());
                    handles.push(Handle::new(e.clone(), 0, None));
                }
            }
            let pick = f.built(&Policy::ConsistentHash(HashConfig::default().load_factor(c).vnodes(40)));
            let mut ext = http::Extensions::new();
            ext.insert(AffinityKey(key));
            let choice = f.pick(&*pick, &ext, &mut fastrand::Rng::with_seed(key));
            let total: u32 = loads.iter().sum();
            let bound = (c * f64::from(total + 1) / loads.len() as f64).ceil();
            match choice {
                Choice::Pick(i) => prop_assert!(f64::from(loads[i] + 1) <= bound),
                other => prop_assert!(false, "no pick: {other:?}"),
            }
        }
    }
}
