//! Micro-batching: requests with the same batch key are grouped and sent to
//! a batch service as one `Vec`, and the answers fanned back out.

mod config;
mod future;

use std::collections::HashMap;
use std::fmt;
use std::future::poll_fn;
use std::hash::Hash;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::PollSender;
use tokio_util::time::{DelayQueue, delay_queue};
use tower::{Service, ServiceExt};

pub use self::config::BatchConfig;
pub use self::future::BatchFuture;
use crate::error::{BoxError, Result, SchedulerError};
use crate::metrics::BatchMetrics;

/// One waiting item.
struct Item<Req, Resp> {
    request: Req,
    reply: oneshot::Sender<Result<Resp>>,
}

/// A micro-batcher in front of a batch service.
///
/// Items with the same key (from the key function) are grouped until the
/// batch holds [`max_batch_size`](BatchConfig::max_batch_size) items or its
/// first item has waited [`max_wait`](BatchConfig::max_wait), whichever
/// comes first, then the batch service is called with all of them, in
/// arrival order. Its response must hold one answer per item, in the same
/// order; each item gets its own (make the answer type a `Result` for
/// per-item errors). A batch that fails as a whole answers every item with
/// [`SchedulerError::Service`] sharing the one error as its source.
///
/// Each item is answered exactly once. An item whose submitter gave up
/// before its batch was sent is left out of the batch; once sent, a batch
/// runs to its end.
///
/// `Batcher` is a `tower::Service` (cheap to clone, every clone feeds the
/// same batches) and offers [`submit`](Batcher::submit) directly.
///
/// ```
/// use std::time::Duration;
/// use keel_scheduler::{BatchConfig, Batcher};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), keel_scheduler::SchedulerError> {
/// // Embeds a whole batch at once; here, the length of each text.
/// let embed = tower::service_fn(|texts: Vec<(String, String)>| async move {
///     Ok::<_, std::convert::Infallible>(texts.into_iter().map(|(_, t)| t.len()).collect::<Vec<_>>())
/// });
/// let batcher = Batcher::new(
///     BatchConfig::new("embed").max_batch_size(32).max_wait(Duration::from_millis(5)),
///     |(model, _): &(String, String)| model.clone(),
///     embed,
/// )?;
/// let (a, b) = tokio::join!(
///     batcher.submit(("small".into(), "hello".into())),
///     batcher.submit(("small".into(), "hi".into())),
/// );
/// assert_eq!((a?, b?), (5, 2));
/// # Ok(())
/// # }
/// ```
pub struct Batcher<Req, Resp> {
    tx: PollSender<Item<Req, Resp>>,
    config: Arc<BatchConfig>,
}

impl<Req, Resp> Clone for Batcher<Req, Resp> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
            config: self.config.clone(),
        }
    }
}

impl<Req, Resp> fmt::Debug for Batcher<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<Req, Resp> Batcher<Req, Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
{
    /// Starts a batcher: `key` names each request's batch, `service` runs
    /// whole batches.
    ///
    /// # Errors
    ///
    /// [`SchedulerError::InvalidConfig`] naming the bad field.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime (the batching task is spawned).
    pub fn new<K, F, S>(config: BatchConfig, key: F, service: S) -> Result<Self>
    where
        K: Hash + Eq + Clone + Send + 'static,
        F: Fn(&Req) -> K + Send + 'static,
        S: Service<Vec<Req>, Response = Vec<Resp>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        config.validate()?;
        let (tx, rx) = mpsc::channel(config.capacity);
        let config = Arc::new(config);
        tokio::spawn(run(config.clone(), key, service, rx));
        Ok(Batcher {
            tx: PollSender::new(tx),
            config,
        })
    }

    /// Adds one request to its batch and waits for its own answer.
    ///
    /// Waits for room when [`capacity`](BatchConfig::capacity) items are
    /// already waiting to be batched.
    ///
    /// # Errors
    ///
    /// [`SchedulerError::Service`] when the batch failed or answered the
    /// wrong number of items; [`SchedulerError::Closed`] when the batch
    /// service failed in `poll_ready`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before the batch is sent leaves the request out
    /// of it.
    pub async fn submit(&self, request: Req) -> Result<Resp> {
        let sender = self
            .tx
            .get_ref()
            .ok_or_else(|| SchedulerError::closed("the batcher stopped"))?
            .clone();
        let (reply, rx) = oneshot::channel();
        sender
            .send(Item { request, reply })
            .await
            .map_err(|_| SchedulerError::closed("the batcher stopped"))?;
        rx.await
            .unwrap_or_else(|_| Err(SchedulerError::closed("the batcher stopped")))
    }

    /// The configuration the batcher was built with.
    pub fn config(&self) -> &BatchConfig {
        &self.config
    }
}

impl<Req, Resp> Service<Req> for Batcher<Req, Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
{
    type Response = Resp;
    type Error = BoxError;
    type Future = BatchFuture<Resp>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        self.tx
            .poll_reserve(cx)
            .map_err(|_| SchedulerError::closed("the batcher stopped").into())
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let (reply, rx) = oneshot::channel();
        match self.tx.send_item(Item { request, reply }) {
            Ok(()) => BatchFuture::waiting(rx),
            Err(_) => BatchFuture::failed(SchedulerError::closed(
                "the batcher stopped (or `call` came without `poll_ready`)",
            )),
        }
    }
}

/// One batch being filled.
struct Open<Req, Resp> {
    items: Vec<Item<Req, Resp>>,
    timer: delay_queue::Key,
}

/// The batching task: groups arrivals, flushes full and timed-out batches.
async fn run<K, F, S, Req, Resp>(
    config: Arc<BatchConfig>,
    key_of: F,
    mut service: S,
    mut rx: mpsc::Receiver<Item<Req, Resp>>,
) where
    K: Hash + Eq + Clone + Send + 'static,
    F: Fn(&Req) -> K + Send + 'static,
    S: Service<Vec<Req>, Response = Vec<Resp>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
    Resp: Send + 'static,
{
    let metrics = BatchMetrics::new(&config.name);
    let mut open: HashMap<K, Open<Req, Resp>> = HashMap::new();
    let mut timers: DelayQueue<K> = DelayQueue::new();
    // Set once the service failed in `poll_ready`: answers everything.
    let mut dead: Option<String> = None;
    loop {
        tokio::select! {
            biased;
            expired = poll_fn(|cx| timers.poll_expired(cx)), if !timers.is_empty() => {
                let Some(expired) = expired else { continue };
                if let Some(batch) = open.remove(expired.get_ref()) {
                    flush(&mut service, batch.items, &metrics, &mut dead).await;
                }
            }
            item = rx.recv() => {
                let Some(item) = item else { break };
                if let Some(reason) = &dead {
                    let _ = item.reply.send(Err(SchedulerError::closed(reason.clone())));
                    continue;
                }
                let key = key_of(&item.request);
                let batch = open.entry(key.clone()).or_insert_with(|| Open {
                    items: Vec::with_capacity(config.max_batch_size),
                    timer: timers.insert(key.clone(), config.max_wait),
                });
                batch.items.push(item);
                if batch.items.len() >= config.max_batch_size {
                    let batch = open.remove(&key).expect("just filled");
                    timers.remove(&batch.timer);
                    flush(&mut service, batch.items, &metrics, &mut dead).await;
                }
            }
        }
    }
    // Every handle is gone: send what is left, then stop.
    for (_, batch) in open.drain() {
        flush(&mut service, batch.items, &metrics, &mut dead).await;
    }
}

/// Sends one batch (leaving out items whose submitter left) and fans the
/// answers out from a task of its own.
async fn flush<S, Req, Resp>(
    service: &mut S,
    items: Vec<Item<Req, Resp>>,
    metrics: &BatchMetrics,
    dead: &mut Option<String>,
) where
    S: Service<Vec<Req>, Response = Vec<Resp>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
    Resp: Send + 'static,
{
    let before = items.len();
    let (requests, replies): (Vec<Req>, Vec<oneshot::Sender<Result<Resp>>>) = items
        .into_iter()
        .filter(|item| !item.reply.is_closed())
        .map(|item| (item.request, item.reply))
        .unzip();
    metrics
        .cancelled
        .increment((before - requests.len()) as u64);
    if requests.is_empty() {
        return;
    }
    if let Some(reason) = dead {
        for reply in replies {
            let _ = reply.send(Err(SchedulerError::closed(reason.clone())));
        }
        return;
    }
    if let Err(err) = service.ready().await {
        let err: BoxError = err.into();
        let reason = format!("the batch service failed: {err}");
        tracing::error!(error = %err, "batch service failed; the batcher answers every item with `Closed`");
        for reply in replies {
            let _ = reply.send(Err(SchedulerError::closed(reason.clone())));
        }
        *dead = Some(reason);
        return;
    }
    metrics.batches.increment(1);
    metrics.items.increment(requests.len() as u64);
    metrics.size.record(requests.len() as f64);
    let expected = requests.len();
    let response = service.call(requests);
    tokio::spawn(async move {
        match response.await {
            Ok(answers) if answers.len() == expected => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            Ok(answers) => {
                let err = Arc::new(BatchFailed::Mismatch {
                    expected,
                    got: answers.len(),
                });
                for reply in replies {
                    let _ = reply.send(Err(SchedulerError::Service(Box::new(SharedBatchError(
                        err.clone(),
                    )))));
                }
            }
            Err(err) => {
                let err = Arc::new(BatchFailed::Service(err.into()));
                for reply in replies {
                    let _ = reply.send(Err(SchedulerError::Service(Box::new(SharedBatchError(
                        err.clone(),
                    )))));
                }
            }
        }
    });
}

/// Why a whole batch failed.
#[derive(Debug, thiserror::Error)]
enum BatchFailed {
    #[error("the batch service failed")]
    Service(#[source] BoxError),
    #[error("the batch service answered {got} items for a batch of {expected}")]
    Mismatch { expected: usize, got: usize },
}

/// One batch failure, shared by every item of the batch.
#[derive(Debug, Clone)]
struct SharedBatchError(Arc<BatchFailed>);

impl fmt::Display for SharedBatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl std::error::Error for SharedBatchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}
