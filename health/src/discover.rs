//! The `tower::discover::Discover` stream for the balancer.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_stream::Stream;
use tokio_stream::wrappers::WatchStream;
use tower::discover::Change;

use keel_core::DefaultClassifier;
use keel_core::EndpointId;

use crate::endpoint::{Endpoint, Snapshot};
use crate::outlier::Outlier;
use crate::registry::Health;

/// The endpoints in rotation as a `tower::discover::Discover` stream of
/// `Change<EndpointId, Outlier<S, C>>`; see [`Health::discover`].
///
/// It follows the registry's snapshot: an endpoint entering rotation (added,
/// passed its probe, ejection over) is an `Insert` of a fresh service built
/// by the `make` closure and wrapped in [`Outlier`]; one leaving it (ejected,
/// failing its checks, removed) is a `Remove`. Changes in between two polls
/// are coalesced: the balancer always converges on the latest set.
///
/// Each key is the endpoint's own [`EndpointId`] (the value given to
/// [`Health::insert`], clones sharing its cells), so a balancer reading
/// [`EndpointKey`](keel_core::EndpointKey) from keys gets, with no task of
/// its own, the endpoint's live weight (slow start, busy dampening, 0 once
/// out of rotation; pushed every `tick`), its declared capacity
/// ([`Endpoint::capacity`]), and a reporter: an outcome it reports through
/// the key (its attempt timeout fired) is recorded by outlier detection
/// like one the [`Outlier`] layer saw.
///
/// The stream holds a [`Health`] handle, so the registry lives as long as
/// the balancer that owns the stream. It never ends and never fails.
pub struct HealthDiscover<S, M, C = DefaultClassifier> {
    health: Health,
    updates: WatchStream<Snapshot>,
    make: M,
    classifier: C,
    /// Endpoint incarnations the consumer currently holds.
    live: HashMap<EndpointId, u64>,
    pending: VecDeque<Change<EndpointId, Outlier<S, C>>>,
}

impl<S, M, C> fmt::Debug for HealthDiscover<S, M, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthDiscover")
            .field("health", &self.health)
            .field("live", &self.live.len())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<S, M, C> HealthDiscover<S, M, C>
where
    M: FnMut(&Endpoint) -> S,
    C: Clone,
{
    pub(crate) fn new(health: Health, make: M, classifier: C) -> Self {
        let updates = WatchStream::new(health.subscribe());
        HealthDiscover {
            health,
            updates,
            make,
            classifier,
            live: HashMap::new(),
            pending: VecDeque::new(),
        }
    }

    fn apply(&mut self, snapshot: &Snapshot) {
        let mut seen: HashMap<&EndpointId, u64> = HashMap::new();
        // In id order, and removals too, so the balancer sees the same
        // sequence of changes on every run (the snapshot is a hash map).
        let mut in_rotation: Vec<_> = snapshot.in_rotation().collect();
        in_rotation.sort_by(|a, b| a.endpoint.id().cmp(b.endpoint.id()));
        for status in in_rotation {
            let id = status.endpoint.id();
            seen.insert(id, status.incarnation);
            if self.live.get(id) == Some(&status.incarnation) {
                continue;
            }
            let Some(recorder) = self.health.recorder_of(id.as_str(), status.incarnation) else {
                // Removed since the snapshot; a later one says so.
                continue;
            };
            let service = Outlier::new(
                (self.make)(&status.endpoint),
                recorder,
                self.classifier.clone(),
            );
            self.live.insert(id.clone(), status.incarnation);
            self.pending.push_back(Change::Insert(id.clone(), service));
        }
        let mut gone: Vec<EndpointId> = self
            .live
            .keys()
            .filter(|id| !seen.contains_key(id))
            .cloned()
            .collect();
        gone.sort();
        for id in gone {
            self.live.remove(&id);
            self.pending.push_back(Change::Remove(id));
        }
    }
}

// No field is ever pinned: the stream only moves services into `pending`.
impl<S, M, C> Unpin for HealthDiscover<S, M, C> {}

impl<S, M, C> Stream for HealthDiscover<S, M, C>
where
    M: FnMut(&Endpoint) -> S,
    C: Clone,
{
    type Item = Result<Change<EndpointId, Outlier<S, C>>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(change) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match Pin::new(&mut this.updates).poll_next(cx) {
                Poll::Ready(Some(snapshot)) => this.apply(&snapshot),
                // The sender lives in the registry we hold: not reached.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
