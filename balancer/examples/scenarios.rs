//! The simulator's scenario table: Keel's policies against tower's p2c,
//! plain round-robin and a naive "3 immediate retries" client, on the same
//! seeded traces.
//!
//! ```text
//! cargo run --release -p keel-balancer --all-features --example scenarios
//! ```
//!
//! Prints one markdown table (the one in the root `BENCHMARKS.md`), the wall
//! time each simulated run took (stderr), and as its last line a JSON
//! object of the headline ratios.

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
    /// Run only the scenarios whose name contains this (the JSON line
    /// needs them all).
    #[arg(long)]
    only: Option<String>,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Keel(&'static str),
    /// Keel's balancer over keel-health (capacity and weights from the keys).
    KeelHealth(&'static str),
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
        Kind::KeelHealth(name) => {
            let config = BalancerConfig::default()
                .policy(policy(name))
                .attempt_timeout(scenario.fleet.latency.base * 20);
            let health = keel_health::HealthConfig::new("scenarios")
                .active(
                    keel_health::ActiveConfig::default()
                        .interval(Duration::from_millis(250))
                        .unhealthy_interval(Duration::from_millis(250))
                        .timeout(Duration::from_millis(150))
                        .unhealthy_threshold(2)
                        .healthy_threshold(2),
                )
                .outlier(
                    keel_health::OutlierConfig::default()
                        .consecutive_failures(Some(3))
                        .ejection(Duration::from_secs(2), Duration::from_secs(10)),
                )
                .slow_start(
                    keel_health::SlowStartConfig::default().window(Duration::from_secs(10)),
                );
            sim::keel_health_router(fleet, config, Some(RetryConfig::default()), health, seed)
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
        Kind::KeelHealth(name) => format!("keel {name} + retry budget + health"),
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
    prefix.insert(0, Kind::Keel("consistent_hash"));
    prefix.insert(0, Kind::Keel("prefix_affinity"));
    scenarios.push((Scenario::prefix_heavy(), prefix.clone()));
    scenarios.push((Scenario::prefix_trace(), prefix));
    let mut sessions = common.to_vec();
    sessions.insert(0, Kind::Keel("consistent_hash"));
    scenarios.push((Scenario::sessions(), sessions));
    let mut health = common.to_vec();
    health.insert(0, Kind::KeelHealth("peak_ewma"));
    scenarios.push((Scenario::heterogeneous(), health.clone()));
    scenarios.push((Scenario::outage_and_recovery(), health));
    if let Some(only) = &args.only {
        scenarios.retain(|(scenario, _)| scenario.name.contains(only.as_str()));
    }
    let mut results: Vec<(&'static str, String, Report)> = Vec::new();

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
            let served = report.nodes.iter().map(|n| n.served);
            let (most, least) = (served.clone().max(), served.min());
            rows.push(format!(
                "| {} | {} | {:.2}% | {:.3} | {} | {} | {} | {:.1} | {} | {} | {} |",
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
                match (most, least) {
                    (Some(most), Some(least)) if least > 0 => {
                        format!("{:.2}", most as f64 / least as f64)
                    }
                    _ => "-".to_owned(),
                },
            ));
            results.push((scenario.name, label(kind), report));
        }
    }
    println!(
        "| scenario | router | success | attempts/request | p50 ms | p99 ms | p99.9 ms | goodput/s | cache hits | key stickiness | node load max/min |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in rows {
        println!("{row}");
    }
    if args.only.is_some() {
        return;
    }
    let find = |scenario: &str, kind: Kind| {
        let label = label(kind);
        results
            .iter()
            .find(|(s, l, _)| *s == scenario && *l == label)
            .map(|(_, _, r)| r)
            .expect("the scenario ran this router")
    };
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    let tower = Kind::TowerP2c;
    let slow = Scenario::slow_node().name;
    let hetero = Scenario::heterogeneous().name;
    let prefix = Scenario::prefix_trace().name;
    let outage = Scenario::outage_and_recovery().name;
    let recovery = find(outage, Kind::KeelHealth("peak_ewma"));
    let prefix_keel = find(prefix, Kind::Keel("prefix_affinity"));
    let prefix_hashing = find(prefix, Kind::Keel("consistent_hash"));
    println!(
        "{{\"slow_p99_vs_tower\": {:.3}, \"hetero_p99_vs_tower\": {:.3}, \"prefix_hit_rate\": {:.3}, \"prefix_hit_vs_hashing\": {:.3}, \"recovery_p99_ratio\": {:.3}, \"outage_max_attempts_per_s\": {:.3}}}",
        ratio(
            find(slow, Kind::Keel("peak_ewma")).p99,
            find(slow, tower).p99
        ),
        ratio(
            find(hetero, Kind::KeelHealth("peak_ewma")).p99,
            find(hetero, tower).p99
        ),
        prefix_keel.cache_hit_rate,
        prefix_keel.cache_hit_rate / prefix_hashing.cache_hit_rate,
        ratio(
            recovery.quantile_between(20, 25, 0.99),
            recovery.quantile_between(0, 10, 0.99)
        ),
        recovery.max_attempts_per_second(),
    );
}
