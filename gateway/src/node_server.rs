//! Serving a node (the fake node, the embedding node) on a listener of its
//! own, in a background task.

use std::net::SocketAddr;

use axum::Router;

/// A node's server running in the background: its address, and the task
/// that serves it, aborted by [`crash`](Self::crash) or on drop (the
/// listener closes and every open connection is cut).
#[derive(Debug)]
pub(crate) struct NodeServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl NodeServer {
    /// Serves `app` on `listener` (TCP no-delay on every connection); a
    /// server error is logged as `what` stopping.
    pub(crate) fn start(
        listener: tokio::net::TcpListener,
        app: Router,
        what: &'static str,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        Ok(NodeServer {
            addr,
            task: spawn(listener, app, what),
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving at once, as if the process had died.
    pub(crate) fn crash(&self) {
        self.task.abort();
    }
}

impl Drop for NodeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn spawn(
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
