//! The conformance suite on the in-memory backend.

use keel_queue::MemoryQueue;
use keel_queue::conformance::Subject;

keel_queue::queue_conformance!(memory, |config| async move {
    Subject::new(MemoryQueue::new(config).expect("valid config"))
});
