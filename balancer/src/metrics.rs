//! The metric names the balancer, retry and hedge layers record.
//!
//! | name | kind | labels | meaning |
//! | --- | --- | --- | --- |
//! | `keel_balancer_endpoints` | gauge | `balancer` | endpoints in the set |
//! | `keel_balancer_outstanding` | gauge | `balancer`, `endpoint` | requests in flight on the endpoint |
//! | `keel_balancer_attempts_total` | counter | `balancer`, `endpoint`, `outcome` | finished attempts; `outcome` is `success`, `failure`, `busy`, `timeout` or `cancelled` |
//! | `keel_balancer_waited_total` | counter | `balancer` | requests that waited for a free slot |
//! | `keel_balancer_overloaded_total` | counter | `balancer` | requests rejected `Overloaded` |
//! | `keel_balancer_no_endpoints_total` | counter | `balancer` | requests rejected `NoEndpoints` (after waiting up to `max_wait` for a first endpoint) |
//! | `keel_balancer_deadline_exceeded_total` | counter | `balancer` | requests whose deadline passed in the balancer |
//! | `keel_balancer_discover_errors_total` | counter | `balancer` | errors from the discovery stream (the set is kept) |
//! | `keel_retry_requests_total` | counter | `retry` | requests entering the retry layer (budget deposits) |
//! | `keel_retry_retries_total` | counter | `retry` | retries sent |
//! | `keel_retry_gave_up_total` | counter | `retry`, `reason` | retryable errors returned without a retry; `reason` is `budget`, `deadline`, `max_attempts` or `no_endpoint_left` |
//! | `keel_hedge_requests_total` | counter | `hedge` | requests entering the hedge layer |
//! | `keel_hedge_hedges_total` | counter | `hedge` | hedged copies sent |
//! | `keel_hedge_wins_total` | counter | `hedge` | responses that came from the hedged copy |
//! | `keel_hedge_budget_exhausted_total` | counter | `hedge` | hedges not sent because the budget was empty |
//!
//! `balancer`, `retry` and `hedge` are the `name` of the component's config;
//! `endpoint` is the discovery key's `Debug` form. Handles are registered
//! when the component is built (and when an endpoint is discovered), so
//! install the `metrics` recorder first. With no recorder installed every
//! update is a no-op.

use metrics::{Counter, Gauge};

/// Balancer-wide handles.
#[derive(Clone, Debug)]
pub(crate) struct BalancerMetrics {
    pub(crate) name: String,
    pub(crate) endpoints: Gauge,
    pub(crate) waited: Counter,
    pub(crate) overloaded: Counter,
    pub(crate) no_endpoints: Counter,
    pub(crate) deadline_exceeded: Counter,
    pub(crate) discover_errors: Counter,
}

impl BalancerMetrics {
    pub(crate) fn new(name: &str) -> Self {
        let labels = [("balancer", name.to_owned())];
        BalancerMetrics {
            name: name.to_owned(),
            endpoints: metrics::gauge!("keel_balancer_endpoints", &labels),
            waited: metrics::counter!("keel_balancer_waited_total", &labels),
            overloaded: metrics::counter!("keel_balancer_overloaded_total", &labels),
            no_endpoints: metrics::counter!("keel_balancer_no_endpoints_total", &labels),
            deadline_exceeded: metrics::counter!("keel_balancer_deadline_exceeded_total", &labels),
            discover_errors: metrics::counter!("keel_balancer_discover_errors_total", &labels),
        }
    }
}

/// Per-endpoint handles.
#[derive(Clone, Debug)]
pub(crate) struct EndpointMetrics {
    pub(crate) outstanding: Gauge,
    pub(crate) succeeded: Counter,
    pub(crate) failed: Counter,
    pub(crate) busy: Counter,
    pub(crate) timed_out: Counter,
    pub(crate) cancelled: Counter,
}

impl EndpointMetrics {
    pub(crate) fn new(balancer: &str, endpoint: String) -> Self {
        let labels = [("balancer", balancer.to_owned()), ("endpoint", endpoint)];
        let attempts = |outcome: &'static str| {
            let mut labels = labels.to_vec();
            labels.push(("outcome", outcome.to_owned()));
            metrics::counter!("keel_balancer_attempts_total", &labels)
        };
        EndpointMetrics {
            outstanding: metrics::gauge!("keel_balancer_outstanding", &labels),
            succeeded: attempts("success"),
            failed: attempts("failure"),
            busy: attempts("busy"),
            timed_out: attempts("timeout"),
            cancelled: attempts("cancelled"),
        }
    }
}

/// Retry layer handles.
#[derive(Clone, Debug)]
pub(crate) struct RetryMetrics {
    pub(crate) requests: Counter,
    pub(crate) retries: Counter,
    pub(crate) gave_up_budget: Counter,
    pub(crate) gave_up_deadline: Counter,
    pub(crate) gave_up_max_attempts: Counter,
    pub(crate) gave_up_no_endpoint_left: Counter,
}

impl RetryMetrics {
    pub(crate) fn new(name: &str) -> Self {
        let labels = [("retry", name.to_owned())];
        let gave_up = |reason: &'static str| {
            let labels = [("retry", name.to_owned()), ("reason", reason.to_owned())];
            metrics::counter!("keel_retry_gave_up_total", &labels)
        };
        RetryMetrics {
            requests: metrics::counter!("keel_retry_requests_total", &labels),
            retries: metrics::counter!("keel_retry_retries_total", &labels),
            gave_up_budget: gave_up("budget"),
            gave_up_deadline: gave_up("deadline"),
            gave_up_max_attempts: gave_up("max_attempts"),
            gave_up_no_endpoint_left: gave_up("no_endpoint_left"),
        }
    }
}

/// Hedge layer handles.
#[derive(Clone, Debug)]
pub(crate) struct HedgeMetrics {
    pub(crate) requests: Counter,
    pub(crate) hedges: Counter,
    pub(crate) wins: Counter,
    pub(crate) budget_exhausted: Counter,
}

impl HedgeMetrics {
    pub(crate) fn new(name: &str) -> Self {
        let labels = [("hedge", name.to_owned())];
        HedgeMetrics {
            requests: metrics::counter!("keel_hedge_requests_total", &labels),
            hedges: metrics::counter!("keel_hedge_hedges_total", &labels),
            wins: metrics::counter!("keel_hedge_wins_total", &labels),
            budget_exhausted: metrics::counter!("keel_hedge_budget_exhausted_total", &labels),
        }
    }
}
