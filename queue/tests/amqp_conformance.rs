//! The conformance suite on the RabbitMQ backend, against the real broker at
//! `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
#![cfg(feature = "amqp")]

use keel_queue::conformance::Subject;
use keel_queue::{AmqpQueue, AmqpQueueConfig, AmqpQueueType};
use keel_testkit::require_amqp;

/// Deletes a test queue's broker objects when the case ends. Delay queues
/// expire on their own (`x-expires`).
#[derive(Debug)]
struct DeleteTopology {
    url: String,
    name: String,
    levels: u8,
}

impl Drop for DeleteTopology {
    fn drop(&mut self) {
        let (url, name, levels) = (self.url.clone(), self.name.clone(), self.levels);
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let Ok(conn) =
                    lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await
                else {
                    return;
                };
                let Ok(channel) = conn.create_channel().await else {
                    return;
                };
                let mut queues: Vec<String> = (0..levels).map(|l| format!("{name}.p{l}")).collect();
                queues.push(format!("{name}.dead"));
                for queue in queues {
                    let _ = channel
                        .queue_delete(
                            queue.as_str().into(),
                            lapin::options::QueueDeleteOptions::default(),
                        )
                        .await;
                }
                let _ = channel
                    .exchange_delete(
                        format!("{name}.dlx").as_str().into(),
                        lapin::options::ExchangeDeleteOptions::default(),
                    )
                    .await;
                let _ = conn.close(200, "test done".into()).await;
            });
        });
        let _ = cleanup.join();
    }
}

async fn subject(config: keel_queue::QueueConfig, queue_type: AmqpQueueType) -> Subject {
    let url = require_amqp().await;
    let guard = DeleteTopology {
        url: url.clone(),
        name: config.name.clone(),
        levels: config.priority_levels,
    };
    let queue = AmqpQueue::connect(AmqpQueueConfig::new(url, config).queue_type(queue_type))
        .await
        .expect("connect to rabbitmq");
    Subject::new(queue).with_guard(guard)
}

keel_queue::queue_conformance!(amqp_quorum, |config| subject(config, AmqpQueueType::Quorum));
keel_queue::queue_conformance!(amqp_classic, |config| subject(
    config,
    AmqpQueueType::Classic
));
