//! Where the shared test servers are, and checks that fail loudly when they
//! are missing.

#[cfg(any(feature = "redis", feature = "amqp"))]
use std::time::Duration;

/// The Redis URL used when `REDIS_URL` is not set.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The RabbitMQ URL used when `AMQP_URL` is not set.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The command that starts a Redis suitable for the tests.
pub const START_REDIS: &str =
    r#"redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no"#;

/// The command that starts a RabbitMQ suitable for the tests, on loopback
/// only, and waits until it is up.
pub const START_RABBITMQ: &str = "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 ERL_EPMD_ADDRESS=127.0.0.1 \
                                  rabbitmq-server -detached && rabbitmqctl await_startup";

/// How long [`require_redis`] waits for `PING`.
#[cfg(feature = "redis")]
const REDIS_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// How long [`require_amqp`] waits for a connection.
#[cfg(feature = "amqp")]
const AMQP_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The Redis the tests use: `REDIS_URL`, or [`DEFAULT_REDIS_URL`].
#[must_use]
pub fn redis_url() -> String {
    env_or("REDIS_URL", DEFAULT_REDIS_URL)
}

/// The RabbitMQ the tests use: `AMQP_URL`, or [`DEFAULT_AMQP_URL`].
#[must_use]
pub fn amqp_url() -> String {
    env_or("AMQP_URL", DEFAULT_AMQP_URL)
}

fn env_or(var: &str, default: &str) -> String {
    match std::env::var(var) {
        Ok(value) if !value.trim().is_empty() => value,
        _ => default.to_owned(),
    }
}

/// Checks that the Redis at [`redis_url`] answers `PING` within about 3
/// seconds and returns its URL. Call it first in every test that needs
/// Redis.
///
/// # Panics
///
/// Panics when Redis does not answer, with the URL, the error, and the
/// command that starts it ([`START_REDIS`]), so a test can never pass
/// because its server was missing.
#[cfg(feature = "redis")]
pub async fn require_redis() -> String {
    let url = redis_url();
    if let Err(error) = crate::redis_server::ping(&url, REDIS_CHECK_TIMEOUT).await {
        panic!(
            "this test needs Redis, but {url} did not answer PING: {error}\n\
             start it with:\n    {START_REDIS}\n\
             or run `.ci/run`, which starts Redis and RabbitMQ before the tests \
             (set REDIS_URL to use another server)"
        );
    }
    url
}

/// Checks that the RabbitMQ at [`amqp_url`] accepts a connection within
/// about 5 seconds and returns its URL. Call it first in every test that
/// needs RabbitMQ.
///
/// # Panics
///
/// Panics when RabbitMQ does not accept the connection, with the URL, the
/// error, and the command that starts it ([`START_RABBITMQ`]), so a test can
/// never pass because its server was missing.
#[cfg(feature = "amqp")]
pub async fn require_amqp() -> String {
    let url = amqp_url();
    let connect = lapin::Connection::connect(&url, lapin::ConnectionProperties::default());
    let error = match tokio::time::timeout(AMQP_CHECK_TIMEOUT, connect).await {
        Ok(Ok(connection)) => {
            // Best effort: the check passed whether or not the close does.
            let _ = tokio::time::timeout(
                AMQP_CHECK_TIMEOUT,
                connection.close(200, "keel-testkit check done".into()),
            )
            .await;
            return url;
        }
        Ok(Err(error)) => error.to_string(),
        Err(_elapsed) => format!("no connection within {AMQP_CHECK_TIMEOUT:?}"),
    };
    panic!(
        "this test needs RabbitMQ, but {url} did not accept a connection: {error}\n\
         start it with:\n    {START_RABBITMQ}\n\
         or run `.ci/run`, which starts Redis and RabbitMQ before the tests \
         (set AMQP_URL to use another server)"
    );
}
