//! Passive outlier detection under paused time: ejection doubling, failure
//! rate, latency, busy storms, max ejection and panic mode.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use keel_health::{
    ActiveConfig, BusyConfig, Endpoint, FailureKind, Health, HealthConfig, HealthState, Outcome,
    OutlierConfig, Reason, SlowStartConfig, Snapshot,
};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

#[path = "support/fleet.rs"]
mod support;
use support::insert_fleet;

const FAIL: Outcome = Outcome::Failure {
    kind: FailureKind::Transport,
    retryable: true,
};
const MS: Duration = Duration::from_millis(1);

fn fleet(config: HealthConfig, n: usize) -> Health {
    let health = Health::new(config).unwrap();
    for i in 0..n {
        health
            .insert(Endpoint::new(format!("n{i}"), format!("10.0.0.{i}:80")))
            .unwrap();
    }
    health
}

fn record(health: &Health, id: &str, outcome: Outcome, latency: Duration, times: usize) {
    let recorder = health.recorder(id).expect("registered");
    for _ in 0..times {
        recorder.record(outcome, latency);
    }
}

async fn wait_state(rx: &mut watch::Receiver<Snapshot>, id: &str, state: HealthState) {
    tokio::time::timeout(
        Duration::from_secs(3600),
        rx.wait_for(|s| s.get(id).is_some_and(|e| e.state == state)),
    )
    .await
    .expect("state reached")
    .expect("registry alive");
}

#[tokio::test(start_paused = true)]
async fn ejection_time_doubles_and_is_capped() {
    let config = HealthConfig::default().outlier(
        OutlierConfig::default()
            .consecutive_failures(Some(3))
            .ejection(Duration::from_secs(10), Duration::from_secs(40)),
    );
    let health = fleet(config, 2);
    let mut rx = health.subscribe();
    let mut lengths = Vec::new();
    for n in 1..=5u32 {
        record(&health, "n0", FAIL, MS, 3);
        let snapshot = health.snapshot();
        let status = snapshot.get("n0").unwrap();
        assert_eq!(status.state, HealthState::Ejected);
        assert_eq!(status.ejections, n);
        assert_eq!(
            status.reason,
            Reason::ConsecutiveFailures {
                count: 3,
                kind: FailureKind::Transport
            }
        );
        let ejected_at = Instant::now();
        // Subscribers see the ejection a moment later (the registry's task
        // sends it), then the return.
        wait_state(&mut rx, "n0", HealthState::Ejected).await;
        wait_state(&mut rx, "n0", HealthState::Healthy).await;
        lengths.push(ejected_at.elapsed().as_secs());
        // No probe configured: back on expiry, through slow start.
        let back = health.snapshot();
        assert_eq!(back.get("n0").unwrap().reason, Reason::EjectionExpired);
        assert!(back.weight("n0") < 0.5, "{}", back.weight("n0"));
    }
    assert_eq!(lengths, [10, 20, 40, 40, 40]);

    // After a quiet `max_ejection` in rotation the streak starts over.
    tokio::time::sleep(Duration::from_secs(41)).await;
    record(&health, "n0", FAIL, MS, 3);
    assert_eq!(health.snapshot().get("n0").unwrap().ejections, 1);
    let ejected_at = Instant::now();
    wait_state(&mut rx, "n0", HealthState::Ejected).await;
    wait_state(&mut rx, "n0", HealthState::Healthy).await;
    assert_eq!(ejected_at.elapsed().as_secs(), 10);
}

#[tokio::test(start_paused = true)]
async fn a_success_breaks_the_run() {
    let config = HealthConfig::default().outlier(
        OutlierConfig::default()
            .consecutive_failures(Some(3))
            .failure_rate(None),
    );
    let health = fleet(config, 2);
    for _ in 0..100 {
        record(&health, "n0", FAIL, MS, 2);
        record(&health, "n0", Outcome::Success, MS, 1);
    }
    health.evaluate();
    assert_eq!(
        health.snapshot().get("n0").unwrap().state,
        HealthState::Healthy
    );
}

#[tokio::test(start_paused = true)]
async fn failure_rate_needs_the_minimum_volume() {
    let config = HealthConfig::default().outlier(
        OutlierConfig::default()
            .consecutive_failures(None)
            .failure_rate(Some(0.5))
            .min_volume(20),
    );
    let health = fleet(config, 4);
    // 18 outcomes, all failures: too few to judge.
    record(&health, "n1", FAIL, MS, 18);
    health.evaluate();
    assert_eq!(
        health.snapshot().get("n1").unwrap().state,
        HealthState::Healthy
    );
    // 22 outcomes, 20 failures: ejected by rate.
    record(&health, "n1", Outcome::Success, MS, 2);
    record(&health, "n1", FAIL, MS, 2);
    health.evaluate();
    let snapshot = health.snapshot();
    let status = snapshot.get("n1").unwrap();
    assert_eq!(status.state, HealthState::Ejected);
    assert!(
        matches!(status.reason, Reason::FailureRate { volume: 22, rate } if (rate - 20.0 / 22.0).abs() < 1e-9),
        "{:?}",
        status.reason
    );
}

#[tokio::test(start_paused = true)]
async fn old_failures_slide_out_of_the_window() {
    let config = HealthConfig::default().outlier(
        OutlierConfig::default()
            .consecutive_failures(None)
            .window(Duration::from_secs(10), 10)
            .min_volume(20),
    );
    let health = fleet(config, 2);
    let mut rx = health.subscribe();
    record(&health, "n0", FAIL, MS, 15);
    // Eleven seconds later those failures are out of the window: these 10
    // successes are all the detector sees (and they are too few).
    tokio::time::sleep(Duration::from_secs(11)).await;
    record(&health, "n0", Outcome::Success, MS, 10);
    health.evaluate();
    assert_eq!(
        health.snapshot().get("n0").unwrap().state,
        HealthState::Healthy
    );
    // Within the window they add up: the driver ejects it at the next bucket.
    record(&health, "n0", FAIL, MS, 15);
    wait_state(&mut rx, "n0", HealthState::Ejected).await;
}

#[tokio::test(start_paused = true)]
async fn latency_outlier_is_ejected() {
    let config = HealthConfig::default().outlier(
        OutlierConfig::default()
            .latency_factor(Some(3.0))
            .latency_floor(Duration::from_millis(50))
            .min_volume(20),
    );
    let health = fleet(config, 5);
    for i in 0..4 {
        record(&health, &format!("n{i}"), Outcome::Success, 20 * MS, 30);
    }
    record(&health, "n4", Outcome::Success, 400 * MS, 30);
    health.evaluate();
    let snapshot = health.snapshot();
    let status = snapshot.get("n4").unwrap();
    assert_eq!(status.state, HealthState::Ejected);
    assert_eq!(
        status.reason,
        Reason::LatencyOutlier {
            mean: 400 * MS,
            median: 20 * MS
        }
    );
    assert_eq!(snapshot.in_rotation().count(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_fast_fleet_has_no_latency_outliers_below_the_floor() {
    let health = fleet(HealthConfig::default(), 5);
    for i in 0..4 {
        record(&health, &format!("n{i}"), Outcome::Success, MS, 30);
    }
    // Ten times the median, but 10 ms: under the 50 ms floor.
    record(&health, "n4", Outcome::Success, 10 * MS, 30);
    health.evaluate();
    assert_eq!(health.snapshot().in_rotation().count(), 5);
}

#[tokio::test(start_paused = true)]
async fn busy_storm_never_ejects() {
    let config = HealthConfig::default()
        .slow_start(SlowStartConfig::default().window(Duration::ZERO))
        .busy(
            BusyConfig::default()
                .weight(0.2)
                .cooldown(Duration::from_secs(1), Duration::from_secs(30)),
        )
        .outlier(
            OutlierConfig::default()
                .consecutive_failures(Some(3))
                .min_volume(5),
        );
    let health = fleet(config, 4);
    let mut rx = health.subscribe();
    let busy = Outcome::Busy {
        retry_after: Some(Duration::from_secs(5)),
    };
    // Ten seconds of nothing but 503s from n0.
    for _ in 0..100 {
        record(&health, "n0", busy, MS, 10);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let snapshot = health.snapshot();
        let status = snapshot.get("n0").unwrap();
        assert_eq!(status.state, HealthState::Degraded);
        assert!(matches!(status.reason, Reason::Busy { .. }));
        assert!((status.weight - 0.2).abs() < 1e-9, "{}", status.weight);
        assert_eq!(snapshot.ejected_count(), 0);
    }
    // Retry-After (5 s) is honoured, then the weight comes back.
    let storm_end = Instant::now();
    wait_state(&mut rx, "n0", HealthState::Healthy).await;
    let recovered_after = storm_end.elapsed();
    assert!(
        recovered_after >= Duration::from_millis(4_900),
        "{recovered_after:?}"
    );
    assert!(
        recovered_after <= Duration::from_millis(5_500),
        "{recovered_after:?}"
    );
    let snapshot = health.snapshot();
    assert_eq!(snapshot.get("n0").unwrap().reason, Reason::BusyCleared);
    assert_eq!(snapshot.weight("n0"), 1.0);
}

#[tokio::test(start_paused = true)]
async fn max_ejection_holds_when_80_percent_fail_and_traffic_keeps_flowing() {
    let config = HealthConfig::default()
        .max_ejection_percent(50)
        .outlier(OutlierConfig::default().consecutive_failures(Some(3)));
    let health = fleet(config, 10);
    // Eight of ten fail at once.
    for i in 0..8 {
        record(&health, &format!("n{i}"), FAIL, MS, 3);
    }
    let snapshot = health.snapshot();
    assert_eq!(snapshot.max_ejected(), 5);
    assert_eq!(snapshot.ejected_count(), 5);
    assert!(snapshot.is_panic());
    let retained: Vec<_> = snapshot
        .iter()
        .filter(|s| matches!(s.reason, Reason::PanicRetained(_)))
        .collect();
    assert_eq!(retained.len(), 3);
    assert!(retained.iter().all(|s| s.state == HealthState::Degraded));
    assert_eq!(snapshot.in_rotation().count(), 5);

    // The balancer keeps serving from the five in rotation.
    let served: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let log = served.clone();
    let discover = health.discover(move |endpoint: &Endpoint| {
        let id = endpoint.id().to_string();
        let log = log.clone();
        tower::load::Constant::new(
            tower::service_fn(move |_: ()| {
                *log.lock().entry(id.clone()).or_default() += 1;
                std::future::ready(Ok::<_, std::io::Error>(()))
            }),
            0usize,
        )
    });
    let mut balancer = tower::balance::p2c::Balance::new(discover);
    for _ in 0..200 {
        balancer.ready().await.unwrap().call(()).await.unwrap();
    }
    let served = served.lock();
    assert_eq!(served.values().sum::<usize>(), 200);
    let in_rotation: Vec<String> = snapshot
        .in_rotation()
        .map(|s| s.endpoint.id().to_string())
        .collect();
    assert!(
        served.keys().all(|id| in_rotation.contains(id)),
        "{served:?}"
    );
    assert!(
        served.len() >= 4,
        "traffic spread over the survivors: {served:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retained_outliers_are_ejected_when_room_frees_up() {
    let config = HealthConfig::default().max_ejection_percent(50).outlier(
        OutlierConfig::default()
            .consecutive_failures(Some(3))
            .ejection(Duration::from_secs(10), Duration::from_secs(10)),
    );
    let health = fleet(config, 4);
    for i in 0..3 {
        record(&health, &format!("n{i}"), FAIL, MS, 3);
    }
    let snapshot = health.snapshot();
    assert_eq!(snapshot.ejected_count(), 2);
    assert!(snapshot.is_panic());
    // After the ejections end (no probe: back at once), the retained one,
    // still failing, goes out: judged on what it did since it was kept.
    tokio::time::sleep(Duration::from_secs(11)).await;
    record(&health, "n2", FAIL, MS, 3);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let snapshot = health.snapshot();
    assert_eq!(snapshot.ejected_count(), 1, "{snapshot:#?}");
    assert_eq!(snapshot.get("n2").unwrap().state, HealthState::Ejected);
    assert!(!snapshot.is_panic());
}

/// The second outage of issue 13: the nodes panic mode kept in rotation
/// through a fleet-wide outage kept the fleet alive; once it is over they
/// succeed, and when the ejected ones come back and the share frees up,
/// their outage failures must not eject them.
#[tokio::test(start_paused = true)]
async fn nodes_kept_through_an_outage_are_not_ejected_for_it_afterwards() {
    let config = HealthConfig::default().max_ejection_percent(50).outlier(
        OutlierConfig::default()
            .consecutive_failures(Some(5))
            .failure_rate(Some(0.5))
            .min_volume(20)
            .ejection(Duration::from_secs(2), Duration::from_secs(10)),
    );
    let outage = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let down = outage.clone();
    let health = Health::builder(
        config.active(
            ActiveConfig::default()
                .interval(Duration::from_millis(250))
                .unhealthy_interval(Duration::from_millis(250))
                .healthy_threshold(2)
                .unhealthy_threshold(2),
        ),
    )
    .probe_fn(move |_: Endpoint| {
        let down = down.load(std::sync::atomic::Ordering::Relaxed);
        async move {
            if down {
                Err(std::io::Error::other("outage"))
            } else {
                Ok(())
            }
        }
    })
    .seed(7)
    .build()
    .unwrap();
    insert_fleet(&health, 10);
    // Probed in (the outage begins after).
    outage.store(false, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(health.snapshot().in_rotation().count(), 10);
    outage.store(true, std::sync::atomic::Ordering::Relaxed);
    // Ten seconds of a total outage: every node fails 40 requests a second.
    for _ in 0..40 {
        for i in 0..10 {
            record(&health, &format!("n{i}"), FAIL, MS, 5);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let snapshot = health.snapshot();
    assert_eq!(snapshot.max_ejected(), 5);
    assert!(snapshot.is_panic(), "{snapshot:#?}");
    let kept: Vec<String> = snapshot
        .in_rotation()
        .map(|s| s.endpoint.id().to_string())
        .collect();
    assert_eq!(kept.len(), 5);
    // Recovery: the kept nodes succeed from now on; the ejected ones pass
    // their probes and come back.
    outage.store(false, std::sync::atomic::Ordering::Relaxed);
    for step in 0..40 {
        for id in &kept {
            record(&health, id, Outcome::Success, MS, 10);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        let snapshot = health.snapshot();
        for id in &kept {
            let status = snapshot.get(id).unwrap();
            assert!(
                status.state.is_in_rotation(),
                "{id}, 100 % successes since recovery, is out {} ms after it: {:?}",
                250 * (step + 1),
                status.reason
            );
        }
    }
    let snapshot = health.snapshot();
    assert_eq!(snapshot.in_rotation().count(), 10, "{snapshot:#?}");
    assert!(!snapshot.is_panic());
}

#[tokio::test(start_paused = true)]
async fn removing_endpoints_keeps_the_share() {
    let config = HealthConfig::default()
        .max_ejection_percent(50)
        .outlier(OutlierConfig::default().consecutive_failures(Some(3)));
    let health = fleet(config, 10);
    for i in 0..5 {
        record(&health, &format!("n{i}"), FAIL, MS, 3);
    }
    assert_eq!(health.snapshot().ejected_count(), 5);
    for i in 6..10 {
        health.remove(&format!("n{i}")).unwrap();
    }
    let snapshot = health.snapshot();
    assert_eq!(snapshot.len(), 6);
    assert_eq!(snapshot.max_ejected(), 3);
    assert_eq!(snapshot.ejected_count(), 3);
    assert!(snapshot.is_panic());
    assert_eq!(snapshot.in_rotation().count(), 3);
}

#[tokio::test(start_paused = true)]
async fn insert_and_remove_errors() {
    let health = fleet(HealthConfig::default(), 1);
    let err = health.insert(Endpoint::new("n0", "x")).unwrap_err();
    assert!(
        matches!(err, keel_health::HealthError::EndpointExists(_)),
        "{err}"
    );
    let err = health
        .insert(Endpoint::new("w", "x").weight(0.0))
        .unwrap_err();
    assert!(err.to_string().contains("weight"), "{err}");
    let err = health.remove("nope").unwrap_err();
    assert!(matches!(err, keel_health::HealthError::UnknownEndpoint(_)));
    assert!(!err.is_retryable());
    // A recorder of a removed endpoint is harmless.
    let recorder = health.recorder("n0").unwrap();
    health.remove("n0").unwrap();
    for _ in 0..10 {
        recorder.record(FAIL, MS);
    }
    assert!(health.snapshot().is_empty());
}
