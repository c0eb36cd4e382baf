//! The fault proxy in front of the shared RabbitMQ.
#![cfg(feature = "amqp")]

use std::time::Duration;

use keel_testkit::{FaultProxy, Namespace, require_amqp};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::time::{Instant, timeout};

/// Bound on every wait that should end well before it.
const WAIT: Duration = Duration::from_secs(5);

async fn connect(url: &str) -> lapin::Result<Connection> {
    timeout(
        WAIT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .expect("connecting to RabbitMQ timed out")
}

/// Declares a temporary queue (exclusive, auto-deleted) named in `ns`.
async fn declare(channel: &Channel, ns: &Namespace) -> lapin::Result<()> {
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    timeout(
        WAIT,
        channel.queue_declare(ns.name("q").into(), options, FieldTable::default()),
    )
    .await
    .expect("queue.declare hung")
    .map(|_queue| ())
}

#[tokio::test]
async fn cut_breaks_the_connection_and_restore_allows_a_new_one() {
    let url = require_amqp().await;
    let ns = Namespace::new("amqp_cut_breaks_the_connection");
    let proxy = FaultProxy::start_for_url(&url).await.unwrap();
    let proxied = proxy.url_for(&url);

    let connection = connect(&proxied).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    declare(&channel, &ns).await.unwrap();

    proxy.cut();
    let after_cut = declare(&channel, &ns).await;
    assert!(after_cut.is_err(), "declare on a cut connection succeeded");
    let deadline = Instant::now() + WAIT;
    while connection.status().connected() {
        assert!(
            Instant::now() < deadline,
            "connection still reports connected after cut"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(connection.create_channel().await.is_err());

    proxy.restore();
    let fresh = connect(&proxied).await.unwrap();
    let channel = fresh.create_channel().await.unwrap();
    declare(&channel, &ns).await.unwrap();
    timeout(WAIT, fresh.close(200, "done".into()))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn refuse_fails_new_connections() {
    let url = require_amqp().await;
    let proxy = FaultProxy::start_for_url(&url).await.unwrap();
    let proxied = proxy.url_for(&url);

    proxy.refuse();
    assert!(connect(&proxied).await.is_err());

    proxy.restore();
    let connection = connect(&proxied).await.unwrap();
    timeout(WAIT, connection.close(200, "done".into()))
        .await
        .unwrap()
        .unwrap();
}
