//! Connections reused across operations without a checkout per call.
//!
//! `deadpool-redis` checks a connection's health with a `PING` round trip on
//! every checkout. Redis connections here are multiplexed (one socket carries
//! concurrent, pipelined commands), so the queue instead keeps a few
//! connections checked out as *lanes* and spreads operations over them. A
//! lane whose connection failed or timed out is emptied and its connection
//! taken out of the pool for good (a reply may still be owed on it, which
//! would poison the next user); the lane's next use takes a fresh
//! (health-checked or newly created) connection from the pool.

use std::sync::atomic::{AtomicUsize, Ordering};

use ::redis::aio::MultiplexedConnection;
use parking_lot::Mutex;

use super::error::RedisFailure;

pub(crate) struct Lanes {
    pool: deadpool_redis::Pool,
    lanes: Mutex<Vec<Option<deadpool_redis::Connection>>>,
    /// One filler at a time per lane, so an empty lane never takes more
    /// than its one connection from the pool.
    fillers: Vec<tokio::sync::Mutex<()>>,
    next: AtomicUsize,
}

/// One lane's connection, and which lane it came from.
pub(crate) struct Lane {
    pub(crate) index: usize,
    pub(crate) conn: MultiplexedConnection,
}

impl Lanes {
    pub(crate) fn new(pool: deadpool_redis::Pool, count: usize) -> Self {
        Lanes {
            pool,
            lanes: Mutex::new((0..count.max(1)).map(|_| None).collect()),
            fillers: (0..count.max(1))
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// A connection for one operation.
    pub(crate) async fn get(&self) -> Result<Lane, RedisFailure> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.fillers.len();
        if let Some(lane) = self.current(index) {
            return Ok(lane);
        }
        let _filling = self.fillers[index].lock().await;
        if let Some(lane) = self.current(index) {
            return Ok(lane);
        }
        let pooled = self.pool.get().await?;
        let conn = (*pooled).clone();
        self.lanes.lock()[index] = Some(pooled);
        Ok(Lane { index, conn })
    }

    fn current(&self, index: usize) -> Option<Lane> {
        self.lanes.lock()[index].as_ref().map(|pooled| Lane {
            index,
            conn: (**pooled).clone(),
        })
    }

    /// Empties a lane after its connection failed or hung, and removes that
    /// connection from the pool.
    pub(crate) fn forget(&self, index: usize) {
        if let Some(pooled) = self.lanes.lock()[index].take() {
            drop(deadpool_redis::Connection::take(pooled));
        }
    }
}
