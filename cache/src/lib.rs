//! # keel-cache (not yet built)
//!
//! The cache tier of Keel: a `Cache` trait with moka (L1) and Redis (L2)
//! backends, a tiered cache with request coalescing, stale-while-revalidate,
//! negative caching and cross-instance invalidation, that never turns a cache
//! outage into a failed request.
//!
//! **Status:** this crate has no public API yet. Its design is in the
//! workspace's `DESIGN.md` and its work is tracked in the issue
//! "keel-cache: moka L1, Redis L2, a tiered cache…". Nothing here should be
//! depended on until it lands.
