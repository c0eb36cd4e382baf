//! A runtime for synchronous tests that drive Tokio's clock.

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
