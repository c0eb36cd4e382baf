//! keel-gateway: an OpenAI-compatible inference gateway built from the
//! Keel crates, and [`fake_node`], the OpenAI-compatible node simulator its
//! tests, the demo and the benchmarks run against (binary
//! `keel-fake-node`).

pub mod fake_node;
pub mod openai;
