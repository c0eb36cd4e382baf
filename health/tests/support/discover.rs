//! Reading health's discovery stream in tests.

use std::convert::Infallible;
use std::time::Duration;

use keel_health::EndpointId;
use tokio_stream::{Stream, StreamExt};
use tower::discover::Change;

/// The stream's next change; panics when none comes within ten (paused)
/// minutes or the stream ends.
pub(crate) async fn next_change<S>(
    discover: &mut (impl Stream<Item = Result<Change<EndpointId, S>, Infallible>> + Unpin),
) -> Change<EndpointId, S> {
    tokio::time::timeout(Duration::from_secs(600), discover.next())
        .await
        .expect("a change in time")
        .expect("stream open")
        .unwrap()
}
