//! Admission outcomes, bounds, limits and ordering through the public API,
//! under paused time.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use keel_core::{Deadline, ErrorKind};
use keel_scheduler::{
    AdmissionLayer, AimdConfig, ClassConfig, ConcurrencyConfig, LocalRateLimiter, Priority, Rate,
    RateLimitConfig, Rejection, Scheduler, SchedulerBuilder, SchedulerConfig, SchedulerError,
    SheddingConfig, TenantConfig, TenantRates, Ticket,
};
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::time::{Instant, sleep};
use tower::{Service, ServiceBuilder, ServiceExt};

/// What the service saw: request ids, in dispatch order.
type Seen = Arc<Mutex<Vec<u32>>>;

/// A service that records each request and answers after `latency`.
fn recording(
    latency: Duration,
) -> (
    impl Service<u32, Response = u32, Error = Infallible, Future: Send> + Send + 'static,
    Seen,
) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let service = tower::service_fn(move |id: u32| {
        log.lock().push(id);
        async move {
            sleep(latency).await;
            Ok::<_, Infallible>(id)
        }
    });
    (service, seen)
}

/// A service whose calls wait until the test adds permits to `gate`.
fn gated() -> (
    impl Service<u32, Response = u32, Error = Infallible, Future: Send> + Send + 'static,
    Seen,
    Arc<Semaphore>,
) {
    let seen: Seen = Arc::default();
    let gate = Arc::new(Semaphore::new(0));
    let (log, g) = (seen.clone(), gate.clone());
    let service = tower::service_fn(move |id: u32| {
        log.lock().push(id);
        let gate = g.clone();
        async move {
            gate.acquire().await.expect("open").forget();
            Ok::<_, Infallible>(id)
        }
    });
    (service, seen, gate)
}

fn one_at_a_time(name: &str) -> SchedulerConfig {
    SchedulerConfig::new(name).concurrency(ConcurrencyConfig::default().max_in_flight(1))
}

#[tokio::test(start_paused = true)]
async fn completes_with_the_service_answer() {
    let (service, seen) = recording(Duration::from_millis(5));
    let scheduler = Scheduler::new(SchedulerConfig::new("t"), service).unwrap();
    assert_eq!(scheduler.submit(Ticket::new("a"), 7).await.unwrap(), 7);
    assert_eq!(*seen.lock(), vec![7]);
}

#[tokio::test(start_paused = true)]
async fn expired_requests_never_reach_the_service() {
    let (service, seen, gate) = gated();
    let scheduler = Scheduler::new(one_at_a_time("t"), service).unwrap();
    // Request 0 holds the only slot.
    let first = tokio::spawn(scheduler.submit(Ticket::new("a"), 0));
    sleep(Duration::from_millis(1)).await;
    // Requests 1..=10 expire while they wait.
    let waiting: Vec<_> = (1..=10)
        .map(|id| {
            let ticket = Ticket::new("b").timeout(Duration::from_millis(10 * u64::from(id)));
            tokio::spawn(scheduler.submit(ticket, id))
        })
        .collect();
    sleep(Duration::from_millis(200)).await;
    gate.add_permits(100);
    for handle in waiting {
        match handle.await.unwrap() {
            Err(SchedulerError::DeadlineExceeded { waited }) => {
                assert!(waited >= Duration::from_millis(10))
            }
            other => panic!("expected DeadlineExceeded, got {other:?}"),
        }
    }
    first.await.unwrap().unwrap();
    // An already-expired ticket is refused without queueing.
    let past = Ticket::new("c").deadline(Instant::now() - Duration::from_millis(1));
    assert!(matches!(
        scheduler.submit(past, 99).await,
        Err(SchedulerError::DeadlineExceeded { .. })
    ));
    assert_eq!(*seen.lock(), vec![0], "only the unexpired request was sent");
    assert_eq!(scheduler.stats().queued, 0);
}

#[tokio::test(start_paused = true)]
async fn requests_without_a_deadline_do_not_wait_forever() {
    let (service, seen, _gate) = gated();
    // Shedding off: here the queue is stuck behind a hung call, which
    // shedding would answer sooner, with `Overloaded`.
    let config = one_at_a_time("t")
        .max_queue_time(Duration::from_secs(2))
        .shedding(SheddingConfig::disabled());
    let scheduler = Scheduler::new(config, service).unwrap();
    let _stuck = tokio::spawn(scheduler.submit(Ticket::new("a"), 0));
    sleep(Duration::from_millis(1)).await;
    let started = Instant::now();
    let waited = scheduler.submit(Ticket::new("a"), 1).await;
    assert!(
        matches!(waited, Err(SchedulerError::DeadlineExceeded { .. })),
        "{waited:?}"
    );
    // Caught by the sweep, every eighth of `max_queue_time`.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited <= Duration::from_millis(2250),
        "{waited:?}"
    );
    // With a deadline, exactly at the deadline.
    let started = Instant::now();
    let ticket = Ticket::new("a").timeout(Duration::from_millis(700));
    assert!(matches!(
        scheduler.submit(ticket, 2).await,
        Err(SchedulerError::DeadlineExceeded { .. })
    ));
    assert_eq!(started.elapsed(), Duration::from_millis(700));
    assert_eq!(*seen.lock(), vec![0]);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_submitter_removes_the_request() {
    let (service, seen, gate) = gated();
    let scheduler = Scheduler::new(one_at_a_time("t"), service).unwrap();
    let first = tokio::spawn(scheduler.submit(Ticket::new("a"), 0));
    sleep(Duration::from_millis(1)).await;
    let dropped = tokio::spawn(scheduler.submit(Ticket::new("a"), 1));
    sleep(Duration::from_millis(1)).await;
    assert_eq!(scheduler.stats().queued, 1);
    dropped.abort();
    let _ = dropped.await;
    assert_eq!(scheduler.stats().queued, 0, "the request left the queue");
    gate.add_permits(10);
    first.await.unwrap().unwrap();
    assert_eq!(scheduler.submit(Ticket::new("a"), 2).await.unwrap(), 2);
    assert_eq!(
        *seen.lock(),
        vec![0, 2],
        "the dropped request was never sent"
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_a_dispatched_request_cancels_the_call() {
    let cancelled = Arc::new(Semaphore::new(0));
    let signal = cancelled.clone();
    let service = tower::service_fn(move |_: u32| {
        let signal = signal.clone();
        async move {
            struct OnDrop(Arc<Semaphore>);
            impl Drop for OnDrop {
                fn drop(&mut self) {
                    self.0.add_permits(1);
                }
            }
            let _guard = OnDrop(signal);
            sleep(Duration::from_secs(3600)).await;
            Ok::<_, Infallible>(0u32)
        }
    });
    let scheduler = Scheduler::new(one_at_a_time("t"), service).unwrap();
    let call = tokio::spawn(scheduler.submit(Ticket::new("a"), 1));
    sleep(Duration::from_millis(10)).await;
    assert_eq!(scheduler.stats().in_flight, 1);
    call.abort();
    let _ = call.await;
    tokio::time::timeout(Duration::from_secs(1), cancelled.acquire())
        .await
        .expect("the response future was dropped")
        .unwrap()
        .forget();
    assert_eq!(scheduler.stats().in_flight, 0, "the slot was released");
}

#[tokio::test(start_paused = true)]
async fn queue_bounds_answer_queue_full() {
    let (service, seen, gate) = gated();
    let config = one_at_a_time("t").max_queued(3).max_queued_per_tenant(2);
    let scheduler = Scheduler::new(config, service).unwrap();
    let mut handles = vec![tokio::spawn(scheduler.submit(Ticket::new("a"), 0))];
    sleep(Duration::from_millis(1)).await;
    handles.push(tokio::spawn(scheduler.submit(Ticket::new("a"), 1)));
    handles.push(tokio::spawn(scheduler.submit(Ticket::new("a"), 2)));
    sleep(Duration::from_millis(1)).await;
    // Tenant `a` has two waiting: its third is refused, `b`'s first is not.
    let refused = scheduler.submit(Ticket::new("a"), 3).await.unwrap_err();
    assert_eq!(refused.rejection(), Some(&Rejection::QueueFull));
    assert!(refused.is_retryable());
    handles.push(tokio::spawn(scheduler.submit(Ticket::new("b"), 4)));
    sleep(Duration::from_millis(1)).await;
    // Three waiting in total: full for everyone.
    let refused = scheduler.submit(Ticket::new("c"), 5).await.unwrap_err();
    assert_eq!(refused.rejection(), Some(&Rejection::QueueFull));
    gate.add_permits(100);
    for handle in handles {
        handle.await.unwrap().unwrap();
    }
    let mut seen = seen.lock().clone();
    seen.sort_unstable();
    assert_eq!(seen, vec![0, 1, 2, 4]);
}

#[tokio::test(start_paused = true)]
async fn rate_limited_requests_carry_retry_after() {
    let (service, seen) = recording(Duration::ZERO);
    let limiter = LocalRateLimiter::new(
        RateLimitConfig::new("t")
            .default_rates(TenantRates::default().requests(Rate::per_second(10).burst(2))),
    )
    .unwrap();
    let scheduler = SchedulerBuilder::new(SchedulerConfig::new("t"))
        .rate_limit(limiter)
        .build(service)
        .unwrap();
    scheduler.submit(Ticket::new("a"), 1).await.unwrap();
    scheduler.submit(Ticket::new("a"), 2).await.unwrap();
    let err = scheduler.submit(Ticket::new("a"), 3).await.unwrap_err();
    assert_eq!(
        err.rejection(),
        Some(&Rejection::RateLimited {
            retry_after: Duration::from_millis(100)
        })
    );
    // Another tenant has its own bucket.
    scheduler.submit(Ticket::new("b"), 4).await.unwrap();
    sleep(err.retry_after().unwrap()).await;
    scheduler.submit(Ticket::new("a"), 5).await.unwrap();
    assert_eq!(*seen.lock(), vec![1, 2, 4, 5]);
}

#[tokio::test(start_paused = true)]
async fn priorities_earliest_deadlines_and_round_robin() {
    let (service, seen, gate) = gated();
    let config = one_at_a_time("t").classes(vec![ClassConfig::default(); 3]);
    let scheduler = Scheduler::new(config, service).unwrap();
    let mut handles = vec![tokio::spawn(scheduler.submit(Ticket::new("x"), 0))];
    sleep(Duration::from_millis(1)).await;
    let submit = |ticket: Ticket, id: u32| tokio::spawn(scheduler.submit(ticket, id));
    let later = Duration::from_secs(60);
    handles.push(submit(Ticket::new("a").priority(Priority::LOW), 1));
    handles.push(submit(Ticket::new("a").timeout(later * 2), 2));
    handles.push(submit(Ticket::new("a").timeout(later), 3));
    handles.push(submit(Ticket::new("b"), 4));
    handles.push(submit(Ticket::new("b"), 5));
    handles.push(submit(Ticket::new("a").priority(Priority::HIGH), 6));
    sleep(Duration::from_millis(1)).await;
    gate.add_permits(100);
    for handle in handles {
        handle.await.unwrap().unwrap();
    }
    // High first; then normal: a (earliest deadline: 3), b, a (2), b; low last.
    assert_eq!(*seen.lock(), vec![0, 6, 3, 4, 2, 5, 1]);
}

#[tokio::test(start_paused = true)]
async fn per_tenant_concurrency_limits() {
    let in_flight: Arc<Mutex<HashMap<String, (u32, u32)>>> = Arc::default();
    let track = in_flight.clone();
    let service = tower::service_fn(move |tenant: String| {
        let track = track.clone();
        async move {
            {
                let mut t = track.lock();
                let entry = t.entry(tenant.clone()).or_default();
                entry.0 += 1;
                entry.1 = entry.1.max(entry.0);
            }
            sleep(Duration::from_millis(10)).await;
            track.lock().get_mut(&tenant).expect("counted").0 -= 1;
            Ok::<_, Infallible>(())
        }
    });
    let config = SchedulerConfig::new("t")
        .concurrency(
            ConcurrencyConfig::default()
                .max_in_flight(16)
                .max_in_flight_per_tenant(2),
        )
        .tenant("big", TenantConfig::default().max_in_flight(5));
    let scheduler = Scheduler::new(config, service).unwrap();
    let handles: Vec<_> = ["small", "big", "other"]
        .iter()
        .flat_map(|t| (0..30).map(move |_| *t))
        .map(|t| tokio::spawn(scheduler.submit(Ticket::new(t), t.to_owned())))
        .collect();
    for handle in handles {
        handle.await.unwrap().unwrap();
    }
    let peaks = in_flight.lock().clone();
    assert_eq!(peaks["small"].1, 2);
    assert_eq!(peaks["other"].1, 2);
    assert_eq!(peaks["big"].1, 5);
}

#[tokio::test(start_paused = true)]
async fn adaptive_limit_follows_latency() {
    let latency = Arc::new(Mutex::new(Duration::from_millis(10)));
    let current = latency.clone();
    let service = tower::service_fn(move |_: u32| {
        let wait = *current.lock();
        async move {
            sleep(wait).await;
            Ok::<_, Infallible>(())
        }
    });
    let aimd = AimdConfig::new(Duration::from_millis(50)).limits(4, 2, 32);
    let config = SchedulerConfig::new("t")
        .max_queued(100_000)
        .max_queued_per_tenant(100_000)
        .shedding(SheddingConfig::disabled())
        .concurrency(ConcurrencyConfig::default().adaptive(aimd));
    let scheduler = Scheduler::new(config, service).unwrap();
    // Keep 64 requests outstanding for `period`, then report the limit.
    let drive = |period: Duration| {
        let scheduler = scheduler.clone();
        async move {
            let stop = Instant::now() + period;
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let scheduler = scheduler.clone();
                    tokio::spawn(async move {
                        while Instant::now() < stop {
                            scheduler.submit(Ticket::new("a"), 0).await.unwrap();
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
            scheduler.stats().concurrency_limit
        }
    };
    let fast = drive(Duration::from_secs(5)).await;
    assert!(fast >= 24, "fast service: the limit grew to {fast}");
    *latency.lock() = Duration::from_millis(200);
    let slow = drive(Duration::from_secs(5)).await;
    assert!(
        slow <= fast / 2,
        "slow service: the limit fell from {fast} to {slow}"
    );
    *latency.lock() = Duration::from_millis(10);
    let recovered = drive(Duration::from_secs(10)).await;
    assert!(
        recovered >= 24,
        "fast again: the limit recovered to {recovered}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_service_closes_the_scheduler() {
    #[derive(Clone)]
    struct Broken;
    impl Service<u32> for Broken {
        type Response = u32;
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<u32, std::io::Error>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), std::io::Error>> {
            std::task::Poll::Ready(Err(std::io::Error::other("model crashed")))
        }
        fn call(&mut self, id: u32) -> Self::Future {
            std::future::ready(Ok(id))
        }
    }
    let scheduler = Scheduler::new(SchedulerConfig::new("t"), Broken).unwrap();
    let err = scheduler.submit(Ticket::new("a"), 1).await.unwrap_err();
    assert!(matches!(err, SchedulerError::Closed { .. }), "{err:?}");
    assert!(err.to_string().contains("model crashed"), "{err}");
    assert!(!err.is_retryable());
    let again = scheduler.submit(Ticket::new("a"), 2).await.unwrap_err();
    assert!(matches!(again, SchedulerError::Closed { .. }));
}

/// A request for the layer: the tenant in a header, `n` in the body.
fn http(tenant: &str, n: u32) -> http::Request<u32> {
    http::Request::builder()
        .header("x-tenant", tenant)
        .body(n)
        .unwrap()
}

fn tenant_of(request: &http::Request<u32>) -> Ticket {
    Ticket::new(
        request
            .headers()
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("anonymous"),
    )
}

#[tokio::test(start_paused = true)]
async fn the_layer_passes_inner_errors_through_and_boxes_its_own() {
    let layer = AdmissionLayer::new(
        SchedulerConfig::new("t")
            .max_queued_per_tenant(1)
            .concurrency(ConcurrencyConfig::default().max_in_flight(1)),
        tenant_of,
    )
    .unwrap();
    let mut service =
        ServiceBuilder::new()
            .layer(layer)
            .service_fn(|request: http::Request<u32>| async move {
                sleep(Duration::from_millis(10)).await;
                let n = *request.body();
                if n == 0 {
                    Err(std::io::Error::other("zero"))
                } else {
                    Ok(n)
                }
            });
    let inner = service
        .ready()
        .await
        .unwrap()
        .call(http("a", 0))
        .await
        .unwrap_err();
    assert!(inner.downcast_ref::<std::io::Error>().is_some(), "{inner}");
    // Response futures are lazy: spawn them so they queue.
    let busy = tokio::spawn(service.ready().await.unwrap().call(http("a", 1)));
    sleep(Duration::from_millis(1)).await;
    let waiting = tokio::spawn(service.ready().await.unwrap().call(http("a", 2)));
    sleep(Duration::from_millis(1)).await;
    let full = service
        .ready()
        .await
        .unwrap()
        .call(http("a", 3))
        .await
        .unwrap_err();
    let full = full
        .downcast_ref::<SchedulerError>()
        .expect("an admission error");
    assert_eq!(full.rejection(), Some(&Rejection::QueueFull));
    assert_eq!(busy.await.unwrap().unwrap(), 1);
    assert_eq!(waiting.await.unwrap().unwrap(), 2);
}

/// What the inner service saw of each request: its body and its deadline.
type SeenDeadlines = Arc<Mutex<Vec<(u32, Option<Deadline>)>>>;

/// Behind one busy slot (request 0 holds it for `busy`), every other
/// request waits in the admission queue.
fn busy_slot(
    config: SchedulerConfig,
    busy: Duration,
) -> (
    impl Service<http::Request<u32>, Response = u32, Error = tower::BoxError, Future: Send>
    + Clone
    + Send
    + 'static,
    SeenDeadlines,
) {
    let seen: SeenDeadlines = Arc::default();
    let log = seen.clone();
    let layer = AdmissionLayer::new(
        config.concurrency(ConcurrencyConfig::default().max_in_flight(1)),
        tenant_of,
    )
    .unwrap();
    let service =
        ServiceBuilder::new()
            .layer(layer)
            .service_fn(move |request: http::Request<u32>| {
                let n = *request.body();
                log.lock().push((n, Deadline::of(&request)));
                async move {
                    if n == 0 {
                        sleep(busy).await;
                    }
                    Ok::<_, Infallible>(n)
                }
            });
    (service, seen)
}

#[tokio::test(start_paused = true)]
async fn a_carried_deadline_expires_the_request_while_it_waits() {
    let (service, seen) = busy_slot(SchedulerConfig::new("carried"), Duration::from_secs(10));
    let busy = tokio::spawn(service.clone().oneshot(http("a", 0)));
    sleep(Duration::from_millis(1)).await;
    let start = Instant::now();
    let mut request = http("a", 1);
    Deadline::after(Duration::from_millis(50)).apply(&mut request);
    let err = service.clone().oneshot(request).await.unwrap_err();
    let waited = start.elapsed();
    let err = err
        .downcast_ref::<SchedulerError>()
        .expect("an admission error");
    assert!(
        matches!(err, SchedulerError::DeadlineExceeded { .. }),
        "{err:?}"
    );
    assert_eq!(keel_core::KeelError::kind(err), ErrorKind::DeadlineExceeded);
    assert!(
        waited >= Duration::from_millis(50) && waited <= Duration::from_millis(55),
        "expired after {waited:?}"
    );
    assert_eq!(
        seen.lock().iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [0],
        "the expired request never reached the service"
    );
    assert_eq!(busy.await.unwrap().unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_service_gets_the_deadline_admission_enforced() {
    let (service, seen) = busy_slot(SchedulerConfig::new("passed"), Duration::from_millis(30));
    let busy = tokio::spawn(service.clone().oneshot(http("a", 0)));
    sleep(Duration::from_millis(1)).await;
    let mut request = http("a", 1);
    let deadline = Deadline::after(Duration::from_millis(500)).apply(&mut request);
    assert_eq!(service.clone().oneshot(request).await.unwrap(), 1);
    assert_eq!(busy.await.unwrap().unwrap(), 0);
    let seen = seen.lock().clone();
    assert_eq!(
        seen[1],
        (1, Some(deadline)),
        "the same instant, not a new one"
    );
}

#[tokio::test(start_paused = true)]
async fn the_scheduler_timeout_counts_from_submit() {
    // A 100 ms timeout of the scheduler's own, and a request that waits
    // 30 ms in the queue: the service sees submit + 100 ms, not
    // dispatch + 100 ms (the trap of a deadline layer under admission).
    let config = SchedulerConfig::new("timeout").request_timeout(Duration::from_millis(100));
    let (service, seen) = busy_slot(config, Duration::from_millis(30));
    let busy = tokio::spawn(service.clone().oneshot(http("a", 0)));
    sleep(Duration::from_millis(1)).await;
    let submitted = Instant::now();
    assert_eq!(service.clone().oneshot(http("a", 1)).await.unwrap(), 1);
    assert_eq!(busy.await.unwrap().unwrap(), 0);
    let (n, deadline) = seen.lock()[1];
    assert_eq!(n, 1);
    assert_eq!(
        deadline.expect("the scheduler set its deadline").instant(),
        submitted + Duration::from_millis(100)
    );
    // A tighter deadline the request carries wins over the timeout.
    let mut tight = http("a", 2);
    let carried = Deadline::after(Duration::from_millis(20)).apply(&mut tight);
    assert_eq!(service.clone().oneshot(tight).await.unwrap(), 2);
    assert_eq!(seen.lock()[2], (2, Some(carried)));
}

#[tokio::test(start_paused = true)]
async fn with_only_a_timeout_a_waiting_request_expires_at_submit_plus_timeout() {
    let config = SchedulerConfig::new("timeout-expiry").request_timeout(Duration::from_millis(50));
    let (service, _seen) = busy_slot(config, Duration::from_secs(10));
    let _busy = tokio::spawn(service.clone().oneshot(http("a", 0)));
    sleep(Duration::from_millis(1)).await;
    let start = Instant::now();
    let err = service.clone().oneshot(http("a", 1)).await.unwrap_err();
    assert_eq!(
        keel_core::kind_of(err.as_ref()),
        ErrorKind::DeadlineExceeded
    );
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(50) && waited <= Duration::from_millis(55),
        "expired after {waited:?}"
    );
}

#[test]
fn futures_and_handles_are_send_and_sync() {
    fn send<T: Send>(_: &T) {}
    fn send_sync<T: Send + Sync>() {}
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let (service, _) = recording(Duration::ZERO);
        let scheduler: Scheduler<u32, u32> =
            Scheduler::new(SchedulerConfig::new("t"), service).unwrap();
        send(&scheduler.submit(Ticket::new("a"), 1));
    });
    send_sync::<Scheduler<u32, u32>>();
    send_sync::<SchedulerError>();
    send_sync::<keel_scheduler::Admission<u32, u32>>();
    send_sync::<keel_scheduler::Batcher<u32, u32>>();
    send_sync::<keel_scheduler::WorkerHandle>();
    fn send_only<T: Send>() {}
    send_only::<keel_scheduler::AdmissionFuture<u32>>();
    send_only::<keel_scheduler::BatchFuture<u32>>();
}

#[tokio::test(start_paused = true)]
async fn a_busy_inner_service_does_not_let_queued_requests_jump_the_order() {
    // No in-flight limit in the scheduler: the inner service's own
    // concurrency limit is the only backpressure (through `poll_ready`).
    let (inner, seen) = recording(Duration::from_millis(10));
    let service = ServiceBuilder::new().concurrency_limit(1).service(inner);
    let config = SchedulerConfig::new("t").classes(vec![ClassConfig::default(); 3]);
    let scheduler = Scheduler::new(config, service).unwrap();
    let mut calls: Vec<_> = (0..20)
        .map(|id| tokio::spawn(scheduler.submit(Ticket::new("bulk").priority(Priority::LOW), id)))
        .collect();
    sleep(Duration::from_millis(1)).await;
    calls.push(tokio::spawn(
        scheduler.submit(Ticket::new("urgent").priority(Priority::HIGH), 100),
    ));
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let seen = seen.lock().clone();
    let at = seen.iter().position(|&id| id == 100).unwrap();
    assert_eq!(
        at, 1,
        "the urgent request went right after the one in flight: {seen:?}"
    );
}
