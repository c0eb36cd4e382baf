//! Active checks under paused time: hysteresis, probe timeouts, first
//! probes and bounded probe concurrency.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use keel_health::{ActiveConfig, Endpoint, Health, HealthConfig, HealthState, Reason, Snapshot};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tower::discover::Change;

#[path = "support/fleet.rs"]
mod support;
use support::insert_fleet;

fn active() -> ActiveConfig {
    ActiveConfig::default()
        .interval(Duration::from_secs(1))
        .unhealthy_interval(Duration::from_secs(1))
        .jitter(0.0)
        .timeout(Duration::from_millis(500))
        .healthy_threshold(2)
        .unhealthy_threshold(3)
}

async fn wait_for(
    rx: &mut watch::Receiver<Snapshot>,
    limit: Duration,
    what: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    tokio::time::timeout(limit, rx.wait_for(|s| what(s)))
        .await
        .expect("state not reached in time")
        .expect("registry alive")
        .clone()
}

/// The endpoint's state (`None`: not in this snapshot; a subscriber's watch
/// catches up with an insertion a moment after it).
fn state(snapshot: &Snapshot, id: &str) -> Option<HealthState> {
    snapshot.get(id).map(|status| status.state)
}

const ALTERNATE: u8 = 0;
const FAIL: u8 = 1;
const PASS: u8 = 2;

#[tokio::test(start_paused = true)]
async fn flapping_endpoint_is_held_by_hysteresis() {
    let calls = Arc::new(AtomicU32::new(0));
    let mode = Arc::new(AtomicU8::new(ALTERNATE));
    let (probe_calls, probe_mode) = (calls.clone(), mode.clone());
    // One endpoint: let it be ejected (the default 50% share would keep it).
    let config = HealthConfig::default()
        .max_ejection_percent(100)
        .active(active());
    let health = Health::builder(config)
        .probe_fn(move |_endpoint: Endpoint| {
            let n = probe_calls.fetch_add(1, Ordering::SeqCst);
            let fail = match probe_mode.load(Ordering::SeqCst) {
                // Passes and fails in turn: never 3 failures or 2 passes in a row.
                ALTERNATE => n % 2 == 1,
                FAIL => true,
                _ => false,
            };
            async move {
                if fail {
                    Err(std::io::Error::other("flap"))
                } else {
                    Ok(())
                }
            }
        })
        .build()
        .unwrap();
    health
        .insert(Endpoint::new("flappy", "10.0.0.1:80"))
        .unwrap();
    let mut discover = health.discover(|_: &Endpoint| ());
    let first = discover.next().await.unwrap().unwrap();
    assert!(matches!(first, Change::Insert(ref id, _) if id.as_str() == "flappy"));
    let mut rx = health.subscribe();
    assert_eq!(state(&rx.borrow(), "flappy"), Some(HealthState::Healthy));

    // A minute of flapping: no Remove ever reaches the balancer.
    let quiet = tokio::time::timeout(Duration::from_secs(60), discover.next()).await;
    assert!(quiet.is_err(), "a flapping endpoint left rotation");
    assert!(calls.load(Ordering::SeqCst) >= 50, "probes kept running");
    assert_eq!(state(&rx.borrow(), "flappy"), Some(HealthState::Healthy));

    // Three failures in a row take it out...
    mode.store(FAIL, Ordering::SeqCst);
    let out = wait_for(&mut rx, Duration::from_secs(5), |s| {
        state(s, "flappy") == Some(HealthState::Probing)
    })
    .await;
    assert_eq!(
        out.get("flappy").unwrap().reason,
        Reason::ProbeFailed { consecutive: 3 }
    );
    assert!(matches!(discover.next().await, Some(Ok(Change::Remove(_)))));

    // ...flapping does not bring it back (two passes in a row needed)...
    mode.store(ALTERNATE, Ordering::SeqCst);
    let stuck = tokio::time::timeout(Duration::from_secs(20), discover.next()).await;
    assert!(stuck.is_err(), "came back without two passes in a row");
    assert_eq!(state(&rx.borrow(), "flappy"), Some(HealthState::Probing));

    // ...two passes do.
    mode.store(PASS, Ordering::SeqCst);
    let back = wait_for(&mut rx, Duration::from_secs(5), |s| {
        state(s, "flappy") == Some(HealthState::Healthy)
    })
    .await;
    assert_eq!(back.get("flappy").unwrap().reason, Reason::ProbePassed);
    assert!(matches!(
        discover.next().await,
        Some(Ok(Change::Insert(..)))
    ));
}

#[tokio::test(start_paused = true)]
async fn probe_timeouts_count_as_failures() {
    let hang = Arc::new(AtomicBool::new(false));
    let probe_hang = hang.clone();
    let config = HealthConfig::default()
        .max_ejection_percent(100)
        .active(active().unhealthy_threshold(2));
    let health = Health::builder(config)
        .probe_fn(move |_endpoint: Endpoint| {
            let hang = probe_hang.load(Ordering::SeqCst);
            async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                Ok::<_, std::io::Error>(())
            }
        })
        .build()
        .unwrap();
    health.insert(Endpoint::new("a", "10.0.0.1:80")).unwrap();
    let mut rx = health.subscribe();
    wait_for(&mut rx, Duration::from_secs(1), |s| {
        state(s, "a") == Some(HealthState::Healthy)
    })
    .await;
    let hung_at = tokio::time::Instant::now();
    hang.store(true, Ordering::SeqCst);
    let out = wait_for(&mut rx, Duration::from_secs(10), |s| {
        state(s, "a") == Some(HealthState::Probing)
    })
    .await;
    assert_eq!(
        out.get("a").unwrap().reason,
        Reason::ProbeTimeout { consecutive: 2 }
    );
    // Two probes, one interval apart, each cut at the 500 ms timeout.
    let took = hung_at.elapsed();
    assert!(
        took >= Duration::from_millis(2_500) && took <= Duration::from_millis(3_000),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn new_endpoint_stays_out_until_its_first_probe_passes() {
    let health = Health::builder(HealthConfig::default().active(active()))
        .probe_fn(|endpoint: Endpoint| async move {
            if endpoint.address().starts_with("dead") {
                Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
            } else {
                Ok(())
            }
        })
        .build()
        .unwrap();
    health.insert(Endpoint::new("dead", "dead:80")).unwrap();
    health.insert(Endpoint::new("live", "live:80")).unwrap();
    assert_eq!(
        state(&health.snapshot(), "live"),
        Some(HealthState::Probing)
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let snapshot = health.snapshot();
    assert_eq!(state(&snapshot, "live"), Some(HealthState::Healthy));
    assert_eq!(state(&snapshot, "dead"), Some(HealthState::Probing));
    assert_eq!(snapshot.weight("dead"), 0.0);
    assert!(matches!(
        snapshot.get("dead").unwrap().reason,
        Reason::ProbeFailed { .. }
    ));
    // Never admitted, so it does not use up the max-ejection share.
    assert_eq!(snapshot.ejected_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn probes_are_bounded_in_concurrency() {
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let (r, p, d) = (running.clone(), peak.clone(), done.clone());
    let health = Health::builder(
        HealthConfig::default().active(active().max_concurrent(2).timeout(Duration::from_secs(5))),
    )
    .probe_fn(move |_endpoint: Endpoint| {
        let (r, p, d) = (r.clone(), p.clone(), d.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            r.fetch_sub(1, Ordering::SeqCst);
            d.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(())
        }
    })
    .build()
    .unwrap();
    insert_fleet(&health, 10);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(done.load(Ordering::SeqCst) >= 10);
    assert_eq!(peak.load(Ordering::SeqCst), 2);
    assert_eq!(health.snapshot().in_rotation().count(), 10);
}

#[tokio::test(start_paused = true)]
async fn failing_checks_beyond_the_share_stay_in_rotation_steadily() {
    // Two endpoints, both failing checks, a 50% share: one goes out, the
    // other stays in rotation (panic mode), and stays there steadily.
    let flip = Arc::new(AtomicBool::new(false));
    let probe_flip = flip.clone();
    let health = Health::builder(HealthConfig::default().active(active()))
        .probe_fn(move |_endpoint: Endpoint| {
            let down = probe_flip.load(Ordering::SeqCst);
            async move {
                if down {
                    Err(std::io::Error::other("down"))
                } else {
                    Ok(())
                }
            }
        })
        .build()
        .unwrap();
    health.insert(Endpoint::new("a", "a:80")).unwrap();
    health.insert(Endpoint::new("b", "b:80")).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(health.snapshot().in_rotation().count(), 2);
    flip.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let snapshot = health.snapshot();
    assert_eq!(snapshot.ejected_count(), 1);
    assert!(snapshot.is_panic());
    let retained = snapshot
        .in_rotation()
        .next()
        .expect("one stays in rotation")
        .endpoint
        .id()
        .clone();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let status = health.snapshot().get(retained.as_str()).unwrap().clone();
        assert_eq!(status.state, HealthState::Degraded);
        assert!(
            matches!(status.reason, Reason::PanicRetained(_)),
            "{:?}",
            status.reason
        );
    }
}
