//! Namespaces and their Redis clean-up, against the shared Redis.
#![cfg(feature = "redis")]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use keel_testkit::{Namespace, redis_cleanup, require_redis};
use redis::aio::MultiplexedConnection;

async fn connect(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn set(con: &mut MultiplexedConnection, key: &str) {
    redis::cmd("SET")
        .arg(key)
        .arg("1")
        .query_async::<()>(con)
        .await
        .unwrap();
}

async fn exists(con: &mut MultiplexedConnection, keys: &[String]) -> usize {
    redis::cmd("EXISTS")
        .arg(keys)
        .query_async(con)
        .await
        .unwrap()
}

#[test]
fn namespaces_differ() {
    let prefixes: HashSet<String> = (0..100)
        .map(|_| Namespace::new("namespaces_differ").prefix().to_owned())
        .collect();
    assert_eq!(prefixes.len(), 100);
    let ns = Namespace::new("namespaces_differ");
    assert!(ns.prefix().starts_with("keel-t-namespaces_differ-"));
    assert!(ns.prefix().contains(&format!("-{}-", std::process::id())));
    assert!(ns.name("jobs").ends_with("-jobs"));
}

#[test]
fn on_drop_runs_when_the_namespace_drops() {
    let ran = Arc::new(AtomicBool::new(false));
    let ns = Namespace::new("on_drop_runs");
    let flag = ran.clone();
    ns.on_drop(move || flag.store(true, Ordering::SeqCst));
    assert!(!ran.load(Ordering::SeqCst));
    drop(ns);
    assert!(ran.load(Ordering::SeqCst));
}

#[tokio::test]
async fn redis_cleanup_removes_only_the_namespace_keys() {
    let url = require_redis().await;
    let mut con = connect(&url).await;
    let ns = Namespace::new("redis_cleanup_removes_keys");
    let other = Namespace::new("redis_cleanup_removes_keys").with_redis_cleanup(url.clone());
    let ours = vec![
        ns.name("plain"),
        format!("{{{}}}:ready", ns.prefix()),
        format!("keel:{}:nested", ns.prefix()),
    ];
    let theirs = vec![other.name("plain")];
    for key in ours.iter().chain(&theirs) {
        set(&mut con, key).await;
    }
    assert_eq!(exists(&mut con, &ours).await, 3);

    let url_for_cleanup = url.clone();
    let prefix = ns.prefix().to_owned();
    let deleted = tokio::task::spawn_blocking(move || redis_cleanup(&url_for_cleanup, &prefix))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(deleted, 3);
    assert_eq!(exists(&mut con, &ours).await, 0);
    assert_eq!(
        exists(&mut con, &theirs).await,
        1,
        "another namespace's key was deleted"
    );

    // The guard form: dropping the namespace deletes its keys.
    drop(other);
    assert_eq!(exists(&mut con, &theirs).await, 0);
}

#[test]
fn redis_cleanup_reports_an_unreachable_server() {
    // Port 1 on loopback: nothing listens there.
    let error = redis_cleanup("redis://127.0.0.1:1/", "keel-t-x").unwrap_err();
    assert!(error.to_string().contains("127.0.0.1:1"), "{error}");
}
