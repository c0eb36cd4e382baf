//! The balancer's response future: pick, maybe wait for a slot, drive the
//! endpoint's service, classify its answer.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::future::{Either, select};
use keel_core::{BoxError, Classify, Deadline, EndpointKey, Outcome, RequestExtensions};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};
use tower::load::TrackCompletion;
use tower_service::Service;

use super::{Balancer, Shared, Snapshot};
use crate::config::BalancerConfig;
use crate::endpoint::{Common, Handle, LazyNow, Recorded};
use crate::error::{BalancerError, FailedResponse};
use crate::policy::{Choice, Pick, choose};
use crate::request::{AvoidEndpoints, DispatchTrace};

/// The longest busy cooldown honoured, whatever `Retry-After` says.
const MAX_BUSY_COOLDOWN: Duration = Duration::from_secs(60);

type WaitFuture<S, Req> =
    Pin<Box<dyn Future<Output = Result<Dispatched<S, Req>, BalancerError>> + Send>>;

/// A request that got a slot.
pub(crate) struct Dispatched<S, Req> {
    svc: S,
    request: Req,
    handle: Handle,
    timer: Option<Timer>,
}

/// The attempt timeout or the deadline, whichever comes first.
struct Timer {
    sleep: Pin<Box<Sleep>>,
    kind: TimerKind,
}

#[derive(Clone, Copy)]
enum TimerKind {
    Attempt(Duration),
    Deadline,
}

pin_project! {
    /// The [`Balancer`]'s response future.
    ///
    /// Dropping it cancels the request: the endpoint's future is dropped and
    /// its slot freed, or, while it still waits for a slot, it leaves the
    /// queue.
    pub struct BalanceFuture<S, Req, C, T>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req, S::Future>,
        handle: Option<Handle>,
        timer: Option<Timer>,
        classifier: C,
        completion: T,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req, F> {
        Waiting { wait: WaitFuture<S, Req> },
        Ready { svc: S, request: Option<Req> },
        Called { #[pin] future: F },
        Failed { error: Option<BalancerError> },
        Done,
    }
}

impl<S, Req, C, T> fmt::Debug for BalanceFuture<S, Req, C, T>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Waiting { .. } => "waiting for a slot",
            State::Ready { .. } => "waiting for the endpoint to be ready",
            State::Called { .. } => "called",
            State::Failed { .. } => "failed",
            State::Done => "done",
        };
        f.debug_struct("BalanceFuture")
            .field("state", &state)
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

enum Acquired {
    /// A slot on this position, and what prefix affinity claimed it had
    /// cached of the prompt (leading blocks, prompt blocks).
    Slot(usize, Option<(usize, usize)>),
    Full,
    Empty,
}

/// Picks and takes a slot; retries a pick that lost a race for the last
/// slot. Answers the clock reading it made (if any) with the result.
fn pick_and_acquire<K: 'static, S, Req: RequestExtensions>(
    pick: &dyn Pick<K>,
    snapshot: &Snapshot<K, S>,
    common: &Common,
    request: &Req,
    rng: &mut fastrand::Rng,
) -> (Acquired, Option<Instant>) {
    let ext = request.extensions();
    let candidates = snapshot.candidates(ext.get::<AvoidEndpoints>(), common);
    for _ in 0..3 {
        match choose(pick, &candidates, ext, rng) {
            Choice::Pick(i) => {
                if snapshot.states[i].try_acquire() {
                    let claim = candidates.prefix_claim();
                    return (Acquired::Slot(i, claim), candidates.read_clock());
                }
            }
            Choice::Full => return (Acquired::Full, candidates.read_clock()),
            Choice::Empty => return (Acquired::Empty, candidates.read_clock()),
        }
    }
    (Acquired::Full, candidates.read_clock())
}

fn timer(config: &BalancerConfig, deadline: Option<Deadline>, now: &LazyNow<'_>) -> Option<Timer> {
    let attempt = config.attempt_timeout.map(|t| (now.instant() + t, t));
    let (at, kind) = match (attempt, deadline) {
        (None, None) => return None,
        (Some((at, t)), Some(d)) if at <= d.instant() => (at, TimerKind::Attempt(t)),
        (Some((at, t)), None) => (at, TimerKind::Attempt(t)),
        (_, Some(d)) => (d.instant(), TimerKind::Deadline),
    };
    Some(Timer {
        sleep: Box::pin(sleep_until(at)),
        kind,
    })
}

fn record_dispatch<Req: RequestExtensions>(request: &Req, handle: &Handle) {
    if let Some(trace) = request.extensions().get::<DispatchTrace>() {
        trace.record(handle.endpoint());
    }
}

/// `Balancer::call`.
pub(super) fn dispatch<K, S, C, T, Req>(
    balancer: &mut Balancer<K, S, C, T>,
    request: Req,
) -> BalanceFuture<S, Req, C, T>
where
    K: EndpointKey + Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    S: Service<Req> + Clone + Send + Sync + 'static,
    C: Clone,
    T: Clone,
    Req: RequestExtensions + Send + 'static,
{
    let shared = &balancer.shared;
    let config = &shared.config;
    let common = &shared.common;
    let now = LazyNow::new(common);
    let deadline = Deadline::of(&request);
    if let Some(deadline) = deadline
        && deadline.instant() <= now.instant()
    {
        common.metrics.deadline_exceeded.increment(1);
        return balancer.failed(BalancerError::DeadlineExceeded);
    }
    let (acquired, read) = pick_and_acquire(
        &*shared.pick,
        &balancer.snapshot,
        common,
        &request,
        &mut balancer.rng,
    );
    let now = now.with(read);
    let empty_fleet = balancer.snapshot.states.is_empty();
    match acquired {
        Acquired::Slot(i, claim) => {
            let handle = Handle::new(
                balancer.snapshot.states[i].clone(),
                now.ns(),
                deadline.map(|d| d.instant()),
            )
            .with_prefix_claim(claim);
            record_dispatch(&request, &handle);
            let timer = timer(config, deadline, &now);
            BalanceFuture {
                state: State::Ready {
                    svc: balancer.snapshot.services[i].clone(),
                    request: Some(request),
                },
                handle: Some(handle),
                timer,
                classifier: balancer.classifier.clone(),
                completion: balancer.completion.clone(),
            }
        }
        Acquired::Empty
            if !empty_fleet
                || (shared.ended.load(Ordering::Acquire) && shared.current().states.is_empty()) =>
        {
            // Every endpoint is avoided, or discovery ended empty: waiting
            // cannot help. (This handle's set may predate the final one,
            // which another clone published since its `poll_ready`: then
            // the wait below picks from the shared set.)
            common.metrics.no_endpoints.increment(1);
            balancer.failed(BalancerError::NoEndpoints)
        }
        Acquired::Empty | Acquired::Full => {
            if config.max_wait.is_zero()
                || common.waiters.load(Ordering::Relaxed) >= config.max_waiters
            {
                return balancer.failed(if empty_fleet {
                    common.metrics.no_endpoints.increment(1);
                    BalancerError::NoEndpoints
                } else {
                    common.metrics.overloaded.increment(1);
                    tracing::debug!(balancer = %config.name, "every endpoint is at capacity; rejecting");
                    BalancerError::Overloaded {
                        waited: Duration::ZERO,
                    }
                });
            }
            let rng = shared.rng();
            let wait = Box::pin(wait_for_slot(shared.clone(), request, rng, deadline));
            BalanceFuture {
                state: State::Waiting { wait },
                handle: None,
                timer: None,
                classifier: balancer.classifier.clone(),
                completion: balancer.completion.clone(),
            }
        }
    }
}

impl<K, S, C, T> Balancer<K, S, C, T>
where
    C: Clone,
    T: Clone,
{
    fn failed<Req>(&self, error: BalancerError) -> BalanceFuture<S, Req, C, T>
    where
        S: Service<Req>,
    {
        BalanceFuture {
            state: State::Failed { error: Some(error) },
            handle: None,
            timer: None,
            classifier: self.classifier.clone(),
            completion: self.completion.clone(),
        }
    }
}

struct Waiting<'a>(&'a Common);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every usable endpoint is full, or there is no endpoint yet: wait for a
/// slot to free (or the set to change), bounded by `max_wait` and the
/// deadline.
async fn wait_for_slot<K, S, Req>(
    shared: Arc<Shared<K, S>>,
    request: Req,
    mut rng: fastrand::Rng,
    deadline: Option<Deadline>,
) -> Result<Dispatched<S, Req>, BalancerError>
where
    K: EndpointKey + Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    S: Clone + Send + Sync + 'static,
    Req: RequestExtensions + Send + 'static,
{
    let common = &*shared.common;
    let config = &shared.config;
    common.waiters.fetch_add(1, Ordering::Relaxed);
    let _waiting = Waiting(common);
    common.metrics.waited.increment(1);
    let started = Instant::now();
    let wait_until = started + config.max_wait;
    let (until, by_deadline) = match deadline {
        Some(d) if d.instant() < wait_until => (d.instant(), true),
        _ => (wait_until, false),
    };
    let mut sleep = pin!(sleep_until(until));
    loop {
        let mut notified = pin!(common.notify.notified());
        notified.as_mut().enable();
        shared.sync_discover();
        let snapshot = shared.current();
        let empty_fleet = snapshot.states.is_empty();
        {
            let (acquired, read) =
                pick_and_acquire(&*shared.pick, &snapshot, common, &request, &mut rng);
            let now = LazyNow::new(common).with(read);
            match acquired {
                Acquired::Slot(i, claim) => {
                    let handle = Handle::new(
                        snapshot.states[i].clone(),
                        now.ns(),
                        deadline.map(|d| d.instant()),
                    )
                    .with_prefix_claim(claim);
                    record_dispatch(&request, &handle);
                    let timer = timer(config, deadline, &now);
                    return Ok(Dispatched {
                        svc: snapshot.services[i].clone(),
                        request,
                        handle,
                        timer,
                    });
                }
                Acquired::Empty if !empty_fleet || shared.ended.load(Ordering::Acquire) => {
                    common.metrics.no_endpoints.increment(1);
                    return Err(BalancerError::NoEndpoints);
                }
                Acquired::Empty | Acquired::Full => {}
            }
        }
        drop(snapshot);
        if let Either::Right(_) = select(notified, sleep.as_mut()).await {
            return Err(if by_deadline {
                common.metrics.deadline_exceeded.increment(1);
                BalancerError::DeadlineExceeded
            } else if shared.current().states.is_empty() {
                common.metrics.no_endpoints.increment(1);
                tracing::debug!(balancer = %config.name, waited = ?config.max_wait, "no endpoint discovered in time; rejecting");
                BalancerError::NoEndpoints
            } else {
                common.metrics.overloaded.increment(1);
                tracing::debug!(balancer = %config.name, waited = ?config.max_wait, "no slot freed in time; rejecting");
                BalancerError::Overloaded {
                    waited: started.elapsed(),
                }
            });
        }
    }
}

/// Classifies an attempt's result and releases (or hands on) its slot: the
/// handle the dispatched request holds.
fn finish<Res, E, C, T>(
    handle: &mut Option<Handle>,
    classifier: &C,
    completion: &T,
    result: Result<Res, E>,
) -> Result<T::Output, BalancerError>
where
    E: Into<BoxError>,
    C: Classify<Res, E>,
    T: TrackCompletion<Handle, Res>,
{
    let mut handle = handle.take().expect("a dispatched request holds a handle");
    let endpoint = handle.endpoint();
    match classifier.classify(&result) {
        Outcome::Success => {
            handle.set_outcome(Recorded::Success);
            match result {
                Ok(response) => Ok(completion.track_completion(handle, response)),
                Err(error) => Err(BalancerError::Failed {
                    endpoint,
                    retryable: false,
                    source: error.into(),
                }),
            }
        }
        Outcome::Busy { retry_after } => {
            let cooldown = retry_after
                .unwrap_or_else(|| handle.common().busy_cooldown())
                .min(MAX_BUSY_COOLDOWN);
            handle.set_outcome(Recorded::Busy(cooldown));
            tracing::debug!(%endpoint, ?cooldown, "endpoint busy; routing around it");
            Err(BalancerError::Busy {
                endpoint,
                retry_after,
            })
        }
        Outcome::Failure { retryable, .. } => {
            handle.set_outcome(Recorded::Failure);
            let source = match result {
                Err(error) => error.into(),
                Ok(_) => Box::new(FailedResponse) as BoxError,
            };
            Err(BalancerError::Failed {
                endpoint,
                retryable,
                source,
            })
        }
        // Nothing to learn about the endpoint (a layer in front of it
        // refused the request, say an open breaker): record nothing against
        // it; an error may succeed elsewhere.
        _ => {
            handle.set_outcome(Recorded::Cancelled);
            match result {
                Ok(response) => Ok(completion.track_completion(handle, response)),
                Err(error) => Err(BalancerError::Failed {
                    endpoint,
                    retryable: true,
                    source: error.into(),
                }),
            }
        }
    }
}

/// `Some` when the attempt timeout or the deadline fired.
fn poll_timer(
    timer: &mut Option<Timer>,
    handle: &mut Option<Handle>,
    cx: &mut Context<'_>,
) -> Option<BalancerError> {
    let t = timer.as_mut()?;
    if t.sleep.as_mut().poll(cx).is_pending() {
        return None;
    }
    let mut handle = handle.take().expect("a dispatched request holds a handle");
    let endpoint = handle.endpoint();
    Some(match t.kind {
        TimerKind::Attempt(after) => {
            handle.set_outcome(Recorded::TimedOut);
            tracing::debug!(%endpoint, ?after, "attempt timed out; cancelling it");
            BalancerError::Timeout { endpoint, after }
        }
        TimerKind::Deadline => {
            handle.common().metrics.deadline_exceeded.increment(1);
            BalancerError::DeadlineExceeded
        }
    })
}

impl<S, Req, C, T> Future for BalanceFuture<S, Req, C, T>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error>,
    T: TrackCompletion<Handle, S::Response>,
{
    type Output = Result<T::Output, BalancerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Waiting { wait } => match ready!(wait.as_mut().poll(cx)) {
                    Ok(dispatched) => {
                        *this.handle = Some(dispatched.handle);
                        *this.timer = dispatched.timer;
                        this.state.set(State::Ready {
                            svc: dispatched.svc,
                            request: Some(dispatched.request),
                        });
                    }
                    Err(error) => {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(error));
                    }
                },
                StateProj::Ready { svc, request } => match svc.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        let request = request.take().expect("request is sent once");
                        let future = svc.call(request);
                        this.state.set(State::Called { future });
                    }
                    Poll::Ready(Err(error)) => {
                        this.state.set(State::Done);
                        return Poll::Ready(finish(
                            this.handle,
                            this.classifier,
                            this.completion,
                            Err(error),
                        ));
                    }
                    Poll::Pending => {
                        if let Some(error) = poll_timer(this.timer, this.handle, cx) {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                        return Poll::Pending;
                    }
                },
                StateProj::Called { future } => match future.poll(cx) {
                    Poll::Ready(result) => {
                        this.state.set(State::Done);
                        return Poll::Ready(finish(
                            this.handle,
                            this.classifier,
                            this.completion,
                            result,
                        ));
                    }
                    Poll::Pending => {
                        if let Some(error) = poll_timer(this.timer, this.handle, cx) {
                            // Dropping the endpoint's future cancels the call.
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                        return Poll::Pending;
                    }
                },
                StateProj::Failed { error } => {
                    let error = error.take().expect("polled after completion");
                    this.state.set(State::Done);
                    return Poll::Ready(Err(error));
                }
                StateProj::Done => panic!("keel_balancer::BalanceFuture polled after completion"),
            }
        }
    }
}
