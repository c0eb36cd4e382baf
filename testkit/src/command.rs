//! Set-up commands (`redis-cli --cluster create`, `rabbitmqctl`) run with a
//! time bound, failing with an error that names the command and says how
//! it ended.

use std::io;
use std::process::Output;
use std::time::Duration;

/// Runs `command` (shown in errors as `shown`) to completion within
/// `limit` and answers its output if it succeeded. A command that is not
/// installed fails with `not_found` (how to install it) when given.
pub(crate) async fn succeed_within(
    command: &mut tokio::process::Command,
    shown: &str,
    limit: Duration,
    not_found: Option<&str>,
) -> io::Result<Output> {
    let output = match tokio::time::timeout(limit, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(error)) => {
            let message = match not_found {
                Some(hint) if error.kind() == io::ErrorKind::NotFound => {
                    format!("cannot run `{shown}`: it is not on PATH ({error}); {hint}")
                }
                _ => format!("cannot run `{shown}`: {error}"),
            };
            return Err(io::Error::new(error.kind(), message));
        }
        Err(_elapsed) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("`{shown}` did not finish within {limit:?}"),
            ));
        }
    };
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "`{shown}` failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(output)
}
