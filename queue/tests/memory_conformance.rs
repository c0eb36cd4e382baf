//! The conformance suite on the in-memory backend.

use keel_queue::MemoryQueue;
use keel_queue::conformance::QueueSubject;

keel_queue::queue_conformance!(memory, |config| async move {
    QueueSubject::new(MemoryQueue::new(config).expect("valid config"))
});
