//! Runnable Keel integrations. The binaries are the point; see
//! `src/bin/demo.rs` for the README's main command.
