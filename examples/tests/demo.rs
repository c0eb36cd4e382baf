//! Short demo runs inside the test suite: the report's numbers are real
//! measurements of the run, and these are the claims the demo makes.

use std::time::Duration;

use keel_examples::demo::{DemoConfig, run};
use keel_examples::report::{PhaseFigures, Report};

fn phase<'r>(report: &'r Report, name: &str) -> &'r keel_examples::report::PhaseReport {
    report
        .phases
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no phase {name}"))
}

fn accounted(figures: &PhaseFigures) -> u64 {
    figures.completed
        + figures.rejected.values().sum::<u64>()
        + figures.expired
        + figures.failed
        + figures.lost
}

fn check(report: &Report) {
    let json = serde_json::to_string_pretty(report).expect("report serialises");
    println!("{json}");
    for p in &report.phases {
        for (pipeline, figures) in [("keel", &p.keel), ("naive", &p.naive)] {
            assert_eq!(
                accounted(figures),
                figures.offered,
                "{pipeline} {}: every offered request has exactly one outcome",
                p.name
            );
            assert_eq!(
                figures.answered_twice, 0,
                "{pipeline} {}: answered twice",
                p.name
            );
            assert!(figures.offered > 0, "{pipeline} {}: no traffic", p.name);
        }
        assert_eq!(p.keel.lost, 0, "keel lost requests in {}", p.name);
    }
    let slow = phase(report, "slow-node");
    assert!(
        slow.keel.p99_ms < slow.naive.p99_ms,
        "slow node: keel p99 {} ms vs naive {} ms",
        slow.keel.p99_ms,
        slow.naive.p99_ms
    );
    let outage = phase(report, "outage");
    assert!(
        outage.keel.attempts_per_request <= 1.2,
        "outage: keel made {} attempts per request",
        outage.keel.attempts_per_request
    );
    assert!(
        outage.naive.attempts_per_request > outage.keel.attempts_per_request + 0.1,
        "outage: naive {} vs keel {} attempts per request",
        outage.naive.attempts_per_request,
        outage.keel.attempts_per_request
    );
    assert_eq!(
        report.jobs.lost, 0,
        "durable path lost jobs: {:?}",
        report.jobs
    );
    assert_eq!(
        report.jobs.unfinished, 0,
        "durable path left jobs in the queue: {:?}",
        report.jobs
    );
    assert_eq!(
        report.jobs.acked + report.jobs.dead_lettered,
        report.jobs.enqueued,
        "every durable job has exactly one outcome: {:?}",
        report.jobs
    );
    assert!(
        report.jobs.acked > 0,
        "durable path acked nothing: {:?}",
        report.jobs
    );
    assert!(
        report.jobs.dead_lettered > 0,
        "malformed jobs were not dead-lettered: {:?}",
        report.jobs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_second_run_on_the_embedded_defaults() {
    let report = run(DemoConfig {
        duration: Duration::from_secs(5),
        ..DemoConfig::default()
    })
    .await
    .expect("demo runs");
    check(&report);
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_second_run_on_redis_queue_and_tiered_cache() {
    keel_testkit::require_redis().await;
    let report = run(DemoConfig {
        duration: Duration::from_secs(5),
        seed: 7,
        queue: "redis".into(),
        cache: "tiered".into(),
        ..DemoConfig::default()
    })
    .await
    .expect("demo runs on redis");
    assert_eq!(report.queue, "redis");
    check(&report);
}
