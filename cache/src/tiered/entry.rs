//! What `Tiered` stores per key, its envelope in L2, and the clock it is
//! timed by.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use keel_core::ErrorKind;
use tokio::time::Instant;

use crate::error::kind_named;

/// Milliseconds since the Unix epoch, read from Tokio's clock.
///
/// The wall clock is read once, when the cache is built; after that time
/// advances with `tokio::time::Instant`, so tests that pause Tokio's clock
/// control freshness and staleness exactly, and instances on one machine
/// agree with each other (across machines, within their NTP skew).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    base_ms: u64,
    base: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let base_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Clock {
            base_ms,
            base: Instant::now(),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        // No u128 arithmetic: this runs on every L1 hit.
        let elapsed = self.base.elapsed();
        self.base_ms + elapsed.as_secs() * 1000 + u64::from(elapsed.subsec_millis())
    }
}

/// Whole milliseconds of `d`, rounded up, saturating.
pub(crate) fn ms_ceil(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// How an entry stands at a moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Freshness {
    Fresh,
    Stale,
    Expired,
}

/// A cached loader error (negative caching): its kind (stored by its
/// [`ErrorKind::as_str`] name) and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Negative {
    pub(crate) kind: ErrorKind,
    pub(crate) message: String,
}

/// One cached value (or cached error) with its freshness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The value; empty for a negative entry.
    pub(crate) value: Bytes,
    /// Fresh until this moment (ms since the epoch, see [`Clock`]).
    pub(crate) fresh_until: u64,
    /// Servable stale until this moment; a miss after.
    pub(crate) stale_until: u64,
    /// How long the load that produced it took, for early refresh.
    pub(crate) load_ms: u32,
    pub(crate) negative: Option<Negative>,
}

/// Envelope magic ("KT") and format version.
const MAGIC: [u8; 2] = *b"KT";
const VERSION: u8 = 1;
const FLAG_NEGATIVE: u8 = 1;
/// magic + version + flags + fresh_until + stale_until + load_ms.
const HEADER: usize = 2 + 1 + 1 + 8 + 8 + 4;

impl Entry {
    pub(crate) fn value(value: Bytes, now: u64, fresh: Duration, stale: Duration) -> Self {
        let fresh_until = now.saturating_add(ms_ceil(fresh));
        Entry {
            value,
            fresh_until,
            stale_until: fresh_until.saturating_add(ms_ceil(stale)),
            load_ms: 0,
            negative: None,
        }
    }

    pub(crate) fn negative(kind: ErrorKind, message: String, now: u64, ttl: Duration) -> Self {
        let until = now.saturating_add(ms_ceil(ttl));
        Entry {
            value: Bytes::new(),
            fresh_until: until,
            stale_until: until,
            load_ms: 0,
            negative: Some(Negative { kind, message }),
        }
    }

    pub(crate) fn freshness(&self, now: u64) -> Freshness {
        if now < self.fresh_until {
            Freshness::Fresh
        } else if now < self.stale_until {
            Freshness::Stale
        } else {
            Freshness::Expired
        }
    }

    /// Time left until the entry expires entirely (at least 1 ms).
    pub(crate) fn remaining(&self, now: u64) -> Duration {
        Duration::from_millis(self.stale_until.saturating_sub(now).max(1))
    }

    /// The L2 envelope: a header with the freshness, then the value (or the
    /// negative entry's kind and message).
    pub(crate) fn encode(&self) -> Bytes {
        let body = match &self.negative {
            Some(n) => 2 + n.kind.as_str().len() + 4 + n.message.len(),
            None => self.value.len(),
        };
        let mut out = BytesMut::with_capacity(HEADER + body);
        out.put_slice(&MAGIC);
        out.put_u8(VERSION);
        out.put_u8(if self.negative.is_some() {
            FLAG_NEGATIVE
        } else {
            0
        });
        out.put_u64(self.fresh_until);
        out.put_u64(self.stale_until);
        out.put_u32(self.load_ms);
        match &self.negative {
            Some(n) => {
                let kind = n.kind.as_str().as_bytes();
                out.put_u16(kind.len() as u16);
                out.put_slice(kind);
                let message = &n.message.as_bytes()[..n.message.len().min(u32::MAX as usize)];
                out.put_u32(message.len() as u32);
                out.put_slice(message);
            }
            None => out.put_slice(&self.value),
        }
        out.freeze()
    }

    /// Reads an envelope; `None` for bytes that are not one (foreign,
    /// truncated, another version).
    pub(crate) fn decode(bytes: Bytes) -> Option<Entry> {
        if bytes.len() < HEADER || bytes[..2] != MAGIC || bytes[2] != VERSION {
            return None;
        }
        let flags = bytes[3];
        if flags & !FLAG_NEGATIVE != 0 {
            return None;
        }
        let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let fresh_until = u64_at(4);
        let stale_until = u64_at(12);
        let load_ms = u32::from_be_bytes(bytes[20..24].try_into().expect("4 bytes"));
        if stale_until < fresh_until {
            return None;
        }
        let negative = if flags & FLAG_NEGATIVE != 0 {
            let rest = &bytes[HEADER..];
            let kind_len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
            let kind = std::str::from_utf8(rest.get(2..2 + kind_len)?).ok()?;
            let rest = &rest[2 + kind_len..];
            let message_len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            let message = std::str::from_utf8(rest.get(4..4 + message_len)?).ok()?;
            if rest.len() != 4 + message_len {
                return None;
            }
            Some(Negative {
                // A kind this version does not know reads as foreign bytes.
                kind: kind_named(kind)?,
                message: message.to_owned(),
            })
        } else {
            None
        };
        let value = if negative.is_some() {
            Bytes::new()
        } else {
            bytes.slice(HEADER..)
        };
        Some(Entry {
            value,
            fresh_until,
            stale_until,
            load_ms,
            negative,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn freshness_windows() {
        let e = Entry::value(
            "v".into(),
            1_000,
            Duration::from_millis(100),
            Duration::from_millis(50),
        );
        assert_eq!(e.freshness(1_000), Freshness::Fresh);
        assert_eq!(e.freshness(1_099), Freshness::Fresh);
        assert_eq!(e.freshness(1_100), Freshness::Stale);
        assert_eq!(e.freshness(1_149), Freshness::Stale);
        assert_eq!(e.freshness(1_150), Freshness::Expired);
        assert_eq!(e.remaining(1_140), Duration::from_millis(10));
        assert_eq!(e.remaining(5_000), Duration::from_millis(1));
    }

    #[test]
    fn foreign_bytes_are_not_entries() {
        assert_eq!(Entry::decode(Bytes::from_static(b"")), None);
        assert_eq!(Entry::decode(Bytes::from_static(b"hello world")), None);
        let good = Entry::value("v".into(), 1, Duration::from_secs(1), Duration::ZERO).encode();
        assert!(Entry::decode(good.clone()).is_some());
        assert_eq!(Entry::decode(good.slice(..HEADER - 1)), None);
        let mut wrong_version = good.to_vec();
        wrong_version[2] = 2;
        assert_eq!(Entry::decode(wrong_version.into()), None);
        let negative = Entry::negative(
            ErrorKind::NotFound,
            "gone".into(),
            1,
            Duration::from_secs(1),
        );
        let encoded = negative.encode();
        assert_eq!(Entry::decode(encoded.clone()), Some(negative));
        assert_eq!(Entry::decode(encoded.slice(..encoded.len() - 1)), None);
        // The kind is stored by name: the envelope format is unchanged.
        assert!(encoded.windows(9).any(|w| w == b"not_found"));
        let unknown = Entry::decode(encoded.clone()).map(|e| e.encode());
        assert_eq!(unknown, Some(encoded.clone()));
        let renamed = encoded.to_vec();
        let at = renamed.windows(9).position(|w| w == b"not_found").unwrap();
        let mut renamed = renamed;
        renamed[at] = b'N';
        assert_eq!(
            Entry::decode(renamed.into()),
            None,
            "unknown kinds are foreign"
        );
    }

    proptest! {
        #[test]
        fn envelopes_round_trip(
            value in proptest::collection::vec(any::<u8>(), 0..256),
            now in 0u64..1 << 50,
            fresh in 1u64..1 << 30,
            stale in 0u64..1 << 30,
            load_ms in any::<u32>(),
            negative in proptest::option::of((0usize..crate::error::KINDS.len(), "\\PC{0,40}")),
        ) {
            let mut entry = match negative {
                Some((kind, message)) => Entry::negative(crate::error::KINDS[kind], message, now, Duration::from_millis(fresh)),
                None => Entry::value(value.into(), now, Duration::from_millis(fresh), Duration::from_millis(stale)),
            };
            entry.load_ms = load_ms;
            prop_assert_eq!(Entry::decode(entry.encode()), Some(entry));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Entry::decode(bytes.into());
        }
    }
}
