//! The ordered set of waiting requests: priority classes with minimum
//! shares, weighted deficit round robin over tenants within a class, and
//! earliest deadline first within a tenant.
//!
//! Pure data structure, no clock of its own and no I/O: only the
//! dispatcher touches it (under its own lock), and the tests drive it
//! directly. A request whose submitter gave up stays in place until it is
//! reached (the `live` check of [`Pending::pop`]) or purged
//! ([`Pending::purge`]): submitters never touch this structure.
//!
//! Most requests carry no deadline of their own; within a tenant they are
//! served in arrival order, so they wait in a ring buffer, and only
//! requests with a deadline go into an ordered map. Tenants live in a slab
//! per class, and the round robin holds slab indices, so serving a request
//! neither hashes nor clones a tenant's name.

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

/// One waiting request.
#[derive(Debug)]
pub(crate) struct Entry<T> {
    pub(crate) value: T,
    pub(crate) cost: u64,
    pub(crate) enqueued: Instant,
    pub(crate) deadline: Option<Instant>,
}

/// A request taken out for dispatch, with what the caller needs to know
/// (and to [`restore`](Pending::restore) it).
#[derive(Debug)]
pub(crate) struct Popped<T, M> {
    pub(crate) class: usize,
    pub(crate) key: Key,
    pub(crate) entry: Entry<T>,
    /// The tenant's weight and what the caller attached to the tenant.
    pub(crate) weight: u64,
    pub(crate) meta: M,
}

/// One tenant's waiting requests in one class.
#[derive(Debug)]
struct TenantQueue<T, M> {
    id: TenantId,
    /// Requests without a deadline, in arrival order (by `seq`).
    fifo: VecDeque<(u64, Entry<T>)>,
    /// Requests with a deadline, earliest first (all before `fifo`).
    edf: BTreeMap<Key, Entry<T>>,
    weight: u64,
    /// What the caller attached to the tenant (its shared counters).
    meta: M,
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

impl<T, M> TenantQueue<T, M> {
    fn new(id: TenantId, weight: u64, meta: M) -> Self {
        TenantQueue {
            id,
            fifo: VecDeque::new(),
            edf: BTreeMap::new(),
            weight: weight.max(1),
            meta,
            deficit: 0,
            credited: false,
            active: false,
        }
    }

    fn len(&self) -> usize {
        self.fifo.len() + self.edf.len()
    }

    fn is_empty(&self) -> bool {
        self.fifo.is_empty() && self.edf.is_empty()
    }

    fn head(&self) -> Option<&Entry<T>> {
        match self.edf.first_key_value() {
            Some((_, entry)) => Some(entry),
            None => self.fifo.front().map(|(_, entry)| entry),
        }
    }

    fn pop_head(&mut self) -> Option<(Key, Entry<T>)> {
        match self.edf.pop_first() {
            Some(head) => Some(head),
            None => self.fifo.pop_front().map(|(seq, entry)| {
                (
                    Key {
                        deadline: None,
                        seq,
                    },
                    entry,
                )
            }),
        }
    }

    fn insert(&mut self, key: Key, entry: Entry<T>) {
        if key.deadline.is_some() {
            self.edf.insert(key, entry);
        } else if self.fifo.back().is_none_or(|(last, _)| *last < key.seq) {
            self.fifo.push_back((key.seq, entry));
        } else {
            // Restored: back to its place.
            let at = self.fifo.partition_point(|(seq, _)| *seq < key.seq);
            self.fifo.insert(at, (key.seq, entry));
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&Entry<T>) -> bool) {
        self.fifo.retain(|(_, entry)| keep(entry));
        self.edf.retain(|_, entry| keep(entry));
    }

    /// Takes the requests for which `take` answers `true`, in order.
    fn extract(&mut self, mut take: impl FnMut(&Entry<T>) -> bool, out: &mut Vec<Entry<T>>) {
        if self.edf.values().any(&mut take) {
            let edf = std::mem::take(&mut self.edf);
            for (key, entry) in edf {
                if take(&entry) {
                    out.push(entry);
                } else {
                    self.edf.insert(key, entry);
                }
            }
        }
        if self.fifo.iter().any(|(_, entry)| take(entry)) {
            let fifo = std::mem::take(&mut self.fifo);
            for (seq, entry) in fifo {
                if take(&entry) {
                    out.push(entry);
                } else {
                    self.fifo.push_back((seq, entry));
                }
            }
        }
    }

    /// Back to a fresh, empty, inactive state (keeping the allocations).
    fn reset(&mut self) {
        debug_assert!(self.is_empty());
        self.deficit = 0;
        self.credited = false;
        self.active = false;
    }
}

#[derive(Debug)]
struct Class<T, M> {
    /// Tenant queues by slab index (`None`: a free slot).
    queues: Vec<Option<TenantQueue<T, M>>>,
    index: HashMap<TenantId, usize, TenantHash>,
    free: Vec<usize>,
    /// Round-robin order of tenants with work, by slab index. A tenant is
    /// in it at most once (`TenantQueue::active`).
    rr: VecDeque<usize>,
    len: usize,
    /// Since when the class has been non-empty.
    nonempty_since: Option<Instant>,
}

impl<T, M> Class<T, M> {
    fn new() -> Self {
        Class {
            queues: Vec::new(),
            index: HashMap::default(),
            free: Vec::new(),
            rr: VecDeque::new(),
            len: 0,
            nonempty_since: None,
        }
    }

    fn queue(&mut self, at: usize) -> Option<&mut TenantQueue<T, M>> {
        self.queues.get_mut(at).and_then(Option::as_mut)
    }

    /// The slab index of `tenant`'s queue, made with `make` if it has none.
    fn slot(&mut self, tenant: &TenantId, make: impl FnOnce() -> TenantQueue<T, M>) -> usize {
        if let Some(&at) = self.index.get(tenant) {
            return at;
        }
        let queue = make();
        let at = match self.free.pop() {
            Some(at) => {
                self.queues[at] = Some(queue);
                at
            }
            None => {
                self.queues.push(Some(queue));
                self.queues.len() - 1
            }
        };
        self.index.insert(tenant.clone(), at);
        at
    }

    /// Forgets a tenant's queue (empty, not in the round robin).
    fn forget(&mut self, at: usize) {
        if let Some(queue) = self.queues[at].take() {
            self.index.remove(&queue.id);
            self.free.push(at);
        }
    }

    /// Resets the class once it holds no request: every tenant left is
    /// empty. A few empty tenants are kept (their queues' allocations are
    /// reused when they come back); beyond [`RETAINED_TENANTS`] all go.
    fn clear(&mut self) {
        debug_assert!(self.queues.iter().flatten().all(TenantQueue::is_empty));
        if self.index.len() > RETAINED_TENANTS {
            self.queues.clear();
            self.index.clear();
            self.free.clear();
        } else {
            for queue in self.queues.iter_mut().flatten() {
                queue.reset();
            }
        }
        self.rr.clear();
        self.len = 0;
        self.nonempty_since = None;
    }

    /// The class ran empty through pops: every tenant was reset as it
    /// emptied, but those still in the round robin (emptied elsewhere,
    /// lazily).
    fn settle(&mut self) {
        while let Some(at) = self.rr.pop_front() {
            if let Some(queue) = self.queue(at) {
                queue.reset();
            }
        }
        self.len = 0;
        self.nonempty_since = None;
    }

    /// A tenant's queue just became empty (and is out of the round robin):
    /// keep it for reuse while few are kept, else drop it.
    fn emptied(&mut self, at: usize) {
        if self.index.len() > RETAINED_TENANTS {
            self.forget(at);
        } else if let Some(queue) = self.queue(at) {
            queue.reset();
        }
    }

    /// Forgets parked tenants left empty (active ones are dropped lazily
    /// when the round robin reaches them).
    fn forget_parked_empty(&mut self) {
        for at in 0..self.queues.len() {
            if self.queues[at]
                .as_ref()
                .is_some_and(|q| !q.active && q.is_empty())
            {
                self.forget(at);
            }
        }
    }
}

/// All waiting requests.
#[derive(Debug)]
pub(crate) struct Pending<T, M> {
    classes: Vec<Class<T, M>>,
    /// Minimum share of dispatches per class while it has work.
    shares: Vec<f64>,
    credits: Vec<f64>,
    quantum: u64,
    len: usize,
    seq: u64,
}

impl<T, M: Clone> Pending<T, M> {
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

    /// Adds a request of the tenant `tenant_of` finds in it. `meta` gives
    /// the tenant's weight and what the
    /// caller attaches to it, called only when the tenant has no queue in
    /// this class yet. `eligible` says whether the tenant may be
    /// dispatched now (below its concurrency limit); an ineligible tenant
    /// is parked until [`unpark`](Self::unpark).
    pub(crate) fn push(
        &mut self,
        class: usize,
        entry: Entry<T>,
        tenant_of: impl Fn(&T) -> &TenantId,
        meta: impl FnOnce(&TenantId) -> (u64, M),
        eligible: impl FnOnce(&M) -> bool,
    ) {
        let at = Self::locate(&mut self.classes[class], tenant_of(&entry.value), meta);
        self.insert_at(class, at, entry, eligible);
    }

    /// The slab index of `tenant`'s queue in `class`, made if it has none.
    fn locate(
        class: &mut Class<T, M>,
        tenant: &TenantId,
        meta: impl FnOnce(&TenantId) -> (u64, M),
    ) -> usize {
        class.slot(tenant, || {
            let (weight, meta) = meta(tenant);
            TenantQueue::new(tenant.clone(), weight, meta)
        })
    }

    fn insert_at(
        &mut self,
        class: usize,
        at: usize,
        entry: Entry<T>,
        eligible: impl FnOnce(&M) -> bool,
    ) {
        let key = Key {
            deadline: entry.deadline,
            seq: self.seq,
        };
        self.seq += 1;
        self.quantum = self.quantum.max(entry.cost);
        let now = entry.enqueued;
        let queue = &mut self.classes[class];
        let tq = queue.queues[at].as_mut().expect("located");
        tq.insert(key, entry);
        if !tq.active && eligible(&tq.meta) {
            tq.active = true;
            queue.rr.push_back(at);
        }
        queue.len += 1;
        queue.nonempty_since.get_or_insert(now);
        self.len += 1;
    }

    /// Drops every request for which `live` answers `false` (submitters
    /// that gave up); answers how many.
    pub(crate) fn purge(&mut self, mut live: impl FnMut(&T) -> bool) -> usize {
        let mut purged = 0;
        for (c, class) in self.classes.iter_mut().enumerate() {
            let before = class.len;
            let mut left = 0;
            for tq in class.queues.iter_mut().flatten() {
                tq.retain(|e| live(&e.value));
                left += tq.len();
            }
            if left == before {
                continue;
            }
            purged += before - left;
            class.len = left;
            if left == 0 {
                class.clear();
                self.credits[c] = 0.0;
            } else {
                class.forget_parked_empty();
            }
        }
        self.len -= purged;
        purged
    }

    /// Puts back a request taken by [`pop`](Self::pop) that could not be
    /// sent after all: same place in its tenant's order, its cost refunded,
    /// its tenant at the front of the round robin (it was being served).
    pub(crate) fn restore(
        &mut self,
        class: usize,
        key: Key,
        entry: Entry<T>,
        tenant_of: impl Fn(&T) -> &TenantId,
        weight: u64,
        meta: M,
    ) {
        let at = Self::locate(&mut self.classes[class], tenant_of(&entry.value), |_| {
            (weight, meta)
        });
        self.restore_at(class, at, key, entry);
    }

    fn restore_at(&mut self, class: usize, at: usize, key: Key, entry: Entry<T>) {
        let queue = &mut self.classes[class];
        let tq = queue.queues[at].as_mut().expect("located");
        tq.deficit = tq.deficit.saturating_add(entry.cost);
        let enqueued = entry.enqueued;
        tq.insert(key, entry);
        if !tq.active {
            tq.active = true;
            queue.rr.push_front(at);
        }
        queue.len += 1;
        queue.nonempty_since = Some(queue.nonempty_since.map_or(enqueued, |s| s.min(enqueued)));
        self.len += 1;
    }

    /// Puts a tenant back into the round robin of every class where it has
    /// work (it fell below its concurrency limit).
    pub(crate) fn unpark(&mut self, tenant: &TenantId) {
        for class in &mut self.classes {
            let Some(&at) = class.index.get(tenant) else {
                continue;
            };
            if let Some(tq) = class.queue(at)
                && !tq.active
                && !tq.is_empty()
            {
                tq.active = true;
                class.rr.push_back(at);
            }
        }
    }

    /// Takes the next request to dispatch: the class chosen by minimum
    /// shares then strict priority, the tenant chosen by weighted deficit
    /// round robin over cost, the tenant's earliest deadline.
    ///
    /// Tenants for which `eligible` answers `false` are parked until
    /// [`unpark`](Self::unpark). Requests for which `live` answers `false`
    /// are dropped on the way, charged to no one. Answers `None` when
    /// nothing is eligible.
    pub(crate) fn pop(
        &mut self,
        mut eligible: impl FnMut(&M) -> bool,
        mut live: impl FnMut(&T) -> bool,
    ) -> Option<Popped<T, M>> {
        if self.len == 0 {
            return None;
        }
        let n = self.classes.len();
        // First a class owed its minimum share, then strict priority: two
        // passes over the classes, highest first.
        let mut chosen = None;
        'passes: for owed_pass in [true, false] {
            for class in (0..n).rev() {
                if self.classes[class].len == 0 {
                    continue;
                }
                if owed_pass
                    && !(self.shares[class] > 0.0
                        && self.credits[class] + self.shares[class] >= 1.0)
                {
                    continue;
                }
                let mut dropped = 0;
                let popped = self.pop_class(class, &mut eligible, &mut live, &mut dropped);
                if dropped > 0 {
                    self.len -= dropped;
                    let queue = &mut self.classes[class];
                    queue.len -= dropped;
                    if queue.len == 0 {
                        queue.settle();
                        self.credits[class] = 0.0;
                    }
                }
                if let Some(popped) = popped {
                    chosen = Some((class, popped));
                    break 'passes;
                }
            }
        }
        let (class, (key, entry, weight, meta)) = chosen?;
        for c in 0..n {
            if self.classes[c].len > 0 || c == class {
                self.credits[c] += self.shares[c];
            }
        }
        self.credits[class] = (self.credits[class] - 1.0).max(0.0);
        let queue = &mut self.classes[class];
        queue.len -= 1;
        if queue.len == 0 {
            queue.settle();
            self.credits[class] = 0.0;
        }
        self.len -= 1;
        Some(Popped {
            class,
            key,
            entry,
            weight,
            meta,
        })
    }

    /// Deficit round robin within one class; counts the requests it drops
    /// as not `live` in `dropped`.
    fn pop_class(
        &mut self,
        class: usize,
        eligible: &mut impl FnMut(&M) -> bool,
        live: &mut impl FnMut(&T) -> bool,
        dropped: &mut usize,
    ) -> Option<(Key, Entry<T>, u64, M)> {
        let quantum = self.quantum;
        let queue = &mut self.classes[class];
        // Visits since the last time every active tenant was credited.
        let mut unserved = 0usize;
        loop {
            let at = queue.rr.pop_front()?;
            let Some(tq) = queue.queue(at) else {
                continue;
            };
            while let Some(head) = tq.head()
                && !live(&head.value)
            {
                tq.pop_head();
                *dropped += 1;
            }
            let Some(head) = tq.head() else {
                queue.emptied(at);
                continue;
            };
            let head_cost = head.cost;
            if !eligible(&tq.meta) {
                tq.active = false;
                tq.credited = false;
                continue;
            }
            if !tq.credited {
                tq.deficit = tq.deficit.saturating_add(quantum.saturating_mul(tq.weight));
                tq.credited = true;
            }
            if head_cost <= tq.deficit {
                tq.deficit -= head_cost;
                let (key, entry) = tq.pop_head().expect("the head exists");
                let (weight, meta) = (tq.weight, tq.meta.clone());
                if tq.is_empty() {
                    queue.emptied(at);
                } else {
                    // Its turn continues while its deficit lasts.
                    queue.rr.push_front(at);
                }
                return Some((key, entry, weight, meta));
            }
            tq.credited = false;
            queue.rr.push_back(at);
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

    fn skip_rounds(queue: &mut Class<T, M>, quantum: u64) {
        let rounds = queue
            .rr
            .iter()
            .filter_map(|&at| queue.queues.get(at)?.as_ref())
            .filter_map(|tq| {
                let missing = tq.head()?.cost.saturating_sub(tq.deficit);
                Some(missing.div_ceil(quantum.saturating_mul(tq.weight)))
            })
            .min()
            .unwrap_or(1);
        // The next visit adds one more quantum itself.
        let extra = rounds.saturating_sub(1);
        if extra == 0 {
            return;
        }
        for i in 0..queue.rr.len() {
            let at = queue.rr[i];
            if let Some(tq) = queue.queue(at) {
                let credit = extra.saturating_mul(quantum).saturating_mul(tq.weight);
                tq.deficit = tq.deficit.saturating_add(credit);
            }
        }
    }

    /// Takes every request of `class` that has waited longer than
    /// `max_wait` (shedding), oldest first, each with its tenant's `M`.
    pub(crate) fn drain_older_than(
        &mut self,
        class: usize,
        now: Instant,
        max_wait: std::time::Duration,
    ) -> Vec<(Entry<T>, M)> {
        let queue = &mut self.classes[class];
        let mut out = Vec::new();
        let mut old = Vec::new();
        for tq in queue.queues.iter_mut().flatten() {
            tq.extract(
                |e| now.saturating_duration_since(e.enqueued) > max_wait,
                &mut old,
            );
            out.extend(old.drain(..).map(|e| (e, tq.meta.clone())));
        }
        if out.is_empty() {
            return out;
        }
        // (Empty parked tenants are dropped here rather than kept: this
        // runs rarely, under shedding.)
        queue.forget_parked_empty();
        queue.len -= out.len();
        self.len -= out.len();
        if queue.len == 0 {
            queue.clear();
            self.credits[class] = 0.0;
        }
        out.sort_by_key(|(e, _)| e.enqueued);
        out
    }

    /// Takes every waiting request (the scheduler closed), each with its
    /// tenant's `M`.
    pub(crate) fn drain_all(&mut self) -> Vec<(Entry<T>, M)> {
        let mut out = Vec::with_capacity(self.len);
        for (c, class) in self.classes.iter_mut().enumerate() {
            for tq in class.queues.iter_mut().flatten() {
                let meta = &tq.meta;
                out.extend(
                    std::mem::take(&mut tq.edf)
                        .into_values()
                        .map(|e| (e, meta.clone())),
                );
                out.extend(tq.fifo.drain(..).map(|(_, e)| (e, meta.clone())));
            }
            class.clear();
            self.credits[c] = 0.0;
        }
        self.len = 0;
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

    /// Pushes for a tenant of `weight`, dispatchable now.
    fn push(
        p: &mut Pending<u32, TenantId>,
        class: usize,
        tenant: &TenantId,
        weight: u64,
        e: Entry<u32>,
    ) {
        let at = Pending::locate(&mut p.classes[class], tenant, |t| (weight, t.clone()));
        p.insert_at(class, at, e, |_| true);
    }

    /// One class with no minimum share, and two tenants `a` and `b`.
    fn two_tenants() -> (Pending<u32, TenantId>, TenantId, TenantId) {
        let p = Pending::new(vec![0.0], 1);
        (p, TenantId::new("a"), TenantId::new("b"))
    }

    fn pop_any(p: &mut Pending<u32, TenantId>) -> Option<Popped<u32, TenantId>> {
        p.pop(|_| true, |_| true)
    }

    fn drain(p: &mut Pending<u32, TenantId>) -> Vec<(TenantId, u32)> {
        std::iter::from_fn(|| pop_any(p).map(|x| (x.meta, x.entry.value))).collect()
    }

    #[test]
    fn strict_priority_without_shares() {
        let now = Instant::now();
        let mut p = Pending::<u32, TenantId>::new(vec![0.0, 0.0, 0.0], 1);
        let t = TenantId::new("a");
        push(&mut p, 0, &t, 1, entry(0, 1, now, None));
        push(&mut p, 2, &t, 1, entry(2, 1, now, None));
        push(&mut p, 1, &t, 1, entry(1, 1, now, None));
        let order: Vec<u32> = drain(&mut p).into_iter().map(|(_, v)| v).collect();
        assert_eq!(order, vec![2, 1, 0]);
        assert!(p.is_empty());
    }

    #[test]
    fn earliest_deadline_first_within_a_tenant() {
        let now = Instant::now();
        let mut p = Pending::<u32, TenantId>::new(vec![0.0], 1);
        let t = TenantId::new("a");
        push(&mut p, 0, &t, 1, entry(1, 1, now, None));
        push(
            &mut p,
            0,
            &t,
            1,
            entry(2, 1, now, Some(now + Duration::from_secs(5))),
        );
        push(
            &mut p,
            0,
            &t,
            1,
            entry(3, 1, now, Some(now + Duration::from_secs(1))),
        );
        push(&mut p, 0, &t, 1, entry(4, 1, now, None));
        let order: Vec<u32> = drain(&mut p).into_iter().map(|(_, v)| v).collect();
        assert_eq!(order, vec![3, 2, 1, 4]);
    }

    #[test]
    fn round_robin_interleaves_equal_tenants() {
        let now = Instant::now();
        let (mut p, a, b) = two_tenants();
        for i in 0..10 {
            push(&mut p, 0, &a, 1, entry(i, 1, now, None));
        }
        for i in 100..103 {
            push(&mut p, 0, &b, 1, entry(i, 1, now, None));
        }
        let order: Vec<u32> = drain(&mut p).into_iter().map(|(_, v)| v).take(6).collect();
        assert_eq!(order, vec![0, 100, 1, 101, 2, 102]);
    }

    #[test]
    fn weights_and_costs_share_by_cost() {
        let now = Instant::now();
        let (mut p, a, b) = two_tenants();
        // `a` sends cost-10 requests with weight 1, `b` cost-1 with weight 3.
        for i in 0..1_000 {
            push(&mut p, 0, &a, 1, entry(i, 10, now, None));
            push(&mut p, 0, &b, 3, entry(i, 1, now, None));
        }
        let mut cost: HashMap<String, u64> = HashMap::new();
        for _ in 0..1_000 {
            let x = pop_any(&mut p).unwrap();
            *cost.entry(x.meta.to_string()).or_default() += x.entry.cost;
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
        let (mut p, a, b) = two_tenants();
        push(&mut p, 0, &a, 1, entry(1, 1_000_000_000, now, None));
        push(&mut p, 0, &b, 1, entry(2, 999_999_999, now, None));
        assert_eq!(drain(&mut p).len(), 2);
    }

    #[test]
    fn minimum_share_keeps_the_low_class_alive() {
        let now = Instant::now();
        let mut p = Pending::<u32, TenantId>::new(vec![0.1, 0.0], 1);
        let t = TenantId::new("a");
        for i in 0..1_000 {
            push(&mut p, 0, &t, 1, entry(i, 1, now, None));
            push(&mut p, 1, &t, 1, entry(10_000 + i, 1, now, None));
        }
        let low = (0..500)
            .filter(|_| pop_any(&mut p).unwrap().class == 0)
            .count();
        assert!((45..=55).contains(&low), "low class got {low} of 500");
    }

    #[test]
    fn parked_tenants_wait_for_unpark() {
        let now = Instant::now();
        let (mut p, a, b) = two_tenants();
        for (tenant, value) in [(&a, 1), (&a, 2), (&b, 3)] {
            push(&mut p, 0, tenant, 1, entry(value, 1, now, None));
        }
        let first = p.pop(|t| t.as_str() == "b", |_| true).unwrap();
        assert_eq!(first.entry.value, 3);
        assert!(pop_any(&mut p).is_none(), "a is parked");
        p.unpark(&a);
        assert_eq!(drain(&mut p).len(), 2);
    }

    #[test]
    fn empty_tenants_kept_for_reuse_are_bounded() {
        let now = Instant::now();
        let mut p = Pending::<u32, TenantId>::new(vec![0.0], 1);
        // Many tenants with work at once, then all served.
        for t in 0..1_000 {
            push(
                &mut p,
                0,
                &TenantId::new(format!("t{t}")),
                1,
                entry(t, 1, now, None),
            );
        }
        assert_eq!(drain(&mut p).len(), 1_000);
        assert!(p.classes[0].index.len() <= RETAINED_TENANTS);
        // One at a time: the few tenants are kept and reused.
        for round in 0..10 {
            for t in 0..8 {
                push(
                    &mut p,
                    0,
                    &TenantId::new(format!("u{t}")),
                    1,
                    entry(round * 8 + t, 1, now, None),
                );
            }
            assert_eq!(drain(&mut p).len(), 8);
        }
        assert!(p.classes[0].index.len() <= RETAINED_TENANTS);
    }

    #[test]
    fn restored_requests_keep_their_place() {
        let now = Instant::now();
        let (mut p, a, b) = two_tenants();
        for (tenant, value) in [(&a, 1), (&a, 2), (&b, 3)] {
            push(&mut p, 0, tenant, 1, entry(value, 1, now, None));
        }
        let first = pop_any(&mut p).unwrap();
        assert_eq!(first.entry.value, 1);
        let at = Pending::locate(&mut p.classes[first.class], &first.meta, |t| {
            (first.weight, t.clone())
        });
        p.restore_at(first.class, at, first.key, first.entry);
        let order: Vec<u32> = drain(&mut p).into_iter().map(|(_, v)| v).collect();
        assert_eq!(order, vec![1, 3, 2]);
    }

    #[test]
    fn requests_given_up_are_skipped_uncharged_and_purged() {
        let now = Instant::now();
        let (mut p, a, b) = two_tenants();
        for i in 0..4 {
            push(&mut p, 0, &a, 1, entry(i, 1, now, None));
        }
        push(&mut p, 0, &b, 1, entry(10, 1, now, None));
        push(&mut p, 0, &b, 1, entry(11, 1, now, None));
        // `a`'s first three gave up: skipped without using `a`'s turn.
        let gone = |v: &u32| *v >= 3;
        let first = p.pop(|_| true, gone).unwrap();
        assert_eq!(first.entry.value, 3);
        assert_eq!(p.len(), 2, "the three dropped on the way are gone");
        assert_eq!(p.pop(|_| true, gone).unwrap().entry.value, 10);
        // A purge drops what gave up since, wherever it is.
        assert_eq!(p.purge(|v| *v != 11), 1);
        assert!(p.is_empty());
        assert_eq!(p.class_len(0), 0);
        assert!(p.pop(|_| true, |_| true).is_none());
        assert!(
            p.classes[0]
                .queues
                .iter()
                .flatten()
                .all(|tq| tq.is_empty() && !tq.active),
            "the empty tenants are kept only for reuse"
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
        GiveUp(u32),
        Purge,
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
            1 => (0..64u32).prop_map(Op::GiveUp),
            1 => Just(Op::Purge),
            1 => (0..4u8).prop_map(Op::Unpark),
            1 => (0..3usize).prop_map(|class| Op::Shed { class }),
        ]
    }

    proptest! {
        /// Whatever happens, every pushed request comes out exactly once
        /// (popped, shed or drained) or, once its submitter gave up, at
        /// most once and never by `pop`; nothing given up is handed out.
        #[test]
        fn no_request_is_lost_or_duplicated(ops in proptest::collection::vec(op(), 1..200)) {
            let start = Instant::now();
            let mut p = Pending::<u32, TenantId>::new(vec![0.1, 0.0, 0.0], 1);
            let mut gone: std::collections::HashSet<u32> = std::collections::HashSet::new();
            let mut out: HashMap<u32, u32> = HashMap::new();
            let mut pushed = 0u32;
            for (step, op) in ops.into_iter().enumerate() {
                let now = start + Duration::from_millis(step as u64);
                match op {
                    Op::Push { class, tenant, cost, deadline } => {
                        let t = TenantId::new(format!("t{tenant}"));
                        let deadline = deadline.map(|d| start + Duration::from_millis(u64::from(d)));
                        push(&mut p, class, &t, 1 + u64::from(tenant), entry(pushed, cost, now, deadline));
                        pushed += 1;
                    }
                    Op::Pop { blocked } => {
                        let blocked = format!("t{blocked}");
                        if let Some(x) = p.pop(|t| t.as_str() != blocked, |v| !gone.contains(v)) {
                            prop_assert_ne!(x.meta.as_str(), blocked.as_str());
                            prop_assert!(!gone.contains(&x.entry.value), "handed out a request given up");
                            *out.entry(x.entry.value).or_default() += 1;
                        }
                    }
                    Op::GiveUp(i) => {
                        if i < pushed && !out.contains_key(&i) {
                            gone.insert(i);
                        }
                    }
                    Op::Purge => {
                        p.purge(|v| !gone.contains(v));
                    }
                    Op::Unpark(t) => p.unpark(&TenantId::new(format!("t{t}"))),
                    Op::Shed { class } => {
                        for (e, _) in p.drain_older_than(class, now, Duration::from_millis(5)) {
                            *out.entry(e.value).or_default() += 1;
                        }
                    }
                }
                let lens: usize = (0..p.classes()).map(|c| p.class_len(c)).sum();
                prop_assert_eq!(lens, p.len());
            }
            for (e, _) in p.drain_all() {
                *out.entry(e.value).or_default() += 1;
            }
            prop_assert!(p.is_empty());
            prop_assert!(out.values().all(|&n| n == 1), "{:?}", out);
            for v in 0..pushed {
                prop_assert!(out.contains_key(&v) || gone.contains(&v), "request {} lost", v);
            }
        }
    }
}
