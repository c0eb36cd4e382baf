//! A spawned `redis-server`: start, kill, restart, drop.
#![cfg(feature = "redis")]

use std::net::SocketAddr;
use std::time::Duration;

use keel_testkit::{Namespace, RedisServer};
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use tokio::time::timeout;

/// Bound on every wait that should end well before it.
const WAIT: Duration = Duration::from_secs(5);

async fn connect(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)));
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Nothing accepts TCP connections on `addr` (checked with a bounded wait).
async fn assert_refused(addr: SocketAddr) {
    match timeout(WAIT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Err(error)) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused),
        Ok(Ok(_)) => panic!("{addr} still accepts connections"),
        Err(_) => panic!("connecting to {addr} hung"),
    }
}

#[tokio::test]
async fn start_kill_restart_and_drop() {
    let mut server = RedisServer::start().await.unwrap();
    let url = server.url();
    let port = server.port();
    let addr = server.addr();
    assert_eq!(url, format!("redis://127.0.0.1:{port}/"));
    assert_eq!(addr.port(), port);
    assert!(server.is_running());

    let ns = Namespace::new("redis_server_start_kill_restart");
    let key = ns.name("k");
    let mut con = connect(&url).await.unwrap();
    redis::cmd("SET")
        .arg(&key)
        .arg("v")
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    let value: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(value, "v");

    server.kill();
    assert!(!server.is_running());
    assert_refused(addr).await;
    let after_kill = timeout(WAIT, async {
        redis::cmd("PING").query_async::<String>(&mut con).await
    })
    .await
    .expect("a command on a killed server hung");
    assert!(after_kill.is_err(), "a killed server answered");
    let reconnect = timeout(WAIT, connect(&url))
        .await
        .expect("connecting to a killed server hung");
    assert!(reconnect.is_err(), "connected to a killed server");

    server.restart().await.unwrap();
    assert_eq!(server.port(), port);
    let mut con = connect(&url).await.unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    let gone: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(gone, None, "persistence is off, so a restart starts empty");

    // Restarting a running server replaces it.
    server.restart().await.unwrap();
    assert!(connect(&url).await.is_ok());

    drop(server);
    assert_refused(addr).await;
}

#[tokio::test]
async fn two_servers_get_different_ports() {
    let a = RedisServer::start().await.unwrap();
    let b = RedisServer::start().await.unwrap();
    assert_ne!(a.port(), b.port());
    assert!(connect(&a.url()).await.is_ok());
    assert!(connect(&b.url()).await.is_ok());
    assert!(format!("{a:?}").contains(&a.port().to_string()));
}

#[tokio::test]
async fn restart_with_persistence_keeps_acknowledged_writes() {
    let args = ["--appendonly", "yes", "--appendfsync", "always"];
    let mut server = RedisServer::start_with_args(args).await.unwrap();
    assert_eq!(server.extra_args(), args);
    let (url, port, dir) = (server.url(), server.port(), server.dir().to_owned());

    let ns = Namespace::new("redis_server_persistence");
    let key = ns.name("k");
    let mut con = connect(&url).await.unwrap();
    for i in 0..100 {
        redis::cmd("RPUSH")
            .arg(&key)
            .arg(i)
            .query_async::<()>(&mut con)
            .await
            .unwrap();
    }

    // SIGKILL: no shutdown hook gets to flush anything.
    server.kill();
    assert!(!server.is_running());
    server.restart().await.unwrap();
    assert_eq!(server.port(), port);
    assert_eq!(server.dir(), dir, "a restart reuses the directory");
    assert_eq!(server.extra_args(), args, "a restart reuses the arguments");

    let mut con = connect(&url).await.unwrap();
    let kept: Vec<u32> = redis::cmd("LRANGE")
        .arg(&key)
        .arg(0)
        .arg(-1)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(
        kept,
        (0..100).collect::<Vec<u32>>(),
        "every acknowledged write survives"
    );
    let appendonly: (String, String) = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(
        appendonly.1, "yes",
        "the restarted server has the same arguments"
    );
    assert!(format!("{server:?}").contains("appendfsync"));
}

#[tokio::test]
async fn bad_extra_args_fail_with_the_log() {
    let error = RedisServer::start_with_args(["--no-such-option", "1"])
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("no-such-option"), "{message}");
}
