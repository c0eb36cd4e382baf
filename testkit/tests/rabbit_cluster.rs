//! A spawned three-node RabbitMQ cluster: start, put confirmed messages on
//! a quorum queue, kill its leader, see another node take over with the
//! messages intact, restart the killed node, and leave nothing running.
#![cfg(feature = "amqp")]

use std::time::Duration;

use keel_testkit::RabbitCluster;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::time::Instant;

/// How long the surviving nodes may take to elect a new leader.
const ELECTION_WITHIN: Duration = Duration::from_secs(30);

const MESSAGES: usize = 50;

async fn connect(url: &str) -> Connection {
    tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .unwrap_or_else(|_| panic!("no connection to {url} within 10 s"))
    .unwrap_or_else(|err| panic!("connect to {url}: {err}"))
}

#[tokio::test]
async fn a_killed_quorum_leader_is_replaced_with_its_messages() {
    let started = Instant::now();
    let mut cluster = RabbitCluster::start().await.unwrap();
    eprintln!("cluster of 3 started in {:?}", started.elapsed());
    assert_eq!(cluster.len(), 3);
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    for url in &urls {
        connect(url).await.close(200, "ok".into()).await.unwrap();
    }

    // A quorum queue declared through node 0, with confirmed messages.
    let queue = "keel-testkit.rabbit-cluster";
    let connection = connect(&urls[0]).await;
    let channel = connection.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..MESSAGES {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "message {i} was not confirmed");
    }
    drop(channel);
    drop(connection);

    let leader = cluster.leader_of(queue).await.unwrap();
    cluster.kill(leader);
    assert!(!cluster.is_running(leader));
    assert!(
        tokio::net::TcpStream::connect(cluster.addr(leader))
            .await
            .is_err(),
        "the killed node still accepts connections"
    );

    // Another node takes over.
    let deadline = Instant::now() + ELECTION_WITHIN;
    let new_leader = loop {
        match cluster.leader_of(queue).await {
            Ok(node) if node != leader => break node,
            outcome => assert!(
                Instant::now() < deadline,
                "no new leader within {ELECTION_WITHIN:?}: {outcome:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("leader {leader} killed; node {new_leader} leads now");

    // Every confirmed message is there, read through a surviving node.
    let survivor = (0..3).find(|&i| i != leader).unwrap();
    let connection = connect(&urls[survivor]).await;
    let channel = connection.create_channel().await.unwrap();
    let mut got = 0;
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        assert_eq!(message.delivery.data, format!("m{got}").as_bytes());
        got += 1;
    }
    assert_eq!(got, MESSAGES, "confirmed messages lost with the leader");

    // The killed node comes back and takes connections again.
    cluster.restart(leader).await.unwrap();
    assert!(cluster.is_running(leader));
    connect(&urls[leader])
        .await
        .close(200, "ok".into())
        .await
        .unwrap();
    channel
        .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
        .await
        .unwrap();
    drop(channel);
    drop(connection);

    // Dropping the cluster stops every node.
    let addrs: Vec<_> = (0..3).map(|i| cluster.addr(i)).collect();
    drop(cluster);
    for addr in addrs {
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "{addr} still accepts connections after the cluster was dropped"
        );
    }
}
