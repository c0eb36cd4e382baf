//! Per-phase accounting of every offered request, and the final report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;

/// How one offered request ended. Every offered request ends in exactly one.
#[derive(Clone, Debug, PartialEq)]
pub enum RequestResult {
    /// Answered, after `attempts` node calls (0 for a cache hit).
    Completed {
        /// Offer to answer.
        latency: Duration,
        /// Node calls made.
        attempts: u32,
        /// Served from the response cache.
        cache_hit: bool,
    },
    /// Refused up front or after trying, with the reason.
    Rejected {
        /// Why (rate-limited, overloaded, queue-full, unavailable…).
        reason: String,
        /// Node calls made.
        attempts: u32,
    },
    /// Dropped because its deadline passed.
    Expired {
        /// Node calls made.
        attempts: u32,
    },
    /// Failed after every attempt.
    Failed {
        /// Node calls made.
        attempts: u32,
    },
}

impl RequestResult {
    fn attempts(&self) -> u32 {
        match self {
            RequestResult::Completed { attempts, .. }
            | RequestResult::Rejected { attempts, .. }
            | RequestResult::Expired { attempts }
            | RequestResult::Failed { attempts } => *attempts,
        }
    }
}

/// One pipeline's figures for one phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseFigures {
    /// Requests offered.
    pub offered: u64,
    /// Requests answered.
    pub completed: u64,
    /// Rejections by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Requests dropped past their deadline.
    pub expired: u64,
    /// Requests that failed after every attempt.
    pub failed: u64,
    /// Requests with no outcome at the end of the run.
    pub lost: u64,
    /// Outcomes recorded beyond the offered count (a request answered
    /// twice); must be 0.
    pub answered_twice: u64,
    /// Median offer-to-answer latency of completed requests, ms.
    pub p50_ms: f64,
    /// 99th percentile of the same, ms.
    pub p99_ms: f64,
    /// Node calls per offered request.
    pub attempts_per_request: f64,
    /// Completed requests served from the cache, over completed.
    pub cache_hit_ratio: f64,
    /// Endpoint ejections that started in this phase.
    pub ejections: u64,
    /// The deepest any queue in the pipeline got during this phase.
    pub max_queue_depth: u64,
    #[serde(skip)]
    latencies_us: Vec<u64>,
    #[serde(skip)]
    attempts: u64,
    #[serde(skip)]
    cache_hits: u64,
    #[serde(skip)]
    outcomes: u64,
}

/// Accounts one pipeline's requests, phase by phase.
#[derive(Debug)]
pub struct Ledger {
    phases: Mutex<Vec<PhaseFigures>>,
}

impl Ledger {
    /// A ledger for `phases` phases.
    pub fn new(phases: usize) -> Self {
        Ledger {
            phases: Mutex::new(vec![PhaseFigures::default(); phases]),
        }
    }

    /// Counts an offered request.
    pub fn offer(&self, phase: usize) {
        self.phases.lock()[phase].offered += 1;
    }

    /// Records a request's outcome (in the phase it was offered in).
    pub fn record(&self, phase: usize, outcome: &RequestResult) {
        let mut phases = self.phases.lock();
        let figures = &mut phases[phase];
        figures.outcomes += 1;
        figures.attempts += u64::from(outcome.attempts());
        match outcome {
            RequestResult::Completed {
                latency, cache_hit, ..
            } => {
                figures.completed += 1;
                figures.cache_hits += u64::from(*cache_hit);
                figures.latencies_us.push(latency.as_micros() as u64);
            }
            RequestResult::Rejected { reason, .. } => {
                *figures.rejected.entry(reason.clone()).or_default() += 1;
            }
            RequestResult::Expired { .. } => figures.expired += 1,
            RequestResult::Failed { .. } => figures.failed += 1,
        }
    }

    /// Counts ejections that started in `phase`.
    pub fn ejections(&self, phase: usize, count: u64) {
        self.phases.lock()[phase].ejections += count;
    }

    /// Notes a queue depth seen during `phase`.
    pub fn queue_depth(&self, phase: usize, depth: u64) {
        let mut phases = self.phases.lock();
        phases[phase].max_queue_depth = phases[phase].max_queue_depth.max(depth);
    }

    /// Completed requests so far, over all phases.
    pub fn completed(&self) -> u64 {
        self.phases.lock().iter().map(|p| p.completed).sum()
    }

    /// Requests with an outcome so far, over all phases.
    pub fn answered(&self) -> u64 {
        self.phases.lock().iter().map(|p| p.outcomes).sum()
    }

    /// Offered requests so far, over all phases.
    pub fn offered(&self) -> u64 {
        self.phases.lock().iter().map(|p| p.offered).sum()
    }

    /// The final figures: percentiles computed, unanswered requests counted
    /// as lost.
    pub fn finish(&self) -> Vec<PhaseFigures> {
        let mut phases = self.phases.lock().clone();
        for figures in &mut phases {
            figures.lost = figures.offered.saturating_sub(figures.outcomes);
            figures.answered_twice = figures.outcomes.saturating_sub(figures.offered);
            figures.latencies_us.sort_unstable();
            let at = |q: f64, v: &[u64]| {
                if v.is_empty() {
                    0.0
                } else {
                    v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0
                }
            };
            figures.p50_ms = at(0.5, &figures.latencies_us);
            figures.p99_ms = at(0.99, &figures.latencies_us);
            figures.attempts_per_request = if figures.offered == 0 {
                0.0
            } else {
                figures.attempts as f64 / figures.offered as f64
            };
            figures.cache_hit_ratio = if figures.completed == 0 {
                0.0
            } else {
                figures.cache_hits as f64 / figures.completed as f64
            };
        }
        phases
    }
}

/// One phase, both pipelines.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseReport {
    /// The phase's name.
    pub name: String,
    /// What happened in it.
    pub description: String,
    /// The Keel pipeline's figures.
    pub keel: PhaseFigures,
    /// The naive pipeline's figures.
    pub naive: PhaseFigures,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The seed that makes the run repeatable.
    pub seed: u64,
    /// Wall time of the offered load, seconds.
    pub duration_s: f64,
    /// The queue backend of the Keel pipeline.
    pub queue: String,
    /// The cache backend of the Keel pipeline.
    pub cache: String,
    /// Per phase.
    pub phases: Vec<PhaseReport>,
    /// The durable-queue path: jobs enqueued, acked, dead-lettered, lost.
    pub jobs: JobFigures,
}

/// The asynchronous (durable queue) path's accounting.
#[derive(Clone, Debug, Default, Serialize)]
pub struct JobFigures {
    /// Jobs enqueued.
    pub enqueued: u64,
    /// Jobs completed and acked.
    pub acked: u64,
    /// Jobs in the dead letters (malformed or out of attempts).
    pub dead_lettered: u64,
    /// Jobs retried at least once.
    pub retried: u64,
    /// Jobs still queued (ready, delayed or leased) when the run ended
    /// after its grace period (should be 0: the worker keeps up).
    pub unfinished: u64,
    /// Jobs with no outcome and not in the queue either (must be 0).
    pub lost: u64,
}

fn rejected(figures: &PhaseFigures) -> String {
    if figures.rejected.is_empty() {
        return "0".into();
    }
    figures
        .rejected
        .iter()
        .map(|(reason, n)| format!("{n} {reason}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How one side's figures read in one row of a phase's table.
type Cell = fn(&PhaseFigures) -> String;

/// The rows of each phase's table: a label, and its [`Cell`].
const ROWS: [(&str, Cell); 12] = [
    ("offered", |f| f.offered.to_string()),
    ("completed", |f| f.completed.to_string()),
    ("rejected", rejected),
    ("expired", |f| f.expired.to_string()),
    ("failed", |f| f.failed.to_string()),
    ("lost", |f| f.lost.to_string()),
    ("p50 latency ms", |f| format!("{:.1}", f.p50_ms)),
    ("p99 latency ms", |f| format!("{:.1}", f.p99_ms)),
    ("attempts/request", |f| {
        format!("{:.2}", f.attempts_per_request)
    }),
    ("cache hit ratio", |f| format!("{:.2}", f.cache_hit_ratio)),
    ("ejections", |f| f.ejections.to_string()),
    ("max queue depth", |f| f.max_queue_depth.to_string()),
];

impl Report {
    /// The side-by-side table printed at the end of the demo.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for phase in &self.phases {
            let _ = writeln!(out, "\n== {} — {}", phase.name, phase.description);
            let _ = writeln!(out, "  {:<22} {:>28} {:>28}", "", "keel", "naive");
            for (name, cell) in ROWS {
                let (keel, naive) = (cell(&phase.keel), cell(&phase.naive));
                let _ = writeln!(out, "  {name:<22} {keel:>28} {naive:>28}");
            }
        }
        let j = &self.jobs;
        let _ = writeln!(
            out,
            "\n== durable queue path ({}): enqueued {} acked {} dead-lettered {} retried {} unfinished {} lost {}",
            self.queue, j.enqueued, j.acked, j.dead_lettered, j.retried, j.unfinished, j.lost
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_offer_without_an_outcome_is_lost() {
        let ledger = Ledger::new(1);
        for _ in 0..3 {
            ledger.offer(0);
        }
        ledger.record(
            0,
            &RequestResult::Completed {
                latency: Duration::from_millis(10),
                attempts: 2,
                cache_hit: false,
            },
        );
        ledger.record(0, &RequestResult::Expired { attempts: 0 });
        let figures = &ledger.finish()[0];
        assert_eq!(
            (figures.completed, figures.expired, figures.lost),
            (1, 1, 1)
        );
        assert!((figures.attempts_per_request - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(figures.p99_ms, 10.0);
    }
}
