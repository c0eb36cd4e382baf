//! A disposable `redis-server` process that a test can kill and restart.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

/// How long a started server gets to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a starting server is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How many times [`RedisServer::start`] tries a fresh port, and
/// [`RedisServer::restart`] retries the same port, when the server exits at
/// once (typically because the port was taken in between).
const SPAWN_ATTEMPTS: usize = 5;

/// The command that installs `redis-server` on Debian and Ubuntu.
pub(crate) const INSTALL_HINT: &str = "apt-get install -y redis-server";

/// A `redis-server` process of its own, on a free port of `127.0.0.1`, with
/// its working directory in a temporary directory and persistence off.
///
/// Tests use it when they must stop the server under a client: [`kill`]
/// it (`SIGKILL`, so clients see refused connections), then [`restart`] it
/// on the same port, empty. Dropping it kills the process and removes the
/// directory.
///
/// A server started [with extra arguments](Self::start_with_args) keeps them
/// across restarts, and every restart reuses the same directory, so a server
/// with persistence on (`--appendonly yes --appendfsync always`) reloads
/// what it had acknowledged before a `SIGKILL`.
///
/// [`kill`]: Self::kill
/// [`restart`]: Self::restart
///
/// # Example
///
/// ```no_run
/// use keel_testkit::RedisServer;
///
/// # async fn demo() -> std::io::Result<()> {
/// let mut server = RedisServer::start().await?;
/// let url = server.url(); // redis://127.0.0.1:<port>/
/// server.kill(); // connections to `url` are now refused
/// server.restart().await?; // same port, empty data set
///
/// // With persistence, a restart replays the append-only file.
/// let mut durable =
///     RedisServer::start_with_args(["--appendonly", "yes", "--appendfsync", "always"]).await?;
/// durable.kill();
/// durable.restart().await?; // same port, same data
/// # Ok(()) }
/// ```
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Passed after the defaults on every start and restart.
    extra_args: Vec<String>,
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("pid", &self.child.as_ref().map(Child::id))
            .field("dir", &self.dir.path())
            .field("extra_args", &self.extra_args)
            .finish()
    }
}

impl RedisServer {
    /// Spawns `redis-server` on a free port and waits until it answers
    /// `PING`.
    ///
    /// The server runs with `--bind 127.0.0.1 --save "" --appendonly no`, its
    /// `--dir` in a fresh temporary directory, and logs to `redis.log` there.
    ///
    /// # Errors
    ///
    /// Fails if `redis-server` is not on `PATH` (the error says how to install
    /// it), if the process keeps exiting at start, or if it does not answer
    /// `PING` within 10 seconds (the error includes the end of its log).
    ///
    /// # Cancel safety
    ///
    /// Cancelling the future kills any process it spawned.
    pub async fn start() -> io::Result<RedisServer> {
        Self::start_with_args(std::iter::empty::<&str>()).await
    }

    /// Like [`start`](Self::start), with `args` appended to the command line
    /// after the defaults, so they override them (the last value of a
    /// setting wins). They are kept for every [`restart`](Self::restart).
    ///
    /// `["--appendonly", "yes", "--appendfsync", "always"]` turns on
    /// persistence that survives a `SIGKILL`: every write the server
    /// acknowledged is on disk in the server's directory, and a restart
    /// replays it. `--port`, `--dir` and `--logfile` are the kit's to set.
    ///
    /// # Errors
    ///
    /// As for [`start`](Self::start); an argument `redis-server` rejects
    /// makes it exit at start, and the error includes its log.
    ///
    /// # Cancel safety
    ///
    /// Cancelling the future kills any process it spawned.
    pub async fn start_with_args<I, S>(args: I) -> io::Result<RedisServer>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::start_on(args, free_port).await
    }

    /// Like [`start_with_args`](Self::start_with_args), on ports chosen by
    /// `pick` (called again for each attempt).
    pub(crate) async fn start_on<I, S>(
        args: I,
        pick: fn() -> io::Result<u16>,
    ) -> io::Result<RedisServer>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let dir = tempfile::Builder::new().prefix("keel-redis-").tempdir()?;
        let mut server = RedisServer {
            port: 0,
            child: None,
            dir,
            extra_args: args.into_iter().map(|a| a.as_ref().to_owned()).collect(),
        };
        let mut last_error = None;
        for _ in 0..SPAWN_ATTEMPTS {
            server.port = pick()?;
            match server.spawn_and_wait().await {
                Ok(()) => return Ok(server),
                Err(SpawnError::Exited(error)) => last_error = Some(error),
                Err(SpawnError::Fatal(error)) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("redis-server did not start")))
    }

    /// The URL clients use: `redis://127.0.0.1:<port>/`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port the server listens on; it stays the same across
    /// [`restart`](Self::restart).
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the server listens on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The server's working directory (`--dir`): where its log, and with
    /// persistence on its data files, live. It stays the same across
    /// [`restart`](Self::restart) and is removed on drop.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The arguments given to [`start_with_args`](Self::start_with_args)
    /// (empty for [`start`](Self::start)).
    #[must_use]
    pub fn extra_args(&self) -> &[String] {
        &self.extra_args
    }

    /// Whether the process is still running (it was not killed and has not
    /// exited on its own).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server with `SIGKILL` and reaps it. When this returns, the
    /// port no longer accepts connections and open connections are closed.
    /// Does nothing if the server is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean the process already exited; `wait` reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
            tracing::debug!(port = self.port, "redis-server killed");
        }
    }

    /// Starts the server again on the same port, in the same directory and
    /// with the same arguments (killing it first if it is still running),
    /// and waits until it answers `PING`. With the default arguments the
    /// data set starts empty, since persistence is off; a server started
    /// with persistence on reloads its data files first (`PING` answers
    /// only once they are loaded).
    ///
    /// # Errors
    ///
    /// Fails if the port stays unavailable over a few attempts, or for the
    /// reasons [`start`](Self::start) fails.
    ///
    /// # Cancel safety
    ///
    /// Cancelling the future may leave a starting process behind; it belongs
    /// to this `RedisServer` and is killed by [`kill`](Self::kill) or on drop.
    pub async fn restart(&mut self) -> io::Result<()> {
        self.kill();
        let mut last_error = None;
        for attempt in 0..SPAWN_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            match self.spawn_and_wait().await {
                Ok(()) => return Ok(()),
                Err(SpawnError::Exited(error)) => last_error = Some(error),
                Err(SpawnError::Fatal(error)) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("redis-server did not restart")))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Spawns the process on `self.port` and waits for `PING`.
    async fn spawn_and_wait(&mut self) -> Result<(), SpawnError> {
        let log = self.log_path();
        // A fresh log per attempt, so errors show this attempt's lines.
        let _ = std::fs::remove_file(&log);
        // What the server prints before its log is open (a rejected
        // argument, say) goes to its own file, also fresh per attempt.
        let output = std::fs::File::create(self.output_path()).map_err(SpawnError::Fatal)?;
        let output_err = output.try_clone().map_err(SpawnError::Fatal)?;
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(output_err)
            .spawn()
            .map_err(|error| {
                SpawnError::Fatal(if error.kind() == io::ErrorKind::NotFound {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "`redis-server` is not on PATH ({error}); install it with \
                             `{INSTALL_HINT}`"
                        ),
                    )
                } else {
                    io::Error::new(error.kind(), format!("cannot spawn redis-server: {error}"))
                })
            })?;
        self.child = Some(child);
        let url = self.url();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = match &mut self.child {
                Some(child) => child.try_wait().map_err(SpawnError::Fatal)?,
                None => None,
            };
            if let Some(status) = exited {
                self.child = None;
                return Err(SpawnError::Exited(io::Error::other(format!(
                    "redis-server on port {} exited at start ({status}); log:\n{}",
                    self.port,
                    self.log_tail()
                ))));
            }
            let last = match ping(&url, Duration::from_millis(500)).await {
                Ok(()) => {
                    tracing::debug!(port = self.port, "redis-server ready");
                    return Ok(());
                }
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                self.kill();
                return Err(SpawnError::Fatal(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "redis-server on port {} did not answer PING within {:?} \
                         (last error: {last}); log:\n{}",
                        self.port,
                        READY_TIMEOUT,
                        self.log_tail()
                    ),
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Where the server's standard output and error go.
    fn output_path(&self) -> PathBuf {
        self.dir.path().join("redis.out")
    }

    /// The last lines of the log, after anything the server printed.
    fn log_tail(&self) -> String {
        let tail = |text: &str| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        };
        let printed = std::fs::read_to_string(self.output_path()).unwrap_or_default();
        let log = match std::fs::read_to_string(self.log_path()) {
            Ok(log) => tail(&log),
            Err(error) => format!("(no log: {error})"),
        };
        if printed.trim().is_empty() {
            log
        } else {
            format!("{}\n{log}", tail(&printed))
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

enum SpawnError {
    /// The process exited at start; another attempt may succeed.
    Exited(io::Error),
    /// Retrying will not help.
    Fatal(io::Error),
}

/// A port that was free on `127.0.0.1` a moment ago.
pub(crate) fn free_port() -> io::Result<u16> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Connects to `url` and sends one `PING`, bounded by `timeout`.
pub(crate) async fn ping(url: &str, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let client = redis::Client::open(url)?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(_pong)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_elapsed) => Err(format!("no answer within {timeout:?}")),
    }
}
