//! The metric names every backend records, registered once per queue.
//!
//! | name | kind | meaning |
//! | --- | --- | --- |
//! | `keel_queue_enqueued_total` | counter | jobs enqueued (duplicates excluded) |
//! | `keel_queue_duplicates_total` | counter | enqueues dropped by an idempotency key |
//! | `keel_queue_full_total` | counter | enqueues refused with `Full` |
//! | `keel_queue_delivered_total` | counter | deliveries handed to consumers |
//! | `keel_queue_acked_total` | counter | deliveries acked |
//! | `keel_queue_retried_total` | counter | deliveries nacked for a retry |
//! | `keel_queue_released_total` | counter | deliveries released untried (`Nack::Release`, no attempt spent) |
//! | `keel_queue_lease_expired_total` | counter | leases that expired unacked |
//! | `keel_queue_dead_lettered_total` | counter | jobs moved to the dead letters |
//! | `keel_queue_ready` | gauge | ready jobs, set by `stats` |
//! | `keel_queue_delayed` | gauge | delayed jobs, set by `stats` |
//! | `keel_queue_in_flight` | gauge | leased jobs, set by `stats` |
//! | `keel_queue_dead` | gauge | dead letters, set by `stats` |
//! | `keel_queue_oldest_ready_age_seconds` | gauge | age of the oldest ready job, set by `stats` |
//!
//! Every series carries the labels `queue` and `backend`. Handles are
//! registered when the queue is built, so install the `metrics` recorder
//! before building queues.

use metrics::{Counter, Gauge};

use crate::types::QueueStats;

/// Registered metric handles for one queue.
#[derive(Clone, Debug)]
pub(crate) struct QueueMetrics {
    pub(crate) enqueued: Counter,
    pub(crate) duplicates: Counter,
    pub(crate) full: Counter,
    pub(crate) delivered: Counter,
    pub(crate) acked: Counter,
    pub(crate) retried: Counter,
    pub(crate) released: Counter,
    pub(crate) lease_expired: Counter,
    pub(crate) dead_lettered: Counter,
    ready: Gauge,
    delayed: Gauge,
    in_flight: Gauge,
    dead: Gauge,
    oldest_ready_age: Gauge,
}

impl QueueMetrics {
    pub(crate) fn new(backend: &'static str, queue: &str) -> Self {
        let labels = [("queue", queue.to_owned()), ("backend", backend.to_owned())];
        QueueMetrics {
            enqueued: metrics::counter!("keel_queue_enqueued_total", &labels),
            duplicates: metrics::counter!("keel_queue_duplicates_total", &labels),
            full: metrics::counter!("keel_queue_full_total", &labels),
            delivered: metrics::counter!("keel_queue_delivered_total", &labels),
            acked: metrics::counter!("keel_queue_acked_total", &labels),
            retried: metrics::counter!("keel_queue_retried_total", &labels),
            released: metrics::counter!("keel_queue_released_total", &labels),
            lease_expired: metrics::counter!("keel_queue_lease_expired_total", &labels),
            dead_lettered: metrics::counter!("keel_queue_dead_lettered_total", &labels),
            ready: metrics::gauge!("keel_queue_ready", &labels),
            delayed: metrics::gauge!("keel_queue_delayed", &labels),
            in_flight: metrics::gauge!("keel_queue_in_flight", &labels),
            dead: metrics::gauge!("keel_queue_dead", &labels),
            oldest_ready_age: metrics::gauge!("keel_queue_oldest_ready_age_seconds", &labels),
        }
    }

    pub(crate) fn record_stats(&self, stats: &QueueStats) {
        self.ready.set(stats.ready as f64);
        self.delayed.set(stats.delayed as f64);
        self.in_flight.set(stats.in_flight as f64);
        self.dead.set(stats.dead as f64);
        self.oldest_ready_age
            .set(stats.oldest_ready_age.map_or(0.0, |d| d.as_secs_f64()));
    }
}
