//! Admission under real concurrency: many submitters on a multi-thread
//! runtime, racing the dispatcher with deadlines, cancellations, tenant
//! limits and a service that is sometimes not ready. Every request ends in
//! exactly one outcome, the service never sees a request twice or one that
//! was answered otherwise, and the lock-free bookkeeping (queue counts,
//! in-flight counts, per-tenant counts) comes back to zero.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use keel_scheduler::{
    ConcurrencyConfig, Priority, Rejection, Scheduler, SchedulerConfig, SchedulerError,
    SheddingConfig, Ticket,
};
use parking_lot::Mutex;
use tokio::time::sleep;
use tower::Service;

/// A service that is not ready every few polls (so the dispatcher puts
/// staged requests back), records what it sees, and answers after a
/// short, request-dependent wait.
#[derive(Clone)]
struct Flaky {
    polls: Arc<AtomicU64>,
    seen: Arc<Mutex<HashMap<u64, u32>>>,
    /// While set, the service is not ready (woken when released).
    held: Arc<Mutex<(bool, Option<std::task::Waker>)>>,
}

impl Flaky {
    fn hold(&self, held: bool) {
        let mut state = self.held.lock();
        state.0 = held;
        if !held && let Some(waker) = state.1.take() {
            waker.wake();
        }
    }
}

impl Service<u64> for Flaky {
    type Response = u64;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<u64, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        {
            let mut held = self.held.lock();
            if held.0 {
                held.1 = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        if self.polls.fetch_add(1, Ordering::Relaxed) % 7 == 3 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, id: u64) -> Self::Future {
        *self.seen.lock().entry(id).or_default() += 1;
        Box::pin(async move {
            if id.is_multiple_of(5) {
                sleep(Duration::from_micros(200 + id % 300)).await;
            } else {
                tokio::task::yield_now().await;
            }
            Ok(id)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum End {
    Completed,
    Rejected,
    Expired,
    GaveUp,
}

#[test]
fn many_submitters_and_cancellations_end_exactly_once() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let seen: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
        let service = Flaky {
            polls: Arc::default(),
            seen: seen.clone(),
            held: Arc::default(),
        };
        let switch = service.clone();
        let config = SchedulerConfig::new("stress")
            .max_queued(400)
            .max_queued_per_tenant(120)
            .shedding(SheddingConfig::disabled())
            .concurrency(
                ConcurrencyConfig::default()
                    .max_in_flight(16)
                    .max_in_flight_per_tenant(6),
            );
        let scheduler = Scheduler::new(config, service).unwrap();
        let next = Arc::new(AtomicU64::new(0));
        let ends: Arc<Mutex<HashMap<u64, End>>> = Arc::default();
        let submitters: Vec<_> = (0..48u64)
            .map(|s| {
                let (scheduler, next, ends) = (scheduler.clone(), next.clone(), ends.clone());
                tokio::spawn(async move {
                    for k in 0..250u64 {
                        let id = next.fetch_add(1, Ordering::Relaxed);
                        let mut ticket = Ticket::new(format!("t{}", s % 5))
                            .priority(Priority((k % 3) as u8))
                            .cost(1 + k % 4);
                        if k % 4 == 1 {
                            ticket = ticket.timeout(Duration::from_micros(50 + (id % 7) * 100));
                        }
                        let call = scheduler.submit(ticket, id);
                        let end = if k % 6 == 2 {
                            // Gives up after a moment: sometimes while
                            // queued, sometimes while dispatched.
                            tokio::select! {
                                r = call => Some(r),
                                () = sleep(Duration::from_micros(id % 400)) => None,
                            }
                        } else {
                            Some(call.await)
                        };
                        let end = match end {
                            None => End::GaveUp,
                            Some(Ok(answer)) => {
                                assert_eq!(answer, id, "answered with another request's response");
                                End::Completed
                            }
                            Some(Err(SchedulerError::Rejected(Rejection::QueueFull))) => {
                                End::Rejected
                            }
                            Some(Err(SchedulerError::DeadlineExceeded { .. })) => End::Expired,
                            Some(Err(other)) => panic!("unexpected outcome {other:?}"),
                        };
                        assert!(ends.lock().insert(id, end).is_none(), "{id} ended twice");
                    }
                })
            })
            .collect();
        for submitter in submitters {
            submitter.await.unwrap();
        }
        // Let dropped response futures and permits settle.
        tokio::time::timeout(Duration::from_secs(10), async {
            while scheduler.stats().in_flight > 0 || scheduler.stats().queued > 0 {
                sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the counts came back to zero");

        let ends = ends.lock().clone();
        let seen = seen.lock().clone();
        assert_eq!(ends.len(), 48 * 250);
        let mut tally: HashMap<End, usize> = HashMap::new();
        for (id, end) in &ends {
            *tally.entry(*end).or_default() += 1;
            let sent = seen.get(id).copied().unwrap_or(0);
            assert!(sent <= 1, "request {id} sent {sent} times");
            match end {
                End::Completed => assert_eq!(sent, 1, "{id} completed without being sent"),
                End::Rejected | End::Expired => {
                    assert_eq!(sent, 0, "{id} answered {end:?} yet sent")
                }
                End::GaveUp => {}
            }
        }
        eprintln!("outcomes: {tally:?}");
        assert!(
            tally.get(&End::Completed).copied().unwrap_or(0) > 1_000,
            "{tally:?}"
        );
        assert!(
            tally.get(&End::GaveUp).copied().unwrap_or(0) > 0,
            "{tally:?}"
        );

        // No count leaked: each tenant can fill its whole queue bound again.
        let stats = scheduler.stats();
        assert_eq!((stats.queued, stats.in_flight), (0, 0), "{stats:?}");
        switch.hold(true);
        for tenant in 0..5 {
            let waiting: Vec<_> = (0..120)
                .map(|i| {
                    let scheduler = scheduler.clone();
                    tokio::spawn(scheduler.submit(Ticket::new(format!("t{tenant}")), 1_000_000 + i))
                })
                .collect();
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while scheduler.stats().queued < 120 {
                    sleep(Duration::from_millis(1)).await;
                }
            })
            .await;
            assert_eq!(
                scheduler.stats().queued,
                120,
                "tenant t{tenant}'s count leaked"
            );
            switch.hold(false);
            for call in waiting {
                call.await
                    .unwrap()
                    .expect("room for the tenant's whole bound");
            }
            switch.hold(true);
        }
    });
}
