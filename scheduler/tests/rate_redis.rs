//! The Redis-shared GCRA limit holds across two scheduler instances, and a
//! limiter whose Redis is gone fails open or closed as configured. Real
//! Redis (the shared test server, and one of the test's own to kill).
#![cfg(feature = "redis")]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use keel_scheduler::{
    Rate, RateDecision, RateLimit, RateLimitConfig, RedisRateLimitConfig, RedisRateLimiter,
    Rejection, Scheduler, SchedulerBuilder, SchedulerConfig, SchedulerError, TenantId, TenantRates,
    Ticket,
};
use keel_testkit::{Namespace, RedisServer, require_redis};
use tokio::time::{Instant, timeout};

const RATE: u32 = 200;
const BURST: u32 = 20;
const RUN: Duration = Duration::from_secs(2);

async fn instance(url: &str, name: &str) -> Scheduler<(), ()> {
    let limits = RateLimitConfig::new(name)
        .default_rates(TenantRates::default().requests(Rate::per_second(RATE).burst(BURST)));
    let limiter = RedisRateLimiter::connect(RedisRateLimitConfig::new(url, limits))
        .await
        .expect("connect the limiter");
    let noop = tower::service_fn(|()| async { Ok::<_, Infallible>(()) });
    SchedulerBuilder::new(SchedulerConfig::new(name))
        .rate_limit(limiter)
        .build(noop)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_limit_holds_across_two_instances() {
    timeout(Duration::from_secs(20), async {
        let url = require_redis().await;
        let ns = Namespace::new("shared_limit_two_instances").with_redis_cleanup(url.clone());
        let (a, b) = (instance(&url, ns.prefix()).await, instance(&url, ns.prefix()).await);
        let start = Instant::now();
        let stop = start + RUN;
        // Eight callers per instance, as fast as they can, for one tenant.
        let callers: Vec<_> = [a, b]
            .into_iter()
            .flat_map(|s| (0..8).map(move |_| s.clone()))
            .map(|scheduler| {
                tokio::spawn(async move {
                    let tenant = TenantId::new("tenant");
                    let (mut allowed, mut limited) = (0u64, 0u64);
                    while Instant::now() < stop {
                        match scheduler.submit(Ticket::new(&tenant), ()).await {
                            Ok(()) => allowed += 1,
                            Err(SchedulerError::Rejected(Rejection::RateLimited { retry_after })) => {
                                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_millis(6));
                                limited += 1;
                            }
                            Err(other) => panic!("unexpected {other:?}"),
                        }
                    }
                    (allowed, limited)
                })
            })
            .collect();
        let (mut allowed, mut limited) = (0, 0);
        for caller in callers {
            let (a, l) = caller.await.unwrap();
            allowed += a;
            limited += l;
        }
        let elapsed = start.elapsed();
        let expected = f64::from(BURST) + f64::from(RATE) * elapsed.as_secs_f64();
        let off = (allowed as f64 - expected).abs() / expected;
        println!(
            "instances=2 allowed={allowed} limited={limited} expected={expected:.0} elapsed={elapsed:?} off={:.2}%",
            off * 100.0
        );
        assert!(limited > allowed, "the callers offered far more than the limit");
        assert!(off <= 0.05, "allowed {allowed}, expected {expected:.0} ({:.1}% off)", off * 100.0);
    })
    .await
    .expect("the test took too long");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_fails_open_or_closed_as_configured() {
    timeout(Duration::from_secs(20), async {
        let mut server = RedisServer::start().await.expect("start redis-server");
        let limits = RateLimitConfig::new("outage")
            .default_rates(TenantRates::default().requests(Rate::per_second(1).burst(1)));
        let open =
            RedisRateLimiter::connect(RedisRateLimitConfig::new(server.url(), limits.clone()))
                .await
                .unwrap();
        let closed = Arc::new(
            RedisRateLimiter::connect(
                RedisRateLimitConfig::new(server.url(), limits).fail_open(false),
            )
            .await
            .unwrap(),
        );
        let tenant = TenantId::new("t");
        assert_eq!(open.acquire(&tenant, 1).await.unwrap(), RateDecision::Allow);
        assert!(matches!(
            open.acquire(&tenant, 1).await.unwrap(),
            RateDecision::Limited { .. }
        ));
        server.kill();
        let started = Instant::now();
        assert_eq!(
            open.acquire(&tenant, 1).await.unwrap(),
            RateDecision::Allow,
            "fails open"
        );
        let err = closed.acquire(&tenant, 1).await.unwrap_err();
        assert!(matches!(err, SchedulerError::RateLimiter { .. }), "{err:?}");
        assert!(err.is_retryable());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "failures are bounded by the timeout"
        );
        // Back: the state was lost with the server, so the tenant starts fresh.
        server.restart().await.expect("restart");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match closed.acquire(&tenant, 1).await {
                Ok(decision) => {
                    assert_eq!(decision, RateDecision::Allow);
                    break;
                }
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(err) => panic!("the limiter did not reconnect: {err}"),
            }
        }
    })
    .await
    .expect("the test took too long");
}

/// One `RedisPool` for the whole process: a queue and a rate limiter built
/// over the same pool both work against the real server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_and_a_limiter_share_one_pool() {
    use keel_core::redis::{RedisConfig, RedisPool};
    use keel_queue::{Job, Queue, QueueConfig, RedisQueue, RedisQueueConfig};

    timeout(Duration::from_secs(20), async {
        let url = require_redis().await;
        let ns = Namespace::new("queue_and_limiter_share_a_pool").with_redis_cleanup(url.clone());
        let pool = RedisPool::connect(RedisConfig::new(url.clone()).pool_size(4))
            .await
            .expect("connect the pool");
        let queue = RedisQueue::with_pool(
            pool.clone(),
            RedisQueueConfig::with_redis(
                pool.config().clone(),
                QueueConfig::new(ns.name("jobs")).capacity(100),
            ),
        )
        .await
        .expect("a queue over the shared pool");
        let limits = RateLimitConfig::new(ns.name("limits"))
            .default_rates(TenantRates::default().requests(Rate::per_minute(2).burst(2)));
        let limiter = RedisRateLimiter::with_pool(
            pool.clone(),
            RedisRateLimitConfig::with_redis(pool.config().clone(), limits).fail_open(false),
        )
        .expect("a limiter over the shared pool");

        // Interleave both, so they really share the connections.
        let tenant = TenantId::new("t");
        queue.enqueue(Job::new("one")).await.unwrap();
        assert_eq!(
            limiter.acquire(&tenant, 1).await.unwrap(),
            RateDecision::Allow
        );
        queue.enqueue(Job::new("two")).await.unwrap();
        assert_eq!(
            limiter.acquire(&tenant, 1).await.unwrap(),
            RateDecision::Allow
        );
        assert!(matches!(
            limiter.acquire(&tenant, 1).await.unwrap(),
            RateDecision::Limited { .. }
        ));
        let mut got = Vec::new();
        while got.len() < 2 {
            let batch = queue
                .dequeue(keel_queue::DequeueOptions::new(2).wait(Duration::from_secs(1)))
                .await
                .unwrap();
            assert!(!batch.is_empty(), "both jobs are ready");
            got.extend(batch);
        }
        let mut payloads: Vec<_> = got.iter().map(|d| d.payload.clone()).collect();
        payloads.sort();
        assert_eq!(payloads, ["one", "two"]);
        queue
            .ack_batch(&got.iter().map(|d| d.receipt.clone()).collect::<Vec<_>>())
            .await
            .unwrap();
        assert_eq!(queue.stats().await.unwrap().ready, 0);
        // The limiter kept its keys in the namespace too (cleaned up on drop).
        assert_eq!(limiter.config().redis, *pool.config());
    })
    .await
    .expect("the test took too long");
}

/// Two limiters (two gateway replicas) share one tenant's token budget:
/// a reservation is settled to the real cost, refunds and overdrafts
/// exactly, whichever replica charged it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlements_are_exact_across_replicas() {
    timeout(Duration::from_secs(20), async {
        let url = require_redis().await;
        let ns = Namespace::new("settle_across_replicas").with_redis_cleanup(url.clone());
        let limits = RateLimitConfig::new(ns.prefix()).default_rates(
            // 6,000 tokens a minute: one token per 10 ms, a bucket of 1,000.
            TenantRates::default().cost(Rate::per_minute(6_000).burst(1_000)),
        );
        let replica = || async {
            RedisRateLimiter::connect(RedisRateLimitConfig::new(url.clone(), limits.clone()))
                .await
                .expect("connect the limiter")
        };
        let (a, b) = (replica().await, replica().await);
        let tenant = TenantId::new("acme");
        assert_eq!(a.acquire(&tenant, 600).await.unwrap(), RateDecision::Allow);
        assert!(
            matches!(
                b.acquire(&tenant, 600).await.unwrap(),
                RateDecision::Limited { .. }
            ),
            "400 left for B"
        );
        // A's request used 100 of its 600: 500 come back, B fits now.
        a.settle(&tenant, 600, 100).await.unwrap();
        assert_eq!(b.acquire(&tenant, 600).await.unwrap(), RateDecision::Allow);
        // B's answer used 1,000 (an overdraft of 400): 100 + 1,000 used of
        // a 1,000 bucket leaves it 100 past empty, so a charge of 10 waits
        // for 110 tokens' worth (1.1 s).
        b.settle(&tenant, 600, 1_000).await.unwrap();
        match a.acquire(&tenant, 10).await.unwrap() {
            RateDecision::Limited { retry_after } => assert!(
                retry_after > Duration::from_millis(1_000)
                    && retry_after <= Duration::from_millis(1_150),
                "{retry_after:?}"
            ),
            RateDecision::Allow => panic!("the overdraft must be paid off first"),
        }
    })
    .await
    .expect("bounded in time");
}
