//! A disposable Redis Cluster: three masters and three replicas on free
//! ports, each node a [`RedisServer`] that a test can kill and restart.

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use keel_core::redis::{SLOTS, key_slot};

use crate::command::succeed_within;
use crate::redis_server::{INSTALL_HINT, RedisServer, free_port};

/// Masters in the cluster; each has one replica.
const MASTERS: usize = 3;

/// How long a node may go unanswered before the others mark it failed
/// (`cluster-node-timeout`, in milliseconds): short, so a failover takes a
/// few seconds.
const NODE_TIMEOUT_MS: &str = "1000";

/// How long `redis-cli --cluster create` and the first agreement get.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on one question to one node.
const QUERY_TIMEOUT: Duration = Duration::from_millis(500);

/// How often [`RedisCluster::wait_healthy`] asks again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// When the steps of [`RedisCluster::fail_over`] ended.
#[derive(Clone, Copy, Debug)]
pub struct Failover {
    /// The master was killed.
    pub killed_at: Instant,
    /// Its replica was promoted and every node agreed.
    pub promoted_at: Instant,
    /// The old master had rejoined (as a replica) and every node agreed.
    pub rejoined_at: Instant,
}

/// A local Redis Cluster of its own: 3 masters and 3 replicas on free
/// ports of `127.0.0.1`, each node with `--cluster-enabled yes`,
/// `--appendonly yes` and its `nodes.conf` in its own temporary directory.
///
/// [`start`](Self::start) creates it with `redis-cli --cluster create …
/// --cluster-replicas 1` and returns once every node says
/// `cluster_state:ok`. A test then [`kill`](Self::kill)s a node (`SIGKILL`)
/// to see its replica promoted ([`wait_healthy`](Self::wait_healthy)), and
/// [`restart`](Self::restart)s it on the same port and directory, where it
/// rejoins (as a replica of whoever took its slots). Nodes notice a dead
/// peer after one second (`cluster-node-timeout 1000`), so a failover takes
/// a few seconds.
///
/// Dropping it kills every node and removes their directories.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use keel_testkit::RedisCluster;
///
/// # async fn demo() -> std::io::Result<()> {
/// let mut cluster = RedisCluster::start().await?;
/// let seeds = cluster.urls(); // what a cluster client is given
/// let master = cluster.master_for_key("user:{42}:name").await?;
/// cluster.kill(master);
/// cluster.wait_healthy(Duration::from_secs(20)).await?; // a replica took over
/// cluster.restart(master).await?; // back, as a replica
/// # Ok(()) }
/// ```
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCluster")
            .field(
                "ports",
                &self.nodes.iter().map(RedisServer::port).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl RedisCluster {
    /// Starts six `redis-server` nodes, joins them into a cluster of three
    /// masters with one replica each, and waits until it is
    /// [healthy](Self::wait_healthy): every node reports `cluster_state:ok`
    /// and every replica is in sync.
    ///
    /// # Errors
    ///
    /// Fails if `redis-server` or `redis-cli` is not on `PATH` (the error
    /// says how to install them), if a node does not start (the error has
    /// its log), if `redis-cli --cluster create` fails (the error has its
    /// output), or if the nodes do not agree within 30 seconds.
    ///
    /// # Cancel safety
    ///
    /// Cancelling the future kills every node it started.
    pub async fn start() -> io::Result<RedisCluster> {
        let mut nodes = Vec::with_capacity(2 * MASTERS);
        for _ in 0..2 * MASTERS {
            let node = RedisServer::start_on(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    NODE_TIMEOUT_MS,
                    // A replica takes over however long it was cut off.
                    "--cluster-replica-validity-factor",
                    "0",
                    "--appendonly",
                    "yes",
                ],
                cluster_port,
            )
            .await?;
            nodes.push(node);
        }
        let mut cluster = RedisCluster { nodes };
        cluster.create().await?;
        cluster.wait_healthy(CREATE_TIMEOUT).await?;
        Ok(cluster)
    }

    /// A cluster shared by the tests of this process that run at the same
    /// time: the first caller starts it, later callers get the same one
    /// while any handle is alive, and it is stopped (every node killed and
    /// its directory removed) when the last handle is dropped. A test that
    /// needs a cluster only as a place to put data (a conformance suite,
    /// one case per test, each in its own namespace) uses it to avoid
    /// starting six servers per case; a test that kills nodes
    /// [starts its own](Self::start).
    ///
    /// # Errors
    ///
    /// As for [`start`](Self::start).
    ///
    /// # Cancel safety
    ///
    /// Cancelling the future kills any node it started; another caller then
    /// starts the cluster.
    pub async fn shared() -> io::Result<Arc<RedisCluster>> {
        static SHARED: tokio::sync::Mutex<Weak<RedisCluster>> =
            tokio::sync::Mutex::const_new(Weak::new());
        let mut shared = SHARED.lock().await;
        if let Some(cluster) = shared.upgrade() {
            return Ok(cluster);
        }
        let cluster = Arc::new(RedisCluster::start().await?);
        *shared = Arc::downgrade(&cluster);
        Ok(cluster)
    }

    /// Runs `redis-cli --cluster create` over the nodes.
    async fn create(&self) -> io::Result<()> {
        let mut command = tokio::process::Command::new("redis-cli");
        command.args(["--cluster", "create"]);
        for node in &self.nodes {
            command.arg(format!("127.0.0.1:{}", node.port()));
        }
        command
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        succeed_within(
            &mut command,
            "redis-cli --cluster create",
            CREATE_TIMEOUT,
            Some(&format!(
                "install it with `{INSTALL_HINT}` (it comes with redis-server, in the redis-tools package)"
            )),
        )
        .await?;
        Ok(())
    }

    /// The URL of every node, `redis://127.0.0.1:<port>/`, in node order:
    /// the seed list a cluster client is given. A node's index in this list
    /// is the one [`kill`](Self::kill) and [`restart`](Self::restart) take.
    #[must_use]
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The number of nodes (6).
    #[must_use]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes: never, it has six (the companion
    /// of [`len`](Self::len)).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `index` itself.
    ///
    /// # Panics
    ///
    /// If `index` is not below [`len`](Self::len).
    #[must_use]
    pub fn node(&self, index: usize) -> &RedisServer {
        &self.nodes[index]
    }

    /// Whether node `index` is running.
    ///
    /// # Panics
    ///
    /// If `index` is not below [`len`](Self::len).
    pub fn is_running(&mut self, index: usize) -> bool {
        self.nodes[index].is_running()
    }

    /// Kills node `index` with `SIGKILL` (see [`RedisServer::kill`]). The
    /// other nodes mark it failed after about a second, and if it was a
    /// master, its replica takes over its slots.
    ///
    /// # Panics
    ///
    /// If `index` is not below [`len`](Self::len).
    pub fn kill(&mut self, index: usize) {
        self.nodes[index].kill();
    }

    /// Starts node `index` again on the same port with the same
    /// `nodes.conf` and append-only file, and waits until it answers
    /// `PING`. It rejoins the cluster on its own; call
    /// [`wait_healthy`](Self::wait_healthy) to wait until every node agrees.
    ///
    /// # Errors
    ///
    /// As for [`RedisServer::restart`].
    ///
    /// # Panics
    ///
    /// If `index` is not below [`len`](Self::len).
    ///
    /// # Cancel safety
    ///
    /// As for [`RedisServer::restart`].
    pub async fn restart(&mut self, index: usize) -> io::Result<()> {
        self.nodes[index].restart().await
    }

    /// A whole failover of master `index`: kills it, waits (up to `within`)
    /// until its replica is promoted and the cluster agrees, restarts it and
    /// waits (up to `within` again) until it has rejoined as a replica of
    /// the promoted node. Answers when each step ended, for tests that
    /// judge what clients saw in each phase.
    ///
    /// # Errors
    ///
    /// As for [`wait_healthy`](Self::wait_healthy) and
    /// [`restart`](Self::restart), with what failed.
    ///
    /// # Panics
    ///
    /// If `index` is not below [`len`](Self::len).
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: a cancelled call may leave the node killed.
    pub async fn fail_over(&mut self, index: usize, within: Duration) -> io::Result<Failover> {
        self.kill(index);
        let killed_at = Instant::now();
        self.wait_healthy(within).await?;
        let promoted_at = Instant::now();
        // The promoted replica has no replica of its own until the old
        // master rejoins as one.
        self.restart(index).await?;
        self.wait_healthy(within).await?;
        Ok(Failover {
            killed_at,
            promoted_at,
            rejoined_at: Instant::now(),
        })
    }

    /// The index of the node that is master for `key`'s slot, as the first
    /// node that answers sees it (see [`master_for_slot`](Self::master_for_slot)).
    ///
    /// # Errors
    ///
    /// As for [`master_for_slot`](Self::master_for_slot).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    pub async fn master_for_key(&self, key: impl AsRef<[u8]>) -> io::Result<usize> {
        self.master_for_slot(key_slot(key.as_ref())).await
    }

    /// The index of the node that is master for `slot`, as the first node
    /// that answers sees it in `CLUSTER NODES`. Right after a [`kill`](Self::kill),
    /// that may still be the killed node: call
    /// [`wait_healthy`](Self::wait_healthy) first.
    ///
    /// # Errors
    ///
    /// Fails when no node is running or answers, or when no master that is
    /// not marked failed serves the slot (a failover is under way).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    pub async fn master_for_slot(&self, slot: u16) -> io::Result<usize> {
        let mut last_error = io::Error::other("no node of the cluster is running");
        // A killed node refuses the connection at once: ask the next.
        for index in 0..self.nodes.len() {
            match self.view_of(index).await {
                Ok(view) => {
                    let Some(port) = view.master_for(slot) else {
                        return Err(io::Error::other(format!(
                            "no live master serves slot {slot} as node {index} sees it \
                             (a failover may be under way; call wait_healthy first)"
                        )));
                    };
                    return self.index_of(port);
                }
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    /// Waits until the cluster is healthy again, at most `within`: every
    /// running node says `cluster_state:ok`, every slot is served, as each
    /// running node sees it, by a master that is running and not marked
    /// failed, and every running replica is in sync with its master
    /// (`master_link_status:up`). After a [`kill`](Self::kill) of a master this is when
    /// its replica has been promoted and every node knows it.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::TimedOut`] naming what was still wrong.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    pub async fn wait_healthy(&mut self, within: Duration) -> io::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let problem = match self.problem().await {
                None => return Ok(()),
                Some(problem) => problem,
            };
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the redis cluster was not healthy within {within:?}: {problem}"),
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// What keeps the cluster from being healthy, if anything.
    async fn problem(&mut self) -> Option<String> {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&index| self.nodes[index].is_running())
            .collect();
        if running.is_empty() {
            return Some("no node is running".to_owned());
        }
        let running_ports: Vec<u16> = running.iter().map(|&i| self.nodes[i].port()).collect();
        for &index in &running {
            let url = self.nodes[index].url();
            let state = match query(&url, "INFO").await {
                Ok(info) => info,
                Err(error) => return Some(format!("node {index} does not answer: {error}")),
            };
            if !state.lines().any(|line| line.trim() == "cluster_state:ok") {
                return Some(format!("node {index} does not say cluster_state:ok"));
            }
            let replication = match info(&url, "replication").await {
                Ok(text) => text,
                Err(error) => return Some(format!("node {index} does not answer: {error}")),
            };
            let replica = replication.lines().any(|line| line.trim() == "role:slave");
            if replica
                && !replication
                    .lines()
                    .any(|line| line.trim() == "master_link_status:up")
            {
                return Some(format!(
                    "replica node {index} is not in sync with its master"
                ));
            }
            let view = match self.view_of(index).await {
                Ok(view) => view,
                Err(error) => return Some(error.to_string()),
            };
            for slot in 0..SLOTS {
                match view.master_for(slot) {
                    Some(port) if running_ports.contains(&port) => {}
                    Some(port) => {
                        return Some(format!(
                            "node {index} sees slot {slot} on 127.0.0.1:{port}, which is not running"
                        ));
                    }
                    None => {
                        return Some(format!("node {index} sees no live master for slot {slot}"));
                    }
                }
            }
        }
        None
    }

    /// Node `index`'s `CLUSTER NODES`.
    async fn view_of(&self, index: usize) -> io::Result<View> {
        let url = self.nodes[index].url();
        let text = query(&url, "NODES").await.map_err(|error| {
            io::Error::other(format!(
                "node {index} ({url}) does not answer CLUSTER NODES: {error}"
            ))
        })?;
        Ok(View::parse(&text))
    }

    fn index_of(&self, port: u16) -> io::Result<usize> {
        self.nodes
            .iter()
            .position(|node| node.port() == port)
            .ok_or_else(|| {
                io::Error::other(format!("127.0.0.1:{port} is not a node of this cluster"))
            })
    }
}

/// Which master serves which slots, from one node's `CLUSTER NODES`.
struct View {
    /// (port, first slot, last slot) of each live master's ranges.
    ranges: Vec<(u16, u16, u16)>,
}

/// Sets `key` to `v-{key}`, the value a test reads back after a failover.
///
/// # Panics
///
/// When the `SET` fails.
pub async fn set_marked<C: redis::aio::ConnectionLike>(connection: &mut C, key: &str) {
    redis::cmd("SET")
        .arg(key)
        .arg(format!("v-{key}"))
        .query_async::<()>(connection)
        .await
        .unwrap_or_else(|err| panic!("SET {key}: {err}"));
}

/// Waits (Redis `WAIT 1`, up to `timeout`) until the writes made so far on
/// `connection` are acknowledged by a replica, and panics otherwise: after
/// it a master can be killed without losing them. On a cluster connection
/// `WAIT` goes to every master and answers the smallest count.
///
/// # Panics
///
/// When the command fails or no replica acknowledged in time.
pub async fn assert_replicated<C: redis::aio::ConnectionLike>(
    connection: &mut C,
    timeout: Duration,
) {
    let millis = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(millis)
        .query_async(connection)
        .await
        .expect("WAIT answers");
    assert_eq!(
        acked, 1,
        "no replica acknowledged the writes within {timeout:?}"
    );
}

impl View {
    fn parse(text: &str) -> View {
        let mut ranges = Vec::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                continue;
            }
            let flags: Vec<&str> = fields[2].split(',').collect();
            if !flags.contains(&"master") || flags.contains(&"fail") {
                continue;
            }
            // `ip:port@cport[,hostname]`
            let Some(port) = fields[1]
                .split('@')
                .next()
                .and_then(|addr| addr.rsplit(':').next())
                .and_then(|port| port.parse().ok())
            else {
                continue;
            };
            for range in &fields[8..] {
                // `[slot->-id]` / `[slot-<-id]`: a migration, not ownership.
                if range.starts_with('[') {
                    continue;
                }
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(first), Ok(last)) = (first.parse(), last.parse()) {
                    ranges.push((port, first, last));
                }
            }
        }
        View { ranges }
    }

    fn master_for(&self, slot: u16) -> Option<u16> {
        self.ranges
            .iter()
            .find(|(_, first, last)| (*first..=*last).contains(&slot))
            .map(|(port, _, _)| *port)
    }
}

/// A free port whose cluster bus port (port + 10000) is free too.
fn cluster_port() -> io::Result<u16> {
    for _ in 0..100 {
        let port = free_port()?;
        let Some(bus) = port.checked_add(10000) else {
            continue;
        };
        if std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, bus)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::other(
        "found no free port whose cluster bus port (port + 10000) is free too",
    ))
}

/// `CLUSTER <what>` (`INFO` or `NODES`) on the node at `url`, bounded.
async fn query(url: &str, what: &str) -> Result<String, String> {
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg(what);
    ask(url, cmd).await
}

/// `INFO <section>` on the node at `url`, bounded.
async fn info(url: &str, section: &str) -> Result<String, String> {
    let mut cmd = redis::cmd("INFO");
    cmd.arg(section);
    ask(url, cmd).await
}

/// `cmd`'s text answer from the node at `url`, bounded.
async fn ask(url: &str, cmd: redis::Cmd) -> Result<String, String> {
    let attempt = async {
        let client = redis::Client::open(url)?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(QUERY_TIMEOUT))
            .set_response_timeout(Some(QUERY_TIMEOUT));
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        cmd.query_async::<String>(&mut connection).await
    };
    match tokio::time::timeout(QUERY_TIMEOUT * 2, attempt).await {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_elapsed) => Err(format!("no answer within {:?}", QUERY_TIMEOUT * 2)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_nodes() {
        let text = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002 master - 0 1426238316232 2 connected 5461-10922
292f 127.0.0.1:30003@40003 master - 0 1426238318243 3 connected 10923-16383 [77->-e7d1]
6ec2 127.0.0.1:30005@40005 master,fail 67ed 1426238316232 0 5 connected
e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
";
        let view = View::parse(text);
        assert_eq!(view.master_for(0), Some(30001));
        assert_eq!(view.master_for(5461), Some(30002));
        assert_eq!(view.master_for(16383), Some(30003));
        assert_eq!(view.master_for(77), Some(30001));
    }
}
