//! The naive pipeline the demo compares against: what a gateway looks like
//! without Keel. An unbounded in-memory queue, a fixed pool of workers,
//! round-robin over the nodes, a client timeout per attempt and three
//! immediate retries on any error. No cache, no admission control, no
//! health checking, no deadlines.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::fleet::{Fleet, InferenceRequest};
use crate::report::{Ledger, RequestResult};

/// Concurrent requests the naive gateway sends to nodes.
const WORKERS: usize = 64;
/// Retries after the first attempt.
const RETRIES: u32 = 3;
/// The HTTP client's timeout per attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// One queued request with its bookkeeping.
#[derive(Debug)]
struct Queued {
    request: InferenceRequest,
    phase: usize,
    offered_at: Instant,
}

/// The naive gateway.
#[derive(Debug, Clone)]
pub struct NaivePipeline {
    queue: mpsc::UnboundedSender<Queued>,
    depth: Arc<AtomicUsize>,
}

impl NaivePipeline {
    /// Starts the workers over `fleet`, recording into `ledger`.
    pub fn start(fleet: Fleet, ledger: Arc<Ledger>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel::<Queued>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let depth = Arc::new(AtomicUsize::new(0));
        let next = Arc::new(AtomicUsize::new(0));
        for _ in 0..WORKERS {
            let (rx, depth, next, fleet, ledger) = (
                rx.clone(),
                depth.clone(),
                next.clone(),
                fleet.clone(),
                ledger.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let Some(item) = rx.lock().await.recv().await else {
                        return;
                    };
                    depth.fetch_sub(1, Ordering::Relaxed);
                    let mut attempts = 0;
                    let outcome = loop {
                        attempts += 1;
                        let node =
                            &fleet.nodes[next.fetch_add(1, Ordering::Relaxed) % fleet.nodes.len()];
                        let answer =
                            tokio::time::timeout(ATTEMPT_TIMEOUT, node.infer(item.request.clone()))
                                .await;
                        match answer {
                            Ok(Ok(_)) => {
                                break RequestResult::Completed {
                                    latency: item.offered_at.elapsed(),
                                    attempts,
                                    cache_hit: false,
                                };
                            }
                            _ if attempts <= RETRIES => continue,
                            _ => break RequestResult::Failed { attempts },
                        }
                    };
                    ledger.record(item.phase, &outcome);
                }
            });
        }
        NaivePipeline { queue: tx, depth }
    }

    /// Offers a request (never refuses: the queue is unbounded).
    pub fn offer(&self, request: InferenceRequest, phase: usize) {
        self.depth.fetch_add(1, Ordering::Relaxed);
        let _ = self.queue.send(Queued {
            request,
            phase,
            offered_at: Instant::now(),
        });
    }

    /// Requests waiting in the queue.
    pub fn depth(&self) -> u64 {
        self.depth.load(Ordering::Relaxed) as u64
    }
}
