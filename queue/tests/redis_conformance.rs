//! The conformance suite on the Redis Streams backend, against the real
//! server at `REDIS_URL` (default `redis://127.0.0.1:6379`).
#![cfg(feature = "redis")]

use keel_queue::conformance::QueueSubject;
use keel_queue::{RedisQueue, RedisQueueConfig};
use keel_testkit::{Namespace, redis_cleanup, require_redis};

keel_queue::queue_conformance!(redis, |config: keel_queue::QueueConfig| async move {
    let url = require_redis().await;
    let cleanup = Namespace::new("redis-conformance");
    let (cleanup_url, name) = (url.clone(), config.name.clone());
    cleanup.on_drop(move || {
        let _ = redis_cleanup(&cleanup_url, &name);
    });
    let queue = RedisQueue::connect(RedisQueueConfig::new(url, config))
        .await
        .expect("connect to redis");
    QueueSubject::new(queue).with_guard(cleanup)
});
