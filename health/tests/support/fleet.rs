//! A fleet of endpoints for tests.

use keel_health::{Endpoint, Health};

/// Inserts `n` endpoints, `n0` at `10.0.0.0:80` to `n{n-1}`.
pub(crate) fn insert_fleet(health: &Health, n: usize) {
    for i in 0..n {
        health
            .insert(Endpoint::new(format!("n{i}"), format!("10.0.0.{i}:80")))
            .unwrap();
    }
}
