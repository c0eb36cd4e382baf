//! Tenant fairness under overload: a greedy tenant cannot starve others,
//! and weighted tenants get their weights. Paused time, a service with a
//! fixed capacity (4 slots × 10 ms = 400 requests/s).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use keel_scheduler::{
    ConcurrencyConfig, Scheduler, SchedulerConfig, SheddingConfig, TenantConfig, TenantId, Ticket,
};
use parking_lot::Mutex;
use tokio::time::{Instant, sleep, sleep_until};

const SLOTS: usize = 4;
const SERVICE_TIME: Duration = Duration::from_millis(10);
/// Requests per second the service can serve.
const CAPACITY: f64 = SLOTS as f64 / 0.010;
const RUN: Duration = Duration::from_secs(6);
/// Served shares are counted from here on (queues are full by then).
const WARM_UP: Duration = Duration::from_secs(1);

/// Completions per tenant inside the measuring window.
type Served = Arc<Mutex<HashMap<String, u64>>>;

fn scheduler(config: SchedulerConfig, served: Served, start: Instant) -> Scheduler<String, ()> {
    let service = tower::service_fn(move |tenant: String| {
        let served = served.clone();
        async move {
            sleep(SERVICE_TIME).await;
            let now = Instant::now();
            if now >= start + WARM_UP && now < start + RUN {
                *served.lock().entry(tenant).or_default() += 1;
            }
            Ok::<_, Infallible>(())
        }
    });
    let config = config
        .concurrency(ConcurrencyConfig::default().max_in_flight(SLOTS))
        .max_queued(100_000)
        .max_queued_per_tenant(2_000)
        .max_queue_time(Duration::from_secs(60))
        .shedding(SheddingConfig::disabled());
    Scheduler::new(config, service).unwrap()
}

/// Offers `rate` requests per second for `tenant` until the run ends.
/// Answers (completed, rejected) counts.
async fn offer(
    scheduler: Scheduler<String, ()>,
    tenant: &'static str,
    rate: f64,
    start: Instant,
) -> (u64, u64) {
    let id = TenantId::new(tenant);
    let every = Duration::from_secs_f64(1.0 / rate);
    let count = (RUN.as_secs_f64() * rate) as u32;
    let mut calls = Vec::with_capacity(count as usize);
    for n in 0..count {
        sleep_until(start + every * n).await;
        calls.push(tokio::spawn(
            scheduler.submit(Ticket::new(&id), tenant.to_owned()),
        ));
    }
    let (mut ok, mut refused) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(()) => ok += 1,
            Err(err) => {
                assert!(
                    err.rejection().is_some()
                        || matches!(err, keel_scheduler::SchedulerError::DeadlineExceeded { .. }),
                    "{err}"
                );
                refused += 1;
            }
        }
    }
    (ok, refused)
}

fn jain(xs: &[f64]) -> f64 {
    let sum: f64 = xs.iter().sum();
    let squares: f64 = xs.iter().map(|x| x * x).sum();
    sum * sum / (xs.len() as f64 * squares)
}

#[tokio::test(start_paused = true)]
async fn a_greedy_tenant_cannot_starve_the_others() {
    let start = Instant::now();
    let served: Served = Arc::default();
    let scheduler = scheduler(SchedulerConfig::new("fair"), served.clone(), start);
    let share = CAPACITY / 4.0;
    // `greedy` offers 10× its share; the others 1.5× (so all are backlogged).
    let tenants = [("greedy", 10.0), ("a", 1.5), ("b", 1.5), ("c", 1.5)];
    let runs: Vec<_> = tenants
        .iter()
        .map(|&(t, x)| tokio::spawn(offer(scheduler.clone(), t, share * x, start)))
        .collect();
    let mut refused = HashMap::new();
    for (run, (tenant, _)) in runs.into_iter().zip(tenants) {
        refused.insert(tenant, run.await.unwrap().1);
    }
    let served = served.lock().clone();
    let xs: Vec<f64> = tenants.iter().map(|(t, _)| served[*t] as f64).collect();
    let index = jain(&xs);
    println!("served={served:?} refused={refused:?} jain={index:.4}");
    assert!(index >= 0.95, "Jain's index {index:.4} for {served:?}");
    assert!(
        refused["greedy"] > 0,
        "the greedy tenant hit its queue bound"
    );
    // Capacity was used: nobody idles while others wait.
    let total: f64 = xs.iter().sum();
    let window = (RUN - WARM_UP).as_secs_f64();
    assert!(
        total >= 0.95 * CAPACITY * window,
        "served {total} in {window} s"
    );
}

#[tokio::test(start_paused = true)]
async fn weighted_tenants_get_their_weights() {
    let start = Instant::now();
    let served: Served = Arc::default();
    let weights = [("w1", 1u32), ("w2", 2), ("w3", 3), ("w4", 4)];
    let config = weights
        .iter()
        .fold(SchedulerConfig::new("weighted"), |c, (t, w)| {
            c.tenant(*t, TenantConfig::default().weight(*w))
        });
    let scheduler = scheduler(config, served.clone(), start);
    // Everyone offers the whole capacity: all stay backlogged.
    let runs: Vec<_> = weights
        .iter()
        .map(|&(t, _)| tokio::spawn(offer(scheduler.clone(), t, CAPACITY, start)))
        .collect();
    for run in runs {
        run.await.unwrap();
    }
    let served = served.lock().clone();
    let total: u64 = served.values().sum();
    let weight_sum: u32 = weights.iter().map(|(_, w)| w).sum();
    println!("served={served:?}");
    for (tenant, weight) in weights {
        let share = served[tenant] as f64 / total as f64;
        let expected = f64::from(weight) / f64::from(weight_sum);
        let off = (share - expected).abs() / expected;
        assert!(
            off <= 0.05,
            "{tenant}: share {share:.4}, weight share {expected:.4} ({:.1}% off)",
            off * 100.0
        );
    }
}
