//! The ordered set of waiting requests: priority classes with minimum
//! shares, weighted deficit round robin over tenants within a class, and
//! earliest deadline first within a tenant.
//!
//! Pure data structure, no clock of its own and no I/O: the scheduler calls
//! it under its lock, and the tests drive it directly.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, VecDeque};

use tokio::time::Instant;

use crate::ticket::{TenantHash, TenantId};

/// Orders a tenant's requests: earliest deadline first (no deadline last),
/// then arrival order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Key {
    deadline: Option<Instant>,
    seq: u64,
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        let by_deadline = match (self.deadline, other.deadline) {
            (Some(a), Some(b)) => a.cmp(&b),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        by_deadline.then(self.seq.cmp(&other.seq))
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Where one waiting request is, so its submitter can take it back out.
#[derive(Clone, Debug)]
pub(crate) struct Loc {
    pub(crate) class: usize,
    pub(crate) tenant: TenantId,
    key: Key,
}

/// One waiting request.
#[derive(Debug)]
pub(crate) struct Entry<T> {
    pub(crate) value: T,
    pub(crate) cost: u64,
    pub(crate) enqueued: Instant,
    pub(crate) deadline: Option<Instant>,
}

/// A request taken out for dispatch, with what the caller needs to know.
#[derive(Debug)]
pub(crate) struct Popped<T> {
    pub(crate) class: usize,
    pub(crate) tenant: TenantId,
    pub(crate) key: Key,
    pub(crate) entry: Entry<T>,
}

#[derive(Debug)]
struct TenantQueue<T> {
    items: BTreeMap<Key, Entry<T>>,
    weight: u64,
    deficit: u64,
    /// Whether this visit's quantum was already added.
    credited: bool,
    /// In the class's round-robin list (else parked at its concurrency
    /// limit, or lazily empty).
    active: bool,
}

/// Empty tenant queues kept per class for reuse (a tenant coming back
/// often does not allocate again); memory stays bounded by this plus the
/// tenants with work.
const RETAINED_TENANTS: usize = 64;

impl<T> TenantQueue<T> {
    /// Back to a fresh, empty, inactive state (keeping the allocation).
    fn reset(&mut self) {
        debug_assert!(self.items.is_empty());
        self.deficit = 0;
        self.credited = false;
        self.active = false;
    }
}

#[derive(Debug)]
struct Class<T> {
    tenants: HashMap<TenantId, TenantQueue<T>, TenantHash>,
    /// Round-robin order of tenants with work. A tenant is in it at most
    /// once (`TenantQueue::active`).
    rr: VecDeque<TenantId>,
    len: usize,
    /// Since when the class has been non-empty.
    nonempty_since: Option<Instant>,
}

impl<T> Class<T> {
    /// Resets the class once it holds no request: every tenant left is
    /// empty. A few empty tenants are kept (their queues' allocations are
    /// reused when they come back); beyond [`RETAINED_TENANTS`] all go.
    fn clear(&mut self) {
        debug_assert!(self.tenants.values().all(|tq| tq.items.is_empty()));
        if self.tenants.len() > RETAINED_TENANTS {
            self.tenants.clear();
        } else {
            for tq in self.tenants.values_mut() {
                tq.reset();
            }
        }
        self.rr.clear();
        self.len = 0;
        self.nonempty_since = None;
    }

    /// A tenant's queue just became empty: keep it for reuse while few
    /// are kept, else drop it.
    fn emptied(&mut self, tenant: &TenantId) {
        if self.tenants.len() > RETAINED_TENANTS {
            self.tenants.remove(tenant);
        } else if let Some(tq) = self.tenants.get_mut(tenant) {
            tq.reset();
        }
    }

    fn new() -> Self {
        Class {
            tenants: HashMap::default(),
            rr: VecDeque::new(),
            len: 0,
            nonempty_since: None,
        }
    }
}

/// All waiting requests.
#[derive(Debug)]
pub(crate) struct Pending<T> {
    classes: Vec<Class<T>>,
    /// Minimum share of dispatches per class while it has work.
    shares: Vec<f64>,
    credits: Vec<f64>,
    quantum: u64,
    len: usize,
    seq: u64,
}

impl<T> Pending<T> {
    /// `shares[c]` is class `c`'s minimum share of dispatches (class 0 is
    /// the lowest priority); `quantum` is the cost credited per round per
    /// unit of weight (raised to the largest cost seen, so every visit can
    /// serve at least one request).
    pub(crate) fn new(shares: Vec<f64>, quantum: u64) -> Self {
        Pending {
            classes: shares.iter().map(|_| Class::new()).collect(),
            credits: vec![0.0; shares.len()],
            shares,
            quantum: quantum.max(1),
            len: 0,
            seq: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn classes(&self) -> usize {
        self.classes.len()
    }

    /// Requests waiting in `class`.
    pub(crate) fn class_len(&self, class: usize) -> usize {
        self.classes[class].len
    }

    /// Since when `class` has had work, if it has.
    pub(crate) fn nonempty_since(&self, class: usize) -> Option<Instant> {
        self.classes[class].nonempty_since
    }

    /// Requests of `tenant` waiting in any class.
    pub(crate) fn tenant_len(&self, tenant: &TenantId) -> usize {
        self.classes
            .iter()
            .filter_map(|class| class.tenants.get(tenant))
            .map(|queue| queue.items.len())
            .sum()
    }

    /// Adds a request. `eligible` says whether the tenant may be dispatched
    /// now (below its concurrency limit); an ineligible tenant is parked
    /// until [`unpark`](Self::unpark).
    pub(crate) fn push(
        &mut self,
        class: usize,
        tenant: &TenantId,
        weight: u64,
        eligible: bool,
        entry: Entry<T>,
    ) -> Loc {
        let key = Key {
            deadline: entry.deadline,
            seq: self.seq,
        };
        self.seq += 1;
        self.quantum = self.quantum.max(entry.cost);
        let now = entry.enqueued;
        let queue = &mut self.classes[class];
        let tq = match queue.tenants.get_mut(tenant) {
            Some(tq) => tq,
            None => queue
                .tenants
                .entry(tenant.clone())
                .or_insert_with(|| TenantQueue {
                    items: BTreeMap::new(),
                    weight: weight.max(1),
                    deficit: 0,
                    credited: false,
                    active: false,
                }),
        };
        tq.items.insert(key, entry);
        if !tq.active && eligible {
            tq.active = true;
            queue.rr.push_back(tenant.clone());
        }
        queue.len += 1;
        queue.nonempty_since.get_or_insert(now);
        self.len += 1;
        Loc {
            class,
            tenant: tenant.clone(),
            key,
        }
    }

    /// Takes a request back out (its submitter gave up or it expired).
    /// Answers `None` when it was already taken.
    pub(crate) fn remove(&mut self, loc: &Loc) -> Option<Entry<T>> {
        let class = &mut self.classes[loc.class];
        let tq = class.tenants.get_mut(&loc.tenant)?;
        let entry = tq.items.remove(&loc.key)?;
        if tq.items.is_empty() && !tq.active {
            // Parked and now empty: nothing refers to it any more.
            class.emptied(&loc.tenant);
        }
        // An active, empty tenant is dropped lazily when the round robin
        // reaches it.
        class.len -= 1;
        if class.len == 0 {
            class.clear();
            self.credits[loc.class] = 0.0;
        }
        self.len -= 1;
        Some(entry)
    }

    /// Puts back a request taken by [`pop`](Self::pop) that could not be
    /// sent after all: same place in its tenant's order, its cost refunded,
    /// its tenant at the front of the round robin (it was being served).
    pub(crate) fn restore(
        &mut self,
        class: usize,
        tenant: &TenantId,
        weight: u64,
        key: Key,
        entry: Entry<T>,
    ) {
        let queue = &mut self.classes[class];
        let tq = queue
            .tenants
            .entry(tenant.clone())
            .or_insert_with(|| TenantQueue {
                items: BTreeMap::new(),
                weight: weight.max(1),
                deficit: 0,
                credited: false,
                active: false,
            });
        tq.deficit = tq.deficit.saturating_add(entry.cost);
        let enqueued = entry.enqueued;
        tq.items.insert(key, entry);
        if !tq.active {
            tq.active = true;
            queue.rr.push_front(tenant.clone());
        }
        queue.len += 1;
        queue.nonempty_since = Some(queue.nonempty_since.map_or(enqueued, |s| s.min(enqueued)));
        self.len += 1;
    }

    /// Puts a tenant back into the round robin of every class where it has
    /// work (it fell below its concurrency limit).
    pub(crate) fn unpark(&mut self, tenant: &TenantId) {
        for class in &mut self.classes {
            if let Some(tq) = class.tenants.get_mut(tenant)
                && !tq.active
                && !tq.items.is_empty()
            {
                tq.active = true;
                class.rr.push_back(tenant.clone());
            }
        }
    }

    /// Takes the next request to dispatch: the class chosen by minimum
    /// shares then strict priority, the tenant chosen by weighted deficit
    /// round robin over cost, the tenant's earliest deadline.
    ///
    /// Tenants for which `eligible` answers `false` are parked until
    /// [`unpark`](Self::unpark). Answers `None` when nothing is eligible.
    pub(crate) fn pop(&mut self, mut eligible: impl FnMut(&TenantId) -> bool) -> Option<Popped<T>> {
        if self.len == 0 {
            return None;
        }
        let n = self.classes.len();
        // First a class owed its minimum share, then strict priority.
        let owed = (0..n).rev().filter(|&c| {
            self.classes[c].len > 0
                && self.shares[c] > 0.0
                && self.credits[c] + self.shares[c] >= 1.0
        });
        let mut chosen = None;
        for class in owed.collect::<SmallClasses>().iter().chain((0..n).rev()) {
            if self.classes[class].len == 0 {
                continue;
            }
            if let Some(popped) = self.pop_class(class, &mut eligible) {
                chosen = Some((class, popped));
                break;
            }
        }
        let (class, (tenant, key, entry)) = chosen?;
        for c in 0..n {
            if self.classes[c].len > 0 || c == class {
                self.credits[c] += self.shares[c];
            }
        }
        self.credits[class] = (self.credits[class] - 1.0).max(0.0);
        let queue = &mut self.classes[class];
        queue.len -= 1;
        if queue.len == 0 {
            queue.clear();
            self.credits[class] = 0.0;
        }
        self.len -= 1;
        Some(Popped {
            class,
            tenant,
            key,
            entry,
        })
    }

    /// Deficit round robin within one class.
    fn pop_class(
        &mut self,
        class: usize,
        eligible: &mut impl FnMut(&TenantId) -> bool,
    ) -> Option<(TenantId, Key, Entry<T>)> {
        let quantum = self.quantum;
        let queue = &mut self.classes[class];
        // Visits since the last time every active tenant was credited.
        let mut unserved = 0usize;
        loop {
            let tenant = queue.rr.pop_front()?;
            let Some(tq) = queue.tenants.get_mut(&tenant) else {
                continue;
            };
            if tq.items.is_empty() {
                queue.emptied(&tenant);
                continue;
            }
            if !eligible(&tenant) {
                tq.active = false;
                tq.credited = false;
                continue;
            }
            if !tq.credited {
                tq.deficit = tq.deficit.saturating_add(quantum.saturating_mul(tq.weight));
                tq.credited = true;
            }
            let head_cost = tq
                .items
                .first_key_value()
                .expect("checked non-empty")
                .1
                .cost;
            if head_cost <= tq.deficit {
                tq.deficit -= head_cost;
                let (key, entry) = tq.items.pop_first().expect("the head exists");
                if tq.items.is_empty() {
                    queue.emptied(&tenant);
                } else {
                    // Its turn continues while its deficit lasts.
                    queue.rr.push_front(tenant.clone());
                }
                return Some((tenant, key, entry));
            }
            tq.credited = false;
            queue.rr.push_back(tenant);
            unserved += 1;
            if unserved >= queue.rr.len() {
                // A whole round served no one (costs far above the
                // quantum): add the rounds the closest tenant still needs
                // to everyone at once instead of looping through them.
                Self::skip_rounds(queue, quantum);
                unserved = 0;
            }
        }
    }

    fn skip_rounds(queue: &mut Class<T>, quantum: u64) {
        let rounds = queue
            .rr
            .iter()
            .filter_map(|t| queue.tenants.get(t))
            .filter_map(|tq| {
                let head = tq.items.first_key_value()?.1.cost;
                let missing = head.saturating_sub(tq.deficit);
                Some(missing.div_ceil(quantum.saturating_mul(tq.weight)))
            })
            .min()
            .unwrap_or(1);
        // The next visit adds one more quantum itself.
        let extra = rounds.saturating_sub(1);
        if extra == 0 {
            return;
        }
        for tenant in &queue.rr {
            if let Some(tq) = queue.tenants.get_mut(tenant) {
                let credit = extra.saturating_mul(quantum).saturating_mul(tq.weight);
                tq.deficit = tq.deficit.saturating_add(credit);
            }
        }
    }

    /// Takes every request of `class` that has waited longer than
    /// `max_wait` (shedding), oldest first.
    pub(crate) fn drain_older_than(
        &mut self,
        class: usize,
        now: Instant,
        max_wait: std::time::Duration,
    ) -> Vec<Entry<T>> {
        let queue = &mut self.classes[class];
        let mut out = Vec::new();
        for tq in queue.tenants.values_mut() {
            let old: Vec<Key> = tq
                .items
                .iter()
                .filter(|(_, e)| now.saturating_duration_since(e.enqueued) > max_wait)
                .map(|(k, _)| *k)
                .collect();
            for key in old {
                if let Some(entry) = tq.items.remove(&key) {
                    out.push(entry);
                }
            }
        }
        queue
            .tenants
            .retain(|_, tq| tq.active || !tq.items.is_empty());
        // (Empty parked tenants are dropped here rather than kept: this runs
        // rarely, under shedding.)
        queue.len -= out.len();
        self.len -= out.len();
        if queue.len == 0 {
            queue.clear();
            self.credits[class] = 0.0;
        }
        out.sort_by_key(|e| e.enqueued);
        out
    }

    /// Takes every waiting request (the scheduler closed).
    pub(crate) fn drain_all(&mut self) -> Vec<Entry<T>> {
        let mut out = Vec::with_capacity(self.len);
        for (c, class) in self.classes.iter_mut().enumerate() {
            for (_, tq) in class.tenants.drain() {
                out.extend(tq.items.into_values());
            }
            class.clear();
            self.credits[c] = 0.0;
        }
        self.len = 0;
        out
    }
}

/// The classes owed their share, highest first (at most 16 classes, so a
/// fixed array instead of an allocation per pop).
#[derive(Default)]
struct SmallClasses {
    items: [usize; 16],
    len: usize,
}

impl SmallClasses {
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.items[..self.len].iter().copied()
    }
}

impl FromIterator<usize> for SmallClasses {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        let mut out = SmallClasses::default();
        for c in iter {
            if out.len < out.items.len() {
                out.items[out.len] = c;
                out.len += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn entry(value: u32, cost: u64, now: Instant, deadline: Option<Instant>) -> Entry<u32> {
        Entry {
            value,
            cost,
            enqueued: now,
            deadline,
        }
    }

    fn drain(p: &mut Pending<u32>) -> Vec<(TenantId, u32)> {
        std::iter::from_fn(|| p.pop(|_| true).map(|x| (x.tenant, x.entry.value))).collect()
    }

    #[test]
    fn strict_priority_without_shares() {
        let now = Instant::now();
        let mut p = Pending::new(vec![0.0, 0.0, 0.0], 1);
        let t = TenantId::new("a");
        p.push(0, &t, 1, true, entry(0, 1, now, None));
        p.push(2, &t, 1, true, entry(2, 1, now, None));
        p.push(1, &t, 1, true, entry(1, 1, now, None));
        let order: Vec<u32> = drain(&mut p).into_iter().map(|(_, v)| v).collect();
        assert_eq!(order, vec![2, 1, 0]);
        assert!(p.is_empty());
    }

    #[test]
    fn earliest_deadline_first_within_a_tenant() {
        let now = Instant::now();
        let mut p = Pending::new(vec![0.0], 1);
        let t = TenantId::new("a");
        p.push(0, &t, 1, true, entry(1, 1, now, None));
        p.push(
            0,
            &t,
            1,
            true,
            entry(2, 1, now, Some(now + Duration::from_secs(5))),
        );
        p.push(
            0,
            &t,
            1,
            true,
            entry(3, 1, now, Some(now + Duration::from_secs(1))),
        );
        p.push(0, &t, 1, true, entry(4, 1, now, None));
        let order: Vec<u32> = drain(&mut p).into_iter().map(|(_, v)| v).collect();
        assert_eq!(order, vec![3, 2, 1, 4]);
    }

    #[test]
    fn round_robin_interleaves_equal_tenants() {
        let now = Instant::now();
        let mut p = Pending::new(vec![0.0], 1);
        let (a, b) = (TenantId::new("a"), TenantId::new("b"));
        for i in 0..10 {
            p.push(0, &a, 1, true, entry(i, 1, now, None));
        }
        for i in 100..103 {
            p.push(0, &b, 1, true, entry(i, 1, now, None));
        }
        let order: Vec<u32> = drain(&mut p).into_iter().map(|(_, v)| v).take(6).collect();
        assert_eq!(order, vec![0, 100, 1, 101, 2, 102]);
    }

    #[test]
    fn weights_and_costs_share_by_cost() {
        let now = Instant::now();
        let mut p = Pending::new(vec![0.0], 1);
        let (a, b) = (TenantId::new("a"), TenantId::new("b"));
        // `a` sends cost-10 requests with weight 1, `b` cost-1 with weight 3.
        for i in 0..1_000 {
            p.push(0, &a, 1, true, entry(i, 10, now, None));
            p.push(0, &b, 3, true, entry(i, 1, now, None));
        }
        let mut cost: HashMap<String, u64> = HashMap::new();
        for _ in 0..1_000 {
            let x = p.pop(|_| true).unwrap();
            *cost.entry(x.tenant.to_string()).or_default() += x.entry.cost;
        }
        let (ca, cb) = (cost["a"] as f64, cost["b"] as f64);
        let ratio = cb / ca;
        assert!(
            (ratio - 3.0).abs() < 0.15,
            "cost served b/a = {ratio} (a={ca}, b={cb})"
        );
    }

    #[test]
    fn huge_costs_do_not_loop() {
        let now = Instant::now();
        let mut p = Pending::new(vec![0.0], 1);
        let (a, b) = (TenantId::new("a"), TenantId::new("b"));
        p.push(0, &a, 1, true, entry(1, 1_000_000_000, now, None));
        p.push(0, &b, 1, true, entry(2, 999_999_999, now, None));
        assert_eq!(drain(&mut p).len(), 2);
    }

    #[test]
    fn minimum_share_keeps_the_low_class_alive() {
        let now = Instant::now();
        let mut p = Pending::new(vec![0.1, 0.0], 1);
        let t = TenantId::new("a");
        for i in 0..1_000 {
            p.push(0, &t, 1, true, entry(i, 1, now, None));
            p.push(1, &t, 1, true, entry(10_000 + i, 1, now, None));
        }
        let low = (0..500)
            .filter(|_| p.pop(|_| true).unwrap().class == 0)
            .count();
        assert!((45..=55).contains(&low), "low class got {low} of 500");
    }

    #[test]
    fn parked_tenants_wait_for_unpark() {
        let now = Instant::now();
        let mut p = Pending::new(vec![0.0], 1);
        let (a, b) = (TenantId::new("a"), TenantId::new("b"));
        p.push(0, &a, 1, true, entry(1, 1, now, None));
        p.push(0, &a, 1, true, entry(2, 1, now, None));
        p.push(0, &b, 1, true, entry(3, 1, now, None));
        let first = p.pop(|t| t.as_str() == "b").unwrap();
        assert_eq!(first.entry.value, 3);
        assert!(p.pop(|_| true).is_none(), "a is parked");
        p.unpark(&a);
        assert_eq!(drain(&mut p).len(), 2);
    }

    #[test]
    fn empty_tenants_kept_for_reuse_are_bounded() {
        let now = Instant::now();
        let mut p = Pending::new(vec![0.0], 1);
        // Many tenants with work at once, then all served.
        for t in 0..1_000 {
            p.push(
                0,
                &TenantId::new(format!("t{t}")),
                1,
                true,
                entry(t, 1, now, None),
            );
        }
        assert_eq!(drain(&mut p).len(), 1_000);
        assert!(p.classes[0].tenants.len() <= RETAINED_TENANTS);
        // One at a time: the few tenants are kept and reused.
        for round in 0..10 {
            for t in 0..8 {
                p.push(
                    0,
                    &TenantId::new(format!("u{t}")),
                    1,
                    true,
                    entry(round * 8 + t, 1, now, None),
                );
            }
            assert_eq!(drain(&mut p).len(), 8);
        }
        assert!(p.classes[0].tenants.len() <= RETAINED_TENANTS);
    }

    #[test]
    fn restored_requests_keep_their_place() {
        let now = Instant::now();
        let mut p = Pending::new(vec![0.0], 1);
        let (a, b) = (TenantId::new("a"), TenantId::new("b"));
        p.push(0, &a, 1, true, entry(1, 1, now, None));
        p.push(0, &a, 1, true, entry(2, 1, now, None));
        p.push(0, &b, 1, true, entry(3, 1, now, None));
        let first = p.pop(|_| true).unwrap();
        assert_eq!(first.entry.value, 1);
        p.restore(first.class, &first.tenant, 1, first.key, first.entry);
        let order: Vec<u32> = drain(&mut p).into_iter().map(|(_, v)| v).collect();
        assert_eq!(order, vec![1, 3, 2]);
    }

    #[test]
    fn removal_and_lazy_cleanup() {
        let now = Instant::now();
        let mut p = Pending::new(vec![0.0], 1);
        let a = TenantId::new("a");
        let loc = p.push(0, &a, 1, true, entry(1, 1, now, None));
        assert!(p.remove(&loc).is_some());
        assert!(p.remove(&loc).is_none(), "removed twice");
        assert!(p.is_empty());
        assert!(p.pop(|_| true).is_none());
        assert!(
            p.classes[0]
                .tenants
                .values()
                .all(|tq| tq.items.is_empty() && !tq.active),
            "the empty tenant is kept only for reuse"
        );
        assert!(p.classes[0].rr.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push {
            class: usize,
            tenant: u8,
            cost: u64,
            deadline: Option<u8>,
        },
        Pop {
            blocked: u8,
        },
        Remove(usize),
        Unpark(u8),
        Shed {
            class: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3usize, 0..4u8, 1..50u64, proptest::option::of(0..20u8))
                .prop_map(|(class, tenant, cost, deadline)| Op::Push { class, tenant, cost, deadline }),
            3 => (0..5u8).prop_map(|blocked| Op::Pop { blocked }),
            1 => (0..64usize).prop_map(Op::Remove),
            1 => (0..4u8).prop_map(Op::Unpark),
            1 => (0..3usize).prop_map(|class| Op::Shed { class }),
        ]
    }

    proptest! {
        /// Whatever happens, every pushed request comes out exactly once:
        /// popped, removed, shed or drained.
        #[test]
        fn no_request_is_lost_or_duplicated(ops in proptest::collection::vec(op(), 1..200)) {
            let start = Instant::now();
            let mut p = Pending::new(vec![0.1, 0.0, 0.0], 1);
            let mut locs = Vec::new();
            let mut out: HashMap<u32, u32> = HashMap::new();
            let mut pushed = 0u32;
            for (step, op) in ops.into_iter().enumerate() {
                let now = start + Duration::from_millis(step as u64);
                match op {
                    Op::Push { class, tenant, cost, deadline } => {
                        let t = TenantId::new(format!("t{tenant}"));
                        let deadline = deadline.map(|d| start + Duration::from_millis(u64::from(d)));
                        locs.push(p.push(class, &t, 1 + u64::from(tenant), true, entry(pushed, cost, now, deadline)));
                        pushed += 1;
                    }
                    Op::Pop { blocked } => {
                        let blocked = format!("t{blocked}");
                        if let Some(x) = p.pop(|t| t.as_str() != blocked) {
                            prop_assert_ne!(x.tenant.as_str(), blocked.as_str());
                            *out.entry(x.entry.value).or_default() += 1;
                        }
                    }
                    Op::Remove(i) => {
                        if let Some(loc) = locs.get(i)
                            && let Some(e) = p.remove(loc) {
                            *out.entry(e.value).or_default() += 1;
                        }
                    }
                    Op::Unpark(t) => p.unpark(&TenantId::new(format!("t{t}"))),
                    Op::Shed { class } => {
                        for e in p.drain_older_than(class, now, Duration::from_millis(5)) {
                            *out.entry(e.value).or_default() += 1;
                        }
                    }
                }
                let lens: usize = (0..p.classes()).map(|c| p.class_len(c)).sum();
                prop_assert_eq!(lens, p.len());
            }
            for e in p.drain_all() {
                *out.entry(e.value).or_default() += 1;
            }
            prop_assert!(p.is_empty());
            prop_assert_eq!(out.len() as u32, pushed);
            prop_assert!(out.values().all(|&n| n == 1), "{:?}", out);
        }
    }
}
