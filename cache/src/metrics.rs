//! The metric names this crate records.
//!
//! | name | kind | labels | meaning |
//! | --- | --- | --- | --- |
//! | `keel_cache_hits_total` | counter | `cache`, `tier` | fresh hits, per tier (`l1`, `l2`) |
//! | `keel_cache_stale_hits_total` | counter | `cache`, `tier` | stale hits served while a refresh runs |
//! | `keel_cache_misses_total` | counter | `cache`, `tier` | misses, per tier |
//! | `keel_cache_coalesced_waits_total` | counter | `cache` | `get_or_load` calls that joined another call's load instead of loading |
//! | `keel_cache_loads_total` | counter | `cache` | loader calls |
//! | `keel_cache_load_errors_total` | counter | `cache`, `reason` | failed loads: `reason` is `error`, `timeout` or `panic` |
//! | `keel_cache_negative_hits_total` | counter | `cache` | loader errors answered from the negative cache |
//! | `keel_cache_stale_on_error_total` | counter | `cache` | stale values served because the refresh failed or was slow |
//! | `keel_cache_load_seconds` | histogram | `cache` | loader call durations |
//! | `keel_cache_l2_errors_total` | counter | `cache`, `op` | L2 failures and timeouts (`get`, `set`, `delete`), each absorbed |
//! | `keel_cache_l2_skipped_total` | counter | `cache` | L2 calls skipped because the breaker is open |
//! | `keel_cache_l2_breaker_state` | gauge | `cache` | 0 closed, 1 open, 2 half-open |
//! | `keel_cache_l2_breaker_opened_total` | counter | `cache` | times the breaker opened |
//! | `keel_cache_invalidations_sent_total` | counter | `cache` | invalidations published |
//! | `keel_cache_invalidations_received_total` | counter | `cache` | invalidations from other instances applied to L1 |
//! | `keel_cache_invalidation_errors_total` | counter | `cache` | invalidations that could not be published |
//! | `keel_cache_l1_flushes_total` | counter | `cache` | L1 flushes after the invalidation subscription was (re)established |
//! | `keel_cache_corrupt_total` | counter | `backend` | stored bytes that were not ours (foreign, truncated, another version), read as misses |
//!
//! The `cache` label is [`TieredConfig::name`](crate::TieredConfig::name).
//! Handles are registered when the cache is built, so install the `metrics`
//! recorder before building caches.

#[cfg(feature = "moka")]
pub(crate) use self::tiered::TieredMetrics;

#[cfg(feature = "moka")]
mod tiered {
    use metrics::{Counter, Gauge, Histogram};

    /// Registered metric handles for one `Tiered`.
    #[derive(Clone, Debug)]
    pub(crate) struct TieredMetrics {
        pub(crate) l1_hits: Counter,
        pub(crate) l1_stale_hits: Counter,
        pub(crate) l1_misses: Counter,
        pub(crate) l2_hits: Counter,
        pub(crate) l2_stale_hits: Counter,
        pub(crate) l2_misses: Counter,
        pub(crate) coalesced: Counter,
        pub(crate) loads: Counter,
        pub(crate) load_errors: Counter,
        pub(crate) load_timeouts: Counter,
        pub(crate) load_panics: Counter,
        pub(crate) negative_hits: Counter,
        pub(crate) stale_on_error: Counter,
        pub(crate) load_seconds: Histogram,
        pub(crate) l2_get_errors: Counter,
        pub(crate) l2_set_errors: Counter,
        pub(crate) l2_delete_errors: Counter,
        pub(crate) l2_skipped: Counter,
        pub(crate) breaker_state: Gauge,
        pub(crate) breaker_opened: Counter,
        pub(crate) invalidations_sent: Counter,
        pub(crate) invalidations_received: Counter,
        pub(crate) invalidation_errors: Counter,
        pub(crate) l1_flushes: Counter,
        pub(crate) corrupt: Counter,
    }

    impl TieredMetrics {
        pub(crate) fn new(cache: &str) -> Self {
            let c = || [("cache", cache.to_owned())];
            let tier = |t: &'static str| [("cache", cache.to_owned()), ("tier", t.to_owned())];
            let reason = |r: &'static str| [("cache", cache.to_owned()), ("reason", r.to_owned())];
            let op = |o: &'static str| [("cache", cache.to_owned()), ("op", o.to_owned())];
            TieredMetrics {
                l1_hits: metrics::counter!("keel_cache_hits_total", &tier("l1")),
                l1_stale_hits: metrics::counter!("keel_cache_stale_hits_total", &tier("l1")),
                l1_misses: metrics::counter!("keel_cache_misses_total", &tier("l1")),
                l2_hits: metrics::counter!("keel_cache_hits_total", &tier("l2")),
                l2_stale_hits: metrics::counter!("keel_cache_stale_hits_total", &tier("l2")),
                l2_misses: metrics::counter!("keel_cache_misses_total", &tier("l2")),
                coalesced: metrics::counter!("keel_cache_coalesced_waits_total", &c()),
                loads: metrics::counter!("keel_cache_loads_total", &c()),
                load_errors: metrics::counter!("keel_cache_load_errors_total", &reason("error")),
                load_timeouts: metrics::counter!(
                    "keel_cache_load_errors_total",
                    &reason("timeout")
                ),
                load_panics: metrics::counter!("keel_cache_load_errors_total", &reason("panic")),
                negative_hits: metrics::counter!("keel_cache_negative_hits_total", &c()),
                stale_on_error: metrics::counter!("keel_cache_stale_on_error_total", &c()),
                load_seconds: metrics::histogram!("keel_cache_load_seconds", &c()),
                l2_get_errors: metrics::counter!("keel_cache_l2_errors_total", &op("get")),
                l2_set_errors: metrics::counter!("keel_cache_l2_errors_total", &op("set")),
                l2_delete_errors: metrics::counter!("keel_cache_l2_errors_total", &op("delete")),
                l2_skipped: metrics::counter!("keel_cache_l2_skipped_total", &c()),
                breaker_state: metrics::gauge!("keel_cache_l2_breaker_state", &c()),
                breaker_opened: metrics::counter!("keel_cache_l2_breaker_opened_total", &c()),
                invalidations_sent: metrics::counter!("keel_cache_invalidations_sent_total", &c()),
                invalidations_received: metrics::counter!(
                    "keel_cache_invalidations_received_total",
                    &c()
                ),
                invalidation_errors: metrics::counter!(
                    "keel_cache_invalidation_errors_total",
                    &c()
                ),
                l1_flushes: metrics::counter!("keel_cache_l1_flushes_total", &c()),
                corrupt: metrics::counter!("keel_cache_corrupt_total", "backend" => "tiered"),
            }
        }
    }
}
