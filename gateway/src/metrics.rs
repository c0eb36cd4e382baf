//! The gateway's metrics (the `metrics` facade), rendered in Prometheus
//! text format at `/metrics`.
//!
//! | name | kind | labels |
//! | --- | --- | --- |
//! | `keel_gateway_requests_total` | counter | `route`, `outcome` |
//! | `keel_gateway_request_seconds` | histogram | `route` |
//! | `keel_gateway_ttft_seconds` | histogram | `model` |
//! | `keel_gateway_inter_token_seconds` | histogram | `model` |
//! | `keel_gateway_tokens_total` | counter | `tenant`, `direction` (`in`, `out`) |
//! | `keel_gateway_tokens_reserved_total` | counter | `tenant` |
//! | `keel_gateway_cache_total` | counter | `result` (`hit`, `miss`) |
//!
//! The crates below add their own (`keel_scheduler_*`, `keel_balancer_*`,
//! `keel_health_*`, `keel_cache_*`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::time::Instant;

use crate::openai::Usage;
use crate::sse::StreamReport;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder for this process (once; later calls
/// return the same handle). `None` when another recorder was installed
/// first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0,
                ])
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

/// The metrics in Prometheus text format (empty without a recorder).
pub fn render() -> String {
    install().map(|handle| handle.render()).unwrap_or_default()
}

pub(crate) fn request_done(route: &'static str, outcome: &'static str, started: Instant) {
    metrics::counter!("keel_gateway_requests_total", "route" => route, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("keel_gateway_request_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
}

pub(crate) fn cache(hit: bool) {
    metrics::counter!("keel_gateway_cache_total", "result" => if hit { "hit" } else { "miss" })
        .increment(1);
}

pub(crate) fn tokens_reserved(tenant: &str, tokens: u64) {
    metrics::counter!("keel_gateway_tokens_reserved_total", "tenant" => tenant.to_owned())
        .increment(tokens);
}

pub(crate) fn stream_done(
    model: &str,
    tenant: &str,
    route: &'static str,
    outcome: &'static str,
    report: &StreamReport,
    usage: Usage,
    started: Instant,
) {
    request_done(route, outcome, started);
    if let Some(first) = report.first_byte {
        metrics::histogram!("keel_gateway_ttft_seconds", "model" => model.to_owned())
            .record(first.as_secs_f64());
    }
    let gaps = metrics::histogram!("keel_gateway_inter_token_seconds", "model" => model.to_owned());
    for gap in &report.gaps {
        gaps.record(gap.as_secs_f64());
    }
    metrics::counter!("keel_gateway_tokens_total", "tenant" => tenant.to_owned(), "direction" => "in")
        .increment(usage.prompt_tokens);
    metrics::counter!("keel_gateway_tokens_total", "tenant" => tenant.to_owned(), "direction" => "out")
        .increment(usage.completion_tokens);
}
