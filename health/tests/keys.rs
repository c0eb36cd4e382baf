//! What a balancer reading discovery keys sees: the live weight health
//! writes into each `EndpointId` (slow start, busy dampening, ejection),
//! the capacity the endpoint declared, and the reporter through which the
//! balancer's own timeouts reach outlier detection.

use std::time::Duration;

use keel_health::{
    BusyConfig, Endpoint, EndpointKey, FailureKind, Health, HealthConfig, HealthState, Outcome,
    OutlierConfig, SlowStartConfig,
};
use tokio::time::Instant;
use tower::discover::Change;
use tower::{Service, ServiceExt};

#[path = "support/discover.rs"]
mod support;
use support::next_change;

fn round(weight: f64) -> f64 {
    (weight * 1000.0).round() / 1000.0
}

#[tokio::test(start_paused = true)]
async fn the_discover_key_weight_follows_slow_start_and_busy_dampening() {
    let config = HealthConfig::default()
        .tick(Duration::from_millis(500))
        .busy(
            BusyConfig::default()
                .weight(0.2)
                .cooldown(Duration::from_secs(1), Duration::from_secs(1)),
        )
        .slow_start(
            SlowStartConfig::default()
                .window(Duration::from_secs(10))
                .min_weight(0.1),
        );
    let start = Instant::now();
    let health = Health::new(config).unwrap();
    health
        .insert(Endpoint::new("a", "a:80").capacity(4))
        .unwrap();
    let mut discover = health.discover(|_: &Endpoint| ());
    let Change::Insert(key, _) = next_change(&mut discover).await else {
        panic!("expected an insert");
    };
    assert_eq!(key.capacity(), Some(4), "the endpoint's batch slots");

    // Nobody reads the snapshot: the registry's tick pushes the ramp into
    // the key the balancer holds.
    let mut seen = Vec::new();
    for step in 0..=4u64 {
        tokio::time::sleep_until(start + Duration::from_millis(2_500 * step + 100)).await;
        seen.push(round(key.weight()));
    }
    assert_eq!(seen, [0.1, 0.25, 0.5, 0.75, 1.0]);

    // A busy answer dampens it at once; the cooldown's end restores it.
    health.recorder("a").unwrap().record(
        Outcome::Busy { retry_after: None },
        Duration::from_millis(5),
    );
    assert_eq!(round(key.weight()), 0.2);
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    assert_eq!(key.weight(), 1.0);

    // Removed: the key the balancer may still hold says 0.
    health.remove("a").unwrap();
    assert_eq!(key.weight(), 0.0);
}

#[tokio::test(start_paused = true)]
async fn timeouts_reported_through_the_id_eject_the_node() {
    let config = HealthConfig::default()
        .max_ejection_percent(100)
        .slow_start(SlowStartConfig::default().window(Duration::ZERO))
        .outlier(
            OutlierConfig::default()
                .consecutive_failures(Some(3))
                .ejection(Duration::from_secs(10), Duration::from_secs(60)),
        );
    let health = Health::new(config).unwrap();
    health.insert(Endpoint::new("hung", "h:80")).unwrap();
    health.insert(Endpoint::new("fine", "f:80")).unwrap();
    // "hung" accepts requests and never answers.
    let mut discover = health.discover(|endpoint: &Endpoint| {
        let hangs = endpoint.address() == "h:80";
        tower::service_fn(move |_: ()| async move {
            if hangs {
                std::future::pending::<()>().await;
            }
            Ok::<_, std::io::Error>(())
        })
    });
    let mut hung = None;
    for _ in 0..2 {
        if let Change::Insert(key, svc) = next_change(&mut discover).await
            && key.as_str() == "hung"
        {
            hung = Some((key, svc));
        }
    }
    let (key, mut svc) = hung.expect("hung inserted");
    assert_eq!(key.weight(), 1.0);

    // A balancer's attempt timeout: the call is dropped (so the outlier
    // layer sees no outcome) and the timeout is reported through the key.
    for _ in 0..3 {
        let call = svc.ready().await.unwrap().call(());
        let attempt = tokio::time::timeout(Duration::from_secs(2), call).await;
        assert!(attempt.is_err(), "the hung node answered");
        key.report(Outcome::failure(FailureKind::Timeout));
    }
    let status = health.snapshot().get("hung").cloned().unwrap();
    assert_eq!(status.state, HealthState::Ejected);
    assert_eq!(
        status.reason,
        keel_health::Reason::ConsecutiveFailures {
            count: 3,
            kind: FailureKind::Timeout
        }
    );
    assert_eq!(key.weight(), 0.0, "the key says so at once");
    assert!(matches!(
        next_change(&mut discover).await,
        Change::Remove(id) if id.as_str() == "hung"
    ));
    assert_eq!(
        health.snapshot().get("fine").unwrap().state,
        HealthState::Healthy
    );
    // Reports on a key the balancer received that say nothing about the
    // node record nothing.
    key.report(Outcome::Cancelled);
    assert_eq!(health.snapshot().get("hung").unwrap().ejections, 1);
}

#[tokio::test(start_paused = true)]
async fn an_id_inserted_again_keeps_reporting_to_its_current_incarnation() {
    let config = HealthConfig::default()
        .max_ejection_percent(100)
        .outlier(OutlierConfig::default().consecutive_failures(Some(2)));
    let health = Health::new(config).unwrap();
    let endpoint = Endpoint::new("a", "a:80");
    health.insert(endpoint.clone()).unwrap();
    health.insert(Endpoint::new("b", "b:80")).unwrap();
    health.remove("a").unwrap();
    // The same id value (its reporter was installed by the first insert).
    health.insert(endpoint.clone()).unwrap();
    for _ in 0..2 {
        endpoint
            .id()
            .report(Outcome::failure(FailureKind::Transport));
    }
    assert_eq!(
        health.snapshot().get("a").unwrap().state,
        HealthState::Ejected
    );
}
