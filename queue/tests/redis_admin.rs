//! `delete` on Redis leaves no key of the queue behind.
#![cfg(feature = "redis")]

use std::time::Duration;

use keel_queue::{DequeueOptions, Job, Nack, Queue, QueueConfig, RedisQueue, RedisQueueConfig};
use keel_testkit::{Namespace, require_redis};

async fn keys(url: &str, pattern: &str) -> Vec<String> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn delete_leaves_no_key_behind() {
    let url = require_redis().await;
    let ns = Namespace::new("redis-delete").with_redis_cleanup(url.clone());
    // A name with glob characters: the scan must not match other queues.
    let name = ns.name("q*[x]");
    let queue = RedisQueue::connect(RedisQueueConfig::new(
        url.clone(),
        QueueConfig::new(name.clone()).capacity(100),
    ))
    .await
    .unwrap();
    let bystander = RedisQueue::connect(RedisQueueConfig::new(
        url.clone(),
        QueueConfig::new(ns.name("q-other")),
    ))
    .await
    .unwrap();
    bystander.enqueue(Job::new("stays")).await.unwrap();
    queue
        .enqueue(Job::new("a").idempotency_key("k"))
        .await
        .unwrap();
    queue
        .enqueue(Job::new("b").delay(Duration::from_secs(60)))
        .await
        .unwrap();
    queue.enqueue(Job::new("c")).await.unwrap();
    let got = queue
        .dequeue(DequeueOptions::new(2).wait(Duration::from_secs(2)))
        .await
        .unwrap();
    queue
        .nack(&got[0].receipt, Nack::dead_letter("dead"))
        .await
        .unwrap();
    let escaped: String = name
        .chars()
        .flat_map(|c| match c {
            '*' | '?' | '[' | ']' | '\\' => vec!['\\', c],
            c => vec![c],
        })
        .collect();
    let pattern = format!("keel:{{{escaped}}}*");
    assert!(!keys(&url, &pattern).await.is_empty());
    queue.delete().await.unwrap();
    assert_eq!(keys(&url, &pattern).await, Vec::<String>::new());
    assert_eq!(bystander.stats().await.unwrap().ready, 1);
    bystander.delete().await.unwrap();
}
