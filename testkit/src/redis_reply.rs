//! Redis error replies as the client sees them, for tests of error
//! classification.

/// The client error that the Redis error reply `text` (`"LOADING …"`,
/// `"WRONGTYPE …"`, without the leading `-`) becomes: the RESP bytes are
/// parsed as the `redis` client parses a server's answer, so a test
/// classifies exactly what a real server would cause.
///
/// # Panics
///
/// If `text` does not parse as an error reply.
#[must_use]
pub fn redis_error_reply(text: &str) -> redis::RedisError {
    let reply = format!("-{text}\r\n");
    match redis::parse_redis_value(reply.as_bytes()) {
        Ok(value) => match value.extract_error() {
            Err(err) => err,
            Ok(_) => panic!("{text} parsed as a value"),
        },
        Err(err) => panic!("{text}: {err}"),
    }
}
