//! A `metrics` recorder that keeps counters, so tests can check what was
//! counted.

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
