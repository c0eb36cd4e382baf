//! Connections reused across operations without a checkout per call.
//!
//! `deadpool-redis` checks a connection's health with a `PING` round trip on
//! every checkout. Redis connections here are multiplexed (one socket carries
//! concurrent, pipelined commands), so on a single server the queue instead
//! keeps a few connections checked out as *lanes* and spreads operations over
//! them. A lane whose connection failed or timed out is emptied and its
//! connection taken out of the pool for good (a reply may still be owed on
//! it, which would poison the next user); the lane's next use takes a fresh
//! (health-checked or newly created) connection from the pool.
//!
//! On a Redis Cluster there is one lane: the cluster connection, which
//! multiplexes over one connection per node and replaces a node's
//! connection by itself after a failure.

use std::sync::atomic::{AtomicUsize, Ordering};

use keel_core::redis::{RedisConnection, RedisPool};
use parking_lot::Mutex;

use super::error::RedisFailure;

pub(crate) enum Lanes {
    Single {
        pool: deadpool_redis::Pool,
        lanes: Mutex<Vec<Option<deadpool_redis::Connection>>>,
        /// One filler at a time per lane, so an empty lane never takes more
        /// than its one connection from the pool.
        fillers: Vec<tokio::sync::Mutex<()>>,
        next: AtomicUsize,
    },
    Cluster(RedisPool),
}

/// One lane's connection, and which lane it came from.
pub(crate) struct Lane {
    pub(crate) index: usize,
    pub(crate) conn: RedisConnection,
}

impl Lanes {
    /// `count` lanes over a single server's pool, or the cluster
    /// connection of a cluster's.
    pub(crate) fn new(pool: &RedisPool, count: usize) -> Self {
        match pool.deadpool() {
            Some(single) => Lanes::Single {
                pool: single.clone(),
                lanes: Mutex::new((0..count.max(1)).map(|_| None).collect()),
                fillers: (0..count.max(1))
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                next: AtomicUsize::new(0),
            },
            None => Lanes::Cluster(pool.clone()),
        }
    }

    /// A connection for one operation.
    pub(crate) async fn get(&self) -> Result<Lane, RedisFailure> {
        let (pool, lanes, fillers, next) = match self {
            Lanes::Single {
                pool,
                lanes,
                fillers,
                next,
            } => (pool, lanes, fillers, next),
            Lanes::Cluster(pool) => {
                return Ok(Lane {
                    index: 0,
                    conn: pool.connection().await?,
                });
            }
        };
        let index = next.fetch_add(1, Ordering::Relaxed) % fillers.len();
        if let Some(lane) = current(lanes, index) {
            return Ok(lane);
        }
        let _filling = fillers[index].lock().await;
        if let Some(lane) = current(lanes, index) {
            return Ok(lane);
        }
        let pooled = pool.get().await?;
        let conn = RedisConnection::Single((*pooled).clone());
        lanes.lock()[index] = Some(pooled);
        Ok(Lane { index, conn })
    }

    /// Empties a lane after its connection failed or hung, and removes that
    /// connection from the pool. (The cluster connection mends itself.)
    pub(crate) fn forget(&self, index: usize) {
        if let Lanes::Single { lanes, .. } = self
            && let Some(pooled) = lanes.lock()[index].take()
        {
            drop(deadpool_redis::Connection::take(pooled));
        }
    }
}

fn current(lanes: &Mutex<Vec<Option<deadpool_redis::Connection>>>, index: usize) -> Option<Lane> {
    lanes.lock()[index].as_ref().map(|pooled| Lane {
        index,
        conn: RedisConnection::Single((**pooled).clone()),
    })
}
