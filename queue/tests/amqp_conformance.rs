//! The conformance suite on the RabbitMQ backend, against the real broker at
//! `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
#![cfg(feature = "amqp")]

#[path = "support/amqp.rs"]
mod amqp_support;

use amqp_support::DeleteTopology;
use keel_queue::conformance::QueueSubject;
use keel_queue::{AmqpQueue, AmqpQueueConfig, AmqpQueueType};
use keel_testkit::require_amqp;

async fn subject(config: keel_queue::QueueConfig, queue_type: AmqpQueueType) -> QueueSubject {
    let url = require_amqp().await;
    // Deletes the case's queues and exchange when the case ends.
    let guard = DeleteTopology::new(url.clone(), config.name.clone(), config.priority_levels);
    let queue = AmqpQueue::connect(AmqpQueueConfig::new(url, config).queue_type(queue_type))
        .await
        .expect("connect to rabbitmq");
    QueueSubject::new(queue).with_guard(guard)
}

keel_queue::queue_conformance!(amqp_quorum, |config| subject(config, AmqpQueueType::Quorum));
keel_queue::queue_conformance!(amqp_classic, |config| subject(
    config,
    AmqpQueueType::Classic
));
