//! Random names, headers, ids and payloads thrown at every backend: no
//! input panics, every refusal names a field, and every job a backend
//! accepts is delivered as it was sent.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use keel_core::ArgumentError;
use keel_queue::{
    DequeueOptions, Headers, Job, JobId, MemoryQueue, Queue, QueueConfig, QueueError,
};
use proptest::prelude::*;
use tokio::time::timeout;

/// One hostile input: a queue name suffix, a job id, headers and a payload.
#[derive(Clone, Debug)]
struct Input {
    name: String,
    id: Option<String>,
    headers: Vec<(String, String)>,
    payload: Vec<u8>,
}

/// Text of up to `max` characters: ASCII, control characters, braces, glob
/// characters and multi-byte characters.
fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::collection::vec(any::<char>(), 0..max),
        4 => proptest::collection::vec(
            prop_oneof![Just('a'), Just('{'), Just('}'), Just('*'), Just('|'), Just('\n'), Just('é'), Just('.')],
            0..max,
        ),
        1 => (0usize..400).prop_map(|n| vec!['n'; n]),
    ]
    .prop_map(|chars| chars.into_iter().collect())
}

fn input() -> impl Strategy<Value = Input> {
    (
        text(40),
        proptest::option::of(text(300)),
        proptest::collection::vec((text(300), text(64)), 0..4),
        prop_oneof![
            3 => proptest::collection::vec(any::<u8>(), 0..256),
            1 => (0usize..200_000).prop_map(|n| vec![7u8; n]),
        ],
    )
        .prop_map(|(name, id, headers, payload)| Input {
            name,
            id,
            headers,
            payload,
        })
}

fn job_of(input: &Input) -> Job {
    let mut job = Job::new(Bytes::from(input.payload.clone()));
    for (k, v) in &input.headers {
        job = job.header(k.clone(), v.clone());
    }
    if let Some(id) = &input.id {
        job = job.id(JobId::from_string(id.clone()));
    }
    job
}

/// Runs one input through a queue made by `make` (which may refuse the
/// name): a refusal must name a field; an accepted job must come back as
/// sent. The queue is deleted afterwards.
async fn check<Q, F, Fut>(input: Input, prefix: &str, make: F) -> Result<(), TestCaseError>
where
    Q: Queue,
    F: FnOnce(QueueConfig) -> Fut,
    Fut: Future<Output = Result<Q, keel_queue::QueueError>>,
{
    let name = format!("{prefix}-{}", input.name);
    let queue = match make(QueueConfig::new(name)).await {
        Ok(queue) => queue,
        Err(QueueError::InvalidConfig(err)) => {
            prop_assert!(err.field.contains("name"), "{err}");
            return Ok(());
        }
        Err(other) => return Err(TestCaseError::fail(format!("connect: {other:?}"))),
    };
    let job = job_of(&input);
    let sent_headers: Headers = job.headers.clone();
    let outcome = match queue.enqueue(job).await {
        Ok(enqueued) => {
            if let Some(id) = &input.id {
                prop_assert_eq!(enqueued.id.as_str(), id.as_str());
            }
            let got = timeout(
                Duration::from_secs(10),
                queue.dequeue(DequeueOptions::new(1).wait(Duration::from_secs(5))),
            )
            .await
            .map_err(|_| TestCaseError::fail("dequeue hung"))?
            .map_err(|err| TestCaseError::fail(format!("dequeue: {err:?}")))?;
            prop_assert_eq!(got.len(), 1, "an accepted job is delivered");
            let got = &got[0];
            prop_assert_eq!(&got.payload[..], &input.payload[..]);
            prop_assert_eq!(&got.headers, &sent_headers);
            prop_assert_eq!(got.id.as_str(), enqueued.id.as_str());
            queue
                .ack(&got.receipt)
                .await
                .map_err(|err| TestCaseError::fail(format!("ack: {err:?}")))?;
            Ok(())
        }
        Err(QueueError::InvalidArgument(ArgumentError { name, .. })) => {
            prop_assert!(["id", "headers", "payload"].contains(&name), "{name}");
            Ok(())
        }
        Err(QueueError::Unsupported { .. }) => Ok(()),
        Err(other) => Err(TestCaseError::fail(format!("enqueue: {other:?}"))),
    };
    queue
        .delete()
        .await
        .map_err(|err| TestCaseError::fail(format!("delete: {err:?}")))?;
    outcome
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn memory_survives_any_input(input in input()) {
        runtime().block_on(check(input, "hostile", |config| async move { MemoryQueue::new(config) }))?;
    }
}

#[cfg(feature = "redis")]
proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn redis_survives_any_input(input in input()) {
        use keel_queue::{RedisQueue, RedisQueueConfig};
        let rt = runtime();
        let url = rt.block_on(keel_testkit::require_redis());
        let ns = keel_testkit::Namespace::new("hostile-redis").with_redis_cleanup(url.clone());
        let prefix = ns.prefix().to_owned();
        rt.block_on(check(input, &prefix, |config| RedisQueue::connect(RedisQueueConfig::new(url, config))))?;
    }
}

#[cfg(feature = "amqp")]
proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn amqp_survives_any_input(input in input()) {
        use keel_queue::{AmqpQueue, AmqpQueueConfig};
        let rt = runtime();
        let url = rt.block_on(keel_testkit::require_amqp());
        let ns = keel_testkit::Namespace::new("hostile-amqp");
        let prefix = ns.prefix().to_owned();
        rt.block_on(check(input, &prefix, |config| AmqpQueue::connect(AmqpQueueConfig::new(url, config))))?;
    }
}
