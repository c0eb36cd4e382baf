//! Cross-instance invalidation: how a change made through one
//! [`Tiered`](crate::Tiered) reaches the L1 of every other.

use std::fmt::Debug;

use async_trait::async_trait;
use futures::stream::BoxStream;
use tokio::sync::broadcast;

use crate::error::Result;
use keel_core::validate;

/// What an instance hears on an [`InvalidationBus`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BusEvent {
    /// The instance `origin` changed or deleted `key`: drop it from L1.
    Invalidate {
        /// The publishing instance's id (instances ignore their own).
        origin: String,
        /// The key, as given to the cache.
        key: String,
    },
    /// The subscription was (re)established. Messages sent before it may
    /// have been missed, so the listener drops its whole L1.
    Subscribed,
}

/// A channel that carries invalidations between cache instances.
///
/// [`RedisInvalidationBus`](crate::RedisInvalidationBus) (feature `redis`)
/// uses Redis pub/sub; [`LocalBus`] connects instances inside one process.
#[async_trait]
pub trait InvalidationBus: Debug + Send + Sync + 'static {
    /// Tells every subscribed instance that `key` changed.
    ///
    /// # Errors
    ///
    /// [`CacheError::Unavailable`](crate::CacheError::Unavailable) or
    /// [`CacheError::Timeout`](crate::CacheError::Timeout) when the message
    /// could not be sent; other instances keep their L1 copy until its
    /// `l1_ttl` lapses.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the message may or may not be sent.
    async fn publish(&self, origin: &str, key: &str) -> Result<()>;

    /// A stream of every invalidation published from now on, by any
    /// instance, and a [`BusEvent::Subscribed`] each time the subscription
    /// is (re)established. The stream ends only when the bus is gone.
    fn subscribe(&self) -> BoxStream<'static, BusEvent>;
}

/// An in-process [`InvalidationBus`] on a Tokio broadcast channel, for
/// several caches in one process and for tests.
///
/// A subscriber that falls more than `capacity` messages behind gets
/// [`BusEvent::Subscribed`] (flush everything) instead of the messages it
/// missed.
#[derive(Clone, Debug)]
pub struct LocalBus {
    sender: broadcast::Sender<BusEvent>,
}

impl LocalBus {
    /// A bus that buffers up to `capacity` messages per slow subscriber.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidConfig`](crate::CacheError::InvalidConfig) naming
    /// `capacity` when it is zero.
    pub fn new(capacity: usize) -> Result<Self> {
        validate::at_least("capacity", capacity, 1)?;
        Ok(LocalBus {
            sender: broadcast::channel(capacity).0,
        })
    }
}

#[async_trait]
impl InvalidationBus for LocalBus {
    async fn publish(&self, origin: &str, key: &str) -> Result<()> {
        // No subscriber is not an error: nobody holds a copy.
        let _ = self.sender.send(BusEvent::Invalidate {
            origin: origin.to_owned(),
            key: key.to_owned(),
        });
        Ok(())
    }

    fn subscribe(&self) -> BoxStream<'static, BusEvent> {
        let receiver = self.sender.subscribe();
        let first = futures::stream::iter([BusEvent::Subscribed]);
        let rest = futures::stream::unfold(receiver, |mut receiver| async move {
            match receiver.recv().await {
                Ok(event) => Some((event, receiver)),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    Some((BusEvent::Subscribed, receiver))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        Box::pin(futures::StreamExt::chain(first, rest))
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test]
    async fn delivers_and_reports_lag_as_a_resubscription() {
        let bus = LocalBus::new(2).unwrap();
        let mut events = bus.subscribe();
        assert_eq!(events.next().await, Some(BusEvent::Subscribed));
        bus.publish("a", "k1").await.unwrap();
        assert_eq!(
            events.next().await,
            Some(BusEvent::Invalidate {
                origin: "a".into(),
                key: "k1".into()
            })
        );
        for i in 0..5 {
            bus.publish("a", &format!("k{i}")).await.unwrap();
        }
        assert_eq!(events.next().await, Some(BusEvent::Subscribed));
        assert!(LocalBus::new(0).is_err());
    }
}
