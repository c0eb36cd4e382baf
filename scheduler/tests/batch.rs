//! Micro-batching: size and wait bounds, fan-out of answers and errors, and
//! a property test over random arrival traces. Paused time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use keel_scheduler::{BatchConfig, Batcher, SchedulerError};
use parking_lot::Mutex;
use proptest::prelude::*;
use tokio::time::{Instant, sleep};
use tower::{Service, ServiceExt};

/// A request: its batch key and its id.
type Req = (u8, u32);

/// Batches the service received: when, and which requests.
type Batches = Arc<Mutex<Vec<(Instant, Vec<Req>)>>>;

/// A batch service that answers each request with its id after `latency`.
fn echo(
    latency: Duration,
) -> (
    impl Service<Vec<Req>, Response = Vec<u32>, Error = std::io::Error, Future: Send> + Send + 'static,
    Batches,
) {
    let batches: Batches = Arc::default();
    let log = batches.clone();
    let service = tower::service_fn(move |batch: Vec<Req>| {
        log.lock().push((Instant::now(), batch.clone()));
        async move {
            sleep(latency).await;
            Ok(batch.into_iter().map(|(_, id)| id).collect())
        }
    });
    (service, batches)
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_goes_at_once_and_a_partial_one_after_max_wait() {
    let (service, batches) = echo(Duration::from_millis(1));
    let config = BatchConfig::new("t")
        .max_batch_size(4)
        .max_wait(Duration::from_millis(20));
    let batcher = Batcher::new(config, |r: &Req| r.0, service).unwrap();
    let start = Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|id| {
            tokio::spawn({
                let b = batcher.clone();
                async move { b.submit((0, id)).await }
            })
        })
        .collect();
    for (id, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), id as u32);
    }
    let batches = batches.lock().clone();
    assert_eq!(batches.len(), 2);
    assert_eq!(
        batches[0].0 - start,
        Duration::ZERO,
        "the full batch left at once"
    );
    assert_eq!(batches[0].1.len(), 4);
    assert_eq!(
        batches[1].0 - start,
        Duration::from_millis(20),
        "the rest after max_wait"
    );
    assert_eq!(batches[1].1, vec![(0, 4), (0, 5)]);
}

#[tokio::test(start_paused = true)]
async fn keys_batch_separately() {
    let (service, batches) = echo(Duration::ZERO);
    let config = BatchConfig::new("t")
        .max_batch_size(10)
        .max_wait(Duration::from_millis(5));
    let batcher = Batcher::new(config, |r: &Req| r.0, service).unwrap();
    let calls: Vec<_> = (0..9u32)
        .map(|id| {
            let b = batcher.clone();
            tokio::spawn(async move { b.submit(((id % 3) as u8, id)).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let batches = batches.lock().clone();
    assert_eq!(batches.len(), 3);
    for (_, batch) in &batches {
        assert!(batch.iter().all(|r| r.0 == batch[0].0), "{batch:?}");
        assert_eq!(batch.len(), 3);
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_batch_fails_each_item_once() {
    let service = tower::service_fn(|batch: Vec<Req>| async move {
        if batch.iter().any(|r| r.1 == 13) {
            return Err(std::io::Error::other("model overloaded"));
        }
        // Wrong length for key 2.
        let mut out: Vec<u32> = batch.iter().map(|r| r.1).collect();
        if batch[0].0 == 2 {
            out.pop();
        }
        Ok(out)
    });
    let config = BatchConfig::new("t")
        .max_batch_size(3)
        .max_wait(Duration::from_millis(5));
    let batcher = Batcher::new(config, |r: &Req| r.0, service).unwrap();
    let ids = [(1u8, 12u32), (1, 13), (1, 14), (2, 20), (2, 21), (3, 30)];
    let calls: Vec<_> = ids
        .iter()
        .map(|&req| {
            let b = batcher.clone();
            tokio::spawn(async move { (req, b.submit(req).await) })
        })
        .collect();
    for call in calls {
        match call.await.unwrap() {
            ((1, _), Err(SchedulerError::Service(err))) => {
                let source = std::error::Error::source(&*err).expect("the batch's error");
                assert_eq!(source.to_string(), "model overloaded");
            }
            ((2, _), Err(SchedulerError::Service(err))) => {
                assert!(
                    err.to_string()
                        .contains("answered 1 items for a batch of 2"),
                    "{err}"
                );
            }
            ((3, id), Ok(answer)) => assert_eq!(answer, id),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn dropped_items_are_left_out_of_their_batch() {
    let (service, batches) = echo(Duration::ZERO);
    let config = BatchConfig::new("t")
        .max_batch_size(10)
        .max_wait(Duration::from_millis(50));
    let batcher = Batcher::new(config, |r: &Req| r.0, service).unwrap();
    let keep = tokio::spawn({
        let b = batcher.clone();
        async move { b.submit((0, 1)).await }
    });
    let gone = tokio::spawn({
        let b = batcher.clone();
        async move { b.submit((0, 2)).await }
    });
    sleep(Duration::from_millis(10)).await;
    gone.abort();
    assert_eq!(keep.await.unwrap().unwrap(), 1);
    assert_eq!(batches.lock().clone()[0].1, vec![(0, 1)]);
}

#[tokio::test(start_paused = true)]
async fn works_as_a_tower_service() {
    let (service, _) = echo(Duration::ZERO);
    let mut batcher = Batcher::new(BatchConfig::new("t"), |r: &Req| r.0, service).unwrap();
    let answer = batcher.ready().await.unwrap().call((7, 70)).await.unwrap();
    assert_eq!(answer, 70);
}

#[derive(Debug, Clone)]
struct Arrival {
    gap_ms: u64,
    key: u8,
}

fn trace() -> impl Strategy<Value = Vec<Arrival>> {
    proptest::collection::vec(
        (
            prop_oneof![3 => Just(0u64), 2 => 1..4u64, 1 => 5..30u64],
            0..3u8,
        )
            .prop_map(|(gap_ms, key)| Arrival { gap_ms, key }),
        1..150,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the arrivals: no item lost, none answered twice or with
    /// another's answer, no batch over `max_batch_size` or mixing keys, no
    /// item waiting past `max_wait`, and a batch leaves early only when full.
    #[test]
    fn batching_respects_size_and_wait(
        arrivals in trace(),
        max_batch_size in 1..8usize,
        max_wait_ms in 1..20u64,
    ) {
        let max_wait = Duration::from_millis(max_wait_ms);
        keel_testkit::paused_runtime().block_on(async move {
            let (service, batches) = echo(Duration::from_millis(3));
            let config = BatchConfig::new("p").max_batch_size(max_batch_size).max_wait(max_wait);
            let batcher = Batcher::new(config, |r: &Req| r.0, service).unwrap();
            let mut arrived = HashMap::new();
            let mut calls = Vec::new();
            for (id, a) in arrivals.iter().enumerate() {
                sleep(Duration::from_millis(a.gap_ms)).await;
                let id = id as u32;
                arrived.insert(id, Instant::now());
                let b = batcher.clone();
                let req = (a.key, id);
                calls.push(tokio::spawn(async move { (id, b.submit(req).await) }));
            }
            let mut answered = HashMap::new();
            for call in calls {
                let (id, answer) = call.await.unwrap();
                prop_assert_eq!(answer.unwrap(), id);
                prop_assert!(answered.insert(id, ()).is_none(), "answered twice");
            }
            prop_assert_eq!(answered.len(), arrivals.len(), "lost items");
            let mut sent = HashMap::new();
            for (at, batch) in batches.lock().iter() {
                prop_assert!(!batch.is_empty() && batch.len() <= max_batch_size);
                prop_assert!(batch.iter().all(|r| r.0 == batch[0].0), "mixed keys");
                let first = batch.iter().map(|r| arrived[&r.1]).min().unwrap();
                let waited = *at - first;
                prop_assert!(waited <= max_wait, "waited {:?} > {:?}", waited, max_wait);
                if waited < max_wait {
                    prop_assert_eq!(batch.len(), max_batch_size, "left early without being full");
                }
                for r in batch {
                    prop_assert!(sent.insert(r.1, ()).is_none(), "sent twice");
                }
            }
            prop_assert_eq!(sent.len(), arrivals.len());
            Ok(())
        })?;
    }
}
