//! One load per key at a time (request coalescing).
//!
//! moka's `get_with` coalesces loads too, but the load runs inside the
//! first caller's future: when that caller gives up (a soft timeout, a
//! cancelled request) the load stops and the next waiter starts it again.
//! Here a load is a spawned task that outlives every caller, so a caller may
//! take a stale value after its soft timeout while the refresh finishes for
//! everyone else, and a background refresh is the same flight as a miss.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use parking_lot::Mutex;

use super::entry::Entry;

/// Why a flight produced no entry; cloned to every waiter.
#[derive(Clone, Debug)]
pub(crate) enum Failure {
    /// The loader returned an error.
    Load {
        kind: Option<String>,
        message: String,
        source: Arc<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The loader exceeded the hard timeout.
    Timeout(Duration),
    /// The loader panicked.
    Panicked,
}

pub(crate) type Outcome = Result<Arc<Entry>, Failure>;
pub(crate) type Flight = Shared<BoxFuture<'static, Outcome>>;

/// The flights in progress, by key.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    /// Locked only to look up, insert or remove; never across an await.
    map: Mutex<HashMap<String, (u64, Flight)>>,
    next_id: AtomicU64,
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
        if map.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            map.remove(&self.key);
        }
    }
}

impl Flights {
    /// Joins the flight for `key`, or starts `start(landing)` as a spawned
    /// task and registers it. Answers the flight and whether it was started
    /// by this call. The task must keep `landing` until it is done.
    pub(crate) fn join_or_start<F>(
        self: &Arc<Self>,
        key: &str,
        start: impl FnOnce(Landing) -> F,
    ) -> (Flight, bool)
    where
        F: std::future::Future<Output = Outcome> + Send + 'static,
    {
        let mut map = self.map.lock();
        if let Some((_, flight)) = map.get(key) {
            return (flight.clone(), false);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let landing = Landing {
            flights: Arc::clone(self),
            key: key.to_owned(),
            id,
        };
        let task = tokio::spawn(start(landing));
        let flight = async move { task.await.unwrap_or(Err(Failure::Panicked)) }
            .boxed()
            .shared();
        map.insert(key.to_owned(), (id, flight.clone()));
        (flight, true)
    }

    /// The flight for `key`, if one is in progress.
    pub(crate) fn get(&self, key: &str) -> Option<Flight> {
        self.map.lock().get(key).map(|(_, f)| f.clone())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

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
        let (a, started_a) = flights.join_or_start("k", |landing| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(landing);
            Ok(entry())
        });
        let (b, started_b) = flights.join_or_start("k", |_landing| async move {
            unreachable!("joined, never started")
        });
        assert!(started_a && !started_b);
        assert_eq!(flights.len(), 1);
        assert!(a.await.is_ok() && b.await.is_ok());
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_panicking_task_lands_and_fails() {
        let flights = Arc::new(Flights::default());
        let (flight, _) = flights.join_or_start("k", |landing| async move {
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
