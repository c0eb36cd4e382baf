//! Connections reused across operations without a checkout per call.
//!
//! `deadpool-redis` checks a connection's health with a `PING` round trip on
//! every checkout. Redis connections here are multiplexed (one socket carries
//! concurrent, pipelined commands), so the queue instead keeps a few
//! checked-out connections as *lanes* and spreads operations over them; a
//! lane whose connection fails is emptied, and its next use takes a fresh
//! (health-checked or newly created) connection from the pool.

use std::sync::atomic::{AtomicUsize, Ordering};

use ::redis::aio::MultiplexedConnection;
use parking_lot::Mutex;

use super::error::RedisFailure;

pub(crate) struct Lanes {
    pool: deadpool_redis::Pool,
    lanes: Mutex<Vec<Option<MultiplexedConnection>>>,
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
            lanes: Mutex::new(vec![None; count.max(1)]),
            next: AtomicUsize::new(0),
        }
    }

    pub(crate) fn pool(&self) -> &deadpool_redis::Pool {
        &self.pool
    }

    /// A connection for one operation.
    pub(crate) async fn get(&self) -> Result<Lane, RedisFailure> {
        let index = {
            let lanes = self.lanes.lock();
            self.next.fetch_add(1, Ordering::Relaxed) % lanes.len()
        };
        if let Some(conn) = self.lanes.lock()[index].clone() {
            return Ok(Lane { index, conn });
        }
        let pooled = self.pool.get().await?;
        let conn = (*pooled).clone();
        self.lanes.lock()[index] = Some(conn.clone());
        Ok(Lane { index, conn })
    }

    /// Empties a lane after its connection failed or hung.
    pub(crate) fn forget(&self, index: usize) {
        self.lanes.lock()[index] = None;
    }
}
