//! The retry, hedge and deadline layers stacked on a balancer.

mod support;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keel_balancer::hedge::{HedgeConfig, HedgeLayer};
use keel_balancer::retry::{BudgetConfig, RetryConfig, RetryLayer};
use keel_balancer::{Balancer, BalancerError, DeadlineLayer, GiveUp, Policy};
use support::{Behavior, Node, classify, nodes, request};
use tokio::time::Instant;
use tower::discover::ServiceList;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

type Classifier = fn(&Result<usize, support::NodeError>) -> keel_balancer::Outcome;
type TestBalancer = Balancer<usize, Node, Classifier>;

fn balancer(nodes: &[Node], policy: Policy) -> TestBalancer {
    Balancer::builder()
        .policy(policy)
        .classifier(classify as Classifier)
        .seed(11)
        .build(ServiceList::new(nodes.to_vec()))
        .unwrap()
}

fn generous() -> RetryConfig {
    RetryConfig::default()
        .max_attempts(3)
        .budget(BudgetConfig::default().ratio(1.0).floor(100))
}

#[tokio::test(start_paused = true)]
async fn retries_never_go_back_to_the_endpoint_that_failed() {
    let (nodes, log) = nodes(3, Behavior::Fail(Duration::from_millis(5)));
    nodes[2].set(Behavior::Ok(Duration::from_millis(5)));
    let client = RetryLayer::with_seed(generous(), 1)
        .unwrap()
        .layer(balancer(&nodes, Policy::RoundRobin));
    for n in 0..30 {
        assert_eq!(client.clone().oneshot(request(n)).await.unwrap(), 2);
    }
    let mut per_request: HashMap<u64, Vec<usize>> = HashMap::new();
    for (node, n) in log.lock().iter() {
        per_request.entry(*n).or_default().push(*node);
    }
    assert_eq!(per_request.len(), 30);
    for (n, mut attempts) in per_request {
        let tries = attempts.len();
        attempts.sort_unstable();
        attempts.dedup();
        assert_eq!(
            attempts.len(),
            tries,
            "request {n} went back to a failed endpoint"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn busy_answers_are_retried_elsewhere_without_failing_the_endpoint() {
    let (nodes, _) = nodes(2, Behavior::Ok(Duration::from_millis(5)));
    nodes[0].set(Behavior::Busy);
    let b = balancer(&nodes, Policy::RoundRobin);
    let client = RetryLayer::with_seed(generous(), 2)
        .unwrap()
        .layer(b.clone());
    for n in 0..20 {
        assert_eq!(client.clone().oneshot(request(n)).await.unwrap(), 1);
    }
    let node0 = &b.endpoints()[0];
    assert!(node0.busy_responses >= 1);
    assert_eq!(node0.failed, 0);
}

#[tokio::test(start_paused = true)]
async fn the_budget_bounds_retries_when_everything_fails() {
    let (nodes, log) = nodes(3, Behavior::Fail(Duration::from_millis(1)));
    let config = RetryConfig::default()
        .max_attempts(3)
        .budget(BudgetConfig::default().ratio(0.1).floor(5));
    let layer = RetryLayer::with_seed(config, 3).unwrap();
    let client = layer.layer(balancer(&nodes, Policy::PeakEwma));
    let mut by_budget = 0;
    for n in 0..200 {
        match client.clone().oneshot(request(n)).await.unwrap_err() {
            BalancerError::RetriesExhausted { reason, source, .. } => {
                assert!(matches!(*source, BalancerError::Failed { .. }));
                if reason == GiveUp::Budget {
                    by_budget += 1;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    let attempts = log.lock().len();
    // 5 + ⌊0.1 × 200⌋ = 25 retries at most.
    assert!(attempts <= 225, "{attempts} attempts for 200 requests");
    assert!(attempts > 200, "the floor and ratio were used");
    assert!(by_budget > 150, "{by_budget} gave up on the budget");
    assert_eq!(layer.budget().stats().remaining, 0);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_retries_and_backoff() {
    let (nodes, log) = nodes(3, Behavior::Fail(Duration::from_millis(100)));
    let client = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_millis(250)))
        .layer(RetryLayer::with_seed(generous().max_attempts(10), 4).unwrap())
        .service(balancer(&nodes, Policy::RoundRobin));
    let started = Instant::now();
    let err = client.oneshot(request(1)).await.unwrap_err();
    assert!(
        matches!(
            err,
            BalancerError::DeadlineExceeded
                | BalancerError::RetriesExhausted {
                    reason: GiveUp::Deadline,
                    ..
                }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() <= Duration::from_millis(250));
    assert!(
        log.lock().len() <= 3,
        "no attempt starts after the deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hedge_goes_elsewhere_and_the_loser_is_cancelled() {
    let (nodes, _) = nodes(2, Behavior::Ok(Duration::from_millis(10)));
    let layer = HedgeLayer::new(HedgeConfig::default().min_samples(20).percentile(0.9)).unwrap();
    let client = layer.layer(balancer(&nodes, Policy::RoundRobin));
    for n in 0..40 {
        client.clone().oneshot(request(n)).await.unwrap();
    }
    assert_eq!(
        layer.budget().stats().retries,
        0,
        "nothing slow, nothing hedged"
    );
    nodes[1].set(Behavior::Ok(Duration::from_secs(5)));
    for n in 0..2 {
        let started = Instant::now();
        assert_eq!(client.clone().oneshot(request(100 + n)).await.unwrap(), 0);
        assert!(
            started.elapsed() <= Duration::from_millis(25),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(layer.budget().stats().retries, 1, "one hedge");
    assert_eq!(
        nodes[1].cancelled.load(Ordering::SeqCst),
        1,
        "the slow copy was cancelled"
    );
    assert_eq!(nodes[1].in_flight.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn hedges_are_budgeted() {
    let (nodes, log) = nodes(2, Behavior::Ok(Duration::from_millis(10)));
    let config = HedgeConfig::default()
        .min_samples(20)
        .percentile(0.9)
        .budget(BudgetConfig::default().ratio(0.0).floor(1));
    let layer = HedgeLayer::new(config).unwrap();
    let client = layer.layer(balancer(&nodes, Policy::RoundRobin));
    for n in 0..40 {
        client.clone().oneshot(request(n)).await.unwrap();
    }
    for n in &nodes {
        n.set(Behavior::Ok(Duration::from_millis(100)));
    }
    for n in 0..10 {
        client.clone().oneshot(request(100 + n)).await.unwrap();
    }
    assert_eq!(
        layer.budget().stats().retries,
        1,
        "the floor allows one hedge"
    );
    assert_eq!(log.lock().len(), 40 + 10 + 1);
}

#[tokio::test(start_paused = true)]
async fn stacked_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let (nodes, _) = nodes(2, Behavior::Ok(Duration::ZERO));
    let mut client = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(1)))
        .layer(RetryLayer::new(RetryConfig::default()).unwrap())
        .layer(HedgeLayer::new(HedgeConfig::default()).unwrap())
        .service(balancer(&nodes, Policy::PeakEwma));
    let future = client.ready().await.unwrap().call(request(1));
    assert_send(&future);
    assert!(future.await.is_ok());
}
