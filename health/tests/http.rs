//! The `http` feature: `HttpProbe` and the default classifier on
//! `http::Response`.
#![cfg(feature = "http")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use keel_health::{
    ActiveConfig, Endpoint, Health, HealthConfig, HealthState, HttpProbe, Reason, SlowStartConfig,
};
use tower::{Layer, Service, ServiceExt};

#[tokio::test(start_paused = true)]
async fn http_probe_gets_the_path_and_wants_2xx() {
    let status = Arc::new(AtomicU16::new(200));
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let (s, log) = (status.clone(), seen.clone());
    let client = tower::service_fn(move |req: http::Request<()>| {
        log.lock().push(req.uri().to_string());
        let code = s.load(Ordering::SeqCst);
        async move { Ok::<_, std::io::Error>(http::Response::builder().status(code).body(()).unwrap()) }
    });
    let config = HealthConfig::default().max_ejection_percent(100).active(
        ActiveConfig::default()
            .interval(Duration::from_secs(1))
            .jitter(0.0)
            .unhealthy_threshold(2),
    );
    let health = Health::builder(config)
        .probe(HttpProbe::new(client, "healthz"))
        .build()
        .unwrap();
    health.insert(Endpoint::new("a", "10.0.0.1:8000")).unwrap();
    health
        .insert(Endpoint::new("b", "https://b.internal:8443/"))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(health.snapshot().in_rotation().count(), 2);
    {
        let mut uris = seen.lock().clone();
        uris.sort();
        assert_eq!(
            uris,
            [
                "http://10.0.0.1:8000/healthz",
                "https://b.internal:8443/healthz"
            ]
        );
    }
    // A 503 from the health endpoint is a failed check.
    status.store(503, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let snapshot = health.snapshot();
    assert_eq!(snapshot.get("a").unwrap().state, HealthState::Probing);
    assert_eq!(
        snapshot.get("a").unwrap().reason,
        Reason::ProbeFailed { consecutive: 2 }
    );
}

#[tokio::test(start_paused = true)]
async fn a_503_with_retry_after_dampens_the_weight_for_that_long() {
    let config =
        HealthConfig::default().slow_start(SlowStartConfig::default().window(Duration::ZERO));
    let health = Health::new(config).unwrap();
    health.insert(Endpoint::new("a", "a:80")).unwrap();
    health.insert(Endpoint::new("b", "b:80")).unwrap();
    let layer = health.outlier_layer("a").unwrap();
    let mut svc = layer.layer(tower::service_fn(|_: ()| async {
        Ok::<_, std::io::Error>(
            http::Response::builder()
                .status(503)
                .header("retry-after", "8")
                .body(())
                .unwrap(),
        )
    }));
    let response = svc.ready().await.unwrap().call(()).await.unwrap();
    assert_eq!(response.status(), 503, "responses pass through untouched");
    let snapshot = health.snapshot();
    let status = snapshot.get("a").unwrap();
    assert_eq!(status.state, HealthState::Degraded);
    assert_eq!(
        status.reason,
        Reason::Busy {
            retry_after: Some(Duration::from_secs(8))
        }
    );
    assert!((status.weight - 0.1).abs() < 1e-9);
    assert_eq!(snapshot.weight("b"), 1.0);
    tokio::time::sleep(Duration::from_millis(7_500)).await;
    assert_eq!(
        health.snapshot().get("a").unwrap().state,
        HealthState::Degraded
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(health.snapshot().weight("a"), 1.0);
}
