//! One load per key (and loader error type) at a time: request coalescing.
//!
//! moka's `get_with` coalesces loads too, but the load runs inside the
//! first caller's future: when that caller gives up (a soft timeout, a
//! cancelled request) the load stops and the next waiter starts it again.
//! Here a load is a spawned task that outlives every caller, so a caller may
//! take a stale value after its soft timeout while the refresh finishes for
//! everyone else, and a background refresh is the same flight as a miss.
//!
//! Flights are keyed by the key and the loader's error type, as moka's
//! `try_get_with` is: every waiter receives the loader's own error, typed.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use parking_lot::Mutex;

use super::entry::Entry;
use crate::error::{CacheError, LoadFailed};

/// What a loader produced: the bytes, and whether to store them (a
/// [`Codec`](crate::Codec) may decline to cache a value, such as an HTTP
/// error response; coalesced waiters still get it).
pub(crate) struct Loaded {
    pub(crate) bytes: Bytes,
    pub(crate) store: bool,
}

/// Why a flight produced no entry; cloned to every waiter.
pub(crate) enum Failure<E> {
    /// The loader returned an error.
    Load(Arc<E>),
    /// The loaded value did not encode.
    Codec(Arc<CacheError>),
    /// The loader exceeded the hard timeout.
    Timeout(Duration),
    /// The loader panicked.
    Panicked,
}

impl<E> Clone for Failure<E> {
    fn clone(&self) -> Self {
        match self {
            Failure::Load(err) => Failure::Load(Arc::clone(err)),
            Failure::Codec(err) => Failure::Codec(Arc::clone(err)),
            Failure::Timeout(limit) => Failure::Timeout(*limit),
            Failure::Panicked => Failure::Panicked,
        }
    }
}

impl<E> Failure<E> {
    pub(crate) fn into_load_failed(self) -> LoadFailed<E> {
        match self {
            Failure::Load(err) => LoadFailed::Loader(err),
            Failure::Codec(err) => LoadFailed::Cache(CacheError::codec(
                "the loaded value could not be encoded",
                err,
            )),
            Failure::Timeout(limit) => LoadFailed::Cache(CacheError::LoadTimeout(limit)),
            Failure::Panicked => LoadFailed::Cache(CacheError::LoaderPanicked),
        }
    }
}

pub(crate) type Outcome<E> = Result<Arc<Entry>, Failure<E>>;
pub(crate) type Flight<E> = Shared<BoxFuture<'static, Outcome<E>>>;

/// One flight in the table: its loader error type, its id, and the
/// [`Flight<E>`] behind `Any`.
struct Slot {
    type_id: TypeId,
    id: u64,
    flight: Box<dyn Any + Send + Sync>,
}

/// The flights in progress, by key (then by loader error type).
#[derive(Default)]
pub(crate) struct Flights {
    /// Locked only to look up, insert or remove; never across an await.
    map: Mutex<HashMap<String, Vec<Slot>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Flights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights")
            .field("keys", &self.map.lock().len())
            .finish()
    }
}

/// Removes its flight from the table when the flight's task ends, however
/// it ends (including a panicking loader).
pub(crate) struct Landing {
    flights: Arc<Flights>,
    key: String,
    id: u64,
}

impl Landing {
    /// Removes the flight now (before the task ends), so that a new flight
    /// for the key can start.
    pub(crate) fn land(self) {}
}

impl Drop for Landing {
    fn drop(&mut self) {
        let mut map = self.flights.map.lock();
        if let Some(slots) = map.get_mut(&self.key) {
            slots.retain(|slot| slot.id != self.id);
            if slots.is_empty() {
                map.remove(&self.key);
            }
        }
    }
}

/// The flight of type `E` among `slots`.
fn find<E: Send + Sync + 'static>(slots: &[Slot]) -> Option<Flight<E>> {
    slots
        .iter()
        .filter(|slot| slot.type_id == TypeId::of::<E>())
        .find_map(|slot| slot.flight.downcast_ref::<Flight<E>>())
        .cloned()
}

impl Flights {
    /// Joins the flight for `key` and error type `E`, or starts
    /// `start(landing)` as a spawned task and registers it. Answers the
    /// flight and whether it was started by this call. The task must keep
    /// `landing` until it is done.
    pub(crate) fn join_or_start<E, F>(
        self: &Arc<Self>,
        key: &str,
        start: impl FnOnce(Landing) -> F,
    ) -> (Flight<E>, bool)
    where
        E: Send + Sync + 'static,
        F: std::future::Future<Output = Outcome<E>> + Send + 'static,
    {
        let mut map = self.map.lock();
        if let Some(flight) = map.get(key).and_then(|slots| find::<E>(slots)) {
            return (flight, false);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let landing = Landing {
            flights: Arc::clone(self),
            key: key.to_owned(),
            id,
        };
        let task = tokio::spawn(start(landing));
        let flight: Flight<E> = async move { task.await.unwrap_or(Err(Failure::Panicked)) }
            .boxed()
            .shared();
        let slot = Slot {
            type_id: TypeId::of::<E>(),
            id,
            flight: Box::new(flight.clone()),
        };
        match map.get_mut(key) {
            Some(slots) => slots.push(slot),
            None => {
                map.insert(key.to_owned(), vec![slot]);
            }
        }
        (flight, true)
    }

    /// The flight for `key` and error type `E`, if one is in progress.
    pub(crate) fn get<E: Send + Sync + 'static>(&self, key: &str) -> Option<Flight<E>> {
        self.map.lock().get(key).and_then(|slots| find::<E>(slots))
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Arc<Entry> {
        Arc::new(Entry::value(
            Bytes::from_static(b"v"),
            0,
            Duration::from_secs(1),
            Duration::ZERO,
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn joins_one_flight_and_lands() {
        let flights = Arc::new(Flights::default());
        let (a, started_a) =
            flights.join_or_start::<std::io::Error, _>("k", |landing| async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(landing);
                Ok(entry())
            });
        let (b, started_b) = flights
            .join_or_start::<std::io::Error, _>("k", |_landing| async move {
                unreachable!("joined, never started")
            });
        assert!(started_a && !started_b);
        assert_eq!(flights.len(), 1);
        assert!(a.await.is_ok() && b.await.is_ok());
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn another_error_type_flies_separately() {
        let flights = Arc::new(Flights::default());
        let (a, started_a) =
            flights.join_or_start::<std::io::Error, _>("k", |landing| async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(landing);
                Err(Failure::Load(Arc::new(std::io::Error::other("io"))))
            });
        let (b, started_b) =
            flights.join_or_start::<std::fmt::Error, _>("k", |landing| async move {
                drop(landing);
                Err(Failure::Load(Arc::new(std::fmt::Error)))
            });
        assert!(started_a && started_b);
        assert_eq!(flights.len(), 2);
        assert!(matches!(a.await, Err(Failure::Load(err)) if err.to_string() == "io"));
        assert!(matches!(b.await, Err(Failure::Load(_))));
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_panicking_task_lands_and_fails() {
        let flights = Arc::new(Flights::default());
        let (flight, _) = flights.join_or_start::<std::io::Error, _>("k", |landing| async move {
            let _landing = landing;
            if flights_len_is_positive() {
                panic!("loader bug");
            }
            Ok(entry())
        });
        assert!(matches!(flight.await, Err(Failure::Panicked)));
        assert_eq!(flights.len(), 0);
    }

    fn flights_len_is_positive() -> bool {
        true
    }
}
