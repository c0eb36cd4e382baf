//! The traps "one vocabulary across the crates" lists for the balancer,
//! each reproduced under paused time: defaults that fit any node speed,
//! setters in any order, an open policy trait, waiting for a first
//! endpoint, retries that never spend budget on an empty fleet, and health
//! read and fed through discovery keys.

mod support;

use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use keel_balancer::retry::{BudgetConfig, RetryConfig, RetryLayer};
use keel_balancer::{
    Balancer, BalancerBuilder, BalancerConfig, BalancerError, Candidates, Deadline, DeadlineLayer,
    EndpointKey, FailureKind, GiveUp, Outcome, Pick, Policy,
};
use keel_core::{EndpointId, ErrorKind, KeelError};
use support::{Behavior, Node, classify, nodes, request};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::discover::{Change, ServiceList};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

type Classifier = fn(&Result<usize, support::NodeError>) -> Outcome;

type Sender<K> = mpsc::UnboundedSender<Change<K, Node>>;

/// A discovery stream fed by hand.
fn channel<K: Send + 'static>() -> (
    Sender<K>,
    impl futures::Stream<Item = Result<Change<K, Node>, Infallible>> + Send + 'static,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Change<K, Node>>();
    let discover =
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|c| c.map(Ok::<_, Infallible>)));
    (tx, discover)
}

/// Sends `requests` requests through clones of `b` from `workers` closed
/// loops (each sends its next request when the last one answered).
async fn drive<S>(b: &S, workers: usize, requests: u64)
where
    S: Service<support::Request, Response = usize, Error = BalancerError> + Clone + Send + 'static,
    S::Future: Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let b = b.clone();
            let next = next.clone();
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= requests {
                        break;
                    }
                    b.clone().oneshot(request(n)).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// The trap: with a 1 s starting estimate and a 10 s time-only decay, a
/// 35 ms node was still estimated at 368 ms after 10 s of traffic, so an
/// 800 ms node kept winning picks. Counted over the 500 requests after 100
/// warm-up requests, from four closed loops.
#[tokio::test(start_paused = true)]
async fn a_35ms_node_beats_an_800ms_node_within_100_requests() {
    let (nodes, log) = nodes(2, Behavior::Ok(Duration::from_millis(35)));
    nodes[1].set(Behavior::Ok(Duration::from_millis(800)));
    let b = Balancer::builder()
        .policy(Policy::PeakEwma)
        .classifier(classify as Classifier)
        .seed(1)
        .build(ServiceList::new(nodes.clone()))
        .unwrap();
    drive(&b, 4, 100).await;
    log.lock().clear();
    drive(&b, 4, 500).await;
    let slow = nodes[1].arrivals();
    assert!(slow * 50 < 500, "the 800 ms node got {slow} of 500 picks");
    let fast = &b.endpoints()[0];
    let estimate = fast.latency_estimate.as_secs_f64();
    assert!(
        (0.0315..0.0385).contains(&estimate),
        "the 35 ms node is estimated at {estimate} s"
    );
}

#[tokio::test(start_paused = true)]
async fn a_new_or_restarted_endpoint_starts_from_the_fleet_estimate() {
    let (nodes, _) = nodes(4, Behavior::Ok(Duration::from_millis(40)));
    let (tx, discover) = channel::<usize>();
    let mut b = Balancer::builder()
        .classifier(classify as Classifier)
        .seed(2)
        .build(discover)
        .unwrap();
    assert_eq!(
        b.fleet_latency_estimate(),
        Duration::from_secs(1),
        "default_rtt"
    );
    for (n, node) in nodes.iter().take(3).enumerate() {
        tx.send(Change::Insert(n, node.clone())).unwrap();
    }
    drive(&b, 1, 60).await;
    let fleet = b.fleet_latency_estimate();
    assert!(
        fleet > Duration::from_millis(39) && fleet < Duration::from_millis(41),
        "{fleet:?}"
    );
    // A new endpoint, and a restarted one (its key's service replaced).
    tx.send(Change::Insert(3, nodes[3].clone())).unwrap();
    tx.send(Change::Insert(0, nodes[0].clone())).unwrap();
    b.ready().await.unwrap();
    let fleet = b.fleet_latency_estimate();
    for endpoint in b.endpoints() {
        if endpoint.key == 0 || endpoint.key == 3 {
            assert_eq!(endpoint.samples, 0);
            assert_eq!(endpoint.latency_estimate, fleet, "{endpoint:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn every_setter_survives_whatever_the_order() {
    let from_file: BalancerConfig = serde_json::from_str(
        r#"{"name": "from-file", "max_wait": "250ms", "decay_samples": 4, "busy_cooldown": "3s"}"#,
    )
    .unwrap();
    let (nodes, _) = nodes(2, Behavior::Ok(Duration::ZERO));
    let b = BalancerBuilder::from_config(from_file)
        .max_outstanding_per_endpoint(3)
        .max_waiters(7)
        .attempt_timeout(Duration::from_secs(2))
        .default_rtt(Duration::from_millis(50))
        .decay(Duration::from_secs(2))
        .load_report_max_age(Duration::from_secs(9))
        .policy(Policy::LeastOutstanding)
        .decay_samples(6)
        .build(ServiceList::new(nodes))
        .unwrap();
    let config = b.config();
    // From the config...
    assert_eq!(config.name, "from-file");
    assert_eq!(config.max_wait, Duration::from_millis(250));
    assert_eq!(config.busy_cooldown, Duration::from_secs(3));
    // ...and every setter, the one overriding the config's field included.
    assert_eq!(config.decay_samples, 6);
    assert_eq!(config.max_outstanding_per_endpoint, Some(3));
    assert_eq!(config.max_waiters, 7);
    assert_eq!(config.attempt_timeout, Some(Duration::from_secs(2)));
    assert_eq!(config.default_rtt, Duration::from_millis(50));
    assert_eq!(config.decay, Duration::from_secs(2));
    assert_eq!(config.load_report_max_age, Duration::from_secs(9));
    assert_eq!(config.policy, Policy::LeastOutstanding);
    assert_eq!(b.policy_name(), "least_outstanding");
    // A bad field is still refused by name, whichever way it was set.
    let err = Balancer::<usize, ()>::builder()
        .decay_samples(0)
        .build(ServiceList::new(Vec::<Node>::new()))
        .unwrap_err();
    assert!(err.to_string().contains("decay_samples"), "{err}");
    assert_eq!(err.kind(), ErrorKind::Internal);
}

/// Where a request asks to go, in its extensions.
#[derive(Clone, Copy, Debug)]
struct Target(usize);

/// A policy of our own: the endpoint whose key the request names, if it is
/// available; otherwise the available one with the lowest latency estimate.
struct ByTarget {
    changes: AtomicUsize,
}

impl Pick<usize> for ByTarget {
    fn pick(
        &self,
        candidates: &Candidates<'_, usize>,
        request: &http::Extensions,
        _rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        let target = request.get::<Target>()?;
        candidates
            .iter()
            .find(|c| *c.key() == target.0 && c.is_available())
            .or_else(|| {
                candidates
                    .iter()
                    .filter(|c| c.is_available())
                    .min_by_key(|c| (c.latency(), c.outstanding()))
            })
            .map(|c| c.position())
    }

    fn endpoints_changed(&self, endpoints: &Candidates<'_, usize>) {
        assert!(endpoints.iter().all(|c| c.capacity() == Some(1)));
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    fn name(&self) -> &str {
        "by_target"
    }
}

#[tokio::test(start_paused = true)]
async fn a_policy_defined_outside_the_crate_picks_as_told() {
    let (nodes, _) = nodes(3, Behavior::Ok(Duration::from_millis(5)));
    let pick = Arc::new(ByTarget {
        changes: AtomicUsize::new(0),
    });
    let mut b = Balancer::builder()
        .policy(Policy::RoundRobin)
        .pick(pick.clone())
        .max_outstanding_per_endpoint(1)
        .classifier(classify as Classifier)
        .build(ServiceList::new(nodes.clone()))
        .unwrap();
    assert_eq!(b.policy_name(), "by_target");
    for n in 0..30u64 {
        let target = (n % 3) as usize;
        let mut r = request(n);
        r.extensions_mut().insert(Target(target));
        assert_eq!(b.ready().await.unwrap().call(r).await.unwrap(), target);
    }
    assert_eq!(
        pick.changes.load(Ordering::Relaxed),
        1,
        "one discovery change"
    );
    // No target: the policy says wait, and the wait is bounded.
    let err = b
        .ready()
        .await
        .unwrap()
        .call(request(99))
        .await
        .unwrap_err();
    assert!(matches!(err, BalancerError::Overloaded { .. }), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn zero_endpoints_at_start_up_wait_for_the_first_one() {
    let (nodes, _) = nodes(1, Behavior::Ok(Duration::from_millis(10)));
    let (tx, discover) = channel::<usize>();
    let mut b = Balancer::builder()
        .max_wait(Duration::from_secs(1))
        .classifier(classify as Classifier)
        .build(discover)
        .unwrap();
    let node = nodes[0].clone();
    tokio::spawn(async move {
        // keel-health inserts an endpoint after its first probe.
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(Change::Insert(0, node)).unwrap();
    });
    let started = Instant::now();
    assert_eq!(b.ready().await.unwrap().call(request(1)).await.unwrap(), 0);
    assert_eq!(started.elapsed(), Duration::from_millis(110));
}

#[tokio::test(start_paused = true)]
async fn no_endpoints_under_retries_spends_no_budget_and_says_no_endpoints() {
    let (_tx, discover) = channel::<usize>();
    let balancer = Balancer::builder()
        .max_wait(Duration::from_millis(200))
        .classifier(classify as Classifier)
        .build(discover)
        .unwrap();
    let layer = RetryLayer::with_seed(RetryConfig::default(), 1).unwrap();
    let client = layer.layer(balancer);
    let started = Instant::now();
    let err = client.oneshot(request(1)).await.unwrap_err();
    assert!(matches!(err, BalancerError::NoEndpoints), "{err:?}");
    assert!(err.to_string().contains("no endpoint"), "{err}");
    assert_eq!(err.kind(), ErrorKind::Unavailable { retry_after: None });
    assert_eq!(started.elapsed(), Duration::from_millis(200), "waited once");
    let stats = layer.budget().stats();
    assert_eq!((stats.requests, stats.retries), (1, 0), "no budget spent");

    // Every endpoint failed the request: the error names that and the
    // last failure, not "max attempts reached".
    let (nodes, log) = nodes(2, Behavior::Fail(Duration::from_millis(5)));
    let balancer = Balancer::builder()
        .classifier(classify as Classifier)
        .build(ServiceList::new(nodes))
        .unwrap();
    let config = RetryConfig::default()
        .max_attempts(5)
        .budget(BudgetConfig::default().floor(100));
    let client = RetryLayer::with_seed(config, 2).unwrap().layer(balancer);
    let err = client.oneshot(request(2)).await.unwrap_err();
    match &err {
        BalancerError::RetriesExhausted {
            attempts: 2,
            reason: GiveUp::NoEndpointLeft,
            source,
        } => assert!(
            matches!(**source, BalancerError::Failed { .. }),
            "{source:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string().contains("every endpoint already failed"),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Upstream);
    assert_eq!(log.lock().len(), 2);
}

/// A discovery key that counts what the balancer reports about it.
#[derive(Clone, Debug)]
struct Counted {
    n: usize,
    timeouts: Arc<AtomicUsize>,
}

impl PartialEq for Counted {
    fn eq(&self, other: &Self) -> bool {
        self.n == other.n
    }
}

impl Eq for Counted {}

impl Hash for Counted {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.n.hash(state);
    }
}

impl EndpointKey for Counted {
    fn report(&self, outcome: Outcome) {
        assert_eq!(outcome, Outcome::failure(FailureKind::Timeout));
        self.timeouts.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn timeouts_the_balancer_imposes_reach_the_key_once_per_attempt() {
    let (nodes, _) = nodes(1, Behavior::Hang);
    let timeouts = Arc::new(AtomicUsize::new(0));
    let key = Counted {
        n: 0,
        timeouts: timeouts.clone(),
    };
    let discover =
        futures::stream::iter([Ok::<_, Infallible>(Change::Insert(key, nodes[0].clone()))]);
    let b = Balancer::builder()
        .attempt_timeout(Duration::from_millis(200))
        .classifier(classify as Classifier)
        .build(discover)
        .unwrap();

    // The attempt timeout fires.
    let err = b.clone().oneshot(request(1)).await.unwrap_err();
    assert!(matches!(err, BalancerError::Timeout { .. }), "{err:?}");
    assert_eq!(timeouts.load(Ordering::SeqCst), 1);

    // The request's deadline passes while the call is in flight, under an
    // outer deadline layer that cancels the whole stack.
    let client = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_millis(100)))
        .service(b.clone());
    let err = client.oneshot(request(2)).await.unwrap_err();
    assert!(matches!(err, BalancerError::DeadlineExceeded), "{err:?}");
    assert_eq!(timeouts.load(Ordering::SeqCst), 2);

    // The caller gives up before the deadline: nothing to report.
    let mut early = request(3);
    Deadline::after(Duration::from_secs(1)).apply(&mut early);
    let call = tokio::spawn(b.clone().oneshot(early));
    tokio::time::sleep(Duration::from_millis(50)).await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    assert_eq!(timeouts.load(Ordering::SeqCst), 2);

    // Answers report nothing either.
    nodes[0].set(Behavior::Ok(Duration::from_millis(5)));
    b.clone().oneshot(request(4)).await.unwrap();
    assert_eq!(timeouts.load(Ordering::SeqCst), 2);
    assert_eq!(b.endpoints()[0].timed_out, 1);
}

#[tokio::test(start_paused = true)]
async fn capacity_and_weight_follow_the_keys_health_publishes() {
    let (nodes, _) = nodes(2, Behavior::Ok(Duration::from_millis(100)));
    let keys = [
        EndpointId::new("node-0").with_capacity(1),
        EndpointId::new("node-1"),
    ];
    keys[1].set_weight(0.0); // still warming up: no traffic while node-0 has room
    let discover = futures::stream::iter(
        keys.clone()
            .into_iter()
            .zip(nodes.clone())
            .map(|(key, node)| Ok::<_, Infallible>(Change::Insert(key, node))),
    );
    let b = Balancer::builder()
        .policy(Policy::LeastOutstanding)
        .max_outstanding_per_endpoint(8)
        .classifier(classify as Classifier)
        .build(discover)
        .unwrap();
    let first = tokio::spawn(b.clone().oneshot(request(1)));
    tokio::task::yield_now().await;
    assert_eq!(nodes[0].arrivals(), 1);
    // node-0 is at its key's capacity: the weight-0 node takes the next.
    assert_eq!(b.clone().oneshot(request(2)).await.unwrap(), 1);
    assert_eq!(first.await.unwrap().unwrap(), 0);
    let endpoints = b.endpoints();
    assert_eq!(endpoints[0].capacity, Some(1), "from the key");
    assert_eq!(endpoints[1].capacity, Some(8), "the configured default");
    // Health raises the capacity: two fit at once now.
    keys[0].set_capacity(Some(2));
    keys[1].set_weight(0.0);
    let a = tokio::spawn(b.clone().oneshot(request(3)));
    let c = tokio::spawn(b.clone().oneshot(request(4)));
    assert_eq!(
        (a.await.unwrap().unwrap(), c.await.unwrap().unwrap()),
        (0, 0)
    );
}
