//! Job ids shared by every backend: a random per-instance prefix and a
//! counter, so ids are unique across processes without a syscall per job.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::types::JobId;

/// Makes unique [`JobId`]s.
#[derive(Debug)]
pub(crate) struct IdGen {
    prefix: String,
    counter: AtomicU64,
}

impl IdGen {
    pub(crate) fn new() -> Self {
        IdGen {
            prefix: uuid::Uuid::new_v4().simple().to_string()[..16].to_owned(),
            counter: AtomicU64::new(0),
        }
    }

    /// The random part, also usable as an instance name (RabbitMQ consumer
    /// tags).
    #[cfg_attr(not(feature = "amqp"), allow(dead_code))]
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    #[cfg_attr(not(any(feature = "redis", feature = "amqp")), allow(dead_code))]
    pub(crate) fn next(&self) -> JobId {
        self.id(self.counter.fetch_add(1, Ordering::Relaxed))
    }

    /// The id for sequence number `n`, for callers that already count
    /// under a lock (no shared atomic on the hot path).
    pub(crate) fn id(&self, n: u64) -> JobId {
        // prefix (16) + '-' + at most 20 digits: built on the stack, one
        // allocation for the id itself.
        let mut text = [0u8; 40];
        let mut buffer = itoa::Buffer::new();
        let digits = buffer.format(n).as_bytes();
        let prefix = self.prefix.as_bytes();
        let len = prefix.len() + 1 + digits.len();
        text[..prefix.len()].copy_from_slice(prefix);
        text[prefix.len()] = b'-';
        text[prefix.len() + 1..len].copy_from_slice(digits);
        JobId::from_str(std::str::from_utf8(&text[..len]).expect("ASCII"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_across_generators() {
        let (a, b) = (IdGen::new(), IdGen::new());
        let ids: std::collections::HashSet<JobId> =
            (0..100).flat_map(|_| [a.next(), b.next()]).collect();
        assert_eq!(ids.len(), 200);
    }
}
