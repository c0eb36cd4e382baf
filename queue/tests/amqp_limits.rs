//! RabbitMQ's limits met up front: long names and header names, reserved
//! headers and derived queue names are refused with an error naming the
//! field, never a panic and never a stranded job.
#![cfg(feature = "amqp")]

#[path = "support/amqp.rs"]
mod amqp_support;

use std::time::Duration;

use amqp_support::DeleteTopology;
use keel_core::ArgumentError;
use keel_queue::{
    AmqpQueue, AmqpQueueConfig, DequeueOptions, Job, Nack, Queue, QueueConfig, QueueError,
};
use keel_testkit::{Namespace, require_amqp};
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(30);

/// `prefix` padded with `x` to exactly `len` bytes.
fn name_of_len(prefix: &str, len: usize) -> String {
    let mut name = prefix.to_owned();
    while name.len() < len {
        name.push('x');
    }
    name
}

async fn refused_name(len: usize) -> String {
    let url = require_amqp().await;
    let ns = Namespace::new("amqp-long-name");
    let config = AmqpQueueConfig::new(url, QueueConfig::new(name_of_len(ns.prefix(), len)));
    match timeout(BOUND, AmqpQueue::connect(config))
        .await
        .expect("connect answers in time")
    {
        Err(err @ QueueError::InvalidConfig(_)) => err.to_string(),
        other => panic!("a {len}-byte name must be refused as InvalidConfig, got {other:?}"),
    }
}

#[tokio::test]
async fn a_300_byte_queue_name_is_refused_naming_the_field() {
    let message = refused_name(300).await;
    assert!(message.contains("`queue.name`"), "{message}");
    assert!(message.contains("255 bytes"), "{message}");
}

#[tokio::test]
async fn a_10_kb_queue_name_gets_a_clear_error_not_a_connection_error() {
    let message = refused_name(10_000).await;
    assert!(message.contains("`queue.name`"), "{message}");
    assert!(message.contains("10000 bytes"), "{message}");
    assert!(!message.contains("running"), "{message}");
}

#[tokio::test]
async fn a_250_byte_name_is_refused_because_its_retry_queue_would_not_fit() {
    // 250 bytes fit a short string, but `<name>.delay.p<level>.<ms>ms`
    // would not: refused up front instead of failing at the first retry.
    let message = refused_name(250).await;
    assert!(message.contains("delay"), "{message}");
}

#[tokio::test]
async fn the_longest_name_taken_retries_through_its_delay_queue() {
    let url = require_amqp().await;
    let ns = Namespace::new("amqp-longest-name");
    let name = name_of_len(ns.prefix(), 222);
    let _guard = DeleteTopology::new(url.clone(), name.clone(), 3);
    let queue = AmqpQueue::connect(AmqpQueueConfig::new(url, QueueConfig::new(name)))
        .await
        .expect("a 222-byte name is taken");
    queue.enqueue(Job::new("job")).await.unwrap();
    let options = DequeueOptions::new(1)
        .wait(Duration::from_secs(5))
        .lease(Duration::from_secs(30));
    let got = queue.dequeue(options).await.unwrap().pop().expect("a job");
    // The retry goes through a delay queue whose name is 255 bytes at most.
    timeout(
        BOUND,
        queue.nack(
            &got.receipt,
            Nack::retry_after(Duration::from_millis(123_456_789), "later"),
        ),
    )
    .await
    .expect("nack answers in time")
    .unwrap();
    assert_eq!(queue.stats().await.unwrap().delayed, 1);
    queue.enqueue(Job::new("again")).await.unwrap();
    let got = queue.dequeue(options).await.unwrap().pop().expect("a job");
    timeout(
        BOUND,
        queue.nack(
            &got.receipt,
            Nack::retry_after(Duration::from_millis(150), "soon"),
        ),
    )
    .await
    .expect("nack answers in time")
    .unwrap();
    let back = queue
        .dequeue(options)
        .await
        .unwrap()
        .pop()
        .expect("retried");
    assert_eq!(&back.payload[..], b"again");
    assert_eq!(back.attempt, 2);
    queue.ack(&back.receipt).await.unwrap();
    // Delete takes the delay queues along.
    queue.delete().await.unwrap();
}

#[tokio::test]
async fn a_300_byte_header_name_is_refused_and_the_queue_works_on() {
    let url = require_amqp().await;
    let ns = Namespace::new("amqp-long-header");
    let name = ns.name("q");
    let _guard = DeleteTopology::new(url.clone(), name.clone(), 3);
    let queue = AmqpQueue::connect(AmqpQueueConfig::new(url, QueueConfig::new(name)))
        .await
        .unwrap();
    let long = "h".repeat(300);
    match queue.enqueue(Job::new("x").header(long, "v")).await {
        Err(QueueError::InvalidArgument(ArgumentError {
            name: "headers",
            reason,
        })) => {
            assert!(reason.contains("255 bytes"), "{reason}");
        }
        other => panic!("a 300-byte header name must be refused, got {other:?}"),
    }
    for reserved in ["x-death", "x-keel-attempts", "x-delivery-count", "BCC"] {
        assert!(
            matches!(
                queue.enqueue(Job::new("x").header(reserved, "v")).await,
                Err(QueueError::InvalidArgument(ArgumentError {
                    name: "headers",
                    ..
                }))
            ),
            "{reserved} is reserved"
        );
    }
    let id = keel_queue::JobId::from_string("i".repeat(256));
    assert!(matches!(
        queue.enqueue(Job::new("x").id(id)).await,
        Err(QueueError::InvalidArgument(ArgumentError {
            name: "id",
            ..
        }))
    ));
    // A 255-byte header name and an `x-` header of the caller's arrive.
    let fits = "h".repeat(255);
    queue
        .enqueue(
            Job::new("ok")
                .header(fits.clone(), "v")
                .header("x-request-id", "r-1"),
        )
        .await
        .unwrap();
    let got = queue
        .dequeue(DequeueOptions::new(1).wait(Duration::from_secs(5)))
        .await
        .unwrap()
        .pop()
        .expect("the job");
    assert_eq!(got.headers[&fits], "v");
    assert_eq!(got.headers["x-request-id"], "r-1");
    queue.ack(&got.receipt).await.unwrap();
    queue.delete().await.unwrap();
}

#[tokio::test]
async fn delete_removes_delay_queues_other_handles_declared() {
    let url = require_amqp().await;
    let ns = Namespace::new("amqp-delete-delays");
    let name = ns.name("q");
    let _guard = DeleteTopology::new(url.clone(), name.clone(), 3);
    let config = AmqpQueueConfig::new(url.clone(), QueueConfig::new(name.clone()));
    let producer = AmqpQueue::connect(config.clone()).await.unwrap();
    producer
        .enqueue(Job::new("later").delay(Duration::from_secs(600)))
        .await
        .unwrap();
    // Another handle, which never declared it, deletes the queue.
    let admin = AmqpQueue::connect(config).await.unwrap();
    admin.delete().await.unwrap();
    drop((producer, admin));
    // The broker has none of the queue's queues left.
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    for queue in [
        format!("{name}.delay.p1.600000ms"),
        format!("{name}.p1"),
        format!("{name}.dead"),
        format!("{name}.delays"),
    ] {
        let channel = conn.create_channel().await.unwrap();
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let found = channel
            .queue_declare(queue.as_str().into(), passive, Default::default())
            .await;
        assert!(found.is_err(), "`{queue}` is still there");
    }
}
