//! A specified, stable hash for affinity keys, hash rings and prefix
//! blocks: XXH3-64 (seed 0) over the bytes given, the same on every build,
//! platform and version of Keel, so two gateway versions in a rolling deploy
//! agree on which node owns a key.
//!
//! Only bytes are hashed, never a `std::hash::Hash` value (whose byte
//! stream `std` does not specify across Rust releases).

/// XXH3-64 with seed 0 of `bytes`.
///
/// ```
/// assert_eq!(keel_core::stable_hash(b""), 0x2d06_8005_38d3_94c2);
/// ```
pub fn stable_hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// XXH3-64 of `bytes` with `seed` (for chained block hashes: the seed is
/// the previous block's hash).
pub fn stable_hash_seeded(bytes: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned vectors: changing any of these breaks every deployed ring.
    #[test]
    fn pinned_vectors() {
        // The XXH3 reference implementation's values for "" and "a".
        assert_eq!(stable_hash(b""), 0x2d06_8005_38d3_94c2);
        let pinned: [(&[u8], u64, u64); 4] = [
            (b"a", 0, PIN_A),
            (b"session-42", 0, PIN_SESSION),
            (b"You are a helpful assistant.", 0, PIN_PROMPT),
            (b"block", 7, PIN_SEEDED),
        ];
        for (bytes, seed, want) in pinned {
            assert_eq!(
                stable_hash_seeded(bytes, seed),
                want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        assert_eq!(stable_hash(b"a"), stable_hash_seeded(b"a", 0));
    }

    const PIN_A: u64 = 0xe6c6_32b6_1e96_4e1f;
    const PIN_SESSION: u64 = 0xa5f9_11d7_4983_374e;
    const PIN_PROMPT: u64 = 0x3206_ec37_b491_baf1;
    const PIN_SEEDED: u64 = 0x9a22_4d01_4b8b_b391;
}
