//! What the balancer reads from a request besides its
//! [`Deadline`](crate::Deadline): its affinity key, prompt, and the
//! endpoints it must avoid — all carried in [`http::Extensions`]
//! ([`RequestExtensions`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use keel_core::{RequestExtensions, stable_hash, stable_hash_seeded};

use crate::endpoint::EndpointIndex;

/// The affinity key of a request for
/// [`Policy::ConsistentHash`](crate::Policy::ConsistentHash): requests with
/// the same key go to the same endpoint while its load stays under the bound.
///
/// Build it from the bytes of a session id, a tenant, or a prompt's
/// prefix. The bytes are hashed with [`keel_core::stable_hash`] (XXH3-64,
/// pinned), so every balancer instance in a deployment, across versions and
/// platforms, agrees on a key's place on the ring. The field is the hash
/// itself, for keys hashed elsewhere.
///
/// ```
/// use keel_balancer::AffinityKey;
///
/// let mut request = http::Request::new(());
/// AffinityKey::of("session-42").apply(&mut request);
/// assert_eq!(AffinityKey::get(&request), Some(AffinityKey::of(b"session-42")));
/// assert_eq!(AffinityKey::of("session-42").0, keel_core::stable_hash(b"session-42"));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey(pub u64);

impl AffinityKey {
    /// The key of `bytes` (a session id, a tenant name, a number's
    /// `to_le_bytes()`): their [`stable_hash`].
    pub fn of(bytes: impl AsRef<[u8]>) -> Self {
        AffinityKey(stable_hash(bytes.as_ref()))
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
/// covers blocks 0..=*i*, like a KV-cache block hash: block *i* hashed with
/// [`stable_hash_seeded`] seeded by block *i − 1*'s hash, the first seeded
/// by 0) and remembers, per endpoint, the blocks it recently sent there.
///
/// What to put in it: the text the model server tokenizes, in the order it
/// does — for an OpenAI chat request, the messages as the server's chat
/// template renders them, or at least their contents concatenated in
/// order (system prompt first). Requests that share a system prompt then
/// share leading blocks.
///
/// Cloning is cheap ([`Bytes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt(pub Bytes);

impl Prompt {
    /// A prompt of `text` (a `String`, `&'static str`, `Vec<u8>` or `Bytes`).
    pub fn new(text: impl Into<Bytes>) -> Self {
        Prompt(text.into())
    }

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
            chain = stable_hash_seeded(block, chain);
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
/// excluded the balancer answers
/// [`BalancerError::NoEndpoints`](crate::BalancerError::NoEndpoints).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AvoidEndpoints(Vec<EndpointIndex>);

impl AvoidEndpoints {
    /// Adds `endpoint` to the set carried by `request`.
    pub fn add<R: RequestExtensions + ?Sized>(request: &mut R, endpoint: EndpointIndex) {
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
    pub fn contains(&self, endpoint: EndpointIndex) -> bool {
        self.0.contains(&endpoint)
    }

    /// The endpoints in the set, in the order they were added.
    pub fn as_slice(&self) -> &[EndpointIndex] {
        &self.0
    }
}

/// Where the balancer dispatched a request, written by the balancer when the
/// request carries one. The hedge layer uses it to send its copy elsewhere.
#[derive(Clone, Debug, Default)]
pub(crate) struct DispatchTrace(Arc<AtomicU64>);

impl DispatchTrace {
    pub(crate) fn record(&self, endpoint: EndpointIndex) {
        self.0.store(endpoint.get() + 1, Ordering::Release);
    }

    pub(crate) fn endpoint(&self) -> Option<EndpointIndex> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            n => Some(EndpointIndex::new(n - 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        AvoidEndpoints::add(&mut ext, EndpointIndex::new(1));
        AvoidEndpoints::add(&mut ext, EndpointIndex::new(1));
        AvoidEndpoints::add(&mut ext, EndpointIndex::new(4));
        let set = AvoidEndpoints::get(&ext).unwrap();
        assert_eq!(
            set.as_slice(),
            &[EndpointIndex::new(1), EndpointIndex::new(4)]
        );
        assert!(set.contains(EndpointIndex::new(4)));
    }

    #[test]
    fn affinity_keys_and_block_hashes_are_pinned() {
        assert_eq!(AffinityKey::of("a"), AffinityKey::of(String::from("a")));
        assert_ne!(AffinityKey::of("a"), AffinityKey::of("b"));
        // XXH3-64 of "session-42": the same in every build and version.
        assert_eq!(AffinityKey::of("session-42").0, 0xa5f9_11d7_4983_374e);
        let blocks = Prompt(Bytes::from_static(b"abcdefgh")).block_hashes(4);
        assert_eq!(blocks[0], stable_hash_seeded(b"abcd", 0));
        assert_eq!(blocks[1], stable_hash_seeded(b"efgh", blocks[0]));
    }
}
