//! The balancer's view: the Discover stream and the weight watch.

use std::time::Duration;

use keel_health::{
    Endpoint, EndpointId, Health, HealthConfig, HealthState, OutlierConfig, SlowStartConfig,
};
use tower::discover::Change;
use tower::{Service, ServiceExt};

#[path = "support/discover.rs"]
mod support;
use support::next_change;

type Svc = tower::util::BoxCloneSyncService<(), (), std::io::Error>;

fn node(fails: bool) -> Svc {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |_: ()| async move {
        if fails {
            Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
        } else {
            Ok(())
        }
    }))
}

fn key<S>(change: &Change<EndpointId, S>) -> (&'static str, String) {
    match change {
        Change::Insert(id, _) => ("insert", id.to_string()),
        Change::Remove(id) => ("remove", id.to_string()),
    }
}

#[tokio::test(start_paused = true)]
async fn endpoints_enter_and_leave_rotation_as_changes() {
    let config = HealthConfig::default().max_ejection_percent(100).outlier(
        OutlierConfig::default()
            .consecutive_failures(Some(2))
            .ejection(Duration::from_secs(10), Duration::from_secs(60)),
    );
    let health = Health::new(config).unwrap();
    health.insert(Endpoint::new("good", "g:80")).unwrap();
    health.insert(Endpoint::new("bad", "b:80")).unwrap();
    let mut discover = health.discover(|endpoint: &Endpoint| node(endpoint.address() == "b:80"));

    let mut inserted = Vec::new();
    let mut bad = None;
    for _ in 0..2 {
        match next_change(&mut discover).await {
            Change::Insert(id, svc) => {
                if id.as_str() == "bad" {
                    bad = Some(svc);
                }
                inserted.push(id.to_string());
            }
            Change::Remove(id) => panic!("unexpected remove of {id}"),
        }
    }
    inserted.sort();
    assert_eq!(inserted, ["bad", "good"]);

    // Requests through the discovered service feed outlier detection.
    let mut bad = bad.unwrap();
    for _ in 0..2 {
        assert!(bad.ready().await.unwrap().call(()).await.is_err());
    }
    assert_eq!(
        health.snapshot().get("bad").unwrap().state,
        HealthState::Ejected
    );
    assert_eq!(
        key(&next_change(&mut discover).await),
        ("remove", "bad".into())
    );

    // Back after the ejection, as a fresh Insert.
    let change = next_change(&mut discover).await;
    assert_eq!(key(&change), ("insert", "bad".into()));

    // Removal, and re-adding under the same id, are seen too.
    health.remove("good").unwrap();
    assert_eq!(
        key(&next_change(&mut discover).await),
        ("remove", "good".into())
    );
    health.insert(Endpoint::new("good", "g2:80")).unwrap();
    assert_eq!(
        key(&next_change(&mut discover).await),
        ("insert", "good".into())
    );
}

#[tokio::test(start_paused = true)]
async fn a_replaced_endpoint_is_reinserted_even_between_polls() {
    let health = Health::new(HealthConfig::default()).unwrap();
    health.insert(Endpoint::new("a", "old:80")).unwrap();
    let mut discover = health.discover(|endpoint: &Endpoint| endpoint.address().to_owned());
    assert_eq!(
        key(&next_change(&mut discover).await),
        ("insert", "a".into())
    );
    // Removed and re-added before the balancer polls again: the new
    // incarnation still reaches it, as an Insert replacing the old service.
    health.remove("a").unwrap();
    health.insert(Endpoint::new("a", "new:80")).unwrap();
    match next_change(&mut discover).await {
        Change::Insert(id, svc) => {
            assert_eq!(id.as_str(), "a");
            assert_eq!(svc.get_ref(), "new:80");
        }
        Change::Remove(_) => {
            // Also valid if the removal was observed on its own; then the
            // insert follows.
            assert_eq!(
                key(&next_change(&mut discover).await),
                ("insert", "a".into())
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn slow_start_ramp_is_linear_by_default() {
    let config = HealthConfig::default()
        .tick(Duration::from_millis(500))
        .slow_start(
            SlowStartConfig::default()
                .window(Duration::from_secs(10))
                .min_weight(0.1),
        );
    let start = tokio::time::Instant::now();
    let health = Health::new(config).unwrap();
    health.insert(Endpoint::new("a", "a:80")).unwrap();
    let mut seen = Vec::new();
    for step in 0..=4u64 {
        // Just after the ticks at 0, 2.5, 5, 7.5 and 10 s.
        tokio::time::sleep_until(start + Duration::from_millis(2_500 * step + 100)).await;
        seen.push((health.snapshot().weight("a") * 1000.0).round() / 1000.0);
    }
    assert_eq!(seen, [0.1, 0.25, 0.5, 0.75, 1.0]);
}

#[tokio::test(start_paused = true)]
async fn slow_start_aggression_shapes_the_ramp() {
    let config = HealthConfig::default().slow_start(
        SlowStartConfig::default()
            .window(Duration::from_secs(10))
            .min_weight(0.05)
            .aggression(2.0),
    );
    let start = tokio::time::Instant::now();
    let health = Health::new(config).unwrap();
    health.insert(Endpoint::new("a", "a:80")).unwrap();
    let mut seen = Vec::new();
    for step in 1..=4u64 {
        tokio::time::sleep_until(start + Duration::from_millis(2_500 * step + 100)).await;
        seen.push((health.snapshot().weight("a") * 1000.0).round() / 1000.0);
    }
    // (t / window)^(1/2): faster early, like Envoy's aggression.
    assert_eq!(seen, [0.5, 0.707, 0.866, 1.0]);
}

#[tokio::test(start_paused = true)]
async fn weights_are_normalised_by_the_largest_configured_weight() {
    let config =
        HealthConfig::default().slow_start(SlowStartConfig::default().window(Duration::ZERO));
    let health = Health::new(config).unwrap();
    health.insert(Endpoint::new("small", "s:80")).unwrap();
    health
        .insert(Endpoint::new("big", "b:80").weight(4.0))
        .unwrap();
    let snapshot = health.snapshot();
    assert_eq!(snapshot.weight("big"), 1.0);
    assert_eq!(snapshot.weight("small"), 0.25);
    assert!(snapshot.iter().all(|s| (0.0..=1.0).contains(&s.weight)));
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Health>();
    send_sync::<keel_health::Snapshot>();
    send_sync::<keel_health::Recorder>();
    send_sync::<keel_health::OutlierLayer>();
    send::<keel_health::HealthDiscover<Svc, fn(&Endpoint) -> Svc>>();
    send::<
        keel_health::outlier::OutlierFuture<
            <Svc as Service<()>>::Future,
            keel_health::DefaultClassifier,
        >,
    >();
}
