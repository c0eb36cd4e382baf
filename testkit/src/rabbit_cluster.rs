//! A disposable three-node RabbitMQ cluster on this machine, whose nodes a
//! test can kill and restart.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use crate::command::succeed_within;

/// Nodes in the cluster.
const NODES: usize = 3;

/// How long a node gets to open its AMQP port, at start and at restart
/// (a node boots in 5-15 s on a loaded 2-core machine).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// How long the nodes get to agree on the cluster's membership once they
/// all listen, before the kit joins a missing one by hand.
const FORM_TIMEOUT: Duration = Duration::from_secs(20);

/// Bound on one `rabbitmqctl` run (the CLI boots an Erlang VM of its own:
/// about a second when the machine is idle, much more when it is not).
const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a starting node is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long a killed node's processes get to end.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where Debian and Ubuntu keep RabbitMQ's own scripts: `rabbitmq-server`
/// and `rabbitmqctl` on `PATH` are wrappers that switch to the `rabbitmq`
/// user and send the output to the system's log, which a node of a test's
/// own must not do.
const DEBIAN_SCRIPTS: &str = "/usr/lib/rabbitmq/bin";

/// The Erlang cookies the system's RabbitMQ uses (its `HOME` is
/// `/var/lib/rabbitmq`), then the user's.
const SYSTEM_COOKIES: [&str; 1] = ["/var/lib/rabbitmq/.erlang.cookie"];

/// The command that installs `rabbitmq-server` on Debian and Ubuntu.
const INSTALL_HINT: &str = "apt-get install -y rabbitmq-server";

/// A local RabbitMQ cluster of its own: three nodes of Debian's
/// `rabbitmq-server` on this machine, beside (and without touching) any
/// RabbitMQ already running here.
///
/// Each node has a name of its own (`keel-<random>-<n>@localhost`), a free
/// AMQP port and a free distribution port on `127.0.0.1` only (the Erlang
/// port mapper is asked to listen there too), no plugins, and its data,
/// logs, config and Erlang cookie in a temporary directory. The cookie is
/// the system RabbitMQ's when it is readable (so the system's
/// `rabbitmqctl` can inspect the nodes too), a random one otherwise.
///
/// [`start`](Self::start) boots the first node, then the other two side by
/// side, which find the first through RabbitMQ's classic-config peer
/// discovery and join it as they boot (a node whose first boot fails is
/// booted once more from empty data). A node that booted on its own
/// anyway is joined with `rabbitmqctl stop_app`, `join_cluster` and
/// `start_app`. It returns once every node takes AMQP connections and the
/// first node counts all three as running.
///
/// A test then finds the node leading a quorum queue
/// ([`leader_of`](Self::leader_of)), [`kill`](Self::kill)s it (`SIGKILL`
/// of the node's processes: its connections drop and the other nodes see
/// it go at once, so a new leader is elected within a second or two), and
/// [`restart`](Self::restart)s it on the same ports and data, where it
/// rejoins the cluster.
///
/// Dropping it kills every node and removes their directories. A node also
/// dies on its own within about two seconds of the test process ending
/// (and its directory goes a second later), so nothing outlives a test run
/// that was killed.
///
/// # Example
///
/// ```no_run
/// use keel_testkit::RabbitCluster;
///
/// # async fn demo() -> std::io::Result<()> {
/// let mut cluster = RabbitCluster::start().await?;
/// let urls = cluster.urls(); // amqp://guest:guest@127.0.0.1:<port>/%2f per node
/// // ... declare the quorum queue `jobs.p0` through urls[0] ...
/// let leader = cluster.leader_of("jobs.p0").await?;
/// cluster.kill(leader); // another node takes over the queue
/// cluster.restart(leader).await?; // back, as a follower
/// # Ok(()) }
/// ```
pub struct RabbitCluster {
    /// `keel-<random>`, the prefix of every node name.
    id: String,
    nodes: Vec<Node>,
    /// Scripts and environment shared by every node and CLI run.
    env: Env,
    /// Holds every node's directory; removed on drop, after the nodes die.
    dir: tempfile::TempDir,
}

/// One node: its identity, where it listens and its process group.
struct Node {
    /// `keel-<random>-<n>@localhost`.
    name: String,
    amqp_port: u16,
    dist_port: u16,
    /// Its data, log, config and output.
    dir: PathBuf,
    /// The node's launcher; its process group holds the node's every
    /// process (the start script, the Erlang VM and its helpers).
    child: Option<Child>,
}

/// What every node and `rabbitmqctl` run shares.
struct Env {
    server: PathBuf,
    ctl: PathBuf,
    /// `HOME` for nodes and the CLI: holds the Erlang cookie.
    home: PathBuf,
    /// An empty `rabbitmq-env.conf`, so `/etc/rabbitmq/rabbitmq-env.conf`
    /// (which names the system node) is not read.
    env_file: PathBuf,
}

impl fmt::Debug for RabbitCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitCluster")
            .field("nodes", &self.nodes)
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("amqp_port", &self.amqp_port)
            .field("dist_port", &self.dist_port)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish()
    }
}

impl RabbitCluster {
    /// Starts three nodes, lets them form one cluster and waits until every
    /// node takes AMQP connections and the first counts all three as
    /// running.
    ///
    /// # Errors
    ///
    /// Fails if RabbitMQ's scripts are not installed (the error says how to
    /// install them), if a node exits or does not listen within 90 seconds
    /// (the error has the end of its output and log), or if a node cannot
    /// be joined to the cluster (the error has `rabbitmqctl`'s output).
    ///
    /// # Cancel safety
    ///
    /// Cancelling the future kills every node it started.
    pub async fn start() -> io::Result<RabbitCluster> {
        let env = Env::find()?;
        let dir = tempfile::Builder::new().prefix("keel-rabbit-").tempdir()?;
        let id = format!("keel-{:08x}", rand::random::<u32>());
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home)?;
        write_cookie(&home)?;
        let env_file = dir.path().join("rabbitmq-env.conf");
        std::fs::write(&env_file, "")?;
        let env = Env {
            home,
            env_file,
            ..env
        };
        let mut ports = Vec::with_capacity(2 * NODES);
        while ports.len() < 2 * NODES {
            let port = free_port()?;
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let first = format!("{id}-1@localhost");
        let mut nodes = Vec::with_capacity(NODES);
        for n in 1..=NODES {
            let node_dir = dir.path().join(format!("node-{n}"));
            std::fs::create_dir_all(&node_dir)?;
            let mut config = String::from("loopback_users.guest = true\n");
            if n > 1 {
                // The first node is the seed; the others join it as they
                // boot, retrying while it is still booting.
                config.push_str(&format!(
                    "cluster_formation.peer_discovery_backend = classic_config\n\
                     cluster_formation.classic_config.nodes.1 = {first}\n\
                     cluster_formation.discovery_retry_limit = 180\n\
                     cluster_formation.discovery_retry_interval = 500\n"
                ));
            }
            std::fs::write(node_dir.join("rabbitmq.conf"), config)?;
            std::fs::write(node_dir.join("enabled_plugins"), "[].\n")?;
            nodes.push(Node {
                name: format!("{id}-{n}@localhost"),
                amqp_port: ports[2 * (n - 1)],
                dist_port: ports[2 * (n - 1) + 1],
                dir: node_dir,
                child: None,
            });
        }
        let mut cluster = RabbitCluster {
            id,
            nodes,
            env,
            dir,
        };
        let started = Instant::now();
        // The seed boots first: a node that joins one still creating its
        // tables can fail its boot (`table_attributes_mismatch`).
        cluster.spawn(0)?;
        cluster.wait_listening(0, started + BOOT_TIMEOUT).await?;
        for index in 1..NODES {
            cluster.spawn(index)?;
        }
        for index in 1..NODES {
            let deadline = Instant::now() + BOOT_TIMEOUT;
            if let Err(error) = cluster.wait_listening(index, deadline).await {
                // Two nodes joining at once can still trip over each
                // other; a second boot from empty data joins alone.
                tracing::debug!(%error, "rabbitmq node failed its first boot; booting it again");
                let _ = std::fs::remove_dir_all(cluster.nodes[index].dir.join("mnesia"));
                cluster.spawn(index)?;
                cluster
                    .wait_listening(index, Instant::now() + BOOT_TIMEOUT)
                    .await?;
            }
        }
        cluster.form().await?;
        tracing::debug!(
            id = %cluster.id,
            elapsed = ?started.elapsed(),
            "rabbitmq cluster ready"
        );
        Ok(cluster)
    }

    /// One cluster for every test of this process that needs a cluster
    /// only as a place to put queues (a conformance suite, one queue per
    /// case): the first caller starts it, later callers get the same one,
    /// whichever runtime they run on. It lives as long as the process: its
    /// nodes and directory go within about three seconds of the process
    /// ending (the nodes watch the process; see the type's docs). A test
    /// that kills nodes [starts its own](Self::start).
    ///
    /// # Errors
    ///
    /// As for [`start`](Self::start); the next caller tries again.
    ///
    /// # Cancel safety
    ///
    /// Cancelling the future kills any node it started; another caller then
    /// starts the cluster.
    pub async fn shared() -> io::Result<&'static RabbitCluster> {
        static SHARED: tokio::sync::OnceCell<RabbitCluster> = tokio::sync::OnceCell::const_new();
        SHARED.get_or_try_init(RabbitCluster::start).await
    }

    /// The AMQP URL of every node,
    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`, in node order. A node's
    /// index in this list is the one [`kill`](Self::kill),
    /// [`restart`](Self::restart) and [`leader_of`](Self::leader_of) use.
    #[must_use]
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// The AMQP URL of node `index`.
    ///
    /// # Panics
    ///
    /// If `index` is not below [`len`](Self::len).
    #[must_use]
    pub fn url(&self, index: usize) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            self.nodes[index].amqp_port
        )
    }

    /// The address node `index` takes AMQP connections on,
    /// `127.0.0.1:<port>`; it stays the same across
    /// [`restart`](Self::restart).
    ///
    /// # Panics
    ///
    /// If `index` is not below [`len`](Self::len).
    #[must_use]
    pub fn addr(&self, index: usize) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.nodes[index].amqp_port))
    }

    /// The Erlang name of node `index`, `keel-<random>-<index + 1>@localhost`.
    ///
    /// # Panics
    ///
    /// If `index` is not below [`len`](Self::len).
    #[must_use]
    pub fn node_name(&self, index: usize) -> &str {
        &self.nodes[index].name
    }

    /// The number of nodes (3).
    #[must_use]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes: never, it has three (the companion
    /// of [`len`](Self::len)).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Whether node `index` is running (it was not killed and has not
    /// exited on its own).
    ///
    /// # Panics
    ///
    /// If `index` is not below [`len`](Self::len).
    pub fn is_running(&mut self, index: usize) -> bool {
        match &mut self.nodes[index].child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills node `index` with `SIGKILL` (every process of the node) and
    /// reaps it. When this returns its AMQP port refuses connections, open
    /// connections to it are closed, and the other nodes see it gone.
    /// Does nothing if the node is not running.
    ///
    /// # Panics
    ///
    /// If `index` is not below [`len`](Self::len).
    pub fn kill(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        if let Some(child) = node.child.take() {
            kill_group(child);
            tracing::debug!(node = %node.name, "rabbitmq node killed");
        }
    }

    /// Starts node `index` again (killing it first if it is still running)
    /// on the same ports with the same data, and waits until it takes AMQP
    /// connections. It rejoins the cluster from its own data; its quorum
    /// queue replicas catch up from the leaders.
    ///
    /// # Errors
    ///
    /// If the node exits or does not listen within 90 seconds (the error
    /// has the end of its output and log).
    ///
    /// # Panics
    ///
    /// If `index` is not below [`len`](Self::len).
    ///
    /// # Cancel safety
    ///
    /// Cancelling the future may leave the starting node running; it
    /// belongs to this cluster and is killed by [`kill`](Self::kill) or on
    /// drop.
    pub async fn restart(&mut self, index: usize) -> io::Result<()> {
        self.kill(index);
        self.spawn(index)?;
        self.wait_listening(index, Instant::now() + BOOT_TIMEOUT)
            .await
    }

    /// The index of the node that leads the quorum queue `queue`, as the
    /// first running node reports it (`rabbitmqctl list_queues name
    /// leader`). Right after a [`kill`](Self::kill) of the leader this may
    /// still name the killed node until the others have elected a new one.
    ///
    /// # Errors
    ///
    /// Fails when no node is running, when `rabbitmqctl` fails (the error
    /// has its output), or when the queue does not exist or has no leader
    /// (a classic queue, or an election under way).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads (the CLI run is killed).
    pub async fn leader_of(&mut self, queue: &str) -> io::Result<usize> {
        let Some(asked) = (0..self.nodes.len()).find(|&i| self.is_running(i)) else {
            return Err(io::Error::other(
                "no node of the rabbitmq cluster is running",
            ));
        };
        let listing = self
            .ctl(
                asked,
                &["-q", "--no-table-headers", "list_queues", "name", "leader"],
            )
            .await?;
        let leader = parse_leader(&listing, queue).ok_or_else(|| {
            io::Error::other(format!(
                "node {asked} lists no leader for queue `{queue}` (is it a quorum queue \
                 that exists? an election may be under way); it listed:\n{listing}"
            ))
        })?;
        self.nodes
            .iter()
            .position(|node| node.name == leader)
            .ok_or_else(|| {
                io::Error::other(format!(
                    "queue `{queue}` is led by `{leader}`, which is not a node of this cluster"
                ))
            })
    }

    /// Spawns node `index`'s launcher in a process group of its own.
    fn spawn(&mut self, index: usize) -> io::Result<()> {
        let env = &self.env;
        let node = &mut self.nodes[index];
        let output = std::fs::File::create(node.dir.join("output.log"))?;
        let output_err = output.try_clone()?;
        // The watchdog shares the node's process group and, once the test
        // process is gone, kills the group and (from a session of its own,
        // which outlives the group, given a second to leave it) removes the
        // cluster's directory: a test run that was killed, or a cluster that
        // is never dropped, leaks nothing.
        let script = "test_pid=$1; dir=$2; shift 2; \
                      ( while kill -0 \"$test_pid\" 2>/dev/null; do sleep 1; done; \
                        setsid sh -c 'sleep 2; rm -rf \"$0\"' \"$dir\" </dev/null >/dev/null 2>&1 & \
                        sleep 1; kill -9 0 ) & \
                      exec \"$@\"";
        let child = Command::new("sh")
            .args(["-c", script, "keel-rabbit-node"])
            .arg(std::process::id().to_string())
            .arg(self.dir.path())
            .arg(&env.server)
            .env("HOME", &env.home)
            .env("RABBITMQ_CONF_ENV_FILE", &env.env_file)
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", node.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                node.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_PID_FILE", node.dir.join("rabbitmq.pid"))
            .current_dir(&node.dir)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(output_err)
            .spawn()
            .map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("cannot spawn {}: {error}", env.server.display()),
                )
            })?;
        node.child = Some(child);
        Ok(())
    }

    /// Waits until node `index` accepts TCP connections on its AMQP port
    /// (RabbitMQ opens it last, once the node has booted), failing early
    /// if it exits.
    async fn wait_listening(&mut self, index: usize, deadline: Instant) -> io::Result<()> {
        let port = self.nodes[index].amqp_port;
        loop {
            let exited = match &mut self.nodes[index].child {
                Some(child) => child.try_wait()?,
                None => {
                    return Err(io::Error::other(format!(
                        "rabbitmq node {index} is not running"
                    )));
                }
            };
            if let Some(status) = exited {
                if let Some(child) = self.nodes[index].child.take() {
                    kill_group(child);
                }
                return Err(io::Error::other(format!(
                    "rabbitmq node {} exited at start ({status}); its output and log:\n{}",
                    self.nodes[index].name,
                    self.nodes[index].log_tail()
                )));
            }
            let connect = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port));
            if let Ok(Ok(_stream)) = tokio::time::timeout(Duration::from_millis(500), connect).await
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let tail = self.nodes[index].log_tail();
                self.kill(index);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "rabbitmq node {} did not listen on 127.0.0.1:{port} within \
                         {BOOT_TIMEOUT:?}; its output and log:\n{tail}",
                        self.nodes[index].name
                    ),
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until the first node counts every node as running, and joins
    /// any node that is still missing after [`FORM_TIMEOUT`] by hand.
    async fn form(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + FORM_TIMEOUT;
        let missing = loop {
            let running = self.running_nodes().await?;
            let missing: Vec<usize> = (1..self.nodes.len())
                .filter(|&i| !running.contains(&self.nodes[i].name))
                .collect();
            if missing.is_empty() || Instant::now() >= deadline {
                break missing;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let first = self.nodes[0].name.clone();
        for index in missing {
            tracing::debug!(node = %self.nodes[index].name, "joining the rabbitmq cluster by hand");
            self.ctl(index, &["stop_app"]).await?;
            self.ctl(index, &["join_cluster", &first]).await?;
            self.ctl(index, &["start_app"]).await?;
        }
        let running = self.running_nodes().await?;
        if let Some(node) = self.nodes.iter().find(|node| !running.contains(&node.name)) {
            return Err(io::Error::other(format!(
                "rabbitmq node {} did not join the cluster of {first} (running there: {running:?}); \
                 its output and log:\n{}",
                node.name,
                node.log_tail()
            )));
        }
        Ok(())
    }

    /// The nodes the first node counts as running, by name.
    async fn running_nodes(&self) -> io::Result<Vec<String>> {
        let text = self
            .ctl(0, &["eval", "rabbit_mnesia:cluster_nodes(running)."])
            .await?;
        Ok(text
            .split(|c: char| !(c.is_alphanumeric() || matches!(c, '-' | '_' | '@' | '.')))
            .filter(|word| word.contains('@'))
            .map(str::to_owned)
            .collect())
    }

    /// Runs `rabbitmqctl -n <node index> <args>`, bounded, and returns its
    /// standard output.
    async fn ctl(&self, index: usize, args: &[&str]) -> io::Result<String> {
        let node = &self.nodes[index].name;
        let mut command = tokio::process::Command::new(&self.env.ctl);
        command
            .arg("-n")
            .arg(node)
            .args(args)
            .env("HOME", &self.env.home)
            .env("RABBITMQ_CONF_ENV_FILE", &self.env.env_file)
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let shown = format!("rabbitmqctl -n {node} {}", args.join(" "));
        let output = succeed_within(&mut command, &shown, CTL_TIMEOUT, None).await?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for index in 0..self.nodes.len() {
            self.kill(index);
        }
    }
}

impl Node {
    /// The end of what the node printed and of its log.
    fn log_tail(&self) -> String {
        let tail = |text: &str| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        };
        let printed = std::fs::read_to_string(self.dir.join("output.log")).unwrap_or_default();
        let log = std::fs::read_to_string(self.dir.join("log").join(format!("{}.log", self.name)))
            .map_or_else(|error| format!("(no log: {error})"), |log| tail(&log));
        format!("{}\n{log}", tail(&printed))
    }
}

impl Env {
    /// Finds RabbitMQ's scripts: Debian's own, else `rabbitmq-server` and
    /// `rabbitmqctl` on `PATH`.
    fn find() -> io::Result<Env> {
        let debian = Path::new(DEBIAN_SCRIPTS);
        let (server, ctl) = if debian.join("rabbitmq-server").is_file() {
            (debian.join("rabbitmq-server"), debian.join("rabbitmqctl"))
        } else if let (Some(server), Some(ctl)) =
            (on_path("rabbitmq-server"), on_path("rabbitmqctl"))
        {
            (server, ctl)
        } else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "RabbitMQ is not installed (no {DEBIAN_SCRIPTS}/rabbitmq-server, and no \
                     rabbitmq-server on PATH); install it with `{INSTALL_HINT}` (or run `.ci/run`, \
                     which installs it)"
                ),
            ));
        };
        Ok(Env {
            server,
            ctl,
            home: PathBuf::new(),
            env_file: PathBuf::new(),
        })
    }
}

/// `name`'s path on `PATH`, if any.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// Writes the Erlang cookie into `home`: the system RabbitMQ's or the
/// user's when readable, a random one otherwise. Erlang refuses a cookie
/// file that others can read, so it is made owner-only.
fn write_cookie(home: &Path) -> io::Result<()> {
    let user = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".erlang.cookie"));
    let cookie = SYSTEM_COOKIES
        .iter()
        .map(PathBuf::from)
        .chain(user)
        .find_map(|path| std::fs::read_to_string(path).ok())
        .map(|text| text.trim().to_owned())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| {
            (0..20)
                .map(|_| char::from(b'A' + rand::random::<u8>() % 26))
                .collect()
        });
    let path = home.join(".erlang.cookie");
    std::fs::write(&path, cookie)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))
}

/// Kills every process of `child`'s process group with `SIGKILL`, reaps
/// `child`, and waits (at most [`KILL_TIMEOUT`]) until no process of the
/// group is left running: the Erlang VM is not our child, so reaping the
/// launcher does not mean the node is gone.
fn kill_group(mut child: Child) {
    // The launcher leads its group, so the group's id is its pid. `sh`'s
    // `kill` reaches a whole group; the standard library's only the leader.
    let group = child.id();
    let _ = Command::new("sh")
        .args(["-c", &format!("kill -9 -{group} 2>/dev/null")])
        .stdin(Stdio::null())
        .status();
    // Errors mean the leader already exited; `wait` reaps it either way.
    let _ = child.kill();
    let _ = child.wait();
    let deadline = Instant::now() + KILL_TIMEOUT;
    while group_alive(group) && Instant::now() < deadline {
        // `kill` and `Drop` cannot await; the kernel tears a killed VM down
        // within milliseconds.
        #[expect(
            clippy::disallowed_methods,
            reason = "a synchronous wait of a few milliseconds for the kernel to end killed processes"
        )]
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a process of process group `group` is still running, from
/// `/proc`. A killed multi-threaded process shows its main thread as a
/// zombie while other threads still end (and hold its sockets open), so
/// every thread counts.
fn group_alive(group: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let Some((pgrp, _)) = stat_fields(&entry.path().join("stat")) else {
            return false;
        };
        if pgrp != group {
            return false;
        }
        let Ok(tasks) = std::fs::read_dir(entry.path().join("task")) else {
            return false;
        };
        tasks.flatten().any(|task| {
            stat_fields(&task.path().join("stat"))
                .is_some_and(|(_, state)| !matches!(state, 'Z' | 'X'))
        })
    })
}

/// The process group and state of a `/proc/.../stat` file.
fn stat_fields(path: &Path) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(path).ok()?;
    // `pid (comm) state ppid pgrp ...`; `comm` may hold spaces and
    // parentheses, so the fields start after the last `)`.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((pgrp, state))
}

/// A port that was free on `127.0.0.1` a moment ago.
fn free_port() -> io::Result<u16> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// The leader's node name of `queue` in `list_queues name leader` output
/// (tab-separated lines, no headers).
fn parse_leader(listing: &str, queue: &str) -> Option<String> {
    listing.lines().find_map(|line| {
        let (name, leader) = line.split_once('\t')?;
        let leader = leader.trim();
        (name == queue && leader.contains('@')).then(|| leader.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_leader() {
        let listing =
            "jobs.p0\tkeel-1a2b-2@localhost\njobs.dead\tkeel-1a2b-1@localhost\nclassic\t\n";
        assert_eq!(
            parse_leader(listing, "jobs.p0").as_deref(),
            Some("keel-1a2b-2@localhost")
        );
        assert_eq!(parse_leader(listing, "classic"), None);
        assert_eq!(parse_leader(listing, "missing"), None);
    }
}
