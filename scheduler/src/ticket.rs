//! What admission knows about one request: tenant, priority, deadline, cost.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keel_queue::Priority;
use tokio::time::Instant;

/// The name of a tenant: whose request this is, for fairness, quotas and
/// limits.
///
/// Cheap to clone (a shared string and its hash, computed once with this
/// process's random hash keys). Build one per tenant and clone it into
/// tickets, rather than building a new one per request.
#[derive(Clone)]
pub struct TenantId {
    name: Arc<str>,
    hash: u64,
}

/// The per-process random keys tenant names are hashed with, so names
/// chosen by clients cannot be made to collide.
fn hash_keys() -> &'static RandomState {
    static KEYS: OnceLock<RandomState> = OnceLock::new();
    KEYS.get_or_init(RandomState::new)
}

impl TenantId {
    /// Names a tenant.
    pub fn new(name: impl AsRef<str>) -> Self {
        Self::from_arc(Arc::from(name.as_ref()))
    }

    fn from_arc(name: Arc<str>) -> Self {
        TenantId {
            hash: hash_keys().hash_one(&*name),
            name,
        }
    }

    /// The tenant's name.
    pub fn as_str(&self) -> &str {
        &self.name
    }
}

impl PartialEq for TenantId {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.name == other.name
    }
}

impl Eq for TenantId {}

impl Hash for TenantId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialOrd for TenantId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for TenantId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.name.cmp(&other.name)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", self.name)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl From<&str> for TenantId {
    fn from(name: &str) -> Self {
        TenantId::new(name)
    }
}

impl From<String> for TenantId {
    fn from(name: String) -> Self {
        TenantId::from_arc(Arc::from(name))
    }
}

impl From<&TenantId> for TenantId {
    fn from(id: &TenantId) -> Self {
        id.clone()
    }
}

/// A hasher for maps keyed by [`TenantId`]: it takes the precomputed hash
/// as it is instead of hashing it again.
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct TenantHasher(u64);

impl Hasher for TenantHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `TenantId`; fold anything else in.
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The `BuildHasher` of maps keyed by [`TenantId`].
pub(crate) type TenantHash = BuildHasherDefault<TenantHasher>;

/// What admission knows about one request.
///
/// - `tenant`: whose request it is. Tenants share their priority class by
///   weighted deficit round robin over `cost`, and carry their own rate,
///   queue and concurrency limits.
/// - `priority`: the class, higher served first (see
///   [`SchedulerConfig::classes`](crate::SchedulerConfig::classes)).
/// - `deadline`: past it the request is answered
///   [`DeadlineExceeded`](crate::SchedulerError::DeadlineExceeded) instead of
///   being dispatched; within a tenant, earliest deadline first.
/// - `cost`: what the request weighs for fairness and for cost-unit rate
///   limits (estimated tokens, say). At least 1.
///
/// ```
/// use std::time::Duration;
/// use keel_scheduler::{Priority, Ticket};
///
/// let ticket = Ticket::new("acme")
///     .priority(Priority::HIGH)
///     .timeout(Duration::from_secs(2))
///     .cost(512);
/// assert_eq!(ticket.tenant.as_str(), "acme");
/// assert_eq!(ticket.cost, 512);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Ticket {
    /// Whose request it is.
    pub tenant: TenantId,
    /// The priority class; higher is served first.
    pub priority: Priority,
    /// Past this instant the request is not dispatched.
    pub deadline: Option<Instant>,
    /// The request's weight for fairness and cost-unit rate limits; at
    /// least 1.
    pub cost: u64,
}

impl Ticket {
    /// A ticket for `tenant` with normal priority, no deadline and cost 1.
    pub fn new(tenant: impl Into<TenantId>) -> Self {
        Ticket {
            tenant: tenant.into(),
            priority: Priority::NORMAL,
            deadline: None,
            cost: 1,
        }
    }

    /// Sets the priority class.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the deadline.
    pub fn deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Sets the deadline to `timeout` from now.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.deadline(Instant::now() + timeout)
    }

    /// Sets the cost (values below 1 count as 1).
    pub fn cost(mut self, cost: u64) -> Self {
        self.cost = cost.max(1);
        self
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn ids_compare_by_name_and_key_maps() {
        let a = TenantId::new("acme");
        let b = TenantId::from(String::from("acme"));
        assert_eq!(a, b);
        assert_ne!(a, TenantId::new("acme2"));
        let mut map: HashMap<TenantId, u32, TenantHash> = HashMap::default();
        map.insert(a, 1);
        map.insert(TenantId::new("other"), 2);
        assert_eq!(map.get(&b), Some(&1));
        assert!(TenantId::new("a") < TenantId::new("b"));
    }
}
