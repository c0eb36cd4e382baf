//! The conformance suite on the in-memory backend.

use keel_queue::MemoryQueue;
use keel_queue::conformance::QueueSubject;

keel_queue::queue_conformance!(memory, |config| async move {
    QueueSubject::new(MemoryQueue::new(config).expect("valid config"))
});

// A sharded queue of one shard keeps every promise of the suite (receipts
// naming their shard, batches split and joined, admin calls forwarded);
// with more shards order holds per shard only, which the FIFO and
// priority cases do not allow for.
keel_queue::queue_conformance!(sharded_memory, |config| async move {
    QueueSubject::new(
        keel_queue::ShardedQueue::new([MemoryQueue::new(config).expect("valid config")])
            .expect("one shard"),
    )
});
