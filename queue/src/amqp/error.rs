//! The RabbitMQ backend's errors, classified into [`crate::QueueError`] in
//! one place.

use crate::error::QueueError;

/// What can go wrong talking to RabbitMQ.
#[derive(Debug)]
pub(crate) enum AmqpFailure {
    /// The client library failed.
    Lapin(lapin::Error),
    /// The broker refused a declaration because the queue exists with other
    /// arguments.
    Topology(lapin::Error),
}

impl From<lapin::Error> for AmqpFailure {
    fn from(err: lapin::Error) -> Self {
        AmqpFailure::Lapin(err)
    }
}

impl From<AmqpFailure> for QueueError {
    fn from(failure: AmqpFailure) -> Self {
        match failure {
            AmqpFailure::Topology(err) => QueueError::Backend {
                message: "the broker refused the queue declaration: a queue with this name exists with other arguments (queue_type, capacity or max_attempts changed?); delete it or use another name".into(),
                source: Some(err.into()),
            },
            AmqpFailure::Lapin(err) => match err.kind() {
                lapin::ErrorKind::IOError(_)
                | lapin::ErrorKind::InvalidChannelState(..)
                | lapin::ErrorKind::InvalidConnectionState(_)
                | lapin::ErrorKind::InvalidChannel(_)
                | lapin::ErrorKind::MissingHeartbeatError
                | lapin::ErrorKind::RuntimeShutdownError(_)
                | lapin::ErrorKind::ChannelsLimitReached => QueueError::unavailable(
                    "rabbitmq connection failed; it will be re-established on the next call",
                    err,
                ),
                lapin::ErrorKind::ProtocolError(_) if err.is_amqp_hard_error() => {
                    QueueError::unavailable("rabbitmq closed the connection", err)
                }
                _ => QueueError::Backend {
                    message: "rabbitmq answered with an error".into(),
                    source: Some(err.into()),
                },
            },
        }
    }
}
