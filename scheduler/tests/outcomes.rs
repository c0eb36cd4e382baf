//! A property test over random request traces: every request ends in
//! exactly one outcome, expired requests never reach the service, and the
//! service never sees a request twice. Paused time.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use keel_scheduler::{
    ConcurrencyConfig, LocalRateLimiter, Priority, Rate, RateLimitConfig, SchedulerBuilder,
    SchedulerConfig, SchedulerError, SheddingConfig, TenantRates, Ticket,
};
use parking_lot::Mutex;
use proptest::prelude::*;
use tokio::time::{Instant, sleep, sleep_until};

#[derive(Debug, Clone)]
struct Arrival {
    /// Milliseconds after the previous arrival.
    gap: u64,
    tenant: u8,
    priority: u8,
    /// Deadline in ms from arrival, if any.
    deadline: Option<u64>,
    /// The submitter gives up after this many ms, if at all.
    give_up: Option<u64>,
    /// How long the service takes for it, in ms.
    latency: u64,
    cost: u64,
}

fn arrival() -> impl Strategy<Value = Arrival> {
    (
        0..5u64,
        0..4u8,
        0..3u8,
        proptest::option::of(1..200u64),
        proptest::option::weighted(0.2, 0..100u64),
        1..30u64,
        1..20u64,
    )
        .prop_map(
            |(gap, tenant, priority, deadline, give_up, latency, cost)| Arrival {
                gap,
                tenant,
                priority,
                deadline,
                give_up,
                latency,
                cost,
            },
        )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Completed,
    Rejected,
    Expired,
    GaveUp,
}

fn run_trace(
    trace: Vec<Arrival>,
    max_in_flight: usize,
    max_queued: usize,
) -> Result<(), TestCaseError> {
    keel_testkit::paused_runtime().block_on(async move {
        // id → times dispatched
        let seen: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
        // id → (deadline, latency)
        let specs_cell = Arc::new(Mutex::new(HashMap::<u32, (Option<Instant>, u64)>::new()));
        let (log, table) = (seen.clone(), specs_cell.clone());
        let violations = Arc::new(Mutex::new(Vec::<String>::new()));
        let bad = violations.clone();
        let service = tower::service_fn(move |id: u32| {
            let (deadline, latency) = table.lock()[&id];
            if deadline.is_some_and(|d| d <= Instant::now()) {
                bad.lock()
                    .push(format!("request {id} dispatched after its deadline"));
            }
            *log.lock().entry(id).or_default() += 1;
            async move {
                sleep(Duration::from_millis(latency)).await;
                Ok::<_, Infallible>(id)
            }
        });
        let limiter = LocalRateLimiter::new(RateLimitConfig::new("p").tenant(
            "t0",
            TenantRates::default().requests(Rate::per_second(200).burst(5)),
        ))
        .unwrap();
        let config = SchedulerConfig::new("p")
            .max_queued(max_queued)
            .max_queued_per_tenant(max_queued.div_ceil(2))
            .max_queue_time(Duration::from_millis(300))
            .shedding(SheddingConfig::new(
                Duration::from_millis(40),
                Duration::from_millis(50),
            ))
            .concurrency(
                ConcurrencyConfig::default()
                    .max_in_flight(max_in_flight)
                    .max_in_flight_per_tenant(2),
            );
        let scheduler = SchedulerBuilder::new(config)
            .rate_limit(limiter)
            .build(service)
            .unwrap();

        let mut tasks = Vec::new();
        for (id, a) in trace.into_iter().enumerate() {
            let id = id as u32;
            sleep(Duration::from_millis(a.gap)).await;
            let now = Instant::now();
            let deadline = a.deadline.map(|d| now + Duration::from_millis(d));
            specs_cell.lock().insert(id, (deadline, a.latency));
            let mut ticket = Ticket::new(format!("t{}", a.tenant))
                .priority(Priority(a.priority))
                .cost(a.cost);
            if let Some(d) = deadline {
                ticket = ticket.deadline(d);
            }
            let call = scheduler.submit(ticket, id);
            let give_up = a.give_up.map(|g| now + Duration::from_millis(g));
            tasks.push(tokio::spawn(async move {
                let outcome = match give_up {
                    Some(at) => tokio::select! {
                        r = call => Some(r),
                        () = sleep_until(at) => None,
                    },
                    None => Some(call.await),
                };
                let end = match outcome {
                    None => End::GaveUp,
                    Some(Ok(answer)) => {
                        assert_eq!(answer, id, "answered with another request's response");
                        End::Completed
                    }
                    Some(Err(SchedulerError::Rejected(_))) => End::Rejected,
                    Some(Err(SchedulerError::DeadlineExceeded { .. })) => End::Expired,
                    Some(Err(other)) => panic!("unexpected outcome {other:?}"),
                };
                (id, end)
            }));
        }
        let mut ends = HashMap::new();
        for task in tasks {
            let (id, end) = task.await.unwrap();
            prop_assert!(
                ends.insert(id, end).is_none(),
                "request {} answered twice",
                id
            );
        }
        // Let everything settle, then check the books.
        sleep(Duration::from_secs(1)).await;
        let seen = seen.lock().clone();
        let violations = violations.lock().clone();
        prop_assert!(violations.is_empty(), "{:?}", violations);
        for (id, end) in &ends {
            let dispatched = seen.get(id).copied().unwrap_or(0);
            prop_assert!(
                dispatched <= 1,
                "request {} dispatched {} times",
                id,
                dispatched
            );
            match end {
                End::Completed => {
                    prop_assert_eq!(dispatched, 1, "completed {} without dispatch", id)
                }
                End::Rejected | End::Expired => {
                    prop_assert_eq!(
                        dispatched,
                        0,
                        "request {} answered {:?} yet dispatched",
                        id,
                        end
                    )
                }
                End::GaveUp => {}
            }
        }
        if std::env::var_os("KEEL_TRACE_OUTCOMES").is_some() {
            let mut counts: HashMap<String, usize> = HashMap::new();
            for end in ends.values() {
                *counts.entry(format!("{end:?}")).or_default() += 1;
            }
            eprintln!("{counts:?}");
        }
        let stats = scheduler.stats();
        prop_assert_eq!(stats.queued, 0);
        prop_assert_eq!(stats.in_flight, 0);
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn every_request_ends_exactly_once(
        trace in proptest::collection::vec(arrival(), 1..120),
        max_in_flight in 1..4usize,
        max_queued in 1..40usize,
    ) {
        run_trace(trace, max_in_flight, max_queued)?;
    }
}
