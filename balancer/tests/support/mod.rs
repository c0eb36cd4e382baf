//! Scriptable in-process endpoints for the service tests.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use keel_balancer::{FailureKind, Outcome};
use parking_lot::Mutex;
use tower::Service;

pub type Request = http::Request<u64>;

/// What a node does with the next request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Behavior {
    Ok(Duration),
    Fail(Duration),
    Busy,
    Hang,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node {0} failed")]
    Failed(usize),
    #[error("node {0} is busy")]
    Busy(usize),
}

/// A shared log of (node, request number) arrivals.
pub type Log = Arc<Mutex<Vec<(usize, u64)>>>;

#[derive(Clone, Debug)]
pub struct Node {
    pub id: usize,
    pub behavior: Arc<Mutex<Behavior>>,
    pub log: Log,
    pub in_flight: Arc<AtomicUsize>,
    pub cancelled: Arc<AtomicUsize>,
}

impl Node {
    pub fn set(&self, behavior: Behavior) {
        *self.behavior.lock() = behavior;
    }

    pub fn arrivals(&self) -> usize {
        self.log
            .lock()
            .iter()
            .filter(|(n, _)| *n == self.id)
            .count()
    }
}

pub fn nodes(n: usize, behavior: Behavior) -> (Vec<Node>, Log) {
    let log: Log = Arc::default();
    let nodes = (0..n)
        .map(|id| Node {
            id,
            behavior: Arc::new(Mutex::new(behavior)),
            log: log.clone(),
            in_flight: Arc::default(),
            cancelled: Arc::default(),
        })
        .collect();
    (nodes, log)
}

struct Guard {
    in_flight: Arc<AtomicUsize>,
    cancelled: Arc<AtomicUsize>,
    done: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.done {
            self.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Service<Request> for Node {
    type Response = usize;
    type Error = NodeError;
    type Future = Pin<Box<dyn Future<Output = Result<usize, NodeError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), NodeError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let id = self.id;
        self.log.lock().push((id, *request.body()));
        let behavior = *self.behavior.lock();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = Guard {
            in_flight: self.in_flight.clone(),
            cancelled: self.cancelled.clone(),
            done: false,
        };
        Box::pin(async move {
            // Move the whole guard in (not just the field the block assigns).
            let mut guard = guard;
            let result = match behavior {
                Behavior::Ok(d) => {
                    tokio::time::sleep(d).await;
                    Ok(id)
                }
                Behavior::Fail(d) => {
                    tokio::time::sleep(d).await;
                    Err(NodeError::Failed(id))
                }
                Behavior::Busy => Err(NodeError::Busy(id)),
                Behavior::Hang => std::future::pending().await,
            };
            guard.done = true;
            result
        })
    }
}

pub fn classify(result: &Result<usize, NodeError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Success,
        Err(NodeError::Busy(_)) => Outcome::Busy { retry_after: None },
        Err(NodeError::Failed(_)) => Outcome::failure(FailureKind::Server),
    }
}

pub fn request(n: u64) -> Request {
    http::Request::new(n)
}
