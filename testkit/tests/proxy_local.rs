//! The fault proxy against a local echo server: no external servers needed.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_testkit::{Direction, FaultProxy, Latency};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

/// Bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(5);

/// An echo server that counts accepted connections and reports each
/// connection's end.
struct Echo {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: mpsc::UnboundedReceiver<()>,
}

async fn echo_server() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let (closed_tx, closed) = mpsc::unbounded_channel();
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let mut buf = [0_u8; 4096];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = closed_tx.send(());
            });
        }
    });
    Echo {
        addr,
        accepted,
        closed,
    }
}

async fn connect(proxy: &FaultProxy) -> TcpStream {
    let stream = timeout(WAIT, TcpStream::connect(proxy.addr()))
        .await
        .expect("connect to proxy timed out")
        .expect("connect to proxy");
    stream.set_nodelay(true).unwrap();
    stream
}

/// Writes `msg` and reads the same number of bytes back.
async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
    stream.write_all(msg).await?;
    let mut back = vec![0_u8; msg.len()];
    stream.read_exact(&mut back).await?;
    Ok(back)
}

/// Asserts the connection ends (EOF or error) within [`WAIT`].
async fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0_u8; 64];
    match timeout(WAIT, stream.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => {}
        Ok(Ok(n)) => panic!("expected the connection to end, read {n} bytes"),
        Err(_) => panic!("connection still open after {WAIT:?}"),
    }
}

/// Asserts nothing arrives on `stream` for `quiet`.
async fn assert_silent(stream: &mut TcpStream, quiet: Duration) {
    let mut buf = [0_u8; 64];
    if let Ok(result) = timeout(quiet, stream.read(&mut buf)).await {
        panic!("expected silence, got {result:?}");
    }
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn passes_bytes_through_and_counts_connections() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    assert_eq!(proxy.upstream(), echo.addr);
    assert_eq!(proxy.addr().ip().to_string(), "127.0.0.1");

    let mut a = connect(&proxy).await;
    assert_eq!(round_trip(&mut a, b"hello").await.unwrap(), b"hello");
    let mut b = connect(&proxy).await;
    assert_eq!(round_trip(&mut b, b"world").await.unwrap(), b"world");
    assert_eq!(proxy.connections_accepted(), 2);
    assert_eq!(proxy.open_connections(), 2);

    drop(a);
    eventually("one connection is left", || proxy.open_connections() == 1).await;
    drop(b);
    eventually("no connection is left", || proxy.open_connections() == 0).await;
}

#[tokio::test]
async fn half_close_passes_through() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut stream = connect(&proxy).await;
    stream.write_all(b"last words").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut back))
        .await
        .expect("echo did not finish")
        .unwrap();
    assert_eq!(back, b"last words");
}

#[tokio::test]
async fn latency_delays_chunks_in_order_without_serialising_them() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut stream = connect(&proxy).await;
    // Set while the connection is open: applies from the next chunk on.
    let base = Duration::from_millis(100);
    proxy.set_latency(
        Direction::Upstream,
        Latency::jittered(base, Duration::from_millis(50)),
    );

    const CHUNKS: usize = 30;
    let (mut reader, mut writer) = stream.split();
    let started = Instant::now();
    let write_all = async {
        for i in 0..CHUNKS {
            writer.write_all(&[i as u8; 4]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let read_all = async {
        let mut back = vec![0_u8; CHUNKS * 4];
        let mut first_byte_at = None;
        let mut filled = 0;
        while filled < back.len() {
            let n = reader.read(&mut back[filled..]).await.unwrap();
            assert!(n > 0, "unexpected EOF");
            first_byte_at.get_or_insert_with(|| started.elapsed());
            filled += n;
        }
        (back, first_byte_at.unwrap())
    };
    let ((), (back, first_byte_at)) = timeout(WAIT, async { tokio::join!(write_all, read_all) })
        .await
        .expect("echo through a slow proxy timed out");
    let elapsed = started.elapsed();

    let expected: Vec<u8> = (0..CHUNKS).flat_map(|i| [i as u8; 4]).collect();
    assert_eq!(back, expected, "chunks were reordered or corrupted");
    assert!(first_byte_at >= base, "first byte after {first_byte_at:?}");
    // Serialised, 30 chunks at >= 100 ms each would need >= 3 s; pipelined
    // they need about 0.3 s of writing plus one latency.
    assert!(
        elapsed < Duration::from_millis(2500),
        "latency serialised the chunks: {elapsed:?}"
    );

    // Cleared latency takes effect on the open connection.
    proxy.clear_latency();
    let (mut reader, mut writer) = stream.split();
    writer.write_all(b"fast").await.unwrap();
    let mut back = [0_u8; 4];
    timeout(WAIT, reader.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"fast");
}

#[tokio::test]
async fn cut_closes_both_sides_and_new_connections_still_work() {
    let mut echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut a = connect(&proxy).await;
    let mut b = connect(&proxy).await;
    round_trip(&mut a, b"a").await.unwrap();
    round_trip(&mut b, b"b").await.unwrap();

    proxy.cut();
    assert_closed(&mut a).await;
    assert_closed(&mut b).await;
    for _ in 0..2 {
        timeout(WAIT, echo.closed.recv())
            .await
            .expect("the server side was not closed")
            .unwrap();
    }
    eventually("cut connections are gone", || proxy.open_connections() == 0).await;

    let mut c = connect(&proxy).await;
    assert_eq!(round_trip(&mut c, b"again").await.unwrap(), b"again");
    assert_eq!(proxy.connections_accepted(), 3);
}

#[tokio::test]
async fn refuse_closes_new_connections_only() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut open = connect(&proxy).await;
    round_trip(&mut open, b"before").await.unwrap();

    proxy.refuse();
    let mut refused = connect(&proxy).await;
    assert_closed(&mut refused).await;
    assert_eq!(
        echo.accepted.load(Ordering::SeqCst),
        1,
        "refused connection reached the server"
    );
    assert_eq!(round_trip(&mut open, b"during").await.unwrap(), b"during");

    proxy.restore();
    let mut fresh = connect(&proxy).await;
    assert_eq!(round_trip(&mut fresh, b"after").await.unwrap(), b"after");
    assert_eq!(proxy.connections_accepted(), 3);
}

#[tokio::test]
async fn blackhole_answers_nothing_until_restored() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut open = connect(&proxy).await;
    round_trip(&mut open, b"before").await.unwrap();

    proxy.blackhole();
    open.write_all(b"lost").await.unwrap();
    assert_silent(&mut open, Duration::from_millis(300)).await;

    let mut swallowed = connect(&proxy).await;
    swallowed.write_all(b"anyone?").await.unwrap();
    assert_silent(&mut swallowed, Duration::from_millis(300)).await;
    assert_eq!(
        echo.accepted.load(Ordering::SeqCst),
        1,
        "blackholed connection reached the server"
    );
    assert_eq!(proxy.open_connections(), 2);

    proxy.restore();
    let mut fresh = connect(&proxy).await;
    assert_eq!(round_trip(&mut fresh, b"after").await.unwrap(), b"after");

    // A cut also closes blackholed connections.
    proxy.cut();
    assert_closed(&mut swallowed).await;
    assert_closed(&mut open).await;
}

#[tokio::test]
async fn upstream_down_resets_the_client() {
    // Bind then drop a listener to get a port nothing listens on.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let proxy = FaultProxy::start(dead_addr).await.unwrap();
    let mut stream = connect(&proxy).await;
    assert_closed(&mut stream).await;
}

#[tokio::test]
async fn dropping_the_proxy_closes_everything() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let addr = proxy.addr();
    let mut open = connect(&proxy).await;
    round_trip(&mut open, b"x").await.unwrap();

    drop(proxy);
    assert_closed(&mut open).await;
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "proxy still accepting after drop"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn url_for_points_at_the_proxy() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let port = proxy.port();
    assert_eq!(
        proxy.url_for("redis://127.0.0.1:6379/"),
        format!("redis://127.0.0.1:{port}/")
    );
    assert_eq!(
        proxy.url_for("amqp://guest:guest@127.0.0.1:5672/%2f"),
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
    );
    let by_url = FaultProxy::start_for_url(&format!("redis://{}/0", echo.addr))
        .await
        .unwrap();
    assert_eq!(by_url.upstream(), echo.addr);
    assert!(FaultProxy::start_for_url("http:///").await.is_err());
}

#[test]
fn public_types_and_futures_are_send_and_sync() {
    fn send<T: Send>(_: &T) {}
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<FaultProxy>();
    is_send_sync::<keel_testkit::Namespace>();
    is_send_sync::<Latency>();
    is_send_sync::<Direction>();
    send(&FaultProxy::start("127.0.0.1:1"));
    send(&FaultProxy::start_for_url("redis://127.0.0.1:1"));
}

#[cfg(all(feature = "redis", feature = "amqp"))]
#[test]
fn server_helpers_are_send_and_sync() {
    fn send<T: Send>(_: &T) {}
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<keel_testkit::RedisServer>();
    send(&keel_testkit::RedisServer::start());
    send(&keel_testkit::require_redis());
    send(&keel_testkit::require_amqp());
}
