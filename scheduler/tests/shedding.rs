//! Offered load at 3× capacity: high priority keeps its queueing delay under
//! the shedding target while low priority is shed with `retry_after`.
//! Paused time; the service has 4 slots of 10 ms (400 requests/s).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use keel_scheduler::{
    ConcurrencyConfig, Priority, Rejection, Scheduler, SchedulerConfig, SchedulerError,
    SheddingConfig, Ticket,
};
use parking_lot::Mutex;
use tokio::time::{Instant, sleep, sleep_until};

const SLOTS: usize = 4;
const SERVICE_TIME: Duration = Duration::from_millis(10);
const CAPACITY: f64 = 400.0;
const TARGET: Duration = Duration::from_millis(20);
const INTERVAL: Duration = Duration::from_millis(100);
const RUN: Duration = Duration::from_secs(5);

/// A request: its priority and when it was submitted.
#[derive(Clone, Copy)]
struct Req {
    high: bool,
    submitted: Instant,
}

/// Queueing delays seen by the service: (high priority?, delay).
type Delays = Arc<Mutex<Vec<(bool, Duration)>>>;

#[derive(Default, Debug)]
struct Tally {
    completed: u64,
    overloaded: u64,
    retry_afters: Vec<Duration>,
    queue_full: u64,
    expired: u64,
}

async fn offer(scheduler: Scheduler<Req, ()>, high: bool, rate: f64, start: Instant) -> Tally {
    let every = Duration::from_secs_f64(1.0 / rate);
    let count = (RUN.as_secs_f64() * rate) as u32;
    let priority = if high { Priority::HIGH } else { Priority::LOW };
    let mut calls = Vec::new();
    for n in 0..count {
        sleep_until(start + every * n).await;
        let req = Req {
            high,
            submitted: Instant::now(),
        };
        calls.push(tokio::spawn(scheduler.submit(
            Ticket::new(if high { "h" } else { "l" }).priority(priority),
            req,
        )));
    }
    let mut tally = Tally::default();
    for call in calls {
        match call.await.unwrap() {
            Ok(()) => tally.completed += 1,
            Err(SchedulerError::Rejected(Rejection::Overloaded { retry_after })) => {
                tally.overloaded += 1;
                tally.retry_afters.push(retry_after);
            }
            Err(SchedulerError::Rejected(Rejection::QueueFull)) => tally.queue_full += 1,
            Err(SchedulerError::DeadlineExceeded { .. }) => tally.expired += 1,
            Err(other) => panic!("unexpected outcome {other:?}"),
        }
    }
    tally
}

fn p99(mut xs: Vec<Duration>) -> Duration {
    xs.sort_unstable();
    xs[(xs.len() * 99).div_ceil(100).saturating_sub(1)]
}

#[tokio::test(start_paused = true)]
async fn high_priority_stays_fast_while_low_priority_is_shed() {
    let delays: Delays = Arc::default();
    let seen = delays.clone();
    let service = tower::service_fn(move |req: Req| {
        seen.lock().push((req.high, req.submitted.elapsed()));
        async move {
            sleep(SERVICE_TIME).await;
            Ok::<_, Infallible>(())
        }
    });
    let config = SchedulerConfig::new("shed")
        .concurrency(ConcurrencyConfig::default().max_in_flight(SLOTS))
        .shedding(SheddingConfig::new(TARGET, INTERVAL))
        .max_queued_per_tenant(5_000);
    let scheduler = Scheduler::new(config, service).unwrap();
    let start = Instant::now();
    // High: half the capacity. Low: 2.5× capacity. Together 3×.
    let high = tokio::spawn(offer(scheduler.clone(), true, CAPACITY * 0.5, start));
    let low = tokio::spawn(offer(scheduler.clone(), false, CAPACITY * 2.5, start));
    let (high, low) = (high.await.unwrap(), low.await.unwrap());
    let delays = delays.lock().clone();
    let high_delays: Vec<Duration> = delays.iter().filter(|d| d.0).map(|d| d.1).collect();
    let low_delays: Vec<Duration> = delays.iter().filter(|d| !d.0).map(|d| d.1).collect();
    let (high_p99, low_p99) = (p99(high_delays), p99(low_delays.clone()));
    println!(
        "high: {high:?} p99_queue_delay={high_p99:?}\nlow: completed={} overloaded={} queue_full={} expired={} p99_queue_delay={low_p99:?}",
        low.completed, low.overloaded, low.queue_full, low.expired
    );
    // Every high-priority request was served, fast.
    let offered_high = (RUN.as_secs_f64() * CAPACITY * 0.5) as u64;
    assert_eq!(high.completed, offered_high, "{high:?}");
    assert!(high_p99 < TARGET, "high p99 queueing delay {high_p99:?}");
    // Low priority was shed with a retry hint, not left waiting.
    assert!(low.overloaded > 0, "{low:?}");
    assert!(low.retry_afters.iter().all(|r| *r >= INTERVAL));
    assert_eq!(low.expired, 0, "shedding answers before deadlines do");
    // Shed requests waited at most about one interval beyond the target.
    let low_max = low_delays.iter().max().copied().unwrap_or_default();
    assert!(
        low_max <= TARGET + INTERVAL * 3,
        "a low request waited {low_max:?} before dispatch"
    );
    // The service stayed busy: low priority filled what high left over.
    let served = (high.completed + low.completed) as f64;
    assert!(
        served >= 0.9 * CAPACITY * RUN.as_secs_f64(),
        "served {served}"
    );
}
