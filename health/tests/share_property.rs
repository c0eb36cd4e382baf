//! Property: whatever outcomes arrive, in whatever order, with whatever
//! probes, insertions and removals, no more than the allowed share of the
//! fleet is ever ejected.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_health::{
    ActiveConfig, Endpoint, FailureKind, Health, HealthConfig, Outcome, OutlierConfig,
    SlowStartConfig,
};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Record {
        endpoint: usize,
        outcome: u8,
        latency_ms: u64,
        times: usize,
    },
    Advance {
        ms: u64,
    },
    Evaluate,
    Remove {
        endpoint: usize,
    },
    Insert {
        endpoint: usize,
    },
    ProbesPass(bool),
}

const IDS: usize = 14;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..IDS, 0u8..4, 1u64..200, 1usize..6).prop_map(|(endpoint, outcome, latency_ms, times)| Op::Record { endpoint, outcome, latency_ms, times }),
        3 => (0u64..3_000).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Evaluate),
        1 => (0..IDS).prop_map(|endpoint| Op::Remove { endpoint }),
        1 => (0..IDS).prop_map(|endpoint| Op::Insert { endpoint }),
        1 => any::<bool>().prop_map(Op::ProbesPass),
    ]
}

fn outcome(code: u8) -> Outcome {
    match code {
        0 => Outcome::Success,
        1 => Outcome::failure(FailureKind::Transport),
        2 => Outcome::failure(FailureKind::Timeout),
        _ => Outcome::Busy { retry_after: None },
    }
}

/// The most endpoints seen ejected at once, and whether panic mode was seen.
#[derive(Debug, Default)]
struct Seen {
    most_ejected: usize,
    panic: bool,
}

fn run(fleet: usize, percent: u8, with_probe: bool, ops: Vec<Op>) -> Result<Seen, TestCaseError> {
    keel_testkit::paused_runtime().block_on(async move {
        let config = HealthConfig::new("prop")
            .tick(Duration::from_millis(100))
            .max_ejection_percent(percent)
            .slow_start(SlowStartConfig::default().window(Duration::from_secs(2)))
            .active(
                ActiveConfig::default()
                    .interval(Duration::from_millis(700))
                    .unhealthy_interval(Duration::from_millis(300))
                    .timeout(Duration::from_millis(100))
                    .healthy_threshold(2)
                    .unhealthy_threshold(2),
            )
            .outlier(
                OutlierConfig::default()
                    .consecutive_failures(Some(2))
                    .failure_rate(Some(0.5))
                    .window(Duration::from_secs(1), 5)
                    .min_volume(4)
                    .latency_factor(Some(2.0))
                    .latency_min_endpoints(2)
                    .latency_floor(Duration::from_millis(1))
                    .ejection(Duration::from_secs(1), Duration::from_secs(4)),
            );
        let pass = Arc::new(AtomicBool::new(true));
        let probe_pass = pass.clone();
        let builder = Health::builder(config);
        let builder = if with_probe {
            builder.probe_fn(move |_endpoint: Endpoint| {
                let ok = probe_pass.load(Ordering::SeqCst);
                async move {
                    if ok {
                        Ok(())
                    } else {
                        Err(std::io::Error::other("down"))
                    }
                }
            })
        } else {
            builder
        };
        let health = builder.build().unwrap();
        for i in 0..fleet {
            health
                .insert(Endpoint::new(format!("n{i}"), "x:80"))
                .unwrap();
        }
        let mut seen = Seen::default();
        let mut check = |health: &Health| -> Result<(), TestCaseError> {
            let snapshot = health.snapshot();
            seen.most_ejected = seen.most_ejected.max(snapshot.ejected_count());
            seen.panic |= snapshot.is_panic();
            let max = snapshot.len() * usize::from(percent) / 100;
            prop_assert_eq!(snapshot.max_ejected(), max);
            prop_assert!(
                snapshot.ejected_count() <= max,
                "{} of {} ejected, allowed {}",
                snapshot.ejected_count(),
                snapshot.len(),
                max
            );
            for status in snapshot.iter() {
                prop_assert!((0.0..=1.0).contains(&status.weight));
                if !status.state.is_in_rotation() {
                    prop_assert_eq!(status.weight, 0.0);
                }
            }
            Ok(())
        };
        for op in ops {
            match op {
                Op::Record {
                    endpoint,
                    outcome: code,
                    latency_ms,
                    times,
                } => {
                    if let Some(recorder) = health.recorder(&format!("n{endpoint}")) {
                        for _ in 0..times {
                            recorder.record(outcome(code), Duration::from_millis(latency_ms));
                        }
                    }
                }
                Op::Advance { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
                Op::Evaluate => health.evaluate(),
                Op::Remove { endpoint } => {
                    let _ = health.remove(&format!("n{endpoint}"));
                }
                Op::Insert { endpoint } => {
                    let _ = health.insert(Endpoint::new(format!("n{endpoint}"), "x:80"));
                }
                Op::ProbesPass(ok) => pass.store(ok, Ordering::SeqCst),
            }
            check(&health)?;
        }
        Ok(seen)
    })
}

/// The harness is not vacuous: a fleet-wide failure reaches the cap, holds
/// it, and engages panic mode.
#[test]
fn a_fleet_wide_failure_reaches_and_holds_the_cap() {
    let mut ops: Vec<Op> = (0..10)
        .map(|endpoint| Op::Record {
            endpoint,
            outcome: 1,
            latency_ms: 5,
            times: 3,
        })
        .collect();
    ops.push(Op::Advance { ms: 500 });
    let seen = run(10, 30, false, ops).unwrap();
    assert_eq!(seen.most_ejected, 3);
    assert!(seen.panic);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn never_ejects_more_than_the_allowed_share(
        fleet in 1usize..12,
        percent in prop_oneof![Just(0u8), Just(10), Just(34), Just(50), Just(80), Just(100), 0u8..=100],
        with_probe in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        run(fleet, percent, with_probe, ops)?;
    }
}
