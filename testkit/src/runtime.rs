//! A runtime for synchronous tests that drive Tokio's clock.

use std::future::Future;

/// Runs `future` to completion on a current-thread Tokio runtime whose
/// clock starts paused, so sleeps and timeouts auto-advance and the run is
/// deterministic. For tests that cannot be `#[tokio::test(start_paused =
/// true)]`: a `proptest!` case, or a test that runs its own thread.
///
/// # Panics
///
/// If the runtime cannot be built; whatever `future` panics with.
pub fn block_on_paused<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime builds")
        .block_on(future)
}
