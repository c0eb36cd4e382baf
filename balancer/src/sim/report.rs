//! What a simulated run produced.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use hdrhistogram::Histogram;

use super::fleet::NodeReport;

/// The outcome of one simulated run.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Report {
    /// Requests the load generator sent.
    pub requests: u64,
    /// Requests answered successfully.
    pub succeeded: u64,
    /// Failed requests by error kind
    /// ([`BalancerError::label`](crate::BalancerError::label),
    /// `client_timeout` when the client gave up, or the node's error kind for
    /// routers without Keel's error type).
    pub errors: BTreeMap<String, u64>,
    /// Attempts that reached a node (first tries, retries and hedges).
    pub attempts: u64,
    /// Median latency of successful requests.
    pub p50: Duration,
    /// 95th percentile latency of successful requests.
    pub p95: Duration,
    /// 99th percentile latency of successful requests.
    pub p99: Duration,
    /// 99.9th percentile latency of successful requests.
    pub p999: Duration,
    /// Successful requests per simulated second of load.
    pub goodput: f64,
    /// What each node saw.
    pub nodes: Vec<NodeReport>,
    /// Share of served prompt blocks found in the serving node's cache.
    pub cache_hit_rate: f64,
    /// Share of each session's successful requests served by that session's
    /// most-used node, weighted by requests.
    pub stickiness: f64,
    /// At every attempt's arrival at a node: (that node's in-flight
    /// requests, the whole fleet's), both counting the arrival.
    pub dispatch_loads: Vec<(u32, u32)>,
    /// Per simulated second since the fleet was built: (requests that
    /// arrived, attempts that reached a node).
    pub per_second: Vec<(u64, u64)>,
    /// Latencies of successful requests (µs) by the second they arrived in.
    pub latency_by_second: Vec<Histogram<u64>>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        requests: u64,
        succeeded: u64,
        errors: BTreeMap<String, u64>,
        sessions: &HashMap<u64, HashMap<usize, u64>>,
        latencies: &Histogram<u64>,
        nodes: Vec<NodeReport>,
        dispatch_loads: Vec<(u32, u32)>,
        per_second: Vec<(u64, u64)>,
        latency_by_second: Vec<Histogram<u64>>,
        duration: Duration,
    ) -> Self {
        let at = |q: f64| {
            if latencies.is_empty() {
                Duration::ZERO
            } else {
                Duration::from_micros(latencies.value_at_quantile(q))
            }
        };
        let (sticky, total) = sessions.values().fold((0u64, 0u64), |(s, t), per_node| {
            let max = per_node.values().copied().max().unwrap_or(0);
            (s + max, t + per_node.values().sum::<u64>())
        });
        let prompt: u64 = nodes.iter().map(|n| n.prompt_blocks).sum();
        let cached: u64 = nodes.iter().map(|n| n.cached_blocks).sum();
        Report {
            requests,
            succeeded,
            errors,
            attempts: nodes.iter().map(|n| n.calls).sum(),
            p50: at(0.5),
            p95: at(0.95),
            p99: at(0.99),
            p999: at(0.999),
            goodput: succeeded as f64 / duration.as_secs_f64(),
            cache_hit_rate: if prompt == 0 {
                0.0
            } else {
                cached as f64 / prompt as f64
            },
            stickiness: if total == 0 {
                0.0
            } else {
                sticky as f64 / total as f64
            },
            nodes,
            dispatch_loads,
            per_second,
            latency_by_second,
        }
    }

    /// The `q` quantile of the latency of successful requests that arrived
    /// in seconds `from..to` (zero when there are none).
    pub fn quantile_between(&self, from: usize, to: usize, q: f64) -> Duration {
        let mut merged: Option<Histogram<u64>> = None;
        for h in self.latency_by_second.iter().take(to).skip(from) {
            match &mut merged {
                Some(m) => m.add(h).expect("same bounds"),
                None => merged = Some(h.clone()),
            }
        }
        match merged {
            Some(m) if !m.is_empty() => Duration::from_micros(m.value_at_quantile(q)),
            _ => Duration::ZERO,
        }
    }

    /// The most attempts per arrived request in any one-second bucket
    /// while requests were arriving (seconds without arrivals are skipped).
    pub fn max_attempts_per_second(&self) -> f64 {
        self.per_second
            .iter()
            .filter(|(arrivals, _)| *arrivals > 0)
            .map(|&(arrivals, attempts)| attempts as f64 / arrivals as f64)
            .fold(0.0, f64::max)
    }

    /// Successful requests over requests sent.
    pub fn success_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.succeeded as f64 / self.requests as f64
        }
    }

    /// Attempts that reached a node per request sent.
    pub fn attempts_per_request(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.attempts as f64 / self.requests as f64
        }
    }

    /// One human line: success, attempts, percentiles, goodput, cache hits.
    pub fn summary(&self) -> String {
        format!(
            "requests {} success {:.2}% attempts/request {:.3} p50 {:?} p99 {:?} p99.9 {:?} goodput {:.1}/s cache hits {:.1}% stickiness {:.1}% errors {:?}",
            self.requests,
            100.0 * self.success_rate(),
            self.attempts_per_request(),
            self.p50,
            self.p99,
            self.p999,
            self.goodput,
            100.0 * self.cache_hit_rate,
            100.0 * self.stickiness,
            self.errors,
        )
    }
}
