//! # keel-scheduler (not yet built)
//!
//! What runs next and when: the worker runtime that consumes `keel-queue`
//! queues, and an admission scheduler with priorities, per-tenant fairness,
//! deadlines, rate and concurrency limits, load shedding and micro-batching.
//!
//! **Status:** this crate has no public API yet; its work is tracked in the
//! issue "keel-scheduler: the worker runtime, priorities, tenant fairness…".
//! Nothing here should be depended on until it lands.
