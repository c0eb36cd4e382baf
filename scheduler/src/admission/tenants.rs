//! Per-tenant counters shared by submitters and the dispatcher, without a
//! scheduler-wide lock: a table sharded by the tenant's hash, each shard a
//! read-mostly lock held only to find a tenant's counters (a write lock
//! only the first time a tenant is seen, and for the rare cleanup).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;
use parking_lot::RwLock;

use super::config::SchedulerConfig;
use crate::ticket::{TenantHash, TenantId};

/// Shards of the table (a power of two).
const SHARDS: usize = 16;

/// One tenant's limits (resolved once from the config) and counts.
#[derive(Debug)]
pub(super) struct TenantSlot {
    pub(super) id: TenantId,
    /// Its requests waiting (inbox and ordered queue), when counted.
    pub(super) queued: AtomicUsize,
    /// Its requests dispatched and not yet answered, when counted.
    pub(super) in_flight: AtomicUsize,
    pub(super) max_queued: usize,
    pub(super) max_in_flight: Option<usize>,
    pub(super) weight: u64,
}

impl TenantSlot {
    /// Whether another request of this tenant may be dispatched now.
    pub(super) fn below_in_flight_limit(&self) -> bool {
        self.max_in_flight
            .is_none_or(|max| self.in_flight.load(Ordering::Acquire) < max)
    }
}

type Shard = HashMap<TenantId, Arc<TenantSlot>, TenantHash>;

/// The table of tenants' counters.
#[derive(Debug)]
pub(super) struct Tenants {
    shards: Box<[CachePadded<RwLock<Shard>>]>,
}

impl Tenants {
    pub(super) fn new() -> Self {
        Tenants {
            shards: (0..SHARDS)
                .map(|_| CachePadded::new(RwLock::new(Shard::default())))
                .collect(),
        }
    }

    fn shard(&self, tenant: &TenantId) -> &RwLock<Shard> {
        let hash = TenantHash::default().hash_one(tenant);
        &self.shards[(hash >> 32) as usize % SHARDS]
    }

    /// Runs `f` on the tenant's counters, creating them on first sight.
    /// The shard stays read-locked while `f` runs, so a cleanup never
    /// drops counters that `f` is changing.
    pub(super) fn with<R>(
        &self,
        tenant: &TenantId,
        config: &SchedulerConfig,
        f: impl FnOnce(&TenantSlot) -> R,
    ) -> R {
        let shard = self.shard(tenant);
        {
            let map = shard.read();
            if let Some(slot) = map.get(tenant) {
                return f(slot);
            }
        }
        let mut map = shard.write();
        let slot = map
            .entry(tenant.clone())
            .or_insert_with(|| Arc::new(new_slot(tenant, config)));
        f(slot)
    }

    /// The tenant's counters, shared (the dispatcher keeps them with the
    /// tenant's queue, a permit keeps them until it is released).
    pub(super) fn get(&self, tenant: &TenantId, config: &SchedulerConfig) -> Arc<TenantSlot> {
        let shard = self.shard(tenant);
        if let Some(slot) = shard.read().get(tenant) {
            return slot.clone();
        }
        shard
            .write()
            .entry(tenant.clone())
            .or_insert_with(|| Arc::new(new_slot(tenant, config)))
            .clone()
    }

    /// How many tenants the table holds.
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// Drops the counters of tenants with nothing waiting or in flight
    /// that nobody else holds. Counters still held (by the dispatcher's
    /// queues or a permit) stay, so a count never moves to a copy.
    pub(super) fn shrink(&self) {
        for shard in self.shards.iter() {
            shard.write().retain(|_, slot| {
                Arc::strong_count(slot) > 1
                    || slot.queued.load(Ordering::Acquire) > 0
                    || slot.in_flight.load(Ordering::Acquire) > 0
            });
        }
    }
}

fn new_slot(tenant: &TenantId, config: &SchedulerConfig) -> TenantSlot {
    TenantSlot {
        id: tenant.clone(),
        queued: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        max_queued: config.max_queued_of(tenant.as_str()),
        max_in_flight: config.max_in_flight_of(tenant.as_str()),
        weight: config.weight_of(tenant.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::config::TenantConfig;

    #[test]
    fn limits_are_resolved_once_per_tenant() {
        let config = SchedulerConfig::new("t")
            .max_queued_per_tenant(7)
            .tenant("big", TenantConfig::default().max_queued(70).weight(3));
        let tenants = Tenants::new();
        let big = tenants.get(&TenantId::new("big"), &config);
        assert_eq!((big.max_queued, big.weight), (70, 3));
        let small = TenantId::new("small");
        assert_eq!(tenants.with(&small, &config, |s| s.max_queued), 7);
        assert!(Arc::ptr_eq(
            &big,
            &tenants.get(&TenantId::new("big"), &config)
        ));
        assert_eq!(tenants.len(), 2);
    }

    #[test]
    fn shrink_keeps_counters_in_use() {
        let config = SchedulerConfig::new("t");
        let tenants = Tenants::new();
        let held = tenants.get(&TenantId::new("held"), &config);
        tenants.with(&TenantId::new("waiting"), &config, |s| {
            s.queued.fetch_add(1, Ordering::AcqRel)
        });
        tenants.with(&TenantId::new("idle"), &config, |_| ());
        tenants.shrink();
        assert_eq!(tenants.len(), 2, "only the idle tenant went");
        assert!(Arc::ptr_eq(&held, &tenants.get(&held.id, &config)));
    }
}
