//! The metric names this crate records, through the `metrics` facade.
//!
//! Handles are registered when a component is built, so install the
//! `metrics` recorder before building schedulers, workers and batchers.
//!
//! # Admission ([`Scheduler`](crate::Scheduler), [`AdmissionLayer`](crate::AdmissionLayer))
//!
//! Every series carries the label `scheduler` (the config's `name`); those
//! marked *per class* also carry `class` (`0` is the lowest priority).
//!
//! | name | kind | meaning |
//! | --- | --- | --- |
//! | `keel_scheduler_submitted_total` | counter | requests submitted |
//! | `keel_scheduler_dispatched_total` | counter, per class | requests sent to the service |
//! | `keel_scheduler_rejected_total` | counter, label `reason` (`rate_limited`, `overloaded`, `queue_full`) | requests refused before reaching the service |
//! | `keel_scheduler_expired_total` | counter | requests whose deadline passed while they waited (never sent) |
//! | `keel_scheduler_cancelled_total` | counter | requests whose submitter gave up while they waited |
//! | `keel_scheduler_shed_total` | counter, per class | waiting requests shed by queueing-delay control (also counted as rejected, `overloaded`) |
//! | `keel_scheduler_queue_delay_seconds` | histogram, per class | how long dispatched requests waited |
//! | `keel_scheduler_queued` | gauge | requests waiting |
//! | `keel_scheduler_in_flight` | gauge | requests dispatched and not yet answered |
//! | `keel_scheduler_concurrency_limit` | gauge | the in-flight limit (moves when adaptive) |
//! | `keel_scheduler_shedding` | gauge, per class | 1 while the class is shedding |
//!
//! # Rate limiters
//!
//! Label `limiter` (the config's `name`).
//!
//! | name | kind | meaning |
//! | --- | --- | --- |
//! | `keel_rate_limited_total` | counter | checks answered `Limited` |
//! | `keel_rate_limiter_keys` | gauge | tenants with live state (local limiter, after each eviction sweep) |
//! | `keel_rate_limiter_errors_total` | counter | checks that could not reach the shared store (Redis limiter) |
//!
//! # Workers ([`Worker`](crate::Worker))
//!
//! Label `worker` (the config's `name`).
//!
//! | name | kind | meaning |
//! | --- | --- | --- |
//! | `keel_worker_started_total` | counter | jobs handed to the handler |
//! | `keel_worker_acked_total` | counter | jobs acked after `JobOutcome::Ack` |
//! | `keel_worker_retried_total` | counter | jobs nacked for a retry |
//! | `keel_worker_dead_lettered_total` | counter | jobs nacked to the dead letters (`JobOutcome::Abort`, expired deadline) |
//! | `keel_worker_panics_total` | counter | handler panics caught (the job is nacked for a retry) |
//! | `keel_worker_released_total` | counter | in-flight jobs handed back at shutdown |
//! | `keel_worker_lease_renewals_total` | counter | leases extended while handlers ran |
//! | `keel_worker_lease_lost_total` | counter | leases lost while a handler ran (the handler is cancelled; the job is redelivered) |
//! | `keel_worker_settle_errors_total` | counter | acks and nacks that failed for good (the job comes back after its lease) |
//! | `keel_worker_retry_budget_exhausted_total` | counter | retries delayed because the retry budget was spent |
//! | `keel_worker_broker_errors_total` | counter | failed `dequeue` calls |
//! | `keel_worker_reconnects_total` | counter | recoveries after broker errors |
//! | `keel_worker_connected` | gauge | 1 while `dequeue` works, 0 while reconnecting |
//! | `keel_worker_in_flight` | gauge | jobs being handled |
//! | `keel_worker_job_seconds` | histogram | handler run time |
//!
//! # Batchers ([`Batcher`](crate::Batcher))
//!
//! Label `batcher` (the config's `name`).
//!
//! | name | kind | meaning |
//! | --- | --- | --- |
//! | `keel_batch_dispatched_total` | counter | batches sent to the batch service |
//! | `keel_batch_items_total` | counter | items sent in batches |
//! | `keel_batch_cancelled_total` | counter | items dropped by their submitter before dispatch |
//! | `keel_batch_size` | histogram | items per batch |

use metrics::{Counter, Gauge, Histogram};

/// Registered handles of one admission scheduler.
#[derive(Clone, Debug)]
pub(crate) struct SchedulerMetrics {
    pub(crate) submitted: Counter,
    pub(crate) dispatched: Vec<Counter>,
    pub(crate) rate_limited: Counter,
    pub(crate) overloaded: Counter,
    pub(crate) queue_full: Counter,
    pub(crate) expired: Counter,
    pub(crate) cancelled: Counter,
    pub(crate) shed: Vec<Counter>,
    pub(crate) queue_delay: Vec<Histogram>,
    pub(crate) queued: Gauge,
    pub(crate) in_flight: Gauge,
    pub(crate) limit: Gauge,
    pub(crate) shedding: Vec<Gauge>,
}

impl SchedulerMetrics {
    pub(crate) fn new(name: &str, classes: usize) -> Self {
        let base = [("scheduler", name.to_owned())];
        let class_labels = |c: usize| [("scheduler", name.to_owned()), ("class", c.to_string())];
        let reason = |r: &'static str| [("scheduler", name.to_owned()), ("reason", r.to_owned())];
        SchedulerMetrics {
            submitted: metrics::counter!("keel_scheduler_submitted_total", &base),
            dispatched: (0..classes)
                .map(|c| metrics::counter!("keel_scheduler_dispatched_total", &class_labels(c)))
                .collect(),
            rate_limited: metrics::counter!(
                "keel_scheduler_rejected_total",
                &reason("rate_limited")
            ),
            overloaded: metrics::counter!("keel_scheduler_rejected_total", &reason("overloaded")),
            queue_full: metrics::counter!("keel_scheduler_rejected_total", &reason("queue_full")),
            expired: metrics::counter!("keel_scheduler_expired_total", &base),
            cancelled: metrics::counter!("keel_scheduler_cancelled_total", &base),
            shed: (0..classes)
                .map(|c| metrics::counter!("keel_scheduler_shed_total", &class_labels(c)))
                .collect(),
            queue_delay: (0..classes)
                .map(|c| {
                    metrics::histogram!("keel_scheduler_queue_delay_seconds", &class_labels(c))
                })
                .collect(),
            queued: metrics::gauge!("keel_scheduler_queued", &base),
            in_flight: metrics::gauge!("keel_scheduler_in_flight", &base),
            limit: metrics::gauge!("keel_scheduler_concurrency_limit", &base),
            shedding: (0..classes)
                .map(|c| metrics::gauge!("keel_scheduler_shedding", &class_labels(c)))
                .collect(),
        }
    }
}

/// Registered handles of one rate limiter.
#[derive(Clone, Debug)]
pub(crate) struct LimiterMetrics {
    pub(crate) limited: Counter,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) errors: Counter,
    pub(crate) keys: Gauge,
}

impl LimiterMetrics {
    pub(crate) fn new(name: &str) -> Self {
        let labels = [("limiter", name.to_owned())];
        LimiterMetrics {
            limited: metrics::counter!("keel_rate_limited_total", &labels),
            errors: metrics::counter!("keel_rate_limiter_errors_total", &labels),
            keys: metrics::gauge!("keel_rate_limiter_keys", &labels),
        }
    }
}

/// Registered handles of one worker.
#[derive(Clone, Debug)]
pub(crate) struct WorkerMetrics {
    pub(crate) started: Counter,
    pub(crate) acked: Counter,
    pub(crate) retried: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) panics: Counter,
    pub(crate) released: Counter,
    pub(crate) renewals: Counter,
    pub(crate) lease_lost: Counter,
    pub(crate) settle_errors: Counter,
    pub(crate) budget_exhausted: Counter,
    pub(crate) broker_errors: Counter,
    pub(crate) reconnects: Counter,
    pub(crate) connected: Gauge,
    pub(crate) in_flight: Gauge,
    pub(crate) job_seconds: Histogram,
}

impl WorkerMetrics {
    pub(crate) fn new(name: &str) -> Self {
        let labels = [("worker", name.to_owned())];
        WorkerMetrics {
            started: metrics::counter!("keel_worker_started_total", &labels),
            acked: metrics::counter!("keel_worker_acked_total", &labels),
            retried: metrics::counter!("keel_worker_retried_total", &labels),
            dead_lettered: metrics::counter!("keel_worker_dead_lettered_total", &labels),
            panics: metrics::counter!("keel_worker_panics_total", &labels),
            released: metrics::counter!("keel_worker_released_total", &labels),
            renewals: metrics::counter!("keel_worker_lease_renewals_total", &labels),
            lease_lost: metrics::counter!("keel_worker_lease_lost_total", &labels),
            settle_errors: metrics::counter!("keel_worker_settle_errors_total", &labels),
            budget_exhausted: metrics::counter!(
                "keel_worker_retry_budget_exhausted_total",
                &labels
            ),
            broker_errors: metrics::counter!("keel_worker_broker_errors_total", &labels),
            reconnects: metrics::counter!("keel_worker_reconnects_total", &labels),
            connected: metrics::gauge!("keel_worker_connected", &labels),
            in_flight: metrics::gauge!("keel_worker_in_flight", &labels),
            job_seconds: metrics::histogram!("keel_worker_job_seconds", &labels),
        }
    }
}

/// Registered handles of one batcher.
#[derive(Clone, Debug)]
pub(crate) struct BatchMetrics {
    pub(crate) batches: Counter,
    pub(crate) items: Counter,
    pub(crate) cancelled: Counter,
    pub(crate) size: Histogram,
}

impl BatchMetrics {
    pub(crate) fn new(name: &str) -> Self {
        let labels = [("batcher", name.to_owned())];
        BatchMetrics {
            batches: metrics::counter!("keel_batch_dispatched_total", &labels),
            items: metrics::counter!("keel_batch_items_total", &labels),
            cancelled: metrics::counter!("keel_batch_cancelled_total", &labels),
            size: metrics::histogram!("keel_batch_size", &labels),
        }
    }
}
