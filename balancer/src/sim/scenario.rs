//! The load generator's settings and the standard scenarios.

use std::time::Duration;

use super::fleet::{Fault, FleetConfig, LatencyModel, Script};

/// The shape of generated prompts.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct PromptShape {
    /// Distinct shared prefixes (system prompts, few-shot examples); each
    /// request draws one uniformly. 0 (the default) means no sharing.
    pub prefixes: u32,
    /// Blocks in each shared prefix. Default 0.
    pub prefix_blocks: u32,
    /// Random blocks after the prefix, unique to the request. Default 4.
    pub suffix_blocks: u32,
    /// Bytes per block. Default 64.
    pub block_bytes: usize,
    /// How requests pick their prefix: `None` (the default) uniformly;
    /// `Some(s)` by Zipf's law with exponent `s` (prefix `k`, from 1, is
    /// drawn in proportion to `1 / k^s`: a few system prompts carry most
    /// of the traffic).
    pub zipf: Option<f64>,
}

impl Default for PromptShape {
    fn default() -> Self {
        PromptShape {
            prefixes: 0,
            prefix_blocks: 0,
            suffix_blocks: 4,
            block_bytes: 64,
            zipf: None,
        }
    }
}

impl PromptShape {
    /// Prompts sharing `prefixes` prefixes of `prefix_blocks` blocks, then
    /// `suffix_blocks` unique blocks.
    pub fn shared(prefixes: u32, prefix_blocks: u32, suffix_blocks: u32) -> Self {
        PromptShape {
            prefixes,
            prefix_blocks,
            suffix_blocks,
            ..PromptShape::default()
        }
    }

    /// Sets [`zipf`](Self::zipf): prefixes drawn by Zipf's law with
    /// exponent `s`.
    pub fn zipf(mut self, s: f64) -> Self {
        self.zipf = Some(s);
        self
    }

    /// Draws a prefix group in `0..prefixes` (`prefixes` > 0).
    pub(crate) fn draw_prefix(&self, rng: &mut fastrand::Rng) -> u32 {
        let Some(s) = self.zipf else {
            return rng.u32(0..self.prefixes);
        };
        let weight = |k: u32| f64::from(k + 1).powf(-s);
        let total: f64 = (0..self.prefixes).map(weight).sum();
        let mut left = rng.f64() * total;
        for k in 0..self.prefixes {
            left -= weight(k);
            if left < 0.0 {
                return k;
            }
        }
        self.prefixes - 1
    }
}

/// An open-loop load: Poisson arrivals at `rate`, for `duration`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Workload {
    /// Mean arrivals per simulated second. Default 200.
    pub rate: f64,
    /// How long requests keep arriving. Default 30 s.
    pub duration: Duration,
    /// Tenants, drawn uniformly per request. Default 4.
    pub tenants: u32,
    /// Sessions (affinity keys), drawn uniformly; 0 (the default) gives
    /// every request its own.
    pub sessions: u64,
    /// Prompt shape.
    pub prompt: PromptShape,
    /// The client gives up on (and drops) a request after this. Default 10 s.
    pub client_timeout: Duration,
    /// Seed of arrivals, tenants, sessions and prompts. Default 1.
    pub seed: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            rate: 200.0,
            duration: Duration::from_secs(30),
            tenants: 4,
            sessions: 0,
            prompt: PromptShape::default(),
            client_timeout: Duration::from_secs(10),
            seed: 1,
        }
    }
}

impl Workload {
    /// Sets [`rate`](Self::rate).
    pub fn rate(mut self, rate: f64) -> Self {
        self.rate = rate;
        self
    }

    /// Sets [`duration`](Self::duration).
    pub fn duration(mut self, duration: Duration) -> Self {
        self.duration = duration;
        self
    }

    /// Sets [`sessions`](Self::sessions).
    pub fn sessions(mut self, sessions: u64) -> Self {
        self.sessions = sessions;
        self
    }

    /// Sets [`prompt`](Self::prompt).
    pub fn prompt(mut self, prompt: PromptShape) -> Self {
        self.prompt = prompt;
        self
    }

    /// Sets [`client_timeout`](Self::client_timeout).
    pub fn client_timeout(mut self, timeout: Duration) -> Self {
        self.client_timeout = timeout;
        self
    }

    /// Sets [`seed`](Self::seed).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// A named fleet, fault script and workload.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Scenario {
    /// Short name for tables.
    pub name: &'static str,
    /// The fleet.
    pub fleet: FleetConfig,
    /// The faults.
    pub script: Script,
    /// The load.
    pub workload: Workload,
}

impl Scenario {
    fn new(name: &'static str, fleet: FleetConfig, script: Script, workload: Workload) -> Self {
        Scenario {
            name,
            fleet,
            script,
            workload,
        }
    }

    /// Ten healthy nodes, 200 requests/s, 30 s.
    pub fn healthy() -> Self {
        Scenario::new(
            "healthy",
            FleetConfig::default(),
            Script::new(),
            Workload::default(),
        )
    }

    /// One of ten nodes is 10× slower throughout.
    pub fn slow_node() -> Self {
        Scenario::new(
            "slow node (1 of 10 at 10x)",
            FleetConfig::default(),
            Script::new().at(Duration::ZERO, 0, Fault::Slow(10.0)),
            Workload::default(),
        )
    }

    /// One of ten nodes stops answering after 5 s (requests to it hang).
    pub fn dead_node() -> Self {
        Scenario::new(
            "dead node (1 of 10 hangs from 5s)",
            FleetConfig::default(),
            Script::new().at(Duration::from_secs(5), 0, Fault::Down),
            Workload::default(),
        )
    }

    /// Every node fails every request, throughout.
    pub fn total_outage() -> Self {
        Scenario::new(
            "total outage (every node fails)",
            FleetConfig::default(),
            Script::new().all(Duration::ZERO, Fault::Failing),
            Workload::default(),
        )
    }

    /// Ten nodes at 2,000 requests/s (about 60 % of their capacity):
    /// healthy for 10 s, every node failing from 10 s to 20 s, healthy
    /// again from 20 s to 30 s. The retry budget's savings from the first
    /// 10 s must not burst in the outage's first second, and the fleet must
    /// come back without a second outage.
    pub fn outage_and_recovery() -> Self {
        Scenario::new(
            "total outage 10s-20s at 2,000 req/s",
            FleetConfig::default(),
            Script::new()
                .all(Duration::from_secs(10), Fault::Failing)
                .all(Duration::from_secs(20), Fault::Recover),
            Workload::default().rate(2_000.0),
        )
    }

    /// Ten nodes of 4 to 16 slots (100 in all, the same speed per slot) at
    /// 80 % of their capacity: a router that spreads by latency alone
    /// overloads the small ones.
    pub fn heterogeneous() -> Self {
        Scenario::new(
            "heterogeneous (4..16 slots, 80% load)",
            FleetConfig::default().slot_mix(vec![4, 6, 8, 10, 12, 14, 16, 4, 10, 16]),
            Script::new(),
            Workload::default().rate(1_550.0),
        )
    }

    /// One of ten nodes answers busy (503) from 5 s to 20 s, then recovers.
    pub fn busy_node() -> Self {
        Scenario::new(
            "busy-503 node (5s-20s)",
            FleetConfig::default(),
            Script::new().at(Duration::from_secs(5), 0, Fault::Busy).at(
                Duration::from_secs(20),
                0,
                Fault::Recover,
            ),
            Workload::default(),
        )
    }

    /// One of ten nodes fails for 2 s out of every 4 s.
    pub fn flapping_node() -> Self {
        Scenario::new(
            "flapping node (2s down, 2s up)",
            FleetConfig::default(),
            Script::new().at(
                Duration::ZERO,
                0,
                Fault::Flapping {
                    period: Duration::from_secs(2),
                },
            ),
            Workload::default(),
        )
    }

    /// Prompts share one of 32 long prefixes; each node caches 384 blocks
    /// (about 6 prefixes), prefill costs 2 ms per uncached block and 0.1 ms
    /// per cached one.
    pub fn prefix_heavy() -> Self {
        Scenario::new(
            "prefix-heavy (32 prefixes, KV cache per node)",
            FleetConfig::default().cache_blocks(384).latency(
                LatencyModel::default()
                    .decode(Duration::from_millis(30), 0.2)
                    .prefill(Duration::from_millis(2), Duration::from_micros(100)),
            ),
            Script::new(),
            Workload::default()
                .rate(100.0)
                .prompt(PromptShape::shared(32, 48, 8)),
        )
    }

    /// The prefix trace: 8 nodes of 32 slots, each with a prefix (KV) cache
    /// holding 4 prompts (LRU); 20 system prompts of 16 blocks with
    /// Zipf(1.1) popularity (the short user text after them is not
    /// modelled); 60 ms per request on a cache miss, 20 ms on a hit;
    /// 5,000 requests/s.
    /// The hottest prompt alone needs more than one node, so affinity
    /// has to spread it without scattering the others.
    pub fn prefix_trace() -> Self {
        Scenario::new(
            "prefix trace (20 prompts, Zipf 1.1, 4-prompt LRU)",
            FleetConfig::default()
                .nodes(8)
                .slots(32)
                .cache_blocks(4 * 16)
                .latency(
                    LatencyModel::default()
                        .decode(Duration::from_millis(20), 0.1)
                        .prefill(Duration::from_micros(2_500), Duration::ZERO),
                ),
            Script::new(),
            Workload::default()
                .rate(5_000.0)
                .duration(Duration::from_secs(20))
                .prompt(PromptShape::shared(20, 16, 0).zipf(1.1)),
        )
    }

    /// 200 sessions, long generations (median 750 ms): about 15 requests
    /// in flight per node, the regime bounded-load hashing is built for.
    pub fn sessions() -> Self {
        Scenario::new(
            "sessions (200 keys, 750ms generations)",
            FleetConfig::default()
                .slots(64)
                .latency(LatencyModel::default().decode(Duration::from_millis(750), 0.25)),
            Script::new(),
            Workload::default().sessions(200),
        )
    }

    /// Shortens the load to `seconds` of arrivals.
    pub fn seconds(mut self, seconds: u64) -> Self {
        self.workload.duration = Duration::from_secs(seconds);
        self
    }

    /// Reseeds the fleet and the workload.
    pub fn seed(mut self, seed: u64) -> Self {
        self.fleet.seed = seed;
        self.workload.seed = seed;
        self
    }
}
