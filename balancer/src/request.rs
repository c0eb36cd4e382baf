//! What the balancer reads from a request: its deadline, affinity key,
//! prompt, and the endpoints it must avoid — all carried in
//! [`http::Extensions`].

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::endpoint::EndpointId;

/// A request that carries [`http::Extensions`], where every Keel layer looks
/// for its routing hints ([`Deadline`], [`AffinityKey`], [`Prompt`],
/// [`AvoidEndpoints`]).
///
/// Implemented for [`http::Request`], so anything built on hyper, axum,
/// tonic or tower-http works as is; `Extensions` is the type map those
/// stacks already use for per-request values. A custom request type
/// implements it with one field:
///
/// ```
/// use keel_balancer::RequestExtensions;
///
/// #[derive(Clone, Debug)]
/// struct Embed {
///     text: String,
///     extensions: http::Extensions,
/// }
///
/// impl RequestExtensions for Embed {
///     fn extensions(&self) -> &http::Extensions {
///         &self.extensions
///     }
///     fn extensions_mut(&mut self) -> &mut http::Extensions {
///         &mut self.extensions
///     }
/// }
/// ```
pub trait RequestExtensions {
    /// The request's extensions.
    fn extensions(&self) -> &http::Extensions;
    /// The request's extensions, mutably.
    fn extensions_mut(&mut self) -> &mut http::Extensions;
}

impl<B> RequestExtensions for http::Request<B> {
    fn extensions(&self) -> &http::Extensions {
        http::Request::extensions(self)
    }

    fn extensions_mut(&mut self) -> &mut http::Extensions {
        http::Request::extensions_mut(self)
    }
}

impl RequestExtensions for http::Extensions {
    fn extensions(&self) -> &http::Extensions {
        self
    }

    fn extensions_mut(&mut self) -> &mut http::Extensions {
        self
    }
}

/// The instant after which nobody wants the answer to a request.
///
/// Carried in the request's extensions. Every Keel layer honours it: the
/// balancer never dispatches an expired request and cancels the upstream
/// call when the deadline passes, the retry layer never schedules an attempt
/// past it, the hedge layer never hedges past it, and
/// [`DeadlineLayer`](crate::DeadlineLayer) sets it and enforces it over the
/// whole stack. It is a [`tokio::time::Instant`], so paused-time tests
/// control it.
///
/// ```
/// use std::time::Duration;
/// use keel_balancer::Deadline;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let mut request = http::Request::new("prompt");
/// Deadline::after(Duration::from_secs(2)).apply(&mut request);
/// // A later, looser deadline never extends an earlier one.
/// Deadline::after(Duration::from_secs(30)).apply(&mut request);
/// let deadline = Deadline::of(&request).unwrap();
/// assert!(deadline.remaining() <= Duration::from_secs(2));
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(Instant);

impl Deadline {
    /// A deadline at `instant`.
    pub fn at(instant: Instant) -> Self {
        Deadline(instant)
    }

    /// A deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Deadline(Instant::now() + timeout)
    }

    /// The deadline's instant.
    pub fn instant(&self) -> Instant {
        self.0
    }

    /// Time left until the deadline; zero once it passed.
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.0
    }

    /// The deadline carried by `request`, if any.
    pub fn of<R: RequestExtensions + ?Sized>(request: &R) -> Option<Deadline> {
        request.extensions().get::<Deadline>().copied()
    }

    /// Sets this deadline on `request`, unless it already carries an earlier
    /// one (a deadline only ever tightens). Returns the deadline in force.
    pub fn apply<R: RequestExtensions + ?Sized>(self, request: &mut R) -> Deadline {
        let effective = match Deadline::of(request) {
            Some(existing) if existing <= self => existing,
            _ => self,
        };
        request.extensions_mut().insert(effective);
        effective
    }
}

/// The affinity key of a request for
/// [`Policy::ConsistentHash`](crate::Policy::ConsistentHash): requests with
/// the same key go to the same endpoint while its load stays under the bound.
///
/// Build it from a session id, a tenant, or a hash of the prompt's prefix.
/// The hash is stable for a given build of this crate, so every balancer
/// instance in a deployment agrees on it.
///
/// ```
/// use keel_balancer::AffinityKey;
///
/// let mut request = http::Request::new(());
/// AffinityKey::of("session-42").apply(&mut request);
/// assert_eq!(AffinityKey::get(&request), Some(AffinityKey::of("session-42")));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey(pub u64);

impl AffinityKey {
    /// The key of any hashable value (a session id, a tenant name, bytes).
    pub fn of<T: Hash + ?Sized>(value: &T) -> Self {
        AffinityKey(stable_hash(value))
    }

    /// Puts this key in `request`'s extensions.
    pub fn apply<R: RequestExtensions + ?Sized>(self, request: &mut R) {
        request.extensions_mut().insert(self);
    }

    /// The key carried by `request`, if any.
    pub fn get<R: RequestExtensions + ?Sized>(request: &R) -> Option<AffinityKey> {
        request.extensions().get::<AffinityKey>().copied()
    }
}

/// The prompt of a request, for
/// [`Policy::PrefixAffinity`](crate::Policy::PrefixAffinity): the balancer
/// splits it into fixed-size blocks, hashes them as a chain (block *i*'s hash
/// covers blocks 0..=*i*, like a KV-cache block hash) and remembers, per
/// endpoint, the blocks it recently sent there.
///
/// Cloning is cheap ([`Bytes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt(pub Bytes);

impl Prompt {
    /// Puts this prompt in `request`'s extensions.
    pub fn apply<R: RequestExtensions + ?Sized>(self, request: &mut R) {
        request.extensions_mut().insert(self);
    }

    /// The prompt carried by `request`, if any.
    pub fn get<R: RequestExtensions + ?Sized>(request: &R) -> Option<&Prompt> {
        request.extensions().get::<Prompt>()
    }

    /// The chained block hashes of this prompt with `block_bytes`-byte
    /// blocks (the last block may be shorter).
    pub fn block_hashes(&self, block_bytes: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.0.len().div_ceil(block_bytes.max(1)));
        let mut chain = 0u64;
        for block in self.0.chunks(block_bytes.max(1)) {
            chain = stable_hash(&(chain, block));
            out.push(chain);
        }
        out
    }
}

/// Endpoints a request must not be sent to: the ones it already failed on.
///
/// The [retry layer](crate::retry) adds the endpoint of each failed attempt,
/// and the [hedge layer](crate::hedge) adds the endpoint of the first copy,
/// so a retry or a hedge always goes somewhere else. If every endpoint is
/// excluded the balancer answers [`Error::NoEndpoints`](crate::Error::NoEndpoints).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AvoidEndpoints(Vec<EndpointId>);

impl AvoidEndpoints {
    /// Adds `endpoint` to the set carried by `request`.
    pub fn add<R: RequestExtensions + ?Sized>(request: &mut R, endpoint: EndpointId) {
        let set = request
            .extensions_mut()
            .get_or_insert_default::<AvoidEndpoints>();
        if !set.0.contains(&endpoint) {
            set.0.push(endpoint);
        }
    }

    /// The set carried by `request`, if any.
    pub fn get<R: RequestExtensions + ?Sized>(request: &R) -> Option<&AvoidEndpoints> {
        request.extensions().get::<AvoidEndpoints>()
    }

    /// Whether `endpoint` is in the set.
    pub fn contains(&self, endpoint: EndpointId) -> bool {
        self.0.contains(&endpoint)
    }

    /// The endpoints in the set, in the order they were added.
    pub fn as_slice(&self) -> &[EndpointId] {
        &self.0
    }
}

/// Where the balancer dispatched a request, written by the balancer when the
/// request carries one. The hedge layer uses it to send its copy elsewhere.
#[derive(Clone, Debug, Default)]
pub(crate) struct DispatchTrace(Arc<AtomicU64>);

impl DispatchTrace {
    pub(crate) fn record(&self, endpoint: EndpointId) {
        self.0.store(endpoint.get() + 1, Ordering::Release);
    }

    pub(crate) fn endpoint(&self) -> Option<EndpointId> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            n => Some(EndpointId::new(n - 1)),
        }
    }
}

/// A hash that is the same in every process running this build: SipHash-1-3
/// with fixed keys (std's `DefaultHasher::new()`).
pub(crate) fn stable_hash<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadline_only_tightens() {
        let mut request = http::Request::new(());
        let first = Deadline::after(Duration::from_secs(1)).apply(&mut request);
        let second = Deadline::after(Duration::from_secs(5)).apply(&mut request);
        assert_eq!(first, second);
        let tighter = Deadline::after(Duration::from_millis(10)).apply(&mut request);
        assert!(tighter < first);
        assert!(!tighter.is_expired());
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(tighter.is_expired());
        assert_eq!(tighter.remaining(), Duration::ZERO);
    }

    #[test]
    fn prompt_blocks_share_a_prefix_chain() {
        let a = Prompt(Bytes::from_static(b"system prompt: be brief. user: hi"));
        let b = Prompt(Bytes::from_static(b"system prompt: be brief. user: bye"));
        let (ha, hb) = (a.block_hashes(8), b.block_hashes(8));
        assert_eq!(ha.len(), 5);
        assert_eq!(ha[..3], hb[..3], "the shared 24-byte prefix hashes alike");
        assert_ne!(ha[3], hb[3]);
    }

    #[test]
    fn avoid_set_has_no_duplicates() {
        let mut ext = http::Extensions::new();
        AvoidEndpoints::add(&mut ext, EndpointId::new(1));
        AvoidEndpoints::add(&mut ext, EndpointId::new(1));
        AvoidEndpoints::add(&mut ext, EndpointId::new(4));
        let set = AvoidEndpoints::get(&ext).unwrap();
        assert_eq!(set.as_slice(), &[EndpointId::new(1), EndpointId::new(4)]);
        assert!(set.contains(EndpointId::new(4)));
    }

    #[test]
    fn affinity_keys_are_stable() {
        assert_eq!(AffinityKey::of("a"), AffinityKey::of("a"));
        assert_ne!(AffinityKey::of("a"), AffinityKey::of("b"));
    }
}
