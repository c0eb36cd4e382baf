//! A TCP proxy that injects network faults between a client and a real server.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Size of the buffer each direction of a connection reads into.
const CHUNK: usize = 16 * 1024;

/// How many chunks may wait in one direction of a connection for their
/// latency to elapse before the reader stops reading (backpressure).
const IN_FLIGHT_CHUNKS: usize = 64;

/// Which way through the proxy a setting applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Bytes the client sends towards the server.
    Upstream,
    /// Bytes the server sends back towards the client.
    Downstream,
    /// Both directions.
    Both,
}

/// A delay added to every chunk of bytes forwarded in one direction.
///
/// The delay is drawn once per chunk: `base` plus a uniformly distributed
/// extra in `0..=jitter`. So `base` is a lower bound tests can rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Latency {
    base: Duration,
    jitter: Duration,
}

impl Latency {
    /// Every chunk is delayed by exactly `delay`.
    #[must_use]
    pub const fn fixed(delay: Duration) -> Self {
        Self {
            base: delay,
            jitter: Duration::ZERO,
        }
    }

    /// Every chunk is delayed by `base` plus a random extra in `0..=jitter`.
    ///
    /// Chunks still leave in the order they arrived: a chunk whose draw is
    /// shorter than its predecessor's waits for the predecessor.
    #[must_use]
    pub const fn jittered(base: Duration, jitter: Duration) -> Self {
        Self { base, jitter }
    }

    /// The smallest delay this latency adds.
    #[must_use]
    pub const fn base(&self) -> Duration {
        self.base
    }

    /// The largest random extra added on top of [`base`](Self::base).
    #[must_use]
    pub const fn jitter(&self) -> Duration {
        self.jitter
    }

    fn sample(&self) -> Duration {
        if self.jitter.is_zero() {
            return self.base;
        }
        let max = u64::try_from(self.jitter.as_nanos()).unwrap_or(u64::MAX);
        self.base + Duration::from_nanos(rand::random_range(0..=max))
    }
}

/// What the proxy does with new connections and with bytes on open ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    PassThrough,
    Refuse,
    Blackhole,
}

#[derive(Debug)]
struct State {
    mode: Mode,
    upstream_latency: Option<Latency>,
    downstream_latency: Option<Latency>,
    /// Cancelled by [`FaultProxy::cut`] and replaced by a fresh child of the
    /// proxy's shutdown token; every connection holds the generation that
    /// was current when it was accepted.
    generation: CancellationToken,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    state: Mutex<State>,
    accepted: AtomicU64,
    open: AtomicUsize,
}

/// What happens to a chunk just read from one side of a connection.
enum ChunkPolicy {
    /// Blackholed: the chunk is dropped.
    Drop,
    /// Forwarded, after the latency if there is one.
    Forward(Option<Latency>),
}

impl Shared {
    fn chunk_policy(&self, direction: Direction) -> ChunkPolicy {
        let state = self.state.lock();
        if state.mode == Mode::Blackhole {
            return ChunkPolicy::Drop;
        }
        ChunkPolicy::Forward(match direction {
            Direction::Upstream => state.upstream_latency,
            Direction::Downstream | Direction::Both => state.downstream_latency,
        })
    }
}

/// Decrements the open-connection counter when a connection task ends,
/// however it ends.
struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.open.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(shared))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A TCP proxy on `127.0.0.1` in front of a real server, whose behaviour a
/// test switches while traffic flows.
///
/// By default it passes bytes through unchanged. The fault switches are:
///
/// | call | new connections | open connections |
/// | --- | --- | --- |
/// | [`set_latency`](Self::set_latency) | delayed per chunk | delayed per chunk, from the next chunk on |
/// | [`cut`](Self::cut) | accepted as usual | reset now (both sides see a reset or EOF) |
/// | [`refuse`](Self::refuse) | accepted, then reset at once | unaffected |
/// | [`blackhole`](Self::blackhole) | accepted, never connected upstream, never answered | bytes silently dropped both ways |
/// | [`restore`](Self::restore) | passed through, no latency | passed through again, no latency |
///
/// [`restore`](Self::restore) does not revive connections that were cut, and
/// a connection accepted while blackholed stays a black hole until it is
/// closed; bytes dropped from an open connection while blackholed are gone,
/// so a client should reconnect after a blackhole.
///
/// Dropping the proxy stops the listener and resets every connection it
/// holds. The proxy's tasks run on the Tokio runtime that called
/// [`start`](Self::start).
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use keel_testkit::{Direction, FaultProxy, Latency};
///
/// # async fn demo() -> std::io::Result<()> {
/// let proxy = FaultProxy::start("127.0.0.1:6379").await?;
/// let url = proxy.url_for("redis://127.0.0.1:6379/");
/// // ... connect a client to `url` ...
/// proxy.set_latency(Direction::Both, Latency::fixed(Duration::from_millis(50)));
/// proxy.cut(); // every open connection is reset
/// proxy.restore();
/// # Ok(()) }
/// ```
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.state.lock();
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("mode", &state.mode)
            .field("upstream_latency", &state.upstream_latency)
            .field("downstream_latency", &state.downstream_latency)
            .field("accepted", &self.connections_accepted())
            .field("open", &self.open_connections())
            .finish()
    }
}

impl FaultProxy {
    /// Starts a proxy on an ephemeral port of `127.0.0.1` that forwards to
    /// `upstream` (a `SocketAddr` or a `"host:port"` string).
    ///
    /// The upstream address is resolved once, now; each accepted connection
    /// then connects to it. The upstream need not be up yet: a connection
    /// whose upstream connect fails is reset.
    ///
    /// # Errors
    ///
    /// Fails if `upstream` does not resolve to any address or the listener
    /// cannot be bound.
    pub async fn start(upstream: impl ToSocketAddrs) -> io::Result<FaultProxy> {
        let upstream = tokio::net::lookup_host(upstream)
            .await?
            .next()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "upstream address resolved to nothing",
                )
            })?;
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State {
                mode: Mode::PassThrough,
                upstream_latency: None,
                downstream_latency: None,
                generation: shutdown.child_token(),
            }),
            accepted: AtomicU64::new(0),
            open: AtomicUsize::new(0),
        });
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), shutdown.clone()));
        tracing::debug!(%addr, %upstream, "fault proxy started");
        Ok(FaultProxy {
            addr,
            shared,
            shutdown,
        })
    }

    /// Starts a proxy in front of the server a URL points at, such as
    /// `redis://127.0.0.1:6379/` or `amqp://guest:guest@127.0.0.1:5672/%2f`.
    ///
    /// A URL without a port uses its scheme's default (`redis` 6379,
    /// `rediss` 6380, `amqp` 5672, `amqps` 5671). Pair it with
    /// [`url_for`](Self::url_for) to get the URL clients should use.
    ///
    /// # Errors
    ///
    /// Fails if the URL has no host, has no port and an unknown scheme, or
    /// for the reasons [`start`](Self::start) fails.
    pub async fn start_for_url(server_url: &str) -> io::Result<FaultProxy> {
        let upstream = upstream_of(server_url).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot find host and port in url `{server_url}`"),
            )
        })?;
        Self::start(upstream).await
    }

    /// The address clients connect to.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to (on `127.0.0.1`).
    #[must_use]
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The server address this proxy forwards to.
    #[must_use]
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Rewrites the `host:port` of `server_url` to point at this proxy,
    /// keeping scheme, credentials, path and query.
    ///
    /// `redis://127.0.0.1:6379/0` becomes `redis://127.0.0.1:<port>/0`, and
    /// `amqp://guest:guest@127.0.0.1:5672/%2f` becomes
    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`. A string without `://` is
    /// taken to be a bare `host:port` and replaced whole.
    #[must_use]
    pub fn url_for(&self, server_url: &str) -> String {
        replace_host_port(server_url, &self.addr.to_string())
    }

    /// Delays every chunk forwarded in `direction` by `latency`, starting
    /// with the next chunk read on every open and future connection.
    ///
    /// Each chunk is stamped with its due time when read and written when
    /// due, so order is kept and throughput is not serialised: many chunks
    /// can be in flight at once.
    pub fn set_latency(&self, direction: Direction, latency: Latency) {
        let mut state = self.shared.state.lock();
        if matches!(direction, Direction::Upstream | Direction::Both) {
            state.upstream_latency = Some(latency);
        }
        if matches!(direction, Direction::Downstream | Direction::Both) {
            state.downstream_latency = Some(latency);
        }
    }

    /// Removes any latency in both directions (chunks already stamped still
    /// wait out their delay).
    pub fn clear_latency(&self) {
        let mut state = self.shared.state.lock();
        state.upstream_latency = None;
        state.downstream_latency = None;
    }

    /// Resets every connection open now: both the client and the server see
    /// the connection end (a reset, or EOF). No byte read after this call is
    /// forwarded. New connections are still accepted and handled according
    /// to the current mode.
    pub fn cut(&self) {
        let old = {
            let mut state = self.shared.state.lock();
            std::mem::replace(&mut state.generation, self.shutdown.child_token())
        };
        old.cancel();
        tracing::debug!(addr = %self.addr, "fault proxy: cut");
    }

    /// From now on, new connections are accepted and reset at once, as if
    /// the server refused them. Open connections are unaffected.
    pub fn refuse(&self) {
        self.shared.state.lock().mode = Mode::Refuse;
        tracing::debug!(addr = %self.addr, "fault proxy: refuse");
    }

    /// From now on, new connections are accepted but never connected
    /// upstream and never answered, and open connections silently drop the
    /// bytes they read in both directions, so clients wait until their own
    /// timeouts fire.
    pub fn blackhole(&self) {
        self.shared.state.lock().mode = Mode::Blackhole;
        tracing::debug!(addr = %self.addr, "fault proxy: blackhole");
    }

    /// Back to passing bytes through with no latency. Connections that were
    /// cut stay closed, and connections accepted while blackholed stay
    /// unanswered; new connections work.
    pub fn restore(&self) {
        let mut state = self.shared.state.lock();
        state.mode = Mode::PassThrough;
        state.upstream_latency = None;
        state.downstream_latency = None;
        drop(state);
        tracing::debug!(addr = %self.addr, "fault proxy: restore");
    }

    /// How many TCP connections the proxy has accepted so far, including
    /// ones it refused or blackholed.
    #[must_use]
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// How many accepted connections are still open (passed through or
    /// blackholed; refused connections are never counted). A connection
    /// that was cut leaves this count shortly after [`cut`](Self::cut),
    /// once its task has run.
    #[must_use]
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let client = match accepted {
            Ok((client, _peer)) => client,
            Err(error) => {
                // Typically out of file descriptors; back off instead of
                // spinning on an error that will repeat immediately.
                tracing::warn!(%error, "fault proxy: accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let (mode, generation) = {
            let state = shared.state.lock();
            (state.mode, state.generation.clone())
        };
        match mode {
            Mode::Refuse => reset(&client),
            Mode::Blackhole => {
                tokio::spawn(blackhole_connection(
                    Arc::clone(&shared),
                    client,
                    generation,
                ));
            }
            Mode::PassThrough => {
                tokio::spawn(forward_connection(Arc::clone(&shared), client, generation));
            }
        }
    }
}

/// Makes dropping `stream` send a reset instead of a graceful close.
fn reset(stream: &TcpStream) {
    // Zero linger never blocks on close; failing to set it only downgrades
    // the reset to a graceful close.
    let _ = stream.set_zero_linger();
}

async fn blackhole_connection(shared: Arc<Shared>, mut client: TcpStream, cut: CancellationToken) {
    let _open = OpenGuard::new(&shared);
    let mut buf = vec![0_u8; CHUNK];
    let swallow = async {
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let was_cut = tokio::select! {
        biased;
        () = cut.cancelled() => true,
        () = swallow => false,
    };
    if was_cut {
        reset(&client);
    }
}

async fn forward_connection(shared: Arc<Shared>, mut client: TcpStream, cut: CancellationToken) {
    let _open = OpenGuard::new(&shared);
    let connect = tokio::select! {
        biased;
        () = cut.cancelled() => {
            reset(&client);
            return;
        }
        connect = TcpStream::connect(shared.upstream) => connect,
    };
    let mut server = match connect {
        Ok(server) => server,
        Err(error) => {
            tracing::debug!(%error, upstream = %shared.upstream, "fault proxy: upstream connect failed");
            reset(&client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);

    let completed = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let both = async {
            tokio::try_join!(
                pump(&shared, Direction::Upstream, client_read, server_write),
                pump(&shared, Direction::Downstream, server_read, client_write),
            )
        };
        tokio::select! {
            biased;
            () = cut.cancelled() => false,
            result = both => result.is_ok(),
        }
    };
    if !completed {
        // Cut, shut down, or one side failed: end both sides abruptly.
        reset(&client);
        reset(&server);
    }
}

/// Copies `from` to `to`, delaying chunks by the current latency and
/// dropping them while blackholed. A reader stamps each chunk with its due
/// time and queues it; a writer sleeps until each chunk is due. On EOF the
/// queued chunks are written and the write side is shut down, so half-closes
/// pass through.
async fn pump<R, W>(shared: &Shared, direction: Direction, mut from: R, mut to: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Option<Instant>, Vec<u8>)>(IN_FLIGHT_CHUNKS);
    let reader = async move {
        let mut buf = vec![0_u8; CHUNK];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(());
            }
            let ChunkPolicy::Forward(latency) = shared.chunk_policy(direction) else {
                continue;
            };
            let due = latency.map(|latency| Instant::now() + latency.sample());
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            if let Some(due) = due {
                tokio::time::sleep_until(due).await;
            }
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

/// Splits `url` into (start of host:port, end of host:port) byte offsets.
fn host_port_span(url: &str) -> (usize, usize) {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let host_start = authority.rfind('@').map_or(0, |i| i + 1);
    (start + host_start, start + authority_len)
}

fn replace_host_port(url: &str, host_port: &str) -> String {
    let (start, end) = host_port_span(url);
    format!("{}{}{}", &url[..start], host_port, &url[end..])
}

/// The `host:port` a URL points at, filling in the scheme's default port.
fn upstream_of(url: &str) -> Option<String> {
    let (start, end) = host_port_span(url);
    let host_port = &url[start..end];
    if host_port.is_empty() {
        return None;
    }
    // A port is present if there is a ':' after any IPv6 bracket.
    let after_bracket = host_port.rfind(']').map_or(0, |i| i + 1);
    if host_port[after_bracket..].contains(':') {
        return Some(host_port.to_owned());
    }
    let scheme = url.split_once("://")?.0.to_ascii_lowercase();
    let port = match scheme.as_str() {
        "redis" => 6379,
        "rediss" => 6380,
        "amqp" => 5672,
        "amqps" => 5671,
        _ => return None,
    };
    Some(format!("{host_port}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_redis_url() {
        assert_eq!(
            replace_host_port("redis://127.0.0.1:6379/", "127.0.0.1:4000"),
            "redis://127.0.0.1:4000/"
        );
        assert_eq!(
            replace_host_port("redis://127.0.0.1:6379", "127.0.0.1:4000"),
            "redis://127.0.0.1:4000"
        );
        assert_eq!(
            replace_host_port("redis://:secret@localhost:6379/2?protocol=resp3", "h:1"),
            "redis://:secret@h:1/2?protocol=resp3"
        );
    }

    #[test]
    fn rewrites_amqp_url() {
        assert_eq!(
            replace_host_port("amqp://guest:guest@127.0.0.1:5672/%2f", "127.0.0.1:4000"),
            "amqp://guest:guest@127.0.0.1:4000/%2f"
        );
        assert_eq!(
            replace_host_port("amqp://u:p@ss@[::1]:5672/%2f", "127.0.0.1:1"),
            "amqp://u:p@ss@127.0.0.1:1/%2f"
        );
    }

    #[test]
    fn rewrites_bare_host_port() {
        assert_eq!(replace_host_port("127.0.0.1:6379", "h:1"), "h:1");
    }

    #[test]
    fn finds_upstream_with_default_ports() {
        assert_eq!(
            upstream_of("redis://127.0.0.1:6380/").as_deref(),
            Some("127.0.0.1:6380")
        );
        assert_eq!(
            upstream_of("redis://localhost").as_deref(),
            Some("localhost:6379")
        );
        assert_eq!(
            upstream_of("amqp://guest:guest@127.0.0.1/%2f").as_deref(),
            Some("127.0.0.1:5672")
        );
        assert_eq!(
            upstream_of("amqp://[::1]/%2f").as_deref(),
            Some("[::1]:5672")
        );
        assert_eq!(upstream_of("http://example.com/"), None);
        assert_eq!(upstream_of("redis:///"), None);
    }

    #[test]
    fn latency_stays_within_bounds() {
        let fixed = Latency::fixed(Duration::from_millis(5));
        assert_eq!(fixed.sample(), Duration::from_millis(5));
        let jittered = Latency::jittered(Duration::from_millis(5), Duration::from_millis(3));
        for _ in 0..1000 {
            let d = jittered.sample();
            assert!(d >= Duration::from_millis(5) && d <= Duration::from_millis(8));
        }
    }
}
