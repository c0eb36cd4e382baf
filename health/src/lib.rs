//! # keel-health (not yet built)
//!
//! Endpoint health for inference fleets: active probes, passive outlier
//! detection, a circuit-breaker layer and slow start, published as
//! `tower::discover::Discover` changes for the balancer.
//!
//! **Status:** this crate has no public API yet; its work is tracked in the
//! issue "keel-health: active probes, outlier ejection, circuit breaking and
//! slow start". Nothing here should be depended on until it lands.
