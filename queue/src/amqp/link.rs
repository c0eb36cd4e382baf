//! One live connection: its channels and its consumers' prefetched
//! deliveries; connecting (and reconnecting), and the time limit on every
//! broker operation.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::AmqpQueue;
use super::error::AmqpFailure;
use super::lease::Lease;
use crate::error::{QueueError, Result};

/// One live connection with its channels and prefetched deliveries.
pub(super) struct Link {
    pub(super) generation: u64,
    pub(super) connection: Arc<Connection>,
    pub(super) publisher: Channel,
    pub(super) declared_delays: Mutex<HashSet<String>>,
    /// One consumer channel per level, created on first demand.
    pub(super) channels: tokio::sync::OnceCell<Vec<Channel>>,
    /// The running consumers (tag and pump task per level); empty while
    /// consumption is paused.
    pub(super) consumers: tokio::sync::Mutex<Vec<(String, tokio::task::JoinHandle<()>)>>,
    /// Set while consumers run; a consumer that ends while it is set means
    /// the channel or connection failed.
    pub(super) consuming: AtomicBool,
    /// `dequeue` calls in progress, and when demand was last seen.
    pub(super) waiting: AtomicUsize,
    pub(super) last_demand: Mutex<Instant>,
    pub(super) buffers: Mutex<Vec<VecDeque<lapin::message::Delivery>>>,
    pub(super) arrived: Notify,
    pub(super) broken: AtomicBool,
}

impl Link {
    pub(super) fn usable(&self) -> bool {
        !self.broken.load(Ordering::Acquire) && self.connection.status().connected()
    }

    pub(super) fn mark_broken(&self) {
        self.broken.store(true, Ordering::Release);
        self.arrived.notify_waiters();
    }

    /// Marks the link broken and closes its connection, so the broker
    /// requeues everything it had delivered here (consumer tasks would
    /// otherwise keep a half-dead connection and its prefetched messages).
    pub(super) fn retire(&self) {
        self.mark_broken();
        let connection = self.connection.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = connection
                    .close(200, "keel-queue: reconnecting".into())
                    .await;
            });
        }
    }
}

/// Marks a `dequeue` in progress on a link, and when it ended.
pub(super) struct Demand<'l>(&'l Link);

impl<'l> Demand<'l> {
    pub(super) fn new(link: &'l Link) -> Self {
        link.waiting.fetch_add(1, Ordering::AcqRel);
        *link.last_demand.lock() = Instant::now();
        Demand(link)
    }
}

impl Drop for Demand<'_> {
    fn drop(&mut self) {
        *self.0.last_demand.lock() = Instant::now();
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AmqpQueue {
    /// Runs one broker operation under `operation_timeout`; a broker that
    /// misses it is not trusted again.
    pub(super) async fn timed<T>(
        &self,
        fut: impl Future<Output = std::result::Result<T, AmqpFailure>>,
    ) -> Result<T> {
        let limit = self.inner.config.operation_timeout;
        match tokio::time::timeout(limit, fut).await {
            Ok(result) => result.map_err(QueueError::from),
            Err(_) => {
                // A broker that does not answer in time is not trusted again:
                // an abandoned publish would also shift the channel's confirm
                // numbering. The next call reconnects.
                if let Ok(mut slot) = self.inner.link.try_lock()
                    && let Some(link) = slot.take()
                {
                    link.retire();
                }
                Err(QueueError::Timeout(limit))
            }
        }
    }

    /// The current link, reconnecting if it is gone.
    pub(super) async fn link(&self) -> Result<Arc<Link>> {
        let mut slot = self.inner.link.lock().await;
        if let Some(link) = slot.as_ref()
            && link.usable()
        {
            return Ok(link.clone());
        }
        if let Some(old) = slot.take() {
            old.retire();
        }
        let link = Arc::new(self.open_link().await?);
        *slot = Some(link.clone());
        Ok(link)
    }

    /// Connects to the first node that answers, starting with the one
    /// after the node of the last connection (so a handle whose node died
    /// moves on), and opens the link there.
    async fn open_link(&self) -> Result<Link> {
        let config = &self.inner.config;
        let count = config.url_count();
        let start = self.inner.next_url.load(Ordering::Acquire) % count;
        let mut last_error = None;
        for offset in 0..count {
            let index = (start + offset) % count;
            let url = config.all_urls().nth(index).unwrap_or(&config.url);
            match self.open_link_to(url).await {
                Ok(link) => {
                    self.inner
                        .next_url
                        .store((index + 1) % count, Ordering::Release);
                    return Ok(link);
                }
                // Another node may answer; anything else (a refused
                // declaration) would be the same on every node.
                Err(err @ (QueueError::Unavailable { .. } | QueueError::Timeout(_))) => {
                    tracing::debug!(
                        url = %keel_core::redacted_url(url),
                        error = %err,
                        "rabbitmq node does not answer"
                    );
                    last_error = Some((url, err));
                }
                Err(other) => return Err(other),
            }
        }
        let Some((url, err)) = last_error else {
            return Err(QueueError::Unavailable {
                message: "no rabbitmq url to connect to".into(),
                source: None,
            });
        };
        let tried = if count > 1 {
            format!(
                "none of the {count} rabbitmq nodes answers (the last, {}",
                keel_core::redacted_url(url)
            )
        } else {
            format!(
                "rabbitmq at {} does not answer (",
                keel_core::redacted_url(url)
            )
        };
        Err(match err {
            QueueError::Unavailable { message, source } => QueueError::Unavailable {
                message: format!("{tried}: {message}); is it running?"),
                source,
            },
            other => other,
        })
    }

    /// Connects to `url`, opens the publisher channel with confirms and
    /// declares the topology.
    async fn open_link_to(&self, url: &str) -> Result<Link> {
        let config = &self.inner.config;
        let levels = usize::from(config.queue.priority_levels);
        let generation = self.inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.timed(async {
            let connection = Connection::connect(
                &config.connect_url(url),
                ConnectionProperties::default()
                    .with_connection_name(format!("keel-queue {}", self.name()).into()),
            )
            .await?;
            let publisher = connection.create_channel().await?;
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            self.declare_topology(&connection, &publisher).await?;
            Ok(Link {
                generation,
                connection: Arc::new(connection),
                publisher,
                declared_delays: Mutex::new(HashSet::new()),
                channels: tokio::sync::OnceCell::new(),
                consumers: tokio::sync::Mutex::new(Vec::new()),
                consuming: AtomicBool::new(false),
                waiting: AtomicUsize::new(0),
                last_demand: Mutex::new(Instant::now()),
                buffers: Mutex::new((0..levels).map(|_| VecDeque::new()).collect()),
                arrived: Notify::new(),
                broken: AtomicBool::new(false),
            })
        })
        .await
    }

    /// The link a lease belongs to, if it is still the live one.
    pub(super) async fn link_of(&self, lease: &Lease) -> Result<Arc<Link>> {
        let link = self.link().await?;
        if link.generation != lease.generation {
            return Err(QueueError::InvalidReceipt(
                "the connection was lost since this delivery; the broker requeued the job".into(),
            ));
        }
        Ok(link)
    }
}
