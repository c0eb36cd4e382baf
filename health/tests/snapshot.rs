//! Reading health's snapshot cannot deadlock: a subscriber holding a
//! `watch` borrow while health changes state (on the same thread, even)
//! only delays the next send.

use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::Duration;

use keel_health::{
    Endpoint, FailureKind, Health, HealthConfig, HealthState, Outcome, OutlierConfig,
};

/// Runs on its own thread, with its own paused-time runtime, so that a
/// regression fails the test after a minute instead of hanging it.
#[test]
fn holding_a_borrow_never_blocks_health() {
    let (done, finished) = channel();
    let worker = std::thread::spawn(move || {
        keel_testkit::paused_runtime().block_on(async {
            let config = HealthConfig::default()
                .max_ejection_percent(100)
                .outlier(OutlierConfig::default().consecutive_failures(Some(2)));
            let health = Health::new(config).unwrap();
            health.insert(Endpoint::new("a", "a:80")).unwrap();
            health.insert(Endpoint::new("b", "b:80")).unwrap();
            let mut watch = health.subscribe();
            {
                let held = watch.borrow();
                // Everything that changes state, on the thread holding it.
                health.insert(Endpoint::new("c", "c:80")).unwrap();
                let a = health.recorder("a").unwrap();
                for _ in 0..2 {
                    a.record(
                        Outcome::failure(FailureKind::Transport),
                        Duration::from_millis(1),
                    );
                }
                health.recorder("b").unwrap().record(
                    Outcome::Busy { retry_after: None },
                    Duration::from_millis(1),
                );
                health.evaluate();
                health.remove("c").unwrap();
                // Reading, too, while the guard is held.
                let now = health.snapshot();
                assert_eq!(now.get("a").unwrap().state, HealthState::Ejected);
                assert_eq!(now.get("b").unwrap().state, HealthState::Degraded);
                assert!(now.get("c").is_none());
                assert!(held.get("c").is_none());
            }
            // Once the guard is dropped, the subscriber catches up.
            let seen = tokio::time::timeout(
                Duration::from_secs(1),
                watch.wait_for(|s| {
                    s.get("a").is_some_and(|a| a.state == HealthState::Ejected)
                        && s.get("b").is_some_and(|b| b.state == HealthState::Degraded)
                }),
            )
            .await
            .expect("the watch caught up")
            .expect("registry alive")
            .clone();
            assert!(seen.get("c").is_none());
        });
        done.send(()).unwrap();
    });
    match finished.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => worker.join().unwrap(),
        Err(RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(worker.join().unwrap_err())
        }
        Err(RecvTimeoutError::Timeout) => {
            panic!("health deadlocked while a subscriber held a watch borrow")
        }
    }
}
