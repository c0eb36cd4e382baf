//! One endpoint identity shared by health checking and the balancer, with
//! the live routing facts discovery publishes about it (weight, capacity).

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::outcome::Outcome;

/// Where outcomes that routing imposed are reported; see
/// [`EndpointId::set_reporter`].
pub type Reporter = Arc<dyn Fn(&EndpointId, Outcome) + Send + Sync>;

/// An endpoint's id: cheap to clone, compared, ordered and hashed as its
/// name, and carrying two live cells that whoever discovers the endpoint
/// keeps current and whoever routes to it reads:
///
/// - its **weight** in [0, 1] (keel-health writes slow start and busy
///   dampening here; the balancer scales the endpoint's share by it), and
/// - its **capacity**, the requests it can serve at once (its batch slots;
///   the balancer never sends more),
///
/// and a **reporter**: outcomes the router imposed itself (an attempt
/// timeout, a deadline that cancelled a call in flight) are reported
/// through it to whoever keeps the endpoint's health, so a node that times
/// out every request is ejected like one that fails.
///
/// Clones share the cells; two ids built separately from the same name are
/// equal but have cells of their own.
///
/// ```
/// use keel_core::{EndpointId, EndpointKey};
///
/// let id = EndpointId::new("node-1").with_capacity(16);
/// let seen_by_the_balancer = id.clone();
/// id.set_weight(0.25); // slow start
/// assert_eq!(seen_by_the_balancer.weight(), 0.25);
/// assert_eq!(seen_by_the_balancer.capacity(), Some(16));
/// assert_eq!(id, EndpointId::from("node-1"));
/// ```
#[derive(Clone)]
pub struct EndpointId(Arc<Cells>);

struct Cells {
    name: Arc<str>,
    /// `f64` bits of the weight.
    weight: AtomicU64,
    /// 0: not known.
    capacity: AtomicU32,
    reporter: OnceLock<Reporter>,
}

impl EndpointId {
    /// An id named `name`, weight 1, capacity unknown.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        EndpointId(Arc::new(Cells {
            name: name.into(),
            weight: AtomicU64::new(1f64.to_bits()),
            capacity: AtomicU32::new(0),
            reporter: OnceLock::new(),
        }))
    }

    /// The same id with its capacity set to `slots` (see
    /// [`set_capacity`](Self::set_capacity)).
    pub fn with_capacity(self, slots: u32) -> Self {
        self.set_capacity(Some(slots));
        self
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0.name
    }

    /// Sets the weight, clamped to [0, 1] (NaN is taken as 0). Every clone
    /// of this id sees it at once.
    pub fn set_weight(&self, weight: f64) {
        let weight = if weight.is_nan() {
            0.0
        } else {
            weight.clamp(0.0, 1.0)
        };
        self.0.weight.store(weight.to_bits(), Ordering::Relaxed);
    }

    /// Installs the reporter [`EndpointKey::report`] calls (keel-health
    /// installs one on the ids it publishes). Set once; returns `false`
    /// when one was already set. The reporter runs on the request path and
    /// must not block; hold the health registry weakly to avoid a cycle.
    pub fn set_reporter(&self, reporter: Reporter) -> bool {
        self.0.reporter.set(reporter).is_ok()
    }

    /// Sets the capacity (`None` or `Some(0)`: not known).
    pub fn set_capacity(&self, slots: Option<u32>) {
        self.0.capacity.store(slots.unwrap_or(0), Ordering::Relaxed);
    }
}

/// What the balancer reads from a discovery key: the endpoint's live
/// weight and capacity.
///
/// Implemented for [`EndpointId`] (which carries both) and, with the
/// defaults (weight 1, capacity unknown), for the key types
/// `tower::discover::ServiceList` and hand-built discovery streams use.
/// A custom key type implements it with an empty `impl` or forwards to an
/// [`EndpointId`] it holds.
pub trait EndpointKey {
    /// The endpoint's weight in [0, 1]: its share of traffic relative to a
    /// fully warm, healthy endpoint. Default 1.
    fn weight(&self) -> f64 {
        1.0
    }

    /// Requests the endpoint serves at once, if discovery knows. Default
    /// `None` (the balancer's configured capacity applies).
    fn capacity(&self) -> Option<u32> {
        None
    }

    /// Reports an outcome the router imposed on a call to this endpoint (an
    /// attempt timeout or a deadline that cancelled it in flight:
    /// [`FailureKind::Timeout`](crate::FailureKind::Timeout)). Default: dropped.
    fn report(&self, outcome: Outcome) {
        let _ = outcome;
    }
}

impl EndpointKey for EndpointId {
    fn weight(&self) -> f64 {
        f64::from_bits(self.0.weight.load(Ordering::Relaxed))
    }

    fn capacity(&self) -> Option<u32> {
        match self.0.capacity.load(Ordering::Relaxed) {
            0 => None,
            slots => Some(slots),
        }
    }

    fn report(&self, outcome: Outcome) {
        if let Some(reporter) = self.0.reporter.get() {
            reporter(self, outcome);
        }
    }
}

macro_rules! plain_keys {
    ($($ty:ty),*) => { $(impl EndpointKey for $ty {})* };
}
plain_keys!(
    usize,
    u64,
    u32,
    u16,
    i64,
    i32,
    String,
    &'static str,
    Arc<str>
);

impl<K: EndpointKey + ?Sized> EndpointKey for &K {
    fn weight(&self) -> f64 {
        (**self).weight()
    }

    fn capacity(&self) -> Option<u32> {
        (**self).capacity()
    }

    fn report(&self, outcome: Outcome) {
        (**self).report(outcome);
    }
}

impl PartialEq for EndpointId {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for EndpointId {}

impl Hash for EndpointId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.name.hash(state);
    }
}

impl PartialOrd for EndpointId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for EndpointId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.name.cmp(&other.0.name)
    }
}

impl fmt::Debug for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0.name, f)
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.name)
    }
}

impl Borrow<str> for EndpointId {
    fn borrow(&self) -> &str {
        &self.0.name
    }
}

impl From<&str> for EndpointId {
    fn from(name: &str) -> Self {
        EndpointId::new(name)
    }
}

impl From<String> for EndpointId {
    fn from(name: String) -> Self {
        EndpointId::new(name)
    }
}

impl From<Arc<str>> for EndpointId {
    fn from(name: Arc<str>) -> Self {
        EndpointId::new(name)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn clones_share_cells_and_lookups_go_by_name() {
        let id = EndpointId::new("a");
        let mut map = HashMap::new();
        map.insert(id.clone(), 1);
        assert_eq!(map.get("a"), Some(&1));
        id.set_weight(0.5);
        assert_eq!(
            map.keys().next().unwrap().weight(),
            0.5,
            "clones share the cell"
        );
        id.set_weight(7.0);
        assert_eq!(id.weight(), 1.0, "clamped");
        id.set_weight(f64::NAN);
        assert_eq!(id.weight(), 0.0);
        id.set_capacity(Some(0));
        assert_eq!(id.capacity(), None);
        assert_eq!(3usize.weight(), 1.0);
    }

    #[test]
    fn reports_reach_the_reporter_once_installed() {
        use std::sync::atomic::AtomicUsize;
        let id = EndpointId::new("a");
        id.report(Outcome::Success); // no reporter: dropped
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        assert!(id.set_reporter(Arc::new(move |id: &EndpointId, outcome| {
            assert_eq!(id.as_str(), "a");
            assert!(outcome.is_failure());
            counter.fetch_add(1, Ordering::Relaxed);
        })));
        assert!(
            !id.set_reporter(Arc::new(|_: &EndpointId, _| {})),
            "set once"
        );
        id.clone()
            .report(Outcome::failure(crate::FailureKind::Timeout));
        assert_eq!(seen.load(Ordering::Relaxed), 1);
    }
}
