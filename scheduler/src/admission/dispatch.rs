//! The dispatcher: the one task that owns the service and hands out
//! queued requests in order, within the in-flight limits.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use tokio::time::Instant;
use tower::Service;

use super::pending::{Entry, Key};
use super::signal::Signal;
use super::{BoxFuture, Meta, Permit, Shared, State, Verdict, Waiting};
use crate::error::BoxError;

/// Back-to-back dispatches reuse the latest clock reading at most this many
/// times before the dispatcher reads the clock itself.
const CLOCK_REUSE: u32 = 32;

/// The most requests the dispatcher takes from the queue per lock.
const STAGE: usize = 16;

impl<Req, Resp> Shared<Req, Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
{
    /// Takes up to `max` requests to dispatch, in order, answering expired
    /// ones and dropping abandoned ones on the way, and counts them in
    /// flight. Answers how many it took.
    fn take(
        self: &Arc<Self>,
        fresh: bool,
        max: usize,
        out: &mut VecDeque<Staged<Req, Resp>>,
    ) -> usize {
        let mut state = self.state.lock();
        // Reading the clock is not free: back to back dispatches use the
        // latest reading, refreshed after any wait, every few dispatches,
        // and for every request with a deadline, so deadlines are checked
        // against the exact time.
        let mut exact =
            fresh || state.clock_uses >= CLOCK_REUSE || self.config.concurrency.adaptive.is_some();
        let mut now = if exact {
            state.read_clock()
        } else {
            state.reuse_clock()
        };
        self.drain_inbox(&mut state, now);
        self.maintain(&mut state, now);
        let track = self.track_tenants;
        let mut taken = 0;
        while taken < max
            && self.in_flight.load(Ordering::Acquire) < self.limit_now.load(Ordering::Acquire)
        {
            let popped = state.pending.pop(
                |meta: &Meta| !track || meta.as_ref().is_none_or(|t| t.below_in_flight_limit()),
                Waiting::is_queued,
            );
            let Some(popped) = popped else {
                break;
            };
            let entry = popped.entry;
            if !entry.value.reply.slot().claim() {
                // Its submitter took it back just now.
                continue;
            }
            self.dequeued(&popped.meta);
            if entry.deadline.is_some() && !exact {
                now = state.read_clock();
                exact = true;
            }
            if entry.deadline.is_some_and(|d| d <= now) {
                self.metrics.expired.increment(1);
                let waited = now.saturating_duration_since(entry.enqueued);
                entry.value.reply.send(Verdict::Expired { waited });
                continue;
            }
            let sojourn = now.saturating_duration_since(entry.enqueued);
            state.codel.record(popped.class, sojourn);
            self.metrics.queue_delay[popped.class].record(sojourn.as_secs_f64());
            let tenant = if track {
                popped.meta.clone().inspect(|t| {
                    t.in_flight.fetch_add(1, Ordering::AcqRel);
                })
            } else {
                None
            };
            let in_flight = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
            self.metrics.in_flight.set(in_flight as f64);
            out.push_back(Staged {
                permit: Permit {
                    shared: self.clone(),
                    tenant,
                    dispatched: now,
                    latency: None,
                },
                class: popped.class,
                key: popped.key,
                weight: popped.weight,
                meta: popped.meta,
                entry,
            });
            taken += 1;
        }
        self.publish(&mut state);
        taken
    }

    /// Whether requests wait and the in-flight limit has room (lock-free,
    /// a hint: `next` decides under the lock).
    fn has_work(&self) -> bool {
        self.queued.load(Ordering::Acquire) > 0
            && self.in_flight.load(Ordering::Acquire) < self.limit_now.load(Ordering::Acquire)
    }

    /// When housekeeping is next due (the lock is held by the caller).
    fn due(&self, state: &State<Req, Resp>) -> Instant {
        if self.config.shedding.enabled {
            state.next_sweep.min(state.codel.next_eval())
        } else {
            state.next_sweep
        }
    }

    fn housekeeping_due(&self) -> Instant {
        self.due(&self.state.lock())
    }

    fn housekeeping(&self) {
        let mut state = self.state.lock();
        let now = state.read_clock();
        self.drain_inbox(&mut state, now);
        self.maintain(&mut state, now);
    }

    /// The service failed in `poll_ready`: close, answering the staged
    /// requests too.
    fn fail(&self, err: &BoxError, staged: VecDeque<Staged<Req, Resp>>) {
        tracing::error!(scheduler = %self.config.name, error = %err, "service failed; closing the scheduler");
        let reason = format!("the service failed: {err}");
        for next in staged {
            next.entry.value.reply.send(Verdict::Closed(reason.clone()));
        }
        self.close(reason);
    }

    /// Puts staged requests back in their places (the service turned out
    /// not to be ready), releasing their permits. A request whose
    /// submitter left meanwhile is dropped instead.
    fn put_back(&self, staged: &mut VecDeque<Staged<Req, Resp>>) {
        if staged.is_empty() {
            return;
        }
        let mut permits = Vec::with_capacity(staged.len());
        {
            let mut state = self.state.lock();
            for next in staged.drain(..) {
                permits.push(next.permit);
                if !next.entry.value.reply.slot().unclaim() {
                    continue;
                }
                self.requeued(&next.meta);
                state.pending.restore(
                    next.class,
                    next.key,
                    next.entry,
                    |waiting| &waiting.tenant,
                    next.weight,
                    next.meta,
                );
            }
            self.publish(&mut state);
        }
        // Released outside the lock.
        drop(permits);
    }

    /// Nothing to send: housekeeping, then wait for a change. Answers
    /// `false` when the dispatcher should stop (every handle gone, queue
    /// empty).
    async fn idle(&self, stalled: &mut bool, stale: &mut bool) -> bool {
        if self.queued.load(Ordering::Acquire) == 0
            && self.pending_empty.load(Ordering::Relaxed)
            && !self.handles_gone.load(Ordering::Acquire)
        {
            // Nothing waits anywhere: no housekeeping is due until
            // something is submitted.
            wait(&self.wake, None).await;
            *stale = true;
            *stalled = false;
            return true;
        }
        let next_eval = {
            let mut state = self.state.lock();
            let now = if *stale || state.clock_uses >= CLOCK_REUSE {
                *stale = false;
                state.read_clock()
            } else {
                state.reuse_clock()
            };
            self.drain_inbox(&mut state, now);
            self.maintain(&mut state, now);
            if self.queued.load(Ordering::Acquire) == 0 {
                // Whatever is left was given up.
                self.purge(&mut state);
                if self.handles_gone.load(Ordering::Acquire) {
                    drop(state);
                    // Answers anyone who submitted through a future made
                    // before the last handle went.
                    self.close("the dispatcher stopped".to_owned());
                    return false;
                }
            }
            (!state.pending.is_empty()).then(|| self.due(&state))
        };
        if !*stalled && self.has_work() {
            return true;
        }
        // After any wait the latest reading is old: the next look reads
        // the clock (it stamps what was submitted meanwhile).
        wait(&self.wake, next_eval).await;
        *stale = true;
        *stalled = false;
        true
    }
}

/// A request taken from the queue, about to be sent (or put back).
pub(super) struct Staged<Req, Resp> {
    entry: Entry<Waiting<Req, Resp>>,
    permit: Permit<Req, Resp>,
    class: usize,
    key: Key,
    weight: u64,
    meta: Meta,
}

/// The dispatcher: owns the service, hands out requests in order.
///
/// While the service answers `poll_ready` at once, it takes up to
/// [`STAGE`] requests per lock (in order, with their in-flight permits)
/// and sends them one `poll_ready` at a time. When the service is not
/// ready, the staged requests go back to their places in the queue before
/// the dispatcher waits, so staging never lets a request overtake another
/// or sit outside the queue's expiry and shedding.
pub(super) async fn dispatch<S, Req>(shared: Arc<Shared<Req, S::Response>>, mut service: S)
where
    S: Service<Req> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    S::Response: Send + 'static,
    Req: Send + 'static,
{
    let mut staged: VecDeque<Staged<Req, S::Response>> = VecDeque::with_capacity(STAGE);
    // Whether `poll_ready` answered `Ready` since the last `call`.
    let mut ready = false;
    // Whether the last look found requests but none eligible (tenants at
    // their limits): wait for a change instead of looking again at once.
    let mut stalled = false;
    // Whether the dispatcher waited for the service since it last took
    // requests (then it takes one at a time until the service keeps up).
    let mut waited = true;
    // Whether the latest clock reading may be old (after waiting for the
    // service or a timer): the next take reads the clock itself.
    let mut stale = true;
    loop {
        // Nothing to send: wait for work (polling the service only when
        // there is work, since a service may reserve capacity when ready).
        if staged.is_empty() && (stalled || !shared.has_work()) {
            if !shared.idle(&mut stalled, &mut stale).await {
                return;
            }
            continue;
        }
        if !ready {
            let first: Poll<std::result::Result<(), BoxError>> =
                poll_fn(|cx| Poll::Ready(service.poll_ready(cx).map_err(Into::into))).await;
            match first {
                Poll::Ready(Ok(())) => ready = true,
                Poll::Ready(Err(err)) => return shared.fail(&err, staged),
                Poll::Pending => {
                    shared.put_back(&mut staged);
                    waited = true;
                    stale = true;
                    // Wait for the service, waking for housekeeping (expiry
                    // sweeps, shedding) meanwhile.
                    let until = shared.housekeeping_due();
                    tokio::select! {
                        result = poll_fn(|cx| service.poll_ready(cx).map_err(Into::into)) => match result {
                            Ok(()) => ready = true,
                            Err(err) => return shared.fail(&err, staged),
                        },
                        () = tokio::time::sleep_until(until) => {
                            shared.housekeeping();
                            continue;
                        }
                    }
                }
            }
        }
        if staged.is_empty() {
            // Right after a wait, take one (the service may be slow to get
            // ready again); back to back, a stage.
            let stage = if waited { 1 } else { STAGE };
            if shared.take(stale, stage, &mut staged) == 0 {
                stalled = true;
            }
            waited = false;
            stale = false;
            continue;
        }
        let next = staged.pop_front().expect("checked non-empty");
        if next.entry.value.reply.slot().is_gone() {
            // Abandoned while staged: the permit goes with it.
            continue;
        }
        ready = false;
        shared.metrics.dispatched[next.class].increment(1);
        let response = service.call(next.entry.value.request);
        let response: BoxFuture<_> = Box::pin(async move { response.await.map_err(Into::into) });
        // A submitter that left in the meantime drops the response future
        // and the permit with it.
        next.entry.value.reply.send(Verdict::Run {
            response,
            permit: next.permit,
        });
    }
}

/// Waits for a signal or `until`.
async fn wait(signal: &Signal, until: Option<Instant>) {
    match until {
        Some(at) => {
            tokio::select! {
                () = signal.wait() => {},
                () = tokio::time::sleep_until(at) => {},
            }
        }
        None => signal.wait().await,
    }
}
