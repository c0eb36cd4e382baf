//! The simulator's scenario table: Keel's policies against tower's p2c,
//! plain round-robin and a naive "3 immediate retries" client, on the same
//! seeded traces.
//!
//! ```text
//! cargo run --release -p keel-balancer --features sim --example scenarios
//! ```
//!
//! Prints one markdown table (the one in the root `BENCHMARKS.md`) and the wall
//! time each simulated run took.

use std::time::{Duration, SystemTime};

use clap::Parser;
use keel_balancer::retry::RetryConfig;
use keel_balancer::sim::{self, Fleet, Report, Router, Scenario};
use keel_balancer::{BalancerConfig, HashConfig, Policy, PrefixConfig};

#[derive(Debug, Parser)]
struct Args {
    /// Seed of fleets, workloads and routers.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Simulated seconds of load per run (default: each scenario's own, 30 s).
    #[arg(long)]
    seconds: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Keel(&'static str),
    TowerP2c,
    RoundRobin,
    Naive,
}

fn keel_config(scenario: &Scenario, policy: Policy) -> BalancerConfig {
    BalancerConfig::default()
        .policy(policy)
        .max_outstanding_per_endpoint(scenario.fleet.slots)
        // Twenty median service times: far beyond a healthy node's tail.
        .attempt_timeout(scenario.fleet.latency.base * 20)
}

fn policy(name: &str) -> Policy {
    match name {
        "peak_ewma" => Policy::PeakEwma,
        "least_outstanding" => Policy::LeastOutstanding,
        "round_robin" => Policy::RoundRobin,
        "consistent_hash" => Policy::ConsistentHash(HashConfig::default().load_factor(1.5)),
        "prefix_affinity" => Policy::PrefixAffinity(PrefixConfig::default()),
        other => panic!("unknown policy {other}"),
    }
}

fn router(kind: Kind, scenario: &Scenario, fleet: &Fleet, seed: u64) -> Router {
    match kind {
        Kind::Keel(name) => {
            sim::keel_router(
                fleet,
                keel_config(scenario, policy(name)),
                Some(RetryConfig::default()),
                seed,
            )
            .expect("valid config")
            .0
        }
        Kind::TowerP2c => sim::tower_p2c_router(fleet, seed),
        Kind::RoundRobin => {
            let config = BalancerConfig::default().policy(Policy::RoundRobin);
            sim::keel_router(fleet, config, None, seed)
                .expect("valid config")
                .0
        }
        Kind::Naive => sim::naive_router(fleet, 3, seed).expect("valid config"),
    }
}

fn label(kind: Kind) -> String {
    match kind {
        Kind::Keel(name) => format!("keel {name} + retry budget"),
        Kind::TowerP2c => "tower p2c PeakEwma (no retry)".to_owned(),
        Kind::RoundRobin => "round-robin (no retry)".to_owned(),
        Kind::Naive => "round-robin + 3 immediate retries".to_owned(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let args = Args::parse();
    let common = [
        Kind::Keel("peak_ewma"),
        Kind::Keel("least_outstanding"),
        Kind::Keel("round_robin"),
        Kind::TowerP2c,
        Kind::RoundRobin,
        Kind::Naive,
    ];
    let mut scenarios: Vec<(Scenario, Vec<Kind>)> = [
        Scenario::healthy(),
        Scenario::slow_node(),
        Scenario::dead_node(),
        Scenario::total_outage(),
        Scenario::busy_node(),
        Scenario::flapping_node(),
    ]
    .into_iter()
    .map(|s| (s, common.to_vec()))
    .collect();
    let mut prefix = common.to_vec();
    prefix.insert(0, Kind::Keel("prefix_affinity"));
    scenarios.push((Scenario::prefix_heavy(), prefix));
    let mut sessions = common.to_vec();
    sessions.insert(0, Kind::Keel("consistent_hash"));
    scenarios.push((Scenario::sessions(), sessions));

    let mut rows = Vec::new();
    for (scenario, kinds) in scenarios {
        let scenario = match args.seconds {
            Some(s) => scenario.seconds(s),
            None => scenario,
        }
        .seed(args.seed);
        for kind in kinds {
            let wall = SystemTime::now();
            let report: Report = sim::block_on(async {
                let fleet = Fleet::new(&scenario.fleet, &scenario.script);
                let router = router(kind, &scenario, &fleet, args.seed);
                sim::run(router, &fleet, &scenario.workload).await
            });
            eprintln!(
                "{} / {}: {} ({:.2}s wall)",
                scenario.name,
                label(kind),
                report.summary(),
                wall.elapsed().unwrap_or_default().as_secs_f64()
            );
            rows.push(format!(
                "| {} | {} | {:.2}% | {:.3} | {} | {} | {} | {:.1} | {} | {} |",
                scenario.name,
                label(kind),
                100.0 * report.success_rate(),
                report.attempts_per_request(),
                ms(report.p50),
                ms(report.p99),
                ms(report.p999),
                report.goodput,
                if report.cache_hit_rate > 0.0 {
                    format!("{:.1}%", 100.0 * report.cache_hit_rate)
                } else {
                    "-".to_owned()
                },
                if scenario.workload.sessions > 0 {
                    format!("{:.1}%", 100.0 * report.stickiness)
                } else {
                    "-".to_owned()
                },
            ));
        }
    }
    println!(
        "| scenario | router | success | attempts/request | p50 ms | p99 ms | p99.9 ms | goodput/s | cache hits | key stickiness |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in rows {
        println!("{row}");
    }
}
