//! The balancer as a tower service: capacity, waiting, cancellation,
//! deadlines, busy signals, weights, load reports, discovery.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keel_balancer::{
    AffinityKey, Balancer, BalancerBuilder, BalancerConfig, BalancerError, Deadline, HashConfig,
    LoadReport, Policy,
};
use keel_core::EndpointId;
use support::{Behavior, Node, classify, nodes, request};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tower::discover::{Change, ServiceList};
use tower::{Service, ServiceExt};

type Classifier = fn(&Result<usize, support::NodeError>) -> keel_balancer::Outcome;
type TestBalancer = Balancer<usize, Node, Classifier>;

fn balancer(nodes: &[Node], config: BalancerConfig) -> TestBalancer {
    BalancerBuilder::from_config(config)
        .classifier(classify as Classifier)
        .seed(3)
        .build(ServiceList::new(nodes.to_vec()))
        .unwrap()
}

async fn ready(b: &mut TestBalancer) -> &mut TestBalancer {
    b.ready().await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn full_endpoints_spill_then_wait_then_reject_overloaded() {
    let (nodes, _) = nodes(2, Behavior::Ok(Duration::from_secs(1)));
    let config = BalancerConfig::default()
        .policy(Policy::RoundRobin)
        .max_outstanding_per_endpoint(1)
        .max_wait(Duration::from_millis(1500));
    let mut b = balancer(&nodes, config);
    let first = tokio::spawn(ready(&mut b).await.call(request(1)));
    let second = tokio::spawn(ready(&mut b).await.call(request(2)));
    tokio::task::yield_now().await;
    assert_eq!(
        nodes[0].in_flight.load(Ordering::SeqCst),
        1,
        "one each: never piled"
    );
    assert_eq!(nodes[1].in_flight.load(Ordering::SeqCst), 1);
    // The third waits in the balancer and takes the first slot that frees.
    let started = Instant::now();
    let third = tokio::spawn(ready(&mut b).await.call(request(3)));
    assert!(first.await.unwrap().is_ok());
    assert!(second.await.unwrap().is_ok());
    assert!(third.await.unwrap().is_ok());
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(2),
        "waited 1 s, served 1 s"
    );

    // Now every node hangs: the wait is bounded and ends Overloaded.
    for n in &nodes {
        n.set(Behavior::Hang);
    }
    let _a = tokio::spawn(ready(&mut b).await.call(request(4)));
    let _b = tokio::spawn(ready(&mut b).await.call(request(5)));
    tokio::task::yield_now().await;
    let started = Instant::now();
    match ready(&mut b).await.call(request(6)).await {
        Err(BalancerError::Overloaded { waited }) => {
            assert_eq!(waited, Duration::from_millis(1500))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(started.elapsed(), Duration::from_millis(1500));
    assert_eq!(
        nodes[0].log.lock().len(),
        5,
        "the sixth was never dispatched"
    );
}

#[tokio::test(start_paused = true)]
async fn zero_max_wait_rejects_at_once() {
    let (nodes, _) = nodes(1, Behavior::Hang);
    let config = BalancerConfig::default()
        .max_outstanding_per_endpoint(1)
        .max_wait(Duration::ZERO);
    let mut b = balancer(&nodes, config);
    let _held = tokio::spawn(ready(&mut b).await.call(request(1)));
    tokio::task::yield_now().await;
    let err = ready(&mut b).await.call(request(2)).await.unwrap_err();
    assert!(
        matches!(err, BalancerError::Overloaded { waited } if waited.is_zero()),
        "{err:?}"
    );
    assert!(err.is_retryable());
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_cancels_the_upstream_call_and_frees_the_slot() {
    let (nodes, _) = nodes(1, Behavior::Hang);
    let mut b = balancer(
        &nodes,
        BalancerConfig::default().max_outstanding_per_endpoint(1),
    );
    let call = tokio::spawn(ready(&mut b).await.call(request(1)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(nodes[0].in_flight.load(Ordering::SeqCst), 1);
    assert_eq!(b.endpoints()[0].outstanding, 1);
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    assert_eq!(nodes[0].in_flight.load(Ordering::SeqCst), 0);
    assert_eq!(
        nodes[0].cancelled.load(Ordering::SeqCst),
        1,
        "the node's future was dropped"
    );
    let endpoint = &b.endpoints()[0];
    assert_eq!(
        (endpoint.outstanding, endpoint.cancelled, endpoint.failed),
        (0, 1, 0)
    );
    // The slot is free again.
    nodes[0].set(Behavior::Ok(Duration::from_millis(1)));
    assert_eq!(ready(&mut b).await.call(request(2)).await.unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_request_dropped_leaves_the_queue() {
    let (nodes, _) = nodes(1, Behavior::Hang);
    let mut b = balancer(
        &nodes,
        BalancerConfig::default().max_outstanding_per_endpoint(1),
    );
    let _held = tokio::spawn(ready(&mut b).await.call(request(1)));
    tokio::task::yield_now().await;
    let waiting = tokio::spawn(ready(&mut b).await.call(request(2)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    waiting.abort();
    assert!(waiting.await.unwrap_err().is_cancelled());
    assert_eq!(nodes[0].log.lock().len(), 1, "never dispatched");
}

#[tokio::test(start_paused = true)]
async fn expired_requests_are_never_dispatched_and_the_deadline_cancels_calls() {
    let (nodes, log) = nodes(1, Behavior::Ok(Duration::from_secs(5)));
    let mut b = balancer(&nodes, BalancerConfig::default());
    let mut expired = request(1);
    Deadline::at(Instant::now()).apply(&mut expired);
    let err = ready(&mut b).await.call(expired).await.unwrap_err();
    assert!(matches!(err, BalancerError::DeadlineExceeded));
    assert!(!err.is_retryable());
    assert!(log.lock().is_empty());

    let mut short = request(2);
    Deadline::after(Duration::from_millis(300)).apply(&mut short);
    let started = Instant::now();
    let err = ready(&mut b).await.call(short).await.unwrap_err();
    assert!(matches!(err, BalancerError::DeadlineExceeded));
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    assert_eq!(nodes[0].cancelled.load(Ordering::SeqCst), 1);
    assert_eq!(b.endpoints()[0].outstanding, 0);
}

#[tokio::test(start_paused = true)]
async fn attempt_timeout_cancels_and_counts_against_the_endpoint() {
    let (nodes, _) = nodes(1, Behavior::Hang);
    let config = BalancerConfig::default().attempt_timeout(Duration::from_millis(200));
    let mut b = balancer(&nodes, config);
    let err = ready(&mut b).await.call(request(1)).await.unwrap_err();
    match &err {
        BalancerError::Timeout { after, endpoint } => {
            assert_eq!(*after, Duration::from_millis(200));
            assert_eq!(b.key_of(*endpoint), Some(0));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_retryable());
    let endpoint = &b.endpoints()[0];
    assert_eq!((endpoint.timed_out, endpoint.outstanding), (1, 0));
    assert!(endpoint.latency_estimate >= Duration::from_millis(200));
    assert_eq!(nodes[0].cancelled.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn busy_endpoint_is_routed_around_for_its_cooldown_and_never_failed() {
    let (nodes, _) = nodes(2, Behavior::Ok(Duration::from_millis(10)));
    nodes[0].set(Behavior::Busy);
    let config = BalancerConfig::default()
        .policy(Policy::RoundRobin)
        .busy_cooldown(Duration::from_secs(2));
    let mut b = balancer(&nodes, config);
    let mut busy_seen = false;
    for n in 0..20 {
        match ready(&mut b).await.call(request(n)).await {
            Ok(node) => assert_eq!(node, 1),
            Err(BalancerError::Busy { endpoint, .. }) => {
                assert_eq!(b.key_of(endpoint), Some(0));
                assert!(!busy_seen, "one busy answer, then routed around");
                busy_seen = true;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!(busy_seen);
    let node0 = &b.endpoints()[0];
    assert!(node0.busy);
    assert_eq!((node0.busy_responses, node0.failed), (1, 0));
    // After the cooldown, the node gets traffic again.
    nodes[0].set(Behavior::Ok(Duration::from_millis(10)));
    tokio::time::advance(Duration::from_secs(2)).await;
    for n in 0..4 {
        ready(&mut b).await.call(request(100 + n)).await.unwrap();
    }
    assert!(nodes[0].arrivals() >= 2, "back in rotation");
    assert!(!b.endpoints()[0].busy);
}

#[tokio::test(start_paused = true)]
async fn weights_read_live_from_the_discovery_keys_shape_traffic() {
    let (nodes, log) = nodes(2, Behavior::Ok(Duration::ZERO));
    let keys = [EndpointId::new("node-0"), EndpointId::new("node-1")];
    keys[0].set_weight(0.25);
    let discover = futures::stream::iter(
        keys.clone()
            .into_iter()
            .zip(nodes.clone())
            .map(|(key, node)| Ok::<_, Infallible>(Change::Insert(key, node))),
    );
    let mut b = Balancer::builder()
        .policy(Policy::Weighted)
        .classifier(classify as Classifier)
        .seed(5)
        .build(discover)
        .unwrap();
    for n in 0..2_000 {
        b.ready().await.unwrap().call(request(n)).await.unwrap();
    }
    let first = nodes[0].arrivals();
    assert!(
        (300..500).contains(&first),
        "0.25 / 1.25 = 20% of 2000: {first}"
    );
    assert_eq!(b.endpoints()[0].weight, 0.25);
    // Weight 0 (set by whoever discovered the endpoint) drains it.
    keys[0].set_weight(0.0);
    log.lock().clear();
    for n in 0..200 {
        b.ready().await.unwrap().call(request(n)).await.unwrap();
    }
    assert_eq!(nodes[0].arrivals(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_stale_idle_load_report_cannot_attract_a_herd() {
    let (nodes, _) = nodes(4, Behavior::Hang);
    // Other clients keep nodes 1-3 busy; node 0 reported idle a while ago.
    let reports = HashMap::from([
        (0usize, LoadReport::now(0.0)),
        (1, LoadReport::now(10.0)),
        (2, LoadReport::now(10.0)),
        (3, LoadReport::now(10.0)),
    ]);
    let (_tx, rx) = watch::channel(reports);
    let config = BalancerConfig::default()
        .policy(Policy::LeastOutstanding)
        .load_report_max_age(Duration::from_secs(60));
    let mut b = BalancerBuilder::from_config(config)
        .classifier(classify as Classifier)
        .load_reports(rx)
        .seed(9)
        .build(ServiceList::new(nodes.clone()))
        .unwrap();
    let mut calls = Vec::new();
    for n in 0..40 {
        calls.push(tokio::spawn(b.ready().await.unwrap().call(request(n))));
    }
    tokio::task::yield_now().await;
    let on_idle = nodes[0].arrivals();
    eprintln!("{on_idle} of 40 requests went to the idle-reported node");
    // Trusting the report alone would send all 40 to node 0; water-filling
    // gives it ~17 (10 to catch up, then a quarter of the rest).
    assert!(
        (10..25).contains(&on_idle),
        "{on_idle} of 40 on the idle-reported node"
    );
    for call in calls {
        call.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn discovery_changes_apply_and_in_flight_requests_finish() {
    let (nodes, _) = nodes(3, Behavior::Ok(Duration::from_millis(100)));
    let (tx, mut rx) = mpsc::unbounded_channel::<Change<usize, Node>>();
    let discover =
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|c| c.map(Ok::<_, Infallible>)));
    let mut b = Balancer::builder()
        .policy(Policy::RoundRobin)
        .classifier(classify as Classifier)
        .build(discover)
        .unwrap();
    // Nothing discovered yet: wait up to `max_wait` (1 s) for a first
    // endpoint, then fail, not retryably (the fleet is still empty).
    let started = Instant::now();
    let err = b.ready().await.unwrap().call(request(0)).await.unwrap_err();
    assert!(matches!(err, BalancerError::NoEndpoints) && !err.is_retryable());
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    tx.send(Change::Insert(0, nodes[0].clone())).unwrap();
    tx.send(Change::Insert(1, nodes[1].clone())).unwrap();
    let in_flight = tokio::spawn(b.ready().await.unwrap().call(request(1)));
    tokio::task::yield_now().await;
    let endpoints = b.endpoints();
    assert_eq!(endpoints.iter().map(|e| e.key).collect::<Vec<_>>(), [0, 1]);
    let busy_key = endpoints.iter().find(|e| e.outstanding == 1).unwrap().key;
    // Remove the endpoint serving the request, and replace the other.
    tx.send(Change::Remove(busy_key)).unwrap();
    let other = 1 - busy_key;
    tx.send(Change::Insert(other, nodes[2].clone())).unwrap();
    b.ready().await.unwrap();
    let after = b.endpoints();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].key, other);
    assert_ne!(
        after[0].index, endpoints[other].index,
        "a replaced service gets a new index"
    );
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        busy_key,
        "in-flight work finishes"
    );
    for n in 0..3 {
        assert_eq!(
            b.ready()
                .await
                .unwrap()
                .call(request(10 + n))
                .await
                .unwrap(),
            2
        );
    }
}

#[tokio::test(start_paused = true)]
async fn waiting_requests_see_new_endpoints() {
    let (nodes, _) = nodes(2, Behavior::Ok(Duration::from_millis(10)));
    nodes[0].set(Behavior::Hang);
    let (tx, mut rx) = mpsc::unbounded_channel::<Change<usize, Node>>();
    let discover =
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|c| c.map(Ok::<_, Infallible>)));
    let mut b = Balancer::builder()
        .max_outstanding_per_endpoint(1)
        .classifier(classify as Classifier)
        .build(discover)
        .unwrap();
    tx.send(Change::Insert(0, nodes[0].clone())).unwrap();
    let _held = tokio::spawn(b.ready().await.unwrap().call(request(1)));
    tokio::task::yield_now().await;
    let waiting = tokio::spawn(b.ready().await.unwrap().call(request(2)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx.send(Change::Insert(1, nodes[1].clone())).unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn consistent_hashing_keeps_a_key_in_place_until_the_bound_then_spills() {
    let (nodes, _) = nodes(4, Behavior::Hang);
    let config = BalancerConfig::default().policy(Policy::ConsistentHash(
        HashConfig::default().load_factor(1.25),
    ));
    let mut b = balancer(&nodes, config);
    let mut calls = Vec::new();
    for n in 0..8 {
        let mut r = request(n);
        AffinityKey::of("tenant-a").apply(&mut r);
        calls.push(tokio::spawn(ready(&mut b).await.call(r)));
        tokio::task::yield_now().await;
    }
    let loads: Vec<usize> = nodes.iter().map(|n| n.arrivals()).collect();
    let home = loads.iter().enumerate().max_by_key(|(_, l)| **l).unwrap().0;
    // ⌈1.25 × (total + 1) / 4⌉: the home node takes the first two, then
    // spills; no node ever holds more than the bound allows.
    assert!(loads[home] >= 2 && loads[home] <= 3, "{loads:?}");
    assert!(
        loads.iter().filter(|l| **l > 0).count() >= 3,
        "spilled along the ring: {loads:?}"
    );
    for call in calls {
        call.abort();
    }
}

#[test]
fn public_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let (nodes, _) = nodes(1, Behavior::Ok(Duration::ZERO));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut b = balancer(&nodes, BalancerConfig::default());
        let future = ready(&mut b).await.call(request(1));
        assert_send(&future);
        assert_send(&b);
        future.await.unwrap();
    });
}

/// Clones of a balancer over a static list, first used at once from
/// several threads: none may see the list's end before its endpoints and
/// fail with `NoEndpoints` (each clone's `poll_ready` races the one that
/// drains the discovery stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clones_racing_the_first_discovery_all_find_endpoints() {
    for round in 0..300 {
        let (nodes, _) = nodes(2, Behavior::Ok(Duration::ZERO));
        let config = BalancerConfig::default().policy(Policy::RoundRobin);
        let b = balancer(&nodes, config);
        let barrier = Arc::new(tokio::sync::Barrier::new(4));
        let callers: Vec<_> = (0..4)
            .map(|n| {
                let mut b = b.clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    b.ready().await?.call(request(n)).await
                })
            })
            .collect();
        for caller in callers {
            let answer = caller.await.unwrap();
            assert!(answer.is_ok(), "round {round}: {answer:?}");
        }
    }
}
