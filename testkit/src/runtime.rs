//! Tokio runtimes for tests (paused time) and benches (one per thread count).

/// A current-thread Tokio runtime whose clock starts paused, so sleeps and
/// timeouts auto-advance and a run is deterministic. For tests that cannot
/// be `#[tokio::test(start_paused = true)]`: a `proptest!` case, or a test
/// that runs on a thread of its own.
///
/// ```
/// use std::time::Duration;
///
/// let slept = keel_testkit::paused_runtime().block_on(async {
///     let start = tokio::time::Instant::now();
///     tokio::time::sleep(Duration::from_secs(3600)).await;
///     start.elapsed()
/// });
/// assert_eq!(slept, Duration::from_secs(3600));
/// ```
///
/// # Panics
///
/// If the runtime cannot be built.
#[must_use]
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime with paused time builds")
}

/// The multi-thread runtime a bench measures one thread count on:
/// `threads` worker threads (at least one), or Tokio's default (one per
/// core) for `None`. Every `--threads` bench of the workspace builds its
/// runtimes here.
///
/// ```
/// let runtime = keel_testkit::bench_runtime(Some(2));
/// assert_eq!(runtime.metrics().num_workers(), 2);
/// ```
///
/// # Panics
///
/// If the runtime cannot be built.
#[must_use]
pub fn bench_runtime(threads: Option<usize>) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads.max(1));
    }
    builder
        .enable_all()
        .build()
        .expect("a multi-thread runtime builds")
}

/// A bench's `--threads` list as it prints it: `1,2,4`.
///
/// ```
/// assert_eq!(keel_testkit::thread_list([1, 2, 4]), "1,2,4");
/// ```
pub fn thread_list<T: std::fmt::Display>(counts: impl IntoIterator<Item = T>) -> String {
    counts
        .into_iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",")
}
