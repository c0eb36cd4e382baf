//! Serving a node (the fake node, the embedding node) on a listener of its
//! own, in a background task.

use axum::Router;

/// Serves `app` on `listener` (TCP no-delay on every connection) until the
/// returned task is aborted; a server error is logged as `what` stopping.
pub(crate) fn spawn(
    listener: tokio::net::TcpListener,
    app: Router,
    what: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        if let Err(err) = axum::serve(listener, app).await {
            tracing::warn!(%err, "{what} stopped");
        }
    })
}
