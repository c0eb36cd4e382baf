//! Picking an endpoint: the policies, the hash ring and the prefix index.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;

use crate::config::{HashConfig, Policy, PrefixConfig};
use crate::endpoint::{EndpointState, LazyNow};
use crate::request::{AffinityKey, AvoidEndpoints, stable_hash};

/// The result of one pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Choice {
    /// Dispatch to this index.
    Pick(usize),
    /// Some endpoint could take the request later: all usable ones are at
    /// capacity or busy.
    Full,
    /// No endpoint may take the request (none known, or all avoided).
    Empty,
}

/// Per-balancer-handle picking state.
#[derive(Debug)]
pub(crate) struct Picker {
    pub(crate) rng: fastrand::Rng,
    cursor: usize,
}

impl Picker {
    pub(crate) fn new(seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let cursor = rng.usize(..);
        Picker { rng, cursor }
    }
}

/// What the request says about routing.
#[derive(Debug, Default)]
pub(crate) struct Hints<'a> {
    pub(crate) avoid: Option<&'a AvoidEndpoints>,
    pub(crate) key: Option<AffinityKey>,
    pub(crate) blocks: Option<Vec<u64>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Avail {
    Usable,
    Full,
    Excluded,
}

fn avail(e: &EndpointState, hints: &Hints<'_>, now: &mut LazyNow<'_>) -> Avail {
    if hints.avoid.is_some_and(|a| a.contains(e.id)) {
        Avail::Excluded
    } else if e.outstanding() >= e.cap() || e.is_busy(now) {
        Avail::Full
    } else {
        Avail::Usable
    }
}

/// Picks an endpoint for one request.
pub(crate) fn choose(
    policy: &Policy,
    states: &[Arc<EndpointState>],
    ring: Option<&Ring>,
    hints: &Hints<'_>,
    picker: &mut Picker,
    now: &mut LazyNow<'_>,
) -> Choice {
    match policy {
        Policy::RoundRobin => round_robin(states, hints, picker, now),
        Policy::Random => random(states, hints, picker, now),
        Policy::LeastOutstanding => p2c(states, hints, picker, now, least_outstanding_cost),
        Policy::PeakEwma => p2c(states, hints, picker, now, peak_ewma_cost),
        Policy::Weighted => weighted(states, hints, picker, now),
        Policy::ConsistentHash(config) => match (hints.key, ring) {
            (Some(key), Some(ring)) => hashed(config, states, ring, key, hints, now),
            _ => p2c(states, hints, picker, now, least_outstanding_cost),
        },
        Policy::PrefixAffinity(config) => match &hints.blocks {
            Some(blocks) if !blocks.is_empty() => prefix(config, states, blocks, hints, now),
            _ => p2c(states, hints, picker, now, least_outstanding_cost),
        },
    }
}

fn least_outstanding_cost(e: &EndpointState, now: &mut LazyNow<'_>) -> f64 {
    (e.load(now) + 1.0) / e.weight()
}

fn peak_ewma_cost(e: &EndpointState, now: &mut LazyNow<'_>) -> f64 {
    let latency = e.latency_ns(now.ns());
    latency * (e.load(now) + 1.0) / e.weight()
}

/// Power of two choices: compare two distinct random endpoints, take the
/// cheaper. Falls back to a scan when the sample is unusable.
fn p2c(
    states: &[Arc<EndpointState>],
    hints: &Hints<'_>,
    picker: &mut Picker,
    now: &mut LazyNow<'_>,
    cost: fn(&EndpointState, &mut LazyNow<'_>) -> f64,
) -> Choice {
    let n = states.len();
    if n < 2 {
        return scan(states, hints, now, cost);
    }
    let a = picker.rng.usize(..n);
    let mut b = picker.rng.usize(..n - 1);
    if b >= a {
        b += 1;
    }
    let (ea, eb) = (&states[a], &states[b]);
    let best = match (avail(ea, hints, now), avail(eb, hints, now)) {
        (Avail::Usable, Avail::Usable) => {
            let (ca, cb) = (cost(ea, now), cost(eb, now));
            if ca <= cb { (a, ca) } else { (b, cb) }
        }
        (Avail::Usable, _) => (a, cost(ea, now)),
        (_, Avail::Usable) => (b, cost(eb, now)),
        _ => return scan(states, hints, now, cost),
    };
    if best.1.is_finite() {
        Choice::Pick(best.0)
    } else {
        // A weight-0 endpoint: only if no positive-weight one is usable.
        scan(states, hints, now, cost)
    }
}

/// The cheapest usable endpoint; weight-0 ones (infinite cost) only if no
/// other is usable, then by load.
fn scan(
    states: &[Arc<EndpointState>],
    hints: &Hints<'_>,
    now: &mut LazyNow<'_>,
    cost: fn(&EndpointState, &mut LazyNow<'_>) -> f64,
) -> Choice {
    let mut best: Option<(usize, f64)> = None;
    let mut zero_weight: Option<(usize, f64)> = None;
    let mut any_full = false;
    for (i, e) in states.iter().enumerate() {
        match avail(e, hints, now) {
            Avail::Usable => {
                let c = cost(e, now);
                if c.is_finite() {
                    if best.is_none_or(|(_, b)| c < b) {
                        best = Some((i, c));
                    }
                } else {
                    let load = e.load(now);
                    if zero_weight.is_none_or(|(_, l)| load < l) {
                        zero_weight = Some((i, load));
                    }
                }
            }
            Avail::Full => any_full = true,
            Avail::Excluded => {}
        }
    }
    match best.or(zero_weight) {
        Some((i, _)) => Choice::Pick(i),
        None if any_full => Choice::Full,
        None => Choice::Empty,
    }
}

/// Walks the endpoints in ring order from `start` and takes the first
/// usable one with weight, else the first usable one with weight zero.
/// Answers the choice and, for a pick with weight, how many steps it took.
fn walk_from(
    states: &[Arc<EndpointState>],
    hints: &Hints<'_>,
    now: &mut LazyNow<'_>,
    start: usize,
) -> (Choice, Option<usize>) {
    let n = states.len();
    let mut zero_weight = None;
    let mut any_full = false;
    for step in 0..n {
        let i = start.wrapping_add(step) % n;
        match avail(&states[i], hints, now) {
            Avail::Usable if states[i].weight() > 0.0 => return (Choice::Pick(i), Some(step)),
            Avail::Usable => {
                zero_weight.get_or_insert(i);
            }
            Avail::Full => any_full = true,
            Avail::Excluded => {}
        }
    }
    let choice = match zero_weight {
        Some(i) => Choice::Pick(i),
        None if any_full => Choice::Full,
        None => Choice::Empty,
    };
    (choice, None)
}

fn round_robin(
    states: &[Arc<EndpointState>],
    hints: &Hints<'_>,
    picker: &mut Picker,
    now: &mut LazyNow<'_>,
) -> Choice {
    let start = picker.cursor;
    picker.cursor = picker.cursor.wrapping_add(1);
    let (choice, step) = walk_from(states, hints, now, start);
    if let Some(step) = step {
        picker.cursor = start.wrapping_add(step).wrapping_add(1);
    }
    choice
}

fn random(
    states: &[Arc<EndpointState>],
    hints: &Hints<'_>,
    picker: &mut Picker,
    now: &mut LazyNow<'_>,
) -> Choice {
    let n = states.len();
    if n == 0 {
        return Choice::Empty;
    }
    for _ in 0..n.min(8) {
        let i = picker.rng.usize(..n);
        if avail(&states[i], hints, now) == Avail::Usable && states[i].weight() > 0.0 {
            return Choice::Pick(i);
        }
    }
    // Unlucky draws or a crowded fleet: walk from a random start.
    let start = picker.rng.usize(..n);
    walk_from(states, hints, now, start).0
}

/// A usable endpoint with probability proportional to its weight.
fn weighted(
    states: &[Arc<EndpointState>],
    hints: &Hints<'_>,
    picker: &mut Picker,
    now: &mut LazyNow<'_>,
) -> Choice {
    let mut usable: Vec<(usize, f64)> = Vec::with_capacity(states.len());
    let mut any_full = false;
    let mut total = 0.0;
    for (i, e) in states.iter().enumerate() {
        match avail(e, hints, now) {
            Avail::Usable => {
                let w = e.weight();
                total += w;
                usable.push((i, w));
            }
            Avail::Full => any_full = true,
            Avail::Excluded => {}
        }
    }
    if usable.is_empty() {
        return if any_full {
            Choice::Full
        } else {
            Choice::Empty
        };
    }
    if total <= 0.0 {
        return Choice::Pick(usable[picker.rng.usize(..usable.len())].0);
    }
    let mut point = picker.rng.f64() * total;
    for &(i, w) in &usable {
        if point < w {
            return Choice::Pick(i);
        }
        point -= w;
    }
    // Rounding left the point past the end: the last positive weight.
    let last = usable
        .iter()
        .rev()
        .find(|(_, w)| *w > 0.0)
        .map_or(usable[0].0, |u| u.0);
    Choice::Pick(last)
}

/// The hash ring of [`Policy::ConsistentHash`]: `vnodes` points per endpoint,
/// sorted.
#[derive(Debug, Default)]
pub(crate) struct Ring {
    points: Vec<(u64, usize)>,
}

impl Ring {
    pub(crate) fn new<K: Hash>(keys: &[K], vnodes: u32) -> Self {
        let mut points = Vec::with_capacity(keys.len() * vnodes as usize);
        for (i, key) in keys.iter().enumerate() {
            let base = stable_hash(key);
            for v in 0..vnodes {
                points.push((stable_hash(&(base, v)), i));
            }
        }
        points.sort_unstable();
        Ring { points }
    }
}

/// Consistent hashing with bounded loads: walk the ring clockwise from the
/// key's point to the first usable endpoint whose load after this request
/// stays within `⌈c × (total + 1) / n⌉`.
fn hashed(
    config: &HashConfig,
    states: &[Arc<EndpointState>],
    ring: &Ring,
    key: AffinityKey,
    hints: &Hints<'_>,
    now: &mut LazyNow<'_>,
) -> Choice {
    let mut total = 0.0;
    let mut counted = 0usize;
    for e in states {
        if !hints.avoid.is_some_and(|a| a.contains(e.id)) {
            total += e.load(now);
            counted += 1;
        }
    }
    if counted == 0 || ring.points.is_empty() {
        return Choice::Empty;
    }
    let bound = (config.load_factor * (total + 1.0) / counted as f64).ceil();
    let start = ring.points.partition_point(|&(p, _)| p < key.0);
    let len = ring.points.len();
    let mut zero_weight = None;
    for step in 0..len {
        let i = ring.points[(start + step) % len].1;
        let e = &states[i];
        if avail(e, hints, now) == Avail::Usable && e.load(now) + 1.0 <= bound {
            if e.weight() > 0.0 {
                return Choice::Pick(i);
            }
            zero_weight.get_or_insert(i);
        }
    }
    match zero_weight {
        Some(i) => Choice::Pick(i),
        // Nothing under the bound is usable (capacities, busy cooldowns):
        // the least-loaded usable endpoint, or wait.
        None => scan(states, hints, now, least_outstanding_cost),
    }
}

/// Prefix affinity: the longest cached prefix wins unless the fleet is
/// imbalanced or the match is too short; then the least-loaded endpoint.
fn prefix(
    config: &PrefixConfig,
    states: &[Arc<EndpointState>],
    blocks: &[u64],
    hints: &Hints<'_>,
    now: &mut LazyNow<'_>,
) -> Choice {
    let mut candidates: Vec<(usize, f64)> = Vec::with_capacity(states.len());
    let mut any_full = false;
    let mut any_positive = false;
    for (i, e) in states.iter().enumerate() {
        match avail(e, hints, now) {
            Avail::Usable => {
                any_positive |= e.weight() > 0.0;
                candidates.push((i, e.load(now)));
            }
            Avail::Full => any_full = true,
            Avail::Excluded => {}
        }
    }
    if any_positive {
        candidates.retain(|&(i, _)| states[i].weight() > 0.0);
    }
    if candidates.is_empty() {
        return if any_full {
            Choice::Full
        } else {
            Choice::Empty
        };
    }
    let max = candidates.iter().map(|c| c.1).fold(f64::MIN, f64::max);
    let min = candidates.iter().map(|c| c.1).fold(f64::MAX, f64::min);
    let least = candidates
        .iter()
        .min_by(|x, y| {
            let cx = (x.1 + 1.0) / states[x.0].weight().max(f64::MIN_POSITIVE);
            let cy = (y.1 + 1.0) / states[y.0].weight().max(f64::MIN_POSITIVE);
            cx.total_cmp(&cy)
        })
        .map(|c| c.0)
        .unwrap_or(candidates[0].0);
    let imbalanced = max - min > f64::from(config.balance_abs) && max > config.balance_rel * min;
    let chosen = if imbalanced {
        least
    } else {
        let mut best = (candidates[0].0, 0usize, f64::MAX);
        for &(i, load) in &candidates {
            let matched = states[i]
                .prefix
                .as_ref()
                .map_or(0, |index| index.lock().matched(blocks));
            if matched > best.1 || (matched == best.1 && load < best.2) {
                best = (i, matched, load);
            }
        }
        if best.1 > 0 && best.1 as f64 >= config.min_match * blocks.len() as f64 {
            best.0
        } else {
            least
        }
    };
    if let Some(index) = &states[chosen].prefix {
        index.lock().insert(blocks);
    }
    Choice::Pick(chosen)
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
#[derive(Debug)]
pub(crate) struct PrefixIndex {
    current: BlockSet,
    previous: BlockSet,
    half: usize,
}

impl PrefixIndex {
    pub(crate) fn new(capacity: usize) -> Self {
        PrefixIndex {
            current: BlockSet::default(),
            previous: BlockSet::default(),
            half: (capacity / 2).max(1),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BalancerConfig;
    use crate::endpoint::{Common, EndpointId, Handle};
    use proptest::prelude::*;

    fn fleet(n: usize, config: &BalancerConfig) -> Vec<Arc<EndpointState>> {
        let common = Arc::new(Common::new(config));
        (0..n)
            .map(|i| {
                Arc::new(EndpointState::new(
                    EndpointId::new(i as u64),
                    format!("e{i}"),
                    1.0,
                    common.clone(),
                    Some(64),
                ))
            })
            .collect()
    }

    fn pick(
        policy: &Policy,
        states: &[Arc<EndpointState>],
        hints: &Hints<'_>,
        picker: &mut Picker,
    ) -> Choice {
        let common = states[0].common();
        choose(
            policy,
            states,
            None,
            hints,
            picker,
            &mut LazyNow::new(common),
        )
    }

    #[test]
    fn round_robin_cycles_and_skips_full_endpoints() {
        let config = BalancerConfig::default().max_outstanding_per_endpoint(1);
        let states = fleet(3, &config);
        let mut picker = Picker::new(7);
        let hints = Hints::default();
        let first = match pick(&Policy::RoundRobin, &states, &hints, &mut picker) {
            Choice::Pick(i) => i,
            other => panic!("{other:?}"),
        };
        let second = pick(&Policy::RoundRobin, &states, &hints, &mut picker);
        assert_eq!(second, Choice::Pick((first + 1) % 3));
        // Fill the third endpoint: round-robin steps over it.
        assert!(states[(first + 2) % 3].try_acquire());
        assert_eq!(
            pick(&Policy::RoundRobin, &states, &hints, &mut picker),
            Choice::Pick(first)
        );
        for e in &states {
            let _ = e.try_acquire();
        }
        assert_eq!(
            pick(&Policy::RoundRobin, &states, &hints, &mut picker),
            Choice::Full
        );
        let _handles: Vec<_> = states.iter().map(|e| Handle::new(e.clone(), 0)).collect();
    }

    #[test]
    fn avoided_endpoints_are_never_picked() {
        let states = fleet(2, &BalancerConfig::default());
        let mut ext = http::Extensions::new();
        crate::AvoidEndpoints::add(&mut ext, EndpointId::new(0));
        let hints = Hints {
            avoid: ext.get::<AvoidEndpoints>(),
            ..Hints::default()
        };
        let mut picker = Picker::new(1);
        for policy in [
            Policy::RoundRobin,
            Policy::Random,
            Policy::LeastOutstanding,
            Policy::PeakEwma,
            Policy::Weighted,
        ] {
            for _ in 0..20 {
                assert_eq!(pick(&policy, &states, &hints, &mut picker), Choice::Pick(1));
            }
        }
        crate::AvoidEndpoints::add(&mut ext, EndpointId::new(1));
        let hints = Hints {
            avoid: ext.get::<AvoidEndpoints>(),
            ..Hints::default()
        };
        assert_eq!(
            pick(&Policy::PeakEwma, &states, &hints, &mut picker),
            Choice::Empty
        );
    }

    #[test]
    fn weight_zero_is_drained_unless_nothing_else_is_usable() {
        let states = fleet(3, &BalancerConfig::default());
        states[0].set_weight(0.0);
        let mut picker = Picker::new(3);
        let hints = Hints::default();
        for policy in [
            Policy::RoundRobin,
            Policy::Random,
            Policy::LeastOutstanding,
            Policy::PeakEwma,
            Policy::Weighted,
        ] {
            for _ in 0..50 {
                assert_ne!(
                    pick(&policy, &states, &hints, &mut picker),
                    Choice::Pick(0),
                    "{policy:?}"
                );
            }
        }
        for e in &states {
            e.set_weight(0.0);
        }
        assert!(matches!(
            pick(&Policy::LeastOutstanding, &states, &hints, &mut picker),
            Choice::Pick(_)
        ));
    }

    #[test]
    fn weighted_follows_weights() {
        let states = fleet(2, &BalancerConfig::default());
        states[0].set_weight(0.25);
        let mut picker = Picker::new(11);
        let hints = Hints::default();
        let mut first = 0;
        for _ in 0..10_000 {
            if pick(&Policy::Weighted, &states, &hints, &mut picker) == Choice::Pick(0) {
                first += 1;
            }
        }
        // 0.25 / 1.25 = 20%.
        assert!((1_700..2_300).contains(&first), "{first}");
    }

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

    proptest! {
        /// Bounded loads: whatever the loads, a keyed pick never pushes an
        /// endpoint past ⌈c × (total + 1) / n⌉.
        #[test]
        fn hashing_never_exceeds_the_bound(loads in prop::collection::vec(0u32..20, 2..12), key: u64, c in 1.0f64..2.0) {
            let states = fleet(loads.len(), &BalancerConfig::default());
            let mut handles = Vec::new();
            for (e, &load) in states.iter().zip(&loads) {
                for _ in 0..load {
                    prop_assert!(e.try_acquire());
                    handles.push(Handle::new(e.clone(), 0));
                }
            }
            let keys: Vec<usize> = (0..states.len()).collect();
            let ring = Ring::new(&keys, 40);
            let config = HashConfig::default().load_factor(c);
            let hints = Hints { key: Some(AffinityKey(key)), ..Hints::default() };
            let mut now = LazyNow::new(states[0].common());
            let choice = hashed(&config, &states, &ring, AffinityKey(key), &hints, &mut now);
            let total: u32 = loads.iter().sum();
            let bound = (c * f64::from(total + 1) / loads.len() as f64).ceil();
            match choice {
                Choice::Pick(i) => prop_assert!(f64::from(loads[i] + 1) <= bound),
                other => prop_assert!(false, "no pick: {other:?}"),
            }
        }
    }
}
