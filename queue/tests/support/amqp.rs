//! RabbitMQ test support shared by the `amqp_*` test files and the bench:
//! deleting a test queue's broker objects when the test ends, and reading
//! what the broker itself holds for it.
//!
//! Included with `#[path = "support/amqp.rs"] mod amqp_support;`. It knows
//! the backend's topology (see `AmqpQueue`'s module docs): for a queue `q`
//! with `n` priority levels, the ready queues `q.p0` .. `q.p<n-1>`, the dead
//! letters `q.dead` and the fanout exchange `q.dlx`. Delay queues expire on
//! their own (`x-expires`).
// Each test file uses a different part of this module.
#![allow(dead_code)]

use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::time::{Instant, sleep};

/// The ready queues of `name`, lowest level first.
fn ready_queues(name: &str, levels: u8) -> Vec<String> {
    (0..levels).map(|l| format!("{name}.p{l}")).collect()
}

fn dead_queue(name: &str) -> String {
    format!("{name}.dead")
}

/// Deletes a test queue's broker objects when dropped, including when the
/// test panics. Create it before the queue, so it drops after every handle.
#[derive(Debug)]
pub(crate) struct DeleteTopology {
    url: String,
    name: String,
    levels: u8,
}

impl DeleteTopology {
    /// Deletes the topology of the queue `name` with `levels` priority
    /// levels on the broker at `url` (not through a proxy) when dropped.
    pub(crate) fn new(url: impl Into<String>, name: impl Into<String>, levels: u8) -> Self {
        DeleteTopology {
            url: url.into(),
            name: name.into(),
            levels,
        }
    }
}

impl Drop for DeleteTopology {
    fn drop(&mut self) {
        // On a thread and runtime of its own: `Drop` cannot await, and may
        // run inside (or after) the test's runtime.
        let (url, name, levels) = (self.url.clone(), self.name.clone(), self.levels);
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                if let Err(err) = delete_topology(&url, &name, levels).await {
                    // Cleanup after the test's own assertions: say so
                    // loudly rather than fail a test that passed.
                    eprintln!("could not delete the test queues of `{name}` at {url}: {err}");
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Deletes the ready queues, the dead letters and the dead-letter exchange
/// of the queue `name` with `levels` priority levels on the broker at
/// `url`; a missing one is no error.
///
/// # Errors
///
/// When the broker cannot be reached.
pub(crate) async fn delete_topology(url: &str, name: &str, levels: u8) -> Result<(), lapin::Error> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let mut queues = ready_queues(name, levels);
    queues.push(dead_queue(name));
    for queue in queues {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .exchange_delete(
            format!("{name}.dlx").as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = conn.close(200, "deleted".into()).await;
    Ok(())
}

/// What the broker holds for a test queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BrokerCounts {
    /// Ready messages over every ready queue (unacked ones are not counted
    /// while their consumer's connection lives).
    pub(crate) ready: u64,
    /// Consumers over every ready queue.
    pub(crate) consumers: u64,
    /// Messages in the dead-letter queue.
    pub(crate) dead: u64,
}

/// Reads [`BrokerCounts`] on a connection of its own.
pub(crate) async fn broker_counts(
    url: &str,
    name: &str,
    levels: u8,
) -> Result<BrokerCounts, lapin::Error> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let mut counts = BrokerCounts::default();
    let mut queues: Vec<(String, bool)> = ready_queues(name, levels)
        .into_iter()
        .map(|q| (q, false))
        .collect();
    queues.push((dead_queue(name), true));
    let mut result = Ok(());
    for (queue, dead) in queues {
        // A fresh channel per look: a missing queue closes the channel.
        let looked = async {
            let channel = conn.create_channel().await?;
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            let _ = channel.close(200, "counted".into()).await;
            Ok::<_, lapin::Error>(declared)
        }
        .await;
        match looked {
            Ok(declared) if dead => counts.dead += u64::from(declared.message_count()),
            Ok(declared) => {
                counts.ready += u64::from(declared.message_count());
                counts.consumers += u64::from(declared.consumer_count());
            }
            Err(err) => {
                result = Err(err);
                break;
            }
        }
    }
    let _ = conn.close(200, "counted".into()).await;
    result.map(|()| counts)
}

/// Once every handle on the queue is dropped: waits (up to `limit`) until
/// no consumer is left on its ready queues, so their connections are closed
/// and the broker has requeued whatever they held unacked (two readings in
/// a row agree), and answers what the broker holds then. A queue that was
/// verifiably drained answers zero ready and zero dead.
///
/// # Panics
///
/// When the broker cannot be read, or its counts have not settled at `limit`.
pub(crate) async fn settled_broker_counts(
    url: &str,
    name: &str,
    levels: u8,
    limit: Duration,
) -> BrokerCounts {
    let deadline = Instant::now() + limit;
    let mut previous = None;
    loop {
        let counts = broker_counts(url, name, levels)
            .await
            .unwrap_or_else(|err| panic!("read the broker's counts of `{name}`: {err}"));
        // Twice the same with no consumer: requeues have landed.
        if counts.consumers == 0 && previous == Some(counts) {
            return counts;
        }
        previous = Some(counts);
        assert!(
            Instant::now() < deadline,
            "the broker's counts of `{name}` did not settle (consumers gone, two readings \
             alike) {limit:?} after every handle was dropped: {counts:?}"
        );
        sleep(Duration::from_millis(50)).await;
    }
}
