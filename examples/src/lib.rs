//! Runnable Keel integrations. The binaries are the point; `demo` is the
//! README's main command. The modules here are the demo's parts: simulated
//! inference nodes, the offered traffic, the naive pipeline it is compared
//! against, and the report.

pub mod demo;
pub mod fleet;
pub mod keel;
pub mod naive;
pub mod report;
pub mod traffic;
