//! # keel-balancer (not yet built)
//!
//! Node selection for inference fleets: P2C over peak-EWMA latency,
//! least-outstanding, weighted, consistent hashing with bounded load and
//! prefix affinity; retries bounded by a budget, hedging, deadlines; and a
//! deterministic fleet simulator.
//!
//! **Status:** this crate has no public API yet; its work is tracked in the
//! issue "keel-balancer: latency-, load- and cache-aware node selection".
//! Nothing here should be depended on until it lands.
