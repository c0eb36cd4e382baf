//! The fault proxy in front of the shared Redis.
#![cfg(feature = "redis")]

use std::time::Duration;

use keel_testkit::{Direction, FaultProxy, Latency, Namespace, require_redis};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisResult};
use tokio::time::{Instant, timeout};

/// Bound on every wait that should end well before it.
const WAIT: Duration = Duration::from_secs(5);

/// Client timeouts far above anything a test waits for, so the test's own
/// `timeout` decides what counts as hanging.
fn patient() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(WAIT))
        .set_response_timeout(Some(WAIT))
}

async fn connect(url: &str) -> RedisResult<MultiplexedConnection> {
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&patient())
        .await
}

async fn ping(con: &mut MultiplexedConnection) -> RedisResult<String> {
    redis::cmd("PING").query_async(con).await
}

/// A new connection through `url` answers PING.
async fn assert_new_connection_works(url: &str) {
    let pong = timeout(WAIT, async { ping(&mut connect(url).await?).await })
        .await
        .expect("a new connection timed out")
        .expect("a new connection failed");
    assert_eq!(pong, "PONG");
}

async fn setup(test: &str) -> (String, Namespace, FaultProxy) {
    let url = require_redis().await;
    let ns = Namespace::new(test).with_redis_cleanup(url.clone());
    let proxy = FaultProxy::start_for_url(&url).await.unwrap();
    (url, ns, proxy)
}

#[tokio::test]
async fn latency_delays_ping_both_ways() {
    let (url, _ns, proxy) = setup("latency_delays_ping_both_ways").await;
    let mut con = connect(&proxy.url_for(&url)).await.unwrap();
    assert_eq!(ping(&mut con).await.unwrap(), "PONG");

    proxy.set_latency(Direction::Both, Latency::fixed(Duration::from_millis(150)));
    let started = Instant::now();
    assert_eq!(
        timeout(WAIT, ping(&mut con)).await.unwrap().unwrap(),
        "PONG"
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300),
        "PING took {elapsed:?}"
    );

    proxy.set_latency(
        Direction::Downstream,
        Latency::fixed(Duration::from_millis(100)),
    );
    proxy.clear_latency();
    assert_eq!(
        timeout(WAIT, ping(&mut con)).await.unwrap().unwrap(),
        "PONG"
    );
}

#[tokio::test]
async fn cut_breaks_the_open_connection_and_restore_allows_a_new_one() {
    let (url, ns, proxy) = setup("cut_breaks_the_open_connection").await;
    let proxied = proxy.url_for(&url);
    let key = format!("{{{}}}:value", ns.prefix());
    let mut con = connect(&proxied).await.unwrap();
    redis::cmd("SET")
        .arg(&key)
        .arg("kept")
        .query_async::<()>(&mut con)
        .await
        .unwrap();

    proxy.cut();
    let after_cut = timeout(WAIT, ping(&mut con))
        .await
        .expect("a command on a cut connection hung instead of failing");
    let error = after_cut.expect_err("a command on a cut connection succeeded");
    assert!(
        error.is_connection_dropped() || error.is_io_error() || error.is_unrecoverable_error(),
        "unexpected error kind: {error:?}"
    );

    proxy.restore();
    let mut fresh = connect(&proxied).await.unwrap();
    let value: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut fresh)
        .await
        .unwrap();
    assert_eq!(value, "kept");
    assert_eq!(proxy.connections_accepted(), 2);
}

#[tokio::test]
async fn refuse_fails_new_connections_and_spares_open_ones() {
    let (url, _ns, proxy) = setup("refuse_fails_new_connections").await;
    let proxied = proxy.url_for(&url);
    let mut open = connect(&proxied).await.unwrap();

    proxy.refuse();
    let refused = timeout(WAIT, async { ping(&mut connect(&proxied).await?).await })
        .await
        .expect("a refused connection hung instead of failing");
    assert!(
        refused.is_err(),
        "a refused connection answered: {refused:?}"
    );
    assert_eq!(
        timeout(WAIT, ping(&mut open)).await.unwrap().unwrap(),
        "PONG"
    );

    proxy.restore();
    assert_new_connection_works(&proxied).await;
}

#[tokio::test]
async fn blackhole_makes_ping_time_out_until_restored() {
    let (url, _ns, proxy) = setup("blackhole_makes_ping_time_out").await;
    let proxied = proxy.url_for(&url);
    let mut open = connect(&proxied).await.unwrap();
    assert_eq!(ping(&mut open).await.unwrap(), "PONG");

    proxy.blackhole();
    let stalled = timeout(Duration::from_millis(500), ping(&mut open)).await;
    assert!(
        stalled.is_err(),
        "PING through a black hole returned {stalled:?}"
    );
    let fresh = timeout(Duration::from_millis(500), async {
        ping(&mut connect(&proxied).await?).await
    })
    .await;
    assert!(
        !matches!(fresh, Ok(Ok(_))),
        "a new connection through a black hole answered"
    );

    proxy.restore();
    assert_new_connection_works(&proxied).await;
}
