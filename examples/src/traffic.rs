//! The demo's offered load: tenants (one greedy), priorities, prompts that
//! share system-prompt prefixes, Poisson arrivals, and the scripted phases.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::fleet::{InferenceRequest, NodeMode};

/// Tenants and their share of the offered load; `acme` is greedy.
pub const TENANTS: [(&str, f64); 3] = [("acme", 0.6), ("globex", 0.25), ("initech", 0.15)];

/// Shared system prompts; a few are far more popular than the rest.
const PREFIXES: u32 = 24;

/// One scripted phase of the run.
#[derive(Clone, Debug)]
pub struct Phase {
    /// Short name, used in the report.
    pub name: &'static str,
    /// What happens, for the terminal.
    pub description: &'static str,
    /// Offered load as a multiple of the base rate.
    pub load: f64,
    /// Node modes set when the phase starts (others go back to healthy).
    pub faults: Vec<(usize, NodeMode)>,
}

/// The five phases, in order; each lasts a fifth of the run.
pub fn phases() -> Vec<Phase> {
    vec![
        Phase {
            name: "steady",
            description: "steady load, every node healthy",
            load: 1.0,
            faults: vec![],
        },
        Phase {
            name: "slow-node",
            description: "node 1 turns 10x slow",
            load: 1.0,
            faults: vec![(1, NodeMode::Slow(10.0))],
        },
        Phase {
            name: "outage",
            description: "node 2 hangs (accepts, never answers)",
            load: 1.0,
            faults: vec![(2, NodeMode::Dead)],
        },
        Phase {
            name: "burst",
            description: "node 2 is back; 3x traffic burst",
            load: 3.0,
            faults: vec![],
        },
        Phase {
            name: "busy-503",
            description: "node 3 answers 503 busy to everything",
            load: 1.0,
            faults: vec![(3, NodeMode::Busy)],
        },
    ]
}

/// A seeded generator of requests and arrival gaps.
#[derive(Debug)]
pub struct Traffic {
    rng: StdRng,
    next_id: u64,
}

impl Traffic {
    /// A generator; the same seed gives the same requests.
    pub fn new(seed: u64) -> Self {
        Traffic {
            rng: StdRng::seed_from_u64(seed),
            next_id: 0,
        }
    }

    /// The gap before the next arrival at `rate` per second (exponential).
    pub fn gap(&mut self, rate: f64) -> Duration {
        let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
        Duration::from_secs_f64(-u.ln() / rate.max(0.001))
    }

    /// The next request.
    pub fn request(&mut self) -> InferenceRequest {
        let id = self.next_id;
        self.next_id += 1;
        let pick: f64 = self.rng.random();
        let mut acc = 0.0;
        let mut tenant = TENANTS[0].0;
        for (name, share) in TENANTS {
            acc += share;
            if pick < acc {
                tenant = name;
                break;
            }
        }
        // Zipf-like prefix popularity.
        let weights: f64 = (1..=PREFIXES).map(|k| 1.0 / f64::from(k)).sum();
        let mut target = self.rng.random::<f64>() * weights;
        let mut prefix = 0;
        for k in 1..=PREFIXES {
            target -= 1.0 / f64::from(k);
            if target <= 0.0 {
                prefix = k - 1;
                break;
            }
        }
        // A quarter of requests repeat a popular question exactly (same
        // prompt, same parameters: cacheable).
        let repeat = self.rng.random_bool(0.25);
        let suffix = if repeat {
            self.rng.random_range(0..40)
        } else {
            1_000 + id as u32
        };
        let max_tokens = if repeat {
            128
        } else {
            self.rng.random_range(50..300)
        };
        InferenceRequest {
            id,
            tenant: tenant.to_owned(),
            priority: u8::from(self.rng.random_bool(0.3)),
            prefix,
            suffix,
            max_tokens,
        }
    }
}
