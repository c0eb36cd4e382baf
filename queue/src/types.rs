//! The values that cross the [`Queue`](crate::Queue) trait: jobs, deliveries,
//! receipts, options and statistics.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arrayvec::ArrayString;
use bytes::Bytes;
use keel_core::ArgumentError;

/// String headers carried with a job (content type, trace context, tenant…).
pub type Headers = BTreeMap<String, String>;

/// The identity of one job, stable across retries, lease expiries and replays.
///
/// Opaque: compare and print it, but do not parse it.
///
/// Cloning is cheap, as every delivery carries one: ids of up to
/// 38 bytes (every id the backends make) are held inline, longer ones
/// as a shared string.
#[derive(Clone)]
pub struct JobId(Text<Arc<str>, 38>);

impl JobId {
    /// Wraps a backend-chosen identifier. For backend implementors.
    pub fn from_string(id: impl Into<String>) -> Self {
        let id = id.into();
        JobId(Text::inline(&id).unwrap_or_else(|| Text::Heap(Arc::from(id))))
    }

    /// Copies `id` into a new identifier (no allocation when it is short).
    pub(crate) fn from_str(id: &str) -> Self {
        JobId(Text::inline(id).unwrap_or_else(|| Text::Heap(Arc::from(id))))
    }

    /// A new random identifier (UUID v4, simple form).
    pub fn random() -> Self {
        JobId::from_str(
            uuid::Uuid::new_v4()
                .simple()
                .encode_lower(&mut uuid::Uuid::encode_buffer()),
        )
    }

    /// The identifier as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl PartialEq for JobId {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for JobId {}

impl PartialOrd for JobId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for JobId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl std::hash::Hash for JobId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.as_str())
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Short text held inline (no allocation to make, clone or drop it), or
/// longer text on the heap in `H`.
#[derive(Clone)]
enum Text<H, const N: usize> {
    Inline(ArrayString<N>),
    Heap(H),
}

impl<H: std::ops::Deref<Target = str>, const N: usize> Text<H, N> {
    /// `text` inline, or `None` when it is longer than `N` bytes.
    fn inline(text: &str) -> Option<Self> {
        ArrayString::from(text).ok().map(Text::Inline)
    }

    fn as_bytes(&self) -> &[u8] {
        self.as_str().as_bytes()
    }

    fn as_str(&self) -> &str {
        match self {
            Text::Inline(text) => text,
            Text::Heap(heap) => heap,
        }
    }
}

/// Proof of one lease on one delivery; pass it back to `ack`, `nack` or
/// `extend_lease`.
///
/// A receipt is valid from `dequeue` until the lease expires or the job is
/// acked or nacked. Opaque: each backend encodes what it needs.
#[derive(Clone)]
pub struct Receipt(Text<String, 46>);

impl Receipt {
    /// Wraps a backend-encoded receipt. For backend implementors.
    pub fn from_string(receipt: impl Into<String>) -> Self {
        Receipt(Text::Heap(receipt.into()))
    }

    /// Copies a short receipt inline (no allocation), a long one to the
    /// heap.
    pub(crate) fn from_short(receipt: &str) -> Self {
        Receipt(Text::inline(receipt).unwrap_or_else(|| Text::Heap(receipt.to_owned())))
    }

    /// The encoded receipt.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The encoded receipt's bytes (no UTF-8 check).
    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl PartialEq for Receipt {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Receipt {}

impl std::hash::Hash for Receipt {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Debug for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Receipt({})", self.as_str())
    }
}

/// A job's priority level: higher is served first.
///
/// A queue has `priority_levels` levels (see
/// [`QueueConfig::priority_levels`](crate::QueueConfig::priority_levels)),
/// numbered `0..levels`; the default of three gives [`Priority::LOW`],
/// [`Priority::NORMAL`] and [`Priority::HIGH`]. Within one level jobs are
/// served first in, first out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(pub u8);

impl Priority {
    /// Level 0, served last.
    pub const LOW: Priority = Priority(0);
    /// Level 1, the default.
    pub const NORMAL: Priority = Priority(1);
    /// Level 2, served first on a queue with the default three levels.
    pub const HIGH: Priority = Priority(2);
}

impl Default for Priority {
    fn default() -> Self {
        Priority::NORMAL
    }
}

/// A job to enqueue: a payload, headers and delivery options.
///
/// ```
/// use std::time::Duration;
/// use keel_queue::{Job, JobId, Priority};
///
/// let job = Job::new("embed this")
///     .id(JobId::from_string("req-42"))
///     .header("tenant", "acme")
///     .priority(Priority::HIGH)
///     .delay(Duration::from_secs(5))
///     .idempotency_key("req-42");
/// assert_eq!(job.headers["tenant"], "acme");
/// ```
///
/// # Limits
///
/// Every backend checks a job against what it can store before it writes
/// anything, and refuses it with
/// [`InvalidArgument`](crate::QueueError::InvalidArgument) naming the field
/// (`id`, `headers`, `payload`, `idempotency_key`): an id or idempotency key
/// is never empty; RabbitMQ takes ids and header names of at most 255 bytes,
/// at most 64 KiB of headers in all, payloads of at most 128 MiB, and
/// refuses header names it reserves (`x-keel-*`, `x-death`,
/// `x-delivery-count`, `x-first-death-*`, `x-last-death-*`, `CC`, `BCC`);
/// Redis takes payloads of at most 512 MiB.
#[derive(Clone, Debug, Default)]
pub struct Job {
    /// The job's id, chosen by the caller; `None` (the default) lets the
    /// backend make a unique one. Backends that take caller-chosen ids say
    /// so in [`QueueCapabilities::caller_ids`]; the others refuse a job that
    /// carries one with [`Unsupported`](crate::QueueError::Unsupported).
    ///
    /// The id names the job in deliveries, dead letters and replays; the
    /// queue does not deduplicate on it (use an idempotency key for that),
    /// so two jobs enqueued under one id are two jobs.
    pub id: Option<JobId>,
    /// The opaque payload.
    pub payload: Bytes,
    /// String headers delivered with the payload.
    pub headers: Headers,
    /// Deliver no earlier than this long after `enqueue` returns.
    pub delay: Option<Duration>,
    /// The priority level.
    pub priority: Priority,
    /// A key that makes a second enqueue inside the queue's dedup window a
    /// no-op (it answers the first job's id with `duplicate: true`).
    pub idempotency_key: Option<String>,
    /// Past this instant the job is not delivered; it goes to the dead
    /// letters with the reason `deadline exceeded`.
    pub deadline: Option<SystemTime>,
}

impl Job {
    /// A job with this payload and default options.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Job {
            payload: payload.into(),
            ..Job::default()
        }
    }

    /// Sets the job's id (see [`Job::id`](Job#structfield.id)).
    pub fn id(mut self, id: JobId) -> Self {
        self.id = Some(id);
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Delays the first delivery.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Sets the priority level.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the deadline after which the job must not run.
    pub fn deadline(mut self, deadline: SystemTime) -> Self {
        self.deadline = Some(deadline);
        self
    }
}

/// The answer to an enqueue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enqueued {
    /// The job's id (the earlier job's id for a duplicate).
    pub id: JobId,
    /// `true` when the idempotency key was seen inside the dedup window and
    /// nothing new was enqueued.
    pub duplicate: bool,
}

/// A leased job handed to a consumer.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The job's id.
    pub id: JobId,
    /// The payload, as enqueued.
    pub payload: Bytes,
    /// The headers, as enqueued.
    pub headers: Headers,
    /// The lease; pass it to `ack`, `nack` or `extend_lease`.
    pub receipt: Receipt,
    /// Which delivery this is: 1 the first time, +1 after every nack-retry
    /// or lease expiry (a [`Nack::Release`] does not count).
    pub attempt: u32,
    /// When the job was first enqueued (wall clock).
    pub enqueued_at: SystemTime,
    /// The job's priority level.
    pub priority: Priority,
    /// The job's deadline, if any.
    pub deadline: Option<SystemTime>,
}

/// How to receive: how many, how long to wait, how long to lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DequeueOptions {
    /// At most this many deliveries (at least 1).
    pub max: usize,
    /// Wait at most this long for the first job (a long poll); zero returns
    /// at once.
    pub wait: Duration,
    /// Lease every delivery for this long; unacked jobs come back after it.
    pub lease: Duration,
}

impl DequeueOptions {
    /// Up to `max` jobs, waiting up to one second, leased for 30 seconds.
    pub fn new(max: usize) -> Self {
        DequeueOptions {
            max,
            ..DequeueOptions::default()
        }
    }

    /// Sets how long to wait for the first job.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Sets the lease.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }
}

/// The longest lease (and the longest wait) a `dequeue` or `extend_lease`
/// accepts: a year. A longer one would mean "never expire", which leaves a
/// crashed consumer's jobs stuck for good.
pub const MAX_LEASE: Duration = Duration::from_secs(365 * 24 * 60 * 60);

impl DequeueOptions {
    /// Checks the options, naming the bad field: `max` at least 1, `lease`
    /// above zero and at most [`MAX_LEASE`], `wait` at most [`MAX_LEASE`].
    /// Every backend's `dequeue` calls it first.
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidArgument`](crate::QueueError::InvalidArgument)
    /// naming the field.
    pub fn validate(&self) -> crate::Result<()> {
        if self.max == 0 {
            return Err(crate::QueueError::InvalidArgument(ArgumentError::new(
                "max",
                "must be at least 1",
            )));
        }
        if self.wait > MAX_LEASE {
            return Err(crate::QueueError::InvalidArgument(ArgumentError::new(
                "wait",
                format!("{:?} is longer than the most allowed, a year", self.wait),
            )));
        }
        check_lease(self.lease)
    }
}

/// Checks a lease length for `dequeue` and `extend_lease`.
pub(crate) fn check_lease(lease: Duration) -> crate::Result<()> {
    if lease.is_zero() || lease > MAX_LEASE {
        return Err(crate::QueueError::InvalidArgument(ArgumentError::new(
            "lease",
            format!(
                "{lease:?} is out of range: a lease is above zero and at most a year \
                 (extend a long job's lease as it runs instead)"
            ),
        )));
    }
    Ok(())
}

impl Default for DequeueOptions {
    fn default() -> Self {
        DequeueOptions {
            max: 1,
            wait: Duration::from_secs(1),
            lease: Duration::from_secs(30),
        }
    }
}

/// What to do with a job that was not processed successfully.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Nack {
    /// Deliver it again. `after: None` uses the queue's exponential backoff
    /// with jitter. Past the queue's `max_attempts` the job is dead-lettered
    /// instead.
    Retry {
        /// Redeliver after this long instead of the queue's backoff.
        after: Option<Duration>,
        /// Why it failed, kept if the job ends up dead-lettered.
        reason: String,
    },
    /// Give up on it now: move it to the dead letters with this reason.
    DeadLetter {
        /// Why it was abandoned.
        reason: String,
    },
    /// Hand it back unprocessed, without spending an attempt: the job is
    /// ready again at once, at the tail of its priority level, and its next
    /// delivery carries the same `attempt` as this one. A release never
    /// dead-letters a job, whatever its attempt count.
    ///
    /// For a consumer that gives work back without trying it (graceful
    /// shutdown, a rebalance), not for a handler failure: a consumer that
    /// releases the same job forever keeps it in circulation forever.
    Release {
        /// Why it was handed back, for logs.
        reason: String,
    },
}

impl Nack {
    /// Retry with the queue's backoff.
    pub fn retry(reason: impl Into<String>) -> Self {
        Nack::Retry {
            after: None,
            reason: reason.into(),
        }
    }

    /// Retry after a fixed delay.
    pub fn retry_after(after: Duration, reason: impl Into<String>) -> Self {
        Nack::Retry {
            after: Some(after),
            reason: reason.into(),
        }
    }

    /// Dead-letter at once.
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Nack::DeadLetter {
            reason: reason.into(),
        }
    }

    /// Hand back at once without spending an attempt; see [`Nack::Release`].
    pub fn release(reason: impl Into<String>) -> Self {
        Nack::Release {
            reason: reason.into(),
        }
    }
}

/// A job in the dead-letter store.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The job's id.
    pub id: JobId,
    /// The payload, as enqueued.
    pub payload: Bytes,
    /// The headers, as enqueued.
    pub headers: Headers,
    /// Why the job was dead-lettered.
    pub reason: String,
    /// How many deliveries were made.
    pub attempts: u32,
    /// The job's priority level.
    pub priority: Priority,
    /// When the job was first enqueued.
    pub enqueued_at: SystemTime,
    /// When it was dead-lettered.
    pub failed_at: SystemTime,
}

/// A snapshot of a queue's size.
///
/// Backends say in [`QueueCapabilities::exact_stats`] whether the counts are
/// exact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Jobs ready for delivery now.
    pub ready: u64,
    /// Jobs waiting for their delay or retry backoff.
    pub delayed: u64,
    /// Jobs leased to consumers.
    pub in_flight: u64,
    /// Jobs in the dead-letter store.
    pub dead: u64,
    /// How long the oldest ready job has waited since it was enqueued.
    pub oldest_ready_age: Option<Duration>,
}

/// What a backend supports; the conformance suite gates its cases on these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueCapabilities {
    /// The backend's name (`memory`, `redis`, `amqp`).
    pub backend: &'static str,
    /// Delayed delivery and retry-after delays.
    pub delay: bool,
    /// Number of priority levels.
    pub priority_levels: u8,
    /// Idempotency keys with a dedup window.
    pub idempotency: bool,
    /// Leases expire on their own (consumer crash, network cut) and
    /// `extend_lease` works.
    pub lease_expiry: bool,
    /// Bounded capacity answering `Full`.
    pub capacity: bool,
    /// `stats` counts are exact rather than estimates.
    pub exact_stats: bool,
    /// The dead-letter store can be listed, replayed and purged.
    pub dead_letter_admin: bool,
    /// Jobs survive a process restart.
    pub durable: bool,
    /// Jobs may carry a caller-chosen [`Job::id`](Job#structfield.id).
    pub caller_ids: bool,
}

/// What a backend can store: checked by [`check_job`] before anything is
/// written, so no input reaches a library that would panic or fail on it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// The backend's name, for `Unsupported`.
    pub(crate) backend: &'static str,
    /// Whether caller-chosen ids are taken.
    pub(crate) caller_ids: bool,
    /// Longest id, in bytes.
    pub(crate) max_id: usize,
    /// Longest header name, in bytes.
    pub(crate) max_header_name: usize,
    /// Most bytes of header names and values together.
    pub(crate) max_headers: usize,
    /// Largest payload, in bytes.
    pub(crate) max_payload: usize,
    /// Header names the backend reserves for itself.
    pub(crate) reserved_header: fn(&str) -> bool,
}

impl Limits {
    /// No limits beyond non-empty ids and keys (the memory backend).
    pub(crate) const NONE: Limits = Limits {
        backend: "memory",
        caller_ids: true,
        max_id: usize::MAX,
        max_header_name: usize::MAX,
        max_headers: usize::MAX,
        max_payload: usize::MAX,
        reserved_header: |_| false,
    };
}

/// A name or value shortened for an error message.
fn shown(text: &str) -> String {
    if text.len() <= 40 {
        return format!("{text:?}");
    }
    let mut end = 40;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &text[..end], text.len())
}

/// Checks a job against a backend's [`Limits`], naming the bad field.
pub(crate) fn check_job(job: &Job, limits: &Limits) -> crate::Result<()> {
    let invalid = |name: &'static str, reason: String| {
        Err(crate::QueueError::InvalidArgument(ArgumentError {
            name,
            reason,
        }))
    };
    if let Some(id) = &job.id {
        if !limits.caller_ids {
            return Err(crate::QueueError::Unsupported {
                backend: limits.backend,
                what: "caller-chosen job ids".into(),
            });
        }
        if id.as_str().is_empty() {
            return invalid("id", "must not be empty".into());
        }
        if id.as_str().len() > limits.max_id {
            return invalid(
                "id",
                format!(
                    "{} is longer than the {} backend's limit of {} bytes",
                    shown(id.as_str()),
                    limits.backend,
                    limits.max_id
                ),
            );
        }
    }
    if job.idempotency_key.as_deref() == Some("") {
        return invalid("idempotency_key", "must not be empty".into());
    }
    let mut total = 0usize;
    for (name, value) in &job.headers {
        if name.len() > limits.max_header_name {
            return invalid(
                "headers",
                format!(
                    "header name {} is longer than the {} backend's limit of {} bytes",
                    shown(name),
                    limits.backend,
                    limits.max_header_name
                ),
            );
        }
        if (limits.reserved_header)(name) {
            return invalid(
                "headers",
                format!(
                    "header name {} is reserved by the {} backend",
                    shown(name),
                    limits.backend
                ),
            );
        }
        total = total.saturating_add(name.len()).saturating_add(value.len());
    }
    if total > limits.max_headers {
        return invalid(
            "headers",
            format!(
                "{total} bytes of headers are more than the {} backend's limit of {} bytes",
                limits.backend, limits.max_headers
            ),
        );
    }
    if job.payload.len() > limits.max_payload {
        return invalid(
            "payload",
            format!(
                "{} bytes are more than the {} backend's limit of {} bytes",
                job.payload.len(),
                limits.backend,
                limits.max_payload
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, RandomState};

    #[test]
    fn short_and_long_ids_compare_and_hash_by_text() {
        let hasher = RandomState::new();
        for text in ["", "a", &"x".repeat(38), &"y".repeat(39), &"z".repeat(200)] {
            let (a, b) = (JobId::from_str(text), JobId::from_string(text));
            assert_eq!(a.as_str(), text);
            assert_eq!(a, b);
            assert_eq!(hasher.hash_one(&a), hasher.hash_one(text));
            assert_eq!(a.to_string(), text);
        }
        assert!(JobId::from_str("a") < JobId::from_str(&"b".repeat(50)));
        assert!(JobId::from_str(&"a".repeat(50)) < JobId::from_str("b"));
    }

    #[test]
    fn receipts_compare_by_text_however_held() {
        let hasher = RandomState::new();
        for text in ["m:1:2", &"r".repeat(46), &"r".repeat(47)] {
            let (short, long) = (Receipt::from_short(text), Receipt::from_string(text));
            assert_eq!(short, long);
            assert_eq!(short.as_str(), text);
            assert_eq!(short.as_bytes(), text.as_bytes());
            assert_eq!(hasher.hash_one(&short), hasher.hash_one(&long));
        }
        assert_ne!(Receipt::from_short("m:1:2"), Receipt::from_short("m:1:3"));
    }
}
