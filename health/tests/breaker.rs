//! The circuit breaker under paused time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_health::{
    BoxError, BreakerConfig, BreakerState, CircuitBreaker, CircuitBreakerLayer, ClassThresholds,
    FailureKind, HealthError, ResponseStatus,
};
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};

/// What the fake endpoint answers, set per call by the test.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Answer {
    Ok,
    Busy,
    Server,
    Timeout,
    Hang,
}

/// An HTTP-like answer (the breaker needs no `http` feature).
#[derive(Debug)]
struct Reply(u16);

impl ResponseStatus for Reply {
    fn status_code(&self) -> Option<u16> {
        Some(self.0)
    }
}

#[derive(Clone)]
struct Fake {
    answer: Arc<parking_lot::Mutex<Answer>>,
    calls: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

impl Fake {
    fn new() -> Self {
        Fake {
            answer: Arc::new(parking_lot::Mutex::new(Answer::Ok)),
            calls: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        }
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock() = answer;
    }

    fn service(
        &self,
    ) -> impl Service<(), Response = Reply, Error = BoxError, Future: Send> + Clone + use<> {
        let fake = self.clone();
        tower::service_fn(move |_: ()| {
            fake.calls.fetch_add(1, Ordering::SeqCst);
            let answer = *fake.answer.lock();
            let gate = fake.gate.clone();
            async move {
                let status = match answer {
                    Answer::Ok => 200,
                    Answer::Busy => 503,
                    Answer::Server => 500,
                    Answer::Timeout => {
                        return Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into());
                    }
                    Answer::Hang => {
                        // Until the test opens the gate.
                        gate.acquire().await.unwrap().forget();
                        200
                    }
                };
                Ok(Reply(status))
            }
        })
    }
}

fn breaker<S>(config: BreakerConfig, inner: S) -> CircuitBreaker<S> {
    CircuitBreakerLayer::new(config).unwrap().layer(inner)
}

async fn call<S>(svc: &mut S) -> Result<u16, BoxError>
where
    S: Service<(), Response = Reply, Error = BoxError>,
{
    svc.ready().await?.call(()).await.map(|r| r.0)
}

fn keel_error(err: &BoxError) -> &HealthError {
    err.downcast_ref::<HealthError>()
        .expect("a keel_health::HealthError")
}

#[tokio::test(start_paused = true)]
async fn each_class_has_its_own_threshold() {
    let fake = Fake::new();
    let thresholds = ClassThresholds::all(Some(4)).set(FailureKind::Timeout, Some(2));
    let mut svc = breaker(
        BreakerConfig::new("t").thresholds(thresholds),
        fake.service(),
    );
    // Three server errors and one timeout: neither run is long enough.
    fake.set(Answer::Server);
    for _ in 0..3 {
        assert_eq!(call(&mut svc).await.unwrap(), 500);
    }
    fake.set(Answer::Timeout);
    assert!(call(&mut svc).await.is_err());
    assert_eq!(svc.state(), BreakerState::Closed);
    // A second timeout completes the timeout run.
    assert!(call(&mut svc).await.is_err());
    assert_eq!(svc.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_runs() {
    let fake = Fake::new();
    let mut svc = breaker(
        BreakerConfig::new("t").thresholds(ClassThresholds::all(Some(3))),
        fake.service(),
    );
    for _ in 0..50 {
        fake.set(Answer::Server);
        call(&mut svc).await.unwrap();
        call(&mut svc).await.unwrap();
        fake.set(Answer::Ok);
        call(&mut svc).await.unwrap();
    }
    assert_eq!(svc.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn open_refuses_at_once_with_a_retryable_error() {
    let fake = Fake::new();
    let mut svc = breaker(
        BreakerConfig::new("t")
            .thresholds(ClassThresholds::all(Some(2)))
            .open_for(Duration::from_secs(5), Duration::from_secs(60)),
        fake.service(),
    );
    fake.set(Answer::Server);
    call(&mut svc).await.unwrap();
    call(&mut svc).await.unwrap();
    assert_eq!(svc.state(), BreakerState::Open);
    let before = fake.calls.load(Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    for _ in 0..100 {
        let err = call(&mut svc).await.unwrap_err();
        let err = keel_error(&err);
        assert!(err.is_retryable());
        assert!(
            matches!(err, HealthError::Unavailable { retry_after: Some(after), .. } if *after <= Duration::from_secs(5)),
            "{err:?}"
        );
    }
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        before,
        "inner service untouched"
    );
    assert_eq!(started.elapsed(), Duration::ZERO, "refusals take no time");
}

#[tokio::test(start_paused = true)]
async fn busy_storm_never_opens() {
    let fake = Fake::new();
    let mut svc = breaker(
        BreakerConfig::new("t").thresholds(ClassThresholds::all(Some(1))),
        fake.service(),
    );
    fake.set(Answer::Busy);
    for _ in 0..1_000 {
        assert_eq!(call(&mut svc).await.unwrap(), 503);
    }
    assert_eq!(svc.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_only_n_trials_then_closes() {
    let fake = Fake::new();
    let mut svc = breaker(
        BreakerConfig::new("t")
            .thresholds(ClassThresholds::all(Some(1)))
            .open_for(Duration::from_secs(5), Duration::from_secs(60))
            .half_open_trials(2)
            .trial_timeout(Duration::from_secs(30)),
        fake.service(),
    );
    fake.set(Answer::Server);
    call(&mut svc).await.unwrap();
    assert_eq!(svc.state(), BreakerState::Open);
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Two trials hang in flight; the third request is refused.
    fake.set(Answer::Hang);
    let calls_before = fake.calls.load(Ordering::SeqCst);
    let first = tokio::spawn(svc.ready().await.unwrap().call(()));
    assert_eq!(svc.state(), BreakerState::HalfOpen);
    let second = tokio::spawn(svc.ready().await.unwrap().call(()));
    let third = call(&mut svc).await.unwrap_err();
    assert!(matches!(
        keel_error(&third),
        HealthError::Unavailable {
            retry_after: None,
            ..
        }
    ));
    tokio::task::yield_now().await;
    assert_eq!(fake.calls.load(Ordering::SeqCst) - calls_before, 2);

    // Both trials succeed: closed.
    fake.gate.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap().0, 200);
    assert_eq!(
        svc.state(),
        BreakerState::HalfOpen,
        "one of two trials done"
    );
    fake.gate.add_permits(1);
    assert_eq!(second.await.unwrap().unwrap().0, 200);
    assert_eq!(svc.state(), BreakerState::Closed);
    fake.set(Answer::Ok);
    assert_eq!(call(&mut svc).await.unwrap(), 200);
}

#[tokio::test(start_paused = true)]
async fn a_hung_trial_reopens_the_breaker_for_longer() {
    let fake = Fake::new();
    let mut svc = breaker(
        BreakerConfig::new("t")
            .thresholds(ClassThresholds::all(Some(1)))
            .open_for(Duration::from_secs(5), Duration::from_secs(60))
            .trial_timeout(Duration::from_secs(2)),
        fake.service(),
    );
    fake.set(Answer::Server);
    call(&mut svc).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;

    fake.set(Answer::Hang);
    let started = tokio::time::Instant::now();
    let err = call(&mut svc).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert!(matches!(keel_error(&err), HealthError::Timeout(d) if *d == Duration::from_secs(2)));
    assert_eq!(svc.state(), BreakerState::Open);

    // Re-opened for twice as long: still open after 5 s, half-open after 10 s.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(call(&mut svc).await.is_err());
    assert_eq!(svc.state(), BreakerState::Open);
    tokio::time::sleep(Duration::from_secs(1)).await;
    fake.set(Answer::Ok);
    assert_eq!(call(&mut svc).await.unwrap(), 200);
    assert_eq!(svc.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_trial_gives_its_slot_back() {
    let fake = Fake::new();
    let mut svc = breaker(
        BreakerConfig::new("t")
            .thresholds(ClassThresholds::all(Some(1)))
            .half_open_trials(1),
        fake.service(),
    );
    fake.set(Answer::Server);
    call(&mut svc).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    fake.set(Answer::Hang);
    let trial = svc.ready().await.unwrap().call(());
    assert_eq!(svc.state(), BreakerState::HalfOpen);
    // The caller gave up: the slot is free for the next request.
    drop(trial);
    fake.set(Answer::Ok);
    assert_eq!(call(&mut svc).await.unwrap(), 200);
    assert_eq!(svc.state(), BreakerState::Closed);
}

#[test]
fn futures_and_services_are_send() {
    fn send<T: Send>(_: &T) {}
    let fake = Fake::new();
    let mut svc = breaker(BreakerConfig::default(), fake.service());
    send(&svc);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    send(&svc.call(()));
}
