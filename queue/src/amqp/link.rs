//! One live connection: its channels, its consumers' prefetched
//! deliveries, and the pump that fills them.

#[allow(unused_imports)]
use super::*;

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

/// Moves one level's deliveries into the link's buffer until the consumer ends.
pub(super) async fn pump(link: Weak<Link>, level: usize, mut consumer: lapin::Consumer) {
    while let Some(item) = consumer.next().await {
        let Some(link) = link.upgrade() else {
            return;
        };
        match item {
            Ok(delivery) => {
                link.buffers.lock()[level].push_back(delivery);
                link.arrived.notify_waiters();
            }
            Err(err) => {
                if link.consuming.load(Ordering::Acquire) {
                    tracing::warn!(error = %err, level, "rabbitmq consumer failed; reconnecting on the next call");
                    link.mark_broken();
                }
                return;
            }
        }
    }
    if let Some(link) = link.upgrade()
        && link.consuming.load(Ordering::Acquire)
    {
        link.mark_broken();
    }
}
