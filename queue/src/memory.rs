//! The in-memory backend: the embedded default, always built.
//!
//! # What `Ok` from `enqueue` promises
//!
//! The job is in this process's memory. It survives consumer crashes (leases
//! expire and the job comes back) but **not** a restart of the process:
//! use the Redis or RabbitMQ backend when jobs must outlive the process.
//!
//! # Leases
//!
//! Leases run on `tokio::time`, so tests can pause and advance time. An
//! expired lease puts the job back at the tail of its priority level with
//! `attempt + 1`, or dead-letters it when that was its last attempt. A
//! [`Nack::Release`] puts it back at the tail at once with the same
//! `attempt`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::QueueConfig;
use crate::error::{QueueError, Result};
use crate::ids::IdGen;
use crate::metrics::QueueMetrics;
use crate::queue::Queue;
use crate::types::{
    DeadLetter, Delivery, DequeueOptions, Enqueued, Headers, Job, JobId, Nack, Priority,
    QueueCapabilities, QueueStats, Receipt,
};

const BACKEND: &str = "memory";

/// A queue in this process's memory: the embedded default.
///
/// # What `Ok` from `enqueue` promises
///
/// The job is in this process's memory. It survives consumer crashes (leases
/// expire and the job comes back) but **not** a restart of the process: use
/// the Redis or RabbitMQ backend when jobs must outlive the process.
///
/// # Leases
///
/// Leases run on `tokio::time`, so tests can pause and advance time. An
/// expired lease puts the job back at the tail of its priority level with
/// `attempt + 1`, or dead-letters it when that was its last attempt. A
/// [`Nack::Release`] puts it back at the tail at once with the same
/// `attempt`.
///
/// Cloning is cheap and every clone is the same queue.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), keel_queue::QueueError> {
/// use keel_queue::{DequeueOptions, Job, MemoryQueue, Queue, QueueConfig};
///
/// let queue = MemoryQueue::new(QueueConfig::new("jobs").capacity(1_000))?;
/// queue.enqueue(Job::new("hello")).await?;
/// let deliveries = queue.dequeue(DequeueOptions::new(10)).await?;
/// assert_eq!(&deliveries[0].payload[..], b"hello");
/// queue.ack(&deliveries[0].receipt).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct MemoryQueue {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: QueueConfig,
    ids: IdGen,
    metrics: QueueMetrics,
    state: Mutex<State>,
    /// Woken whenever work may have become available sooner.
    changed: Notify,
}

#[derive(Debug)]
struct Record {
    id: JobId,
    payload: Bytes,
    headers: Headers,
    priority: Priority,
    /// Deliveries made so far.
    attempts: u32,
    enqueued_at: SystemTime,
    deadline: Option<SystemTime>,
    /// When it last became ready (for the oldest-ready age).
    ready_since: Instant,
    place: Place,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Ready,
    Delayed,
    Leased { token: u64, expires: Instant },
}

/// Leases that were handed out together and expire together.
#[derive(Debug)]
struct LeaseBatch {
    expires: Instant,
    /// `(seq, token)` of each lease.
    members: Vec<(u64, u64)>,
}

impl PartialEq for LeaseBatch {
    fn eq(&self, other: &Self) -> bool {
        self.expires == other.expires
    }
}

impl Eq for LeaseBatch {}

impl PartialOrd for LeaseBatch {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for LeaseBatch {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.expires.cmp(&other.expires)
    }
}

/// The records of a queue's jobs by sequence number: a window of
/// consecutive numbers in enqueue order, so the usual first-in, first-out
/// flow writes and reads records in memory order (a hash map scattered
/// them, and a large backlog cost a cache miss per job), and a map for
/// the few that outlive the window (long delays, long leases).
#[derive(Debug, Default)]
struct Jobs {
    /// `window[i]` holds sequence number `base + i`; `None` once gone.
    window: VecDeque<Option<Record>>,
    base: u64,
    /// Records in `window`.
    in_window: usize,
    /// Records numbered below `base`. Keyed by our own sequence numbers,
    /// so a fast non-keyed hash is safe.
    old: HashMap<u64, Record, foldhash::fast::RandomState>,
}

impl Jobs {
    /// No jobs; the next one pushed is numbered `base`.
    fn starting_at(base: u64) -> Self {
        Jobs {
            base,
            ..Jobs::default()
        }
    }

    fn len(&self) -> usize {
        self.in_window + self.old.len()
    }

    /// Adds the record numbered `seq`, the next number after the last push.
    fn push(&mut self, seq: u64, record: Record) {
        debug_assert_eq!(seq, self.base + self.window.len() as u64);
        self.window.push_back(Some(record));
        self.in_window += 1;
    }

    fn get(&self, seq: u64) -> Option<&Record> {
        match seq.checked_sub(self.base) {
            Some(i) => self.window.get(usize::try_from(i).ok()?)?.as_ref(),
            None => self.old.get(&seq),
        }
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut Record> {
        match seq.checked_sub(self.base) {
            Some(i) => self.window.get_mut(usize::try_from(i).ok()?)?.as_mut(),
            None => self.old.get_mut(&seq),
        }
    }

    fn remove(&mut self, seq: u64) -> Option<Record> {
        let Some(i) = seq.checked_sub(self.base) else {
            return self.old.remove(&seq);
        };
        let record = self.window.get_mut(usize::try_from(i).ok()?)?.take()?;
        self.in_window -= 1;
        self.trim();
        Some(record)
    }

    fn retain(&mut self, mut keep: impl FnMut(&Record) -> bool) {
        for slot in &mut self.window {
            if slot.as_ref().is_some_and(|record| !keep(record)) {
                *slot = None;
                self.in_window -= 1;
            }
        }
        self.old.retain(|_, record| keep(record));
        self.trim();
    }

    /// Drops empty slots at the front; moves records at the front to `old`
    /// while empty slots outnumber the records, so the window stays at
    /// most about twice the size of what it holds.
    fn trim(&mut self) {
        while let Some(front) = self.window.front() {
            if front.is_some() && self.window.len() <= 2 * self.in_window + 64 {
                break;
            }
            if let Some(Some(record)) = self.window.pop_front() {
                self.in_window -= 1;
                self.old.insert(self.base, record);
            }
            self.base += 1;
        }
    }
}

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    next_token: u64,
    jobs: Jobs,
    /// One FIFO per priority level, index = level.
    ready: Vec<VecDeque<u64>>,
    delayed: BinaryHeap<Reverse<(Instant, u64)>>,
    delayed_count: u64,
    /// Lease expiries, one entry per batch handed out together; stale
    /// members (acked, extended) are skipped when the batch comes due.
    leases: BinaryHeap<Reverse<LeaseBatch>>,
    leased_count: u64,
    dead: VecDeque<DeadLetter>,
    dedup: HashMap<String, (JobId, Instant)>,
    dedup_expiry: BinaryHeap<Reverse<(Instant, String)>>,
}

impl MemoryQueue {
    /// Builds a queue from `config`.
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidConfig`] naming the bad field.
    pub fn new(config: QueueConfig) -> Result<Self> {
        config.validate()?;
        let levels = usize::from(config.priority_levels);
        let state = State {
            ready: (0..levels).map(|_| VecDeque::new()).collect(),
            ..State::default()
        };
        Ok(MemoryQueue {
            shared: Arc::new(Shared {
                metrics: QueueMetrics::new(BACKEND, &config.name),
                ids: IdGen::new(),
                config,
                state: Mutex::new(state),
                changed: Notify::new(),
            }),
        })
    }

    /// The configuration the queue was built with.
    pub fn config(&self) -> &QueueConfig {
        &self.shared.config
    }

    /// Checks one job's priority and fields.
    fn check(&self, job: &Job) -> Result<()> {
        self.shared.config.check_priority(job.priority)?;
        crate::types::check_job(job, &crate::types::Limits::NONE)
    }

    /// Adds one job that passed [`check`](Self::check); `now` and `wall`
    /// are read once per batch.
    fn insert(
        &self,
        state: &mut State,
        job: Job,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Enqueued> {
        let config = &self.shared.config;
        if let Some(key) = &job.idempotency_key {
            state.expire_dedup(now);
            if let Some((id, _)) = state.dedup.get(key) {
                self.shared.metrics.duplicates.increment(1);
                return Ok(Enqueued {
                    id: id.clone(),
                    duplicate: true,
                });
            }
        }
        if let Some(capacity) = config.capacity
            && state.jobs.len() as u64 >= capacity
        {
            self.shared.metrics.full.increment(1);
            return Err(QueueError::Full { capacity });
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        let id = match job.id {
            Some(id) => id,
            None => self.shared.ids.id(seq),
        };
        if let Some(key) = job.idempotency_key {
            let expires = now + config.dedup_window;
            state.dedup.insert(key.clone(), (id.clone(), expires));
            state.dedup_expiry.push(Reverse((expires, key)));
        }
        let delay = job.delay.filter(|d| !d.is_zero());
        let record = Record {
            id: id.clone(),
            payload: job.payload,
            headers: job.headers,
            priority: job.priority,
            attempts: 0,
            enqueued_at: wall,
            deadline: job.deadline,
            ready_since: now,
            place: if delay.is_some() {
                Place::Delayed
            } else {
                Place::Ready
            },
        };
        match delay {
            Some(delay) => {
                state.delayed.push(Reverse((now + delay, seq)));
                state.delayed_count += 1;
            }
            None => state.ready[usize::from(job.priority.0)].push_back(seq),
        }
        state.jobs.push(seq, record);
        self.shared.metrics.enqueued.increment(1);
        Ok(Enqueued {
            id,
            duplicate: false,
        })
    }

    /// Finds the leased record a receipt names, or says why it is invalid.
    fn leased<'s>(
        state: &'s mut State,
        receipt: &Receipt,
        now: Instant,
    ) -> Result<(u64, &'s mut Record)> {
        let (seq, token) = parse_receipt(receipt)?;
        let record = state.jobs.get_mut(seq).ok_or_else(|| {
            QueueError::InvalidReceipt("the job was already acked, nacked or dead-lettered".into())
        })?;
        match record.place {
            Place::Leased { token: t, expires } if t == token && expires > now => Ok((seq, record)),
            Place::Leased { token: t, .. } if t == token => Err(QueueError::InvalidReceipt(
                "the lease expired; the job is being redelivered".into(),
            )),
            _ => Err(QueueError::InvalidReceipt(
                "the lease expired and the job was redelivered or settled".into(),
            )),
        }
    }
}

fn receipt_for(seq: u64, token: u64) -> Receipt {
    // "m:" + two u64s + ':' fits the receipt's inline buffer for any job
    // this process will see; built on the stack, no allocation.
    let mut text = [0u8; 43];
    let (mut a, mut b) = (itoa::Buffer::new(), itoa::Buffer::new());
    let (seq, token) = (a.format(seq).as_bytes(), b.format(token).as_bytes());
    let len = 2 + seq.len() + 1 + token.len();
    text[..2].copy_from_slice(b"m:");
    text[2..2 + seq.len()].copy_from_slice(seq);
    text[2 + seq.len()] = b':';
    text[3 + seq.len()..len].copy_from_slice(token);
    Receipt::from_short(std::str::from_utf8(&text[..len]).expect("ASCII"))
}

fn parse_receipt(receipt: &Receipt) -> Result<(u64, u64)> {
    let bad = || {
        QueueError::InvalidReceipt(format!(
            "`{}` is not a memory-queue receipt",
            receipt.as_str()
        ))
    };
    let rest = receipt.as_bytes().strip_prefix(b"m:").ok_or_else(bad)?;
    let colon = rest.iter().position(|&b| b == b':').ok_or_else(bad)?;
    let (seq, token) = (&rest[..colon], &rest[colon + 1..]);
    Ok((
        parse_u64(seq).ok_or_else(bad)?,
        parse_u64(token).ok_or_else(bad)?,
    ))
}

/// Decimal digits to a `u64`; `None` for anything else or an overflow.
fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let d = d.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

impl State {
    /// Removes every ready and delayed job (`Queue::purge`); leased jobs
    /// stay. Answers how many were removed.
    fn purge_waiting(&mut self) -> u64 {
        let before = self.jobs.len();
        self.jobs
            .retain(|record| matches!(record.place, Place::Leased { .. }));
        for level in &mut self.ready {
            level.clear();
        }
        self.delayed.clear();
        self.delayed_count = 0;
        (before - self.jobs.len()) as u64
    }

    fn expire_dedup(&mut self, now: Instant) {
        while let Some(Reverse((expires, _))) = self.dedup_expiry.peek() {
            if *expires > now {
                break;
            }
            let Some(Reverse((expires, key))) = self.dedup_expiry.pop() else {
                break;
            };
            if self.dedup.get(&key).is_some_and(|(_, e)| *e == expires) {
                self.dedup.remove(&key);
            }
        }
    }

    fn make_ready(&mut self, seq: u64, now: Instant) {
        if let Some(record) = self.jobs.get_mut(seq) {
            record.place = Place::Ready;
            record.ready_since = now;
            self.ready[usize::from(record.priority.0)].push_back(seq);
        }
    }

    fn make_delayed(&mut self, seq: u64, due: Instant) {
        if let Some(record) = self.jobs.get_mut(seq) {
            record.place = Place::Delayed;
            self.delayed.push(Reverse((due, seq)));
            self.delayed_count += 1;
        }
    }

    fn kill(&mut self, seq: u64, reason: String, metrics: &QueueMetrics) {
        if let Some(record) = self.jobs.remove(seq) {
            tracing::debug!(job = %record.id, %reason, "job dead-lettered");
            metrics.dead_lettered.increment(1);
            self.dead.push_back(DeadLetter {
                id: record.id,
                payload: record.payload,
                headers: record.headers,
                reason,
                attempts: record.attempts,
                priority: record.priority,
                enqueued_at: record.enqueued_at,
                failed_at: SystemTime::now(),
            });
        }
    }

    /// Promotes due delayed jobs and takes back expired leases.
    fn maintain(&mut self, now: Instant, config: &QueueConfig, metrics: &QueueMetrics) {
        while let Some(Reverse((due, seq))) = self.delayed.peek().copied() {
            if due > now {
                break;
            }
            self.delayed.pop();
            self.delayed_count -= 1;
            self.make_ready(seq, now);
        }
        // Expired leases go back in expiry order, then enqueue order, however
        // they were batched.
        let mut due = Vec::new();
        while self
            .leases
            .peek()
            .is_some_and(|Reverse(batch)| batch.expires <= now)
        {
            let Some(Reverse(batch)) = self.leases.pop() else {
                break;
            };
            due.extend(
                batch
                    .members
                    .into_iter()
                    .map(|(seq, token)| (batch.expires, seq, token)),
            );
        }
        due.sort_unstable();
        for (expires, seq, token) in due {
            self.expire_lease(seq, token, expires, now, config, metrics);
        }
    }

    /// Takes back one lease of an expired batch, unless it was settled or
    /// extended since.
    fn expire_lease(
        &mut self,
        seq: u64,
        token: u64,
        expires: Instant,
        now: Instant,
        config: &QueueConfig,
        metrics: &QueueMetrics,
    ) {
        let Some(record) = self.jobs.get(seq) else {
            return;
        };
        if record.place != (Place::Leased { token, expires }) {
            return;
        }
        self.leased_count -= 1;
        metrics.lease_expired.increment(1);
        tracing::debug!(job = %record.id, attempt = record.attempts, "lease expired");
        if record.attempts >= config.max_attempts {
            let reason = config.exhausted_reason(&format!(
                "lease expired on attempt {} (consumer crashed or too slow)",
                record.attempts
            ));
            self.kill(seq, reason, metrics);
        } else {
            self.make_ready(seq, now);
        }
    }

    /// When the next delayed job or lease becomes due.
    fn next_event(&self) -> Option<Instant> {
        let delayed = self.delayed.peek().map(|Reverse((due, _))| *due);
        let lease = self.leases.peek().map(|Reverse(batch)| batch.expires);
        match (delayed, lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn take_ready(
        &mut self,
        options: &DequeueOptions,
        now: Instant,
        metrics: &QueueMetrics,
    ) -> Vec<Delivery> {
        let mut out = Vec::new();
        let mut leased = Vec::new();
        let expires = now + options.lease;
        let wall = SystemTime::now();
        for level in (0..self.ready.len()).rev() {
            while out.len() < options.max {
                let Some(seq) = self.ready[level].pop_front() else {
                    break;
                };
                let Some(record) = self.jobs.get_mut(seq) else {
                    continue;
                };
                if record.deadline.is_some_and(|d| d <= wall) {
                    self.kill(seq, "deadline exceeded before delivery".into(), metrics);
                    continue;
                }
                let token = self.next_token;
                self.next_token += 1;
                record.attempts += 1;
                record.place = Place::Leased { token, expires };
                leased.push((seq, token));
                out.push(Delivery {
                    id: record.id.clone(),
                    payload: record.payload.clone(),
                    headers: record.headers.clone(),
                    receipt: receipt_for(seq, token),
                    attempt: record.attempts,
                    enqueued_at: record.enqueued_at,
                    priority: record.priority,
                    deadline: record.deadline,
                });
            }
        }
        if !leased.is_empty() {
            self.leased_count += leased.len() as u64;
            self.leases.push(Reverse(LeaseBatch {
                expires,
                members: leased,
            }));
        }
        metrics.delivered.increment(out.len() as u64);
        out
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn enqueue(&self, job: Job) -> Result<Enqueued> {
        self.check(&job)?;
        let now = Instant::now();
        let enqueued = self.insert(&mut self.shared.state.lock(), job, now, SystemTime::now())?;
        if !enqueued.duplicate {
            self.shared.changed.notify_waiters();
        }
        Ok(enqueued)
    }

    async fn enqueue_batch(&self, jobs: Vec<Job>) -> Result<Vec<Enqueued>> {
        // Checked up front, as the other backends do: a bad job stops the
        // batch before any of it is enqueued.
        for job in &jobs {
            self.check(job)?;
        }
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut out = Vec::with_capacity(jobs.len());
        let result = {
            let mut state = self.shared.state.lock();
            jobs.into_iter()
                .try_for_each(|job| self.insert(&mut state, job, now, wall).map(|e| out.push(e)))
        };
        if !out.is_empty() {
            self.shared.changed.notify_waiters();
        }
        result.map(|()| out)
    }

    async fn dequeue(&self, options: DequeueOptions) -> Result<Vec<Delivery>> {
        options.validate()?;
        let shared = &self.shared;
        let give_up = Instant::now() + options.wait;
        loop {
            // Register for wake-ups before looking, so a job enqueued between
            // the look and the wait is not missed.
            let changed = shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = Instant::now();
            let (deliveries, next_event) = {
                let mut state = shared.state.lock();
                state.maintain(now, &shared.config, &shared.metrics);
                let deliveries = state.take_ready(&options, now, &shared.metrics);
                (deliveries, state.next_event())
            };
            if !deliveries.is_empty() || now >= give_up {
                return Ok(deliveries);
            }
            let wake = next_event.map_or(give_up, |e| e.min(give_up));
            tokio::select! {
                () = &mut changed => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn ack(&self, receipt: &Receipt) -> Result<()> {
        let now = Instant::now();
        let mut state = self.shared.state.lock();
        let (seq, _) = Self::leased(&mut state, receipt, now)?;
        state.jobs.remove(seq);
        state.leased_count -= 1;
        self.shared.metrics.acked.increment(1);
        Ok(())
    }

    async fn ack_batch(&self, receipts: &[Receipt]) -> Result<()> {
        let now = Instant::now();
        let mut invalid = 0usize;
        let mut first = None;
        {
            let mut state = self.shared.state.lock();
            for receipt in receipts {
                match Self::leased(&mut state, receipt, now) {
                    Ok((seq, _)) => {
                        state.jobs.remove(seq);
                        state.leased_count -= 1;
                    }
                    Err(QueueError::InvalidReceipt(why)) => {
                        invalid += 1;
                        first.get_or_insert(why);
                    }
                    Err(other) => return Err(other),
                }
            }
        }
        self.shared
            .metrics
            .acked
            .increment((receipts.len() - invalid) as u64);
        match first {
            None => Ok(()),
            Some(why) => Err(QueueError::InvalidReceipt(format!(
                "{invalid} of {} receipts were not valid (the rest were acked); first: {why}",
                receipts.len()
            ))),
        }
    }

    async fn nack(&self, receipt: &Receipt, action: Nack) -> Result<()> {
        let now = Instant::now();
        let config = &self.shared.config;
        {
            let mut state = self.shared.state.lock();
            let (seq, record) = Self::leased(&mut state, receipt, now)?;
            let attempts = record.attempts;
            state.leased_count -= 1;
            match action {
                Nack::DeadLetter { reason } => {
                    state.kill(seq, reason, &self.shared.metrics);
                }
                Nack::Retry { reason, .. } if attempts >= config.max_attempts => {
                    state.kill(seq, config.exhausted_reason(&reason), &self.shared.metrics);
                }
                Nack::Release { reason } => {
                    // The delivery is not counted: the next one repeats its
                    // attempt number.
                    let record = state.jobs.get_mut(seq).expect("leased() found it");
                    record.attempts = record.attempts.saturating_sub(1);
                    tracing::debug!(job = %record.id, %reason, "job released");
                    self.shared.metrics.released.increment(1);
                    state.make_ready(seq, now);
                }
                Nack::Retry { after, .. } => {
                    self.shared.metrics.retried.increment(1);
                    let delay = after.unwrap_or_else(|| config.backoff_for(attempts));
                    if delay.is_zero() {
                        state.make_ready(seq, now);
                    } else {
                        state.make_delayed(seq, now + delay);
                    }
                }
            }
        }
        self.shared.changed.notify_waiters();
        Ok(())
    }

    async fn extend_lease(&self, receipt: &Receipt, lease: Duration) -> Result<()> {
        crate::types::check_lease(lease)?;
        let now = Instant::now();
        let mut state = self.shared.state.lock();
        let (seq, record) = Self::leased(&mut state, receipt, now)?;
        let Place::Leased { token, .. } = record.place else {
            unreachable!("leased() only answers leased records");
        };
        let expires = now + lease;
        record.place = Place::Leased { token, expires };
        state.leases.push(Reverse(LeaseBatch {
            expires,
            members: vec![(seq, token)],
        }));
        Ok(())
    }

    async fn stats(&self) -> Result<QueueStats> {
        let now = Instant::now();
        let stats = {
            let mut state = self.shared.state.lock();
            state.maintain(now, &self.shared.config, &self.shared.metrics);
            let ready: usize = state.ready.iter().map(VecDeque::len).sum();
            let oldest = state
                .ready
                .iter()
                .filter_map(|level| level.front())
                .filter_map(|&seq| state.jobs.get(seq))
                .map(|record| record.ready_since)
                .min();
            QueueStats {
                ready: ready as u64,
                delayed: state.delayed_count,
                in_flight: state.leased_count,
                dead: state.dead.len() as u64,
                oldest_ready_age: oldest.map(|since| now.saturating_duration_since(since)),
            }
        };
        self.shared.metrics.record_stats(&stats);
        Ok(stats)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let state = self.shared.state.lock();
        Ok(state.dead.iter().take(limit).cloned().collect())
    }

    async fn replay_dead_letters(&self, ids: &[JobId]) -> Result<u64> {
        let now = Instant::now();
        let mut replayed = 0;
        {
            let mut state = self.shared.state.lock();
            let (back, keep): (Vec<DeadLetter>, Vec<DeadLetter>) = state
                .dead
                .drain(..)
                .partition(|dead| ids.contains(&dead.id));
            state.dead = keep.into();
            for dead in back {
                let seq = state.next_seq;
                state.next_seq += 1;
                let priority =
                    Priority(dead.priority.0.min(self.shared.config.priority_levels - 1));
                state.jobs.push(
                    seq,
                    Record {
                        id: dead.id,
                        payload: dead.payload,
                        headers: dead.headers,
                        priority,
                        attempts: 0,
                        enqueued_at: dead.enqueued_at,
                        deadline: None,
                        ready_since: now,
                        place: Place::Ready,
                    },
                );
                state.ready[usize::from(priority.0)].push_back(seq);
                replayed += 1;
            }
        }
        if replayed > 0 {
            self.shared.changed.notify_waiters();
        }
        Ok(replayed)
    }

    async fn purge_dead_letters(&self) -> Result<u64> {
        let mut state = self.shared.state.lock();
        let purged = state.dead.len() as u64;
        state.dead.clear();
        Ok(purged)
    }

    async fn purge(&self) -> Result<u64> {
        Ok(self.shared.state.lock().purge_waiting())
    }

    async fn delete(&self) -> Result<()> {
        let levels = usize::from(self.shared.config.priority_levels);
        {
            let mut state = self.shared.state.lock();
            // The counters carry on, so no earlier receipt names a new job.
            *state = State {
                next_seq: state.next_seq,
                jobs: Jobs::starting_at(state.next_seq),
                next_token: state.next_token,
                ready: (0..levels).map(|_| VecDeque::new()).collect(),
                ..State::default()
            };
        }
        // Waiting consumers look again (and find nothing).
        self.shared.changed.notify_waiters();
        Ok(())
    }

    fn capabilities(&self) -> QueueCapabilities {
        QueueCapabilities {
            backend: BACKEND,
            delay: true,
            priority_levels: self.shared.config.priority_levels,
            idempotency: true,
            lease_expiry: true,
            capacity: true,
            exact_stats: true,
            dead_letter_admin: true,
            durable: false,
            caller_ids: true,
        }
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(attempts: u32) -> Record {
        Record {
            id: JobId::from_str("x"),
            payload: Bytes::new(),
            headers: Headers::new(),
            priority: Priority::NORMAL,
            attempts,
            enqueued_at: SystemTime::UNIX_EPOCH,
            deadline: None,
            ready_since: Instant::now(),
            place: Place::Ready,
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Push,
        /// Removes the live record at this position (modulo their count).
        Remove(usize),
        /// Removes a number that may be gone or never pushed.
        RemoveAny(u64),
        /// Keeps the records whose number is not a multiple of this.
        Retain(u64),
    }

    proptest! {
        /// The window-and-map store answers like a plain map, whatever the
        /// order of removals, and its window stays bounded by what it holds.
        #[test]
        fn jobs_behave_like_a_map(
            start in 0u64..1_000,
            ops in proptest::collection::vec(
                prop_oneof![
                    4 => Just(Op::Push),
                    3 => any::<usize>().prop_map(Op::Remove),
                    1 => (0u64..3_000).prop_map(Op::RemoveAny),
                    1 => (2u64..5).prop_map(Op::Retain),
                ],
                0..600,
            ),
        ) {
            let mut jobs = Jobs::starting_at(start);
            let mut model = std::collections::BTreeMap::new();
            let mut next = start;
            for op in ops {
                match op {
                    Op::Push => {
                        jobs.push(next, record(next as u32));
                        model.insert(next, next as u32);
                        next += 1;
                    }
                    Op::Remove(i) if !model.is_empty() => {
                        let seq = *model.keys().nth(i % model.len()).unwrap();
                        prop_assert_eq!(jobs.remove(seq).map(|r| r.attempts), model.remove(&seq));
                    }
                    Op::Remove(_) => {}
                    Op::RemoveAny(seq) => {
                        prop_assert_eq!(jobs.remove(seq).map(|r| r.attempts), model.remove(&seq));
                    }
                    Op::Retain(m) => {
                        jobs.retain(|r| u64::from(r.attempts) % m != 0);
                        model.retain(|seq, _| seq % m != 0);
                    }
                }
                prop_assert_eq!(jobs.len(), model.len());
                // Empty, or a live record first and no more than about
                // twice as many slots as records.
                prop_assert!(jobs.window.front().is_none_or(Option::is_some));
                prop_assert!(jobs.window.len() <= 2 * jobs.in_window + 64);
                for seq in start.saturating_sub(2)..next + 2 {
                    prop_assert_eq!(jobs.get(seq).map(|r| r.attempts), model.get(&seq).copied());
                }
            }
            // What is left can still be reached and removed.
            for (seq, attempts) in model {
                prop_assert_eq!(jobs.get_mut(seq).map(|r| r.attempts), Some(attempts));
                prop_assert_eq!(jobs.remove(seq).map(|r| r.attempts), Some(attempts));
            }
            prop_assert_eq!(jobs.len(), 0);
            prop_assert!(jobs.window.is_empty() && jobs.old.is_empty());
        }
    }

    #[test]
    fn receipts_round_trip() {
        for (seq, token) in [(0, 0), (7, 12_345), (u64::MAX, u64::MAX)] {
            let receipt = receipt_for(seq, token);
            assert_eq!(receipt.as_str(), format!("m:{seq}:{token}"));
            assert_eq!(parse_receipt(&receipt).unwrap(), (seq, token));
        }
    }

    #[test]
    fn foreign_receipts_are_invalid() {
        for text in [
            "",
            "m:",
            "m:1",
            "m:1:",
            "m::2",
            "m:1:2:3",
            "m:a:2",
            "m:-1:2",
            "x:1:2",
            "m:18446744073709551616:1",
        ] {
            assert!(
                matches!(
                    parse_receipt(&Receipt::from_string(text)),
                    Err(QueueError::InvalidReceipt(_))
                ),
                "{text:?}"
            );
        }
    }
}
