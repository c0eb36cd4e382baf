//! The read path: `dequeue`'s pipelined reads of the priority levels, the
//! housekeeping script before them, giving back what was read past the
//! batch, dead-lettering what cannot be delivered, and the blocking wait.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::Value;
use bytes::Bytes;
use keel_core::redis::RedisPool;
use parking_lot::Mutex;

use super::error::RedisFailure;
use super::receipt::id_before;
use super::{GROUP, RedisQueue, decode_headers, epoch_ms, from_epoch_ms, ms, protocol};
use crate::error::{QueueError, Result};
use crate::types::{Delivery, Headers, JobId, Priority, Receipt};

/// One stream entry as `XREADGROUP` answers it: its id and raw fields (`m`
/// meta, `p` payload, optional `h` headers and `d` deadline).
type Entry = (String, Vec<Vec<u8>>);
/// `XREADGROUP`'s answer for one stream.
type ReadReply = Option<Vec<(String, Vec<Entry>)>>;
/// Deliveries per `dequeue` call at most (keeps each read short).
pub(super) const DEQUEUE_MAX: usize = 1_000;
/// How often a reading handle takes back expired leases.
const RECLAIM_EVERY: Duration = Duration::from_millis(500);
/// Reads of one level per `dequeue` when jobs past their deadline take the
/// place of live ones.
const READS_PER_LEVEL: usize = 4;

/// Deliveries collected by one `dequeue`.
struct Batch {
    out: Vec<Delivery>,
    /// Entries read that cannot be delivered, by level: to dead-letter.
    undeliverable: Vec<(usize, Undeliverable)>,
    lease_ends: u64,
    deadline_now: u64,
}

/// Why an entry read cannot be delivered.
enum Undeliverable {
    /// Its deadline passed (the entry id).
    Late(String),
    /// It is not an entry this library wrote (the entry id, and why).
    Malformed(String, String),
}

/// Where blocking reads go: a small pool of dedicated connections to the
/// server or, on a Redis Cluster, to the master of the queue's slot, so a
/// waiting consumer never holds up the shared connection's other commands.
/// Made on first use; on a cluster, made again (the slot's master looked up
/// anew) after a read failed or was redirected, which is how reads follow a
/// failover or a resharding.
pub(super) struct Blocking {
    redis: RedisPool,
    size: usize,
    current: Mutex<Option<deadpool_redis::Pool>>,
}

impl Blocking {
    pub(super) fn new(redis: RedisPool, size: usize) -> Self {
        Blocking {
            redis,
            size,
            current: Mutex::new(None),
        }
    }

    /// The pool for blocking reads of `key`.
    async fn pool(&self, key: &str) -> std::result::Result<deadpool_redis::Pool, RedisFailure> {
        if let Some(pool) = self.current.lock().clone() {
            return Ok(pool);
        }
        let pool = self
            .redis
            .blocking_pool_for_key(key.as_bytes(), self.size)
            .await?;
        *self.current.lock() = Some(pool.clone());
        Ok(pool)
    }

    /// After a failed or redirected read on a cluster: the slot's master is
    /// looked up again on the next read. (A single server's pool replaces
    /// its broken connections by itself.)
    fn forget(&self) {
        if self.redis.is_cluster() {
            self.current.lock().take();
        }
    }
}

/// Takes a blocking connection out of its pool if the read is abandoned,
/// so no one reuses a connection with a blocking command in flight.
struct DetachOnDrop(Option<deadpool_redis::Connection>);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(deadpool_redis::Connection::take(conn));
        }
    }
}

impl RedisQueue {
    /// A delivery from one entry of `level` read under a lease that ends at
    /// `lease_ends_ms`, or why the entry cannot be delivered: its deadline
    /// passed by `now_ms`, or it is not an entry this library wrote.
    fn delivery(
        &self,
        level: usize,
        (entry, fields): Entry,
        lease_ends_ms: u64,
        now_ms: u64,
    ) -> std::result::Result<Delivery, Undeliverable> {
        let malformed = |why: String| Undeliverable::Malformed(entry.clone(), why);
        let mut meta = None;
        let mut payload = Vec::new();
        let mut headers = None;
        let mut deadline = None;
        let mut it = fields.into_iter();
        while let (Some(name), Some(value)) = (it.next(), it.next()) {
            match name.as_slice() {
                b"m" => meta = Some(value),
                b"p" => payload = value,
                b"h" => headers = Some(value),
                b"d" => deadline = Some(String::from_utf8_lossy(&value).into_owned()),
                _ => {}
            }
        }
        if let Some(deadline) = &deadline
            && deadline.parse::<u64>().is_ok_and(|d| d <= now_ms)
        {
            return Err(Undeliverable::Late(entry));
        }
        let meta = meta.ok_or_else(|| malformed("the entry has no `m` field".into()))?;
        let meta = std::str::from_utf8(&meta)
            .map_err(|_| malformed("its `m` field is not UTF-8".into()))?;
        let mut parts = meta.rsplitn(4, '|');
        let (_level, enqueued, previous, id) =
            (parts.next(), parts.next(), parts.next(), parts.next());
        let (Some(enqueued), Some(previous), Some(id)) = (enqueued, previous, id) else {
            return Err(malformed(format!(
                "its `m` field `{meta}` is not id|attempts|ms|level"
            )));
        };
        let attempt = previous
            .parse::<u32>()
            .map_err(|_| malformed(format!("attempt count `{previous}` in `{meta}`")))?
            + 1;
        let headers = match headers {
            Some(text) => decode_headers(&text).map_err(|err| malformed(err.to_string()))?,
            None => Headers::new(),
        };
        Ok(Delivery {
            id: JobId::from_string(id),
            payload: Bytes::from(payload),
            headers,
            receipt: Receipt::from_string(format!("{level}:{entry}|{attempt}|{lease_ends_ms}")),
            attempt,
            enqueued_at: from_epoch_ms(enqueued).unwrap_or(UNIX_EPOCH),
            priority: Priority(level as u8),
            deadline: deadline.as_deref().and_then(from_epoch_ms),
        })
    }

    /// The housekeeping script as a plain command, for a pipeline.
    fn maintain_cmd(&self, reclaim: bool, idle: bool) -> ::redis::Cmd {
        let queue = &self.inner.config.queue;
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(self.inner.scripts.maintain.get_hash())
            .arg(1)
            .arg(&self.inner.route_key)
            .arg(&self.inner.prefix)
            .arg(queue.max_attempts)
            .arg(queue.priority_levels)
            .arg(if reclaim { "1" } else { "0" })
            .arg(if idle { "1" } else { "0" });
        cmd
    }

    /// True when this handle should take back expired leases on this read
    /// (at most every [`RECLAIM_EVERY`]).
    pub(super) fn reclaim_due(&self) -> bool {
        let inner = &self.inner;
        let now = inner.started.elapsed().as_millis() as u64;
        let next = inner.next_reclaim_ms.load(Ordering::Relaxed);
        now >= next
            && inner
                .next_reclaim_ms
                .compare_exchange(
                    next,
                    now + RECLAIM_EVERY.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Creates the consumer group of every level that lacks one (first use,
    /// or the server lost its data).
    async fn create_groups(&self) -> Result<()> {
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        for stream in &self.inner.streams {
            pipe.cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM");
        }
        let pipe = &pipe;
        let replies: Vec<Value> = self
            .on_lane(|mut conn| async move { Ok(pipe.query_async(&mut conn).await?) })
            .await?;
        for reply in replies {
            if let Value::ServerError(err) = reply
                && err.code() != "BUSYGROUP"
            {
                return Err(RedisFailure::from(::redis::RedisError::from(err)).into());
            }
        }
        Ok(())
    }

    /// Loads the housekeeping script after the server answered `NOSCRIPT`.
    async fn load_maintain(&self) -> Result<()> {
        let script = &self.inner.scripts.maintain;
        self.on_lane(|mut conn| async move {
            script.prepare_invoke().load_async(&mut conn).await?;
            Ok(())
        })
        .await
    }

    /// Reads up to `want` entries of each of `levels` under `consumer` (the
    /// lease length) in one round trip, after the housekeeping script when
    /// `maintain` is set. Answers the server time the script reported (if
    /// it ran) and each level's entries, in the order asked. A level
    /// without its consumer group reads as empty (the group is created for
    /// the next read).
    async fn read_levels(
        &self,
        levels: &[usize],
        consumer: &str,
        want: usize,
        maintain: Option<bool>,
    ) -> Result<(Option<u64>, Vec<Vec<Entry>>)> {
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        if let Some(reclaim) = maintain {
            pipe.add_command(self.maintain_cmd(reclaim, false));
        }
        for &level in levels {
            pipe.cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(consumer)
                .arg("COUNT")
                .arg(want)
                .arg("STREAMS")
                .arg(&self.inner.streams[level])
                .arg(">");
        }
        let pipe = &pipe;
        let sent_ms = epoch_ms(SystemTime::now());
        let replies: Vec<Value> = self
            .on_lane(|mut conn| async move { Ok(pipe.query_async(&mut conn).await?) })
            .await?;
        let mut replies = replies.into_iter();
        let mut now = None;
        let mut housekeeping_failed = None;
        if maintain.is_some() {
            match replies.next() {
                Some(Value::ServerError(err)) if err.code() == "NOSCRIPT" => {
                    // The reads after it still ran: keep their entries, and
                    // load the script for the next call.
                    if let Err(err) = self.load_maintain().await {
                        housekeeping_failed = Some(err);
                    }
                }
                Some(Value::ServerError(err)) => {
                    housekeeping_failed = Some(QueueError::from(RedisFailure::from(
                        ::redis::RedisError::from(err),
                    )));
                }
                Some(value) => match ::redis::from_redis_value::<(u64, u64)>(value) {
                    Ok((server_ms, _moved)) => {
                        now = Some(server_ms);
                        // The server read its clock after we sent: this
                        // bounds how far ahead of ours it is.
                        self.inner
                            .server_ahead_ms
                            .store(server_ms as i64 - sent_ms as i64, Ordering::Relaxed);
                    }
                    Err(err) => {
                        housekeeping_failed = Some(protocol(format!("housekeeping answer: {err}")));
                    }
                },
                None => return Err(protocol("empty read answer")),
            }
        }
        let mut out = Vec::with_capacity(levels.len());
        let mut missing_group = false;
        let mut failed = None;
        for reply in replies {
            match reply {
                Value::ServerError(err) if err.code() == "NOGROUP" => {
                    missing_group = true;
                    out.push(Vec::new());
                }
                Value::ServerError(err) => {
                    failed.get_or_insert(QueueError::from(RedisFailure::from(
                        ::redis::RedisError::from(err),
                    )));
                    out.push(Vec::new());
                }
                value => {
                    let reply: ReadReply = ::redis::from_redis_value(value)
                        .map_err(|err| protocol(format!("XREADGROUP answer: {err}")))?;
                    out.push(
                        reply
                            .and_then(|mut streams| streams.pop())
                            .map(|(_, entries)| entries)
                            .unwrap_or_default(),
                    );
                }
            }
        }
        if out.len() != levels.len() {
            return Err(protocol("short read answer"));
        }
        if missing_group && let Err(err) = self.create_groups().await {
            failed.get_or_insert(err);
        }
        // Entries read are leased: hand them out even when something else
        // failed, and report it.
        if let Some(err) = failed.or(housekeeping_failed) {
            if out.iter().all(Vec::is_empty) {
                return Err(err);
            }
            tracing::warn!(error = %err, "part of a queue read failed");
        }
        Ok((now, out))
    }

    /// Gives back entries of `level` read past what a `dequeue` could hand
    /// out: the group is rewound when nobody read after them, else they go
    /// back to the tail as untried.
    async fn unread(&self, level: usize, entries: &[String]) {
        let Some(before) = entries.first().and_then(|first| id_before(first)) else {
            return;
        };
        let result = self
            .settle_one(|inv| {
                inv.arg("unread").arg(level).arg(&before).arg(entries);
            })
            .await;
        if let Err(err) = result {
            tracing::warn!(
                error = %err,
                jobs = entries.len(),
                "could not give back jobs read ahead; they return when their lease runs out"
            );
        }
    }

    /// Reads up to `max` jobs, highest priority first, leased for `lease`;
    /// jobs found past their deadline go to the dead letters on the way.
    ///
    /// The levels from the top down to the one that had jobs at the last
    /// read are read in one round trip (the ones above it were empty then,
    /// so reading them is cheap); whatever a higher level's jobs left no
    /// room for is given back at once. Lower levels are read one by one.
    pub(super) async fn read(
        &self,
        max: usize,
        lease: Duration,
        reclaim: bool,
    ) -> Result<Vec<Delivery>> {
        let consumer = ms(lease).to_string();
        let levels = self.inner.streams.len();
        let hint = self
            .inner
            .read_down_to
            .load(Ordering::Relaxed)
            .min(levels - 1);
        let first: Vec<usize> = (hint..levels).rev().collect();
        let (now, replies) = self
            .read_levels(&first, &consumer, max, Some(reclaim))
            .await?;
        // The server's clock just before the read bounds the delivery time
        // from below, so the lease ends no earlier than this (0 when the
        // script did not run: every ack then checks the pending list).
        let (lease_ends, deadline_now) = match now {
            Some(now) => (now + ms(lease), now),
            None => (0, epoch_ms(SystemTime::now())),
        };
        let mut batch = Batch {
            out: Vec::new(),
            undeliverable: Vec::new(),
            lease_ends,
            deadline_now,
        };
        let mut found_at = None;
        let mut resume = hint.checked_sub(1);
        let mut give_back = Vec::new();
        let mut stop = false;
        for (level, entries) in first.iter().copied().zip(replies) {
            if !entries.is_empty() {
                found_at.get_or_insert(level);
            }
            if stop || batch.out.len() >= max {
                if !entries.is_empty() {
                    give_back.push((level, entries.into_iter().map(|(id, _)| id).collect()));
                }
                continue;
            }
            let got = entries.len();
            let (undeliverable, rest) = self.take_into(&mut batch, level, entries, max);
            if !rest.is_empty() {
                give_back.push((level, rest));
            }
            // A full read that lost jobs to their deadlines may have left
            // more at this level: read on from here, one level at a time.
            if got == max && undeliverable > 0 && batch.out.len() < max {
                resume = Some(level);
                stop = true;
            }
        }
        for (level, entries) in give_back {
            self.unread(level, &entries).await;
        }
        if let Some(resume) = resume {
            'levels: for level in (0..=resume).rev() {
                let mut rounds = 0;
                loop {
                    let want = max - batch.out.len();
                    if want == 0 {
                        break 'levels;
                    }
                    if rounds == READS_PER_LEVEL {
                        // Still undeliverable jobs at this level: do not
                        // serve lower levels before it; the next read goes on.
                        break 'levels;
                    }
                    rounds += 1;
                    let entries = match self.read_levels(&[level], &consumer, want, None).await {
                        Ok((_, mut replies)) => replies.pop().unwrap_or_default(),
                        // What was read so far is leased: hand it out.
                        Err(err) if !batch.out.is_empty() || !batch.undeliverable.is_empty() => {
                            tracing::warn!(error = %err, "queue read failed part way");
                            break 'levels;
                        }
                        Err(err) => return Err(err),
                    };
                    if !entries.is_empty() {
                        found_at.get_or_insert(level);
                    }
                    let got = entries.len();
                    let (undeliverable, _) = self.take_into(&mut batch, level, entries, max);
                    // Read again only when undeliverable jobs took the place
                    // of live ones.
                    if got < want || undeliverable == 0 {
                        break;
                    }
                }
            }
        }
        self.inner
            .read_down_to
            .store(found_at.unwrap_or(0), Ordering::Relaxed);
        self.reject(std::mem::take(&mut batch.undeliverable)).await;
        Ok(batch.out)
    }

    /// Turns `entries` of `level` into deliveries until `batch` holds
    /// `max`. Answers how many could not be delivered and the ids of the
    /// entries there was no room for.
    fn take_into(
        &self,
        batch: &mut Batch,
        level: usize,
        entries: Vec<Entry>,
        max: usize,
    ) -> (usize, Vec<String>) {
        let mut undeliverable = 0;
        let mut rest = Vec::new();
        for entry in entries {
            if batch.out.len() >= max {
                rest.push(entry.0);
                continue;
            }
            match self.delivery(level, entry, batch.lease_ends, batch.deadline_now) {
                Ok(delivery) => batch.out.push(delivery),
                Err(why) => {
                    undeliverable += 1;
                    batch.undeliverable.push((level, why));
                }
            }
        }
        (undeliverable, rest)
    }

    /// Dead-letters entries a read could not deliver, in one call per
    /// reason. Failures are logged: those entries come back when their
    /// lease runs out and are looked at again.
    async fn reject(&self, undeliverable: Vec<(usize, Undeliverable)>) {
        let mut late = Vec::new();
        let mut malformed = Vec::new();
        for (level, why) in undeliverable {
            match why {
                Undeliverable::Late(entry) => late.push((level, entry)),
                Undeliverable::Malformed(entry, why) => {
                    tracing::warn!(level, entry, %why, "stream entry is not a keel job; dead-lettering it");
                    malformed.push((level, entry));
                }
            }
        }
        for (reason, entries) in [
            ("deadline exceeded before delivery", late),
            (
                "malformed stream entry (not written by keel-queue)",
                malformed,
            ),
        ] {
            if entries.is_empty() {
                continue;
            }
            let result: Result<Vec<u64>> = self
                .invoke(&self.inner.scripts.settle, |inv| {
                    inv.arg("reject").arg(reason);
                    for (level, entry) in &entries {
                        inv.arg(*level).arg(entry);
                    }
                })
                .await;
            match result {
                Ok(n) => self
                    .inner
                    .metrics
                    .dead_lettered
                    .increment(n.first().copied().unwrap_or(0)),
                Err(err) => tracing::warn!(
                    error = %err,
                    jobs = entries.len(),
                    reason,
                    "could not dead-letter undeliverable jobs; they come back when their lease runs out"
                ),
            }
        }
    }

    /// Waits up to `block` for an entry newer than `last_ids` in any level,
    /// or for a read elsewhere to give entries back (the wake stream).
    pub(super) async fn block_for_new(&self, last_ids: &[String], block: Duration) -> Result<()> {
        let inner = &self.inner;
        let timeout = inner.config.redis.operation_timeout;
        // Every blocking connection is busy, or Redis is unreachable: wait
        // without one; the next look at the queue reports errors.
        let Ok(Ok(pool)) =
            tokio::time::timeout(timeout, inner.blocking.pool(&inner.route_key)).await
        else {
            tokio::time::sleep(block).await;
            return Ok(());
        };
        let conn = match tokio::time::timeout(timeout, pool.get()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(deadpool_redis::PoolError::Timeout(deadpool_redis::TimeoutType::Wait))) => {
                tokio::time::sleep(block).await;
                return Ok(());
            }
            _ => {
                // The node does not answer: on a cluster, it may have lost
                // its slots to a replica; look the master up again.
                inner.blocking.forget();
                tokio::time::sleep(block).await;
                return Ok(());
            }
        };
        let mut guard = DetachOnDrop(Some(conn));
        let mut cmd = ::redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(ms(block).max(1))
            .arg("STREAMS");
        // Every level's stream, then the wake stream (see `maintain.lua`).
        if last_ids.len() != inner.streams.len() + 1 {
            return Err(protocol(
                "housekeeping answered the wrong number of stream ids",
            ));
        }
        cmd.arg(&inner.streams)
            .arg(format!("{}:wake", inner.prefix))
            .arg(last_ids);
        let limit = block + inner.config.redis.operation_timeout;
        let conn = guard.0.as_mut().expect("just set");
        match tokio::time::timeout(limit, cmd.query_async::<::redis::Value>(&mut **conn)).await {
            Ok(Ok(_)) => {
                guard.0.take(); // healthy: back to the pool
                Ok(())
            }
            Ok(Err(err)) => {
                inner.blocking.forget();
                if err.code() == Some("MOVED") {
                    // The slot moved (a failover or a resharding): the next
                    // wait goes to its new master; look at the queue now.
                    return Ok(());
                }
                Err(RedisFailure::from(err).into())
            }
            Err(_) => {
                inner.blocking.forget();
                Err(QueueError::Timeout(limit))
            }
        }
    }
}
