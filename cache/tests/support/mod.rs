//! What the cache tests share: a `metrics` recorder that keeps counters,
//! so tests can check what was counted, and waiting for what another
//! instance sees.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use parking_lot::Mutex;

/// Counters by `name{label=value,...}` (labels in the order registered).
#[derive(Debug, Default)]
pub(crate) struct Counting {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl Counting {
    /// The value of the counter `name` with exactly these labels, 0 if it
    /// was never registered.
    pub(crate) fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.counters
            .lock()
            .get(&id(name, labels.iter().map(|(k, v)| (*k, *v))))
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }

    /// Runs `f` (which builds the caches under test) with this recorder,
    /// so the handles they register count here.
    pub(crate) fn install<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(self, f)
    }
}

fn id<'a>(name: &str, labels: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let labels: Vec<String> = labels.map(|(k, v)| format!("{k}={v}")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

impl Recorder for Counting {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let id = id(key.name(), key.labels().map(|l| (l.key(), l.value())));
        let counter = self.counters.lock().entry(id).or_default().clone();
        Counter::from_arc(counter)
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Polls `check` every 20 ms until it holds; panics naming `what` after
/// 10 s.
pub(crate) async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{what} did not happen within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// An update of `key` through `a` reaches `b` (which holds the old value in
/// its L1), and so does an invalidation of it.
#[cfg(feature = "moka")]
pub(crate) async fn update_and_invalidation_reach(
    a: &keel_cache::Tiered,
    b: &keel_cache::Tiered,
    key: &str,
) {
    use keel_cache::Cache;
    a.set(key, "v2".into(), std::time::Duration::from_secs(30))
        .await
        .unwrap();
    eventually("b sees v2", async || {
        b.get(key).await.unwrap().as_deref() == Some(&b"v2"[..])
    })
    .await;
    a.invalidate(key).await.unwrap();
    eventually("b misses after invalidate", async || {
        b.get(key).await.unwrap().is_none()
    })
    .await;
}
