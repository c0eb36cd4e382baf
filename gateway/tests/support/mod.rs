//! A gateway in front of fake nodes, all on loopback, for the tests.

#![allow(dead_code, unreachable_pub)]

#[cfg(feature = "real-model")]
pub mod embed;

use std::time::Duration;

use keel_gateway::config::{KeyConfig, ModelConfig, Tenant};
use keel_gateway::fake_node::{FakeNode, FakeNodeConfig};
use keel_gateway::{Gateway, GatewayConfig};

/// The API key every test uses.
pub const KEY: &str = "sk-test-key";
/// The model the nodes serve.
pub const MODEL: &str = "fake-model";

/// A running gateway and its nodes.
pub struct Setup {
    pub nodes: Vec<FakeNode>,
    pub url: String,
    pub gateway: tokio::task::JoinHandle<std::io::Result<()>>,
    pub shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.gateway.abort();
    }
}

/// A `keel-gateway` process (the binary, started from a TOML file written
/// from a config); killed when dropped.
pub struct GatewayProcess {
    pub child: std::process::Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// Starts the binary on `config` (its `listen` replaced by a free
    /// loopback port) and returns once it is ready.
    pub async fn start(mut config: GatewayConfig) -> GatewayProcess {
        config.listen = "127.0.0.1:0".parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        let (child, url) = spawn_announcing(
            std::process::Command::new(env!("CARGO_BIN_EXE_keel-gateway"))
                .arg("--config")
                .arg(&path),
            "keel-gateway",
        );
        wait_ready(&url, config.models.len()).await;
        GatewayProcess {
            child,
            url,
            _dir: dir,
        }
    }

    /// Sends SIGTERM (graceful drain).
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `command` (logs at `warn`, stdout piped) and reads the
/// `listening on ADDR` line it prints first; returns the child and
/// `http://ADDR`.
pub fn spawn_announcing(
    command: &mut std::process::Command,
    what: &str,
) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = command
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("{what} does not start: {err}"));
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{what} prints its address first, not {line:?} (see its stderr)"))
        .to_owned();
    (child, format!("http://{addr}"))
}

/// Waits for load callers, each answering `(ok, failed)`, and adds them up.
pub async fn sum_callers(callers: Vec<tokio::task::JoinHandle<(u64, u64)>>) -> (u64, u64) {
    let mut totals = (0, 0);
    for caller in callers {
        let (ok, failed) = caller.await.unwrap();
        totals.0 += ok;
        totals.1 += failed;
    }
    totals
}

/// The configuration [`start`] gives a gateway in front of `nodes`: one
/// model, tenant `acme`, key [`KEY`], probes every 100 ms.
pub fn config_for(nodes: &[FakeNode]) -> GatewayConfig {
    let mut config = GatewayConfig::default();
    config.probe_interval = Duration::from_millis(100);
    config.models = vec![ModelConfig::new(MODEL, nodes.iter().map(FakeNode::url))];
    config.tenants = vec![Tenant::new("acme")];
    config.keys = vec![KeyConfig::new(KEY, "acme")];
    config
}

/// `n` fake nodes with `node` settings behind a gateway configured by
/// `tweak`, ready (every node probed healthy) when this returns.
pub async fn start(
    n: usize,
    node: FakeNodeConfig,
    tweak: impl FnOnce(&mut GatewayConfig),
) -> Setup {
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(FakeNode::start(node.clone(), "127.0.0.1:0").await.unwrap());
    }
    let mut config = config_for(&nodes);
    tweak(&mut config);
    serve(config, nodes).await
}

/// Serves a gateway on `config` (in this process, on a free loopback port)
/// in front of `nodes`; ready when this returns.
pub async fn serve(config: GatewayConfig, nodes: Vec<FakeNode>) -> Setup {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let gateway = Gateway::new(config).await.expect("a valid config");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(gateway.serve(listener, async {
        let _ = rx.await;
    }));
    let setup = Setup {
        nodes,
        url,
        gateway: server,
        shutdown: Some(tx),
    };
    wait_ready(&setup.url, setup.nodes.len()).await;
    setup
}

/// Waits until `/readyz` lists the model and every node has been probed.
pub async fn wait_ready(url: &str, _nodes: usize) {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(answer) = client.get(format!("{url}/readyz")).send().await
            && answer.status() == 200
        {
            // Give the other nodes a probe round to join.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway at {url} never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An async-openai client for the gateway.
pub fn openai(url: &str) -> async_openai::Client<async_openai::config::OpenAIConfig> {
    async_openai::Client::with_config(
        async_openai::config::OpenAIConfig::new()
            .with_api_base(format!("{url}/v1"))
            .with_api_key(KEY),
    )
}

/// Sum of a stat over the nodes.
pub fn total(nodes: &[FakeNode], stat: impl Fn(keel_gateway::fake_node::Stats) -> u64) -> u64 {
    nodes.iter().map(|n| stat(n.stats())).sum()
}

/// Sends `request` and reads the answer as JSON.
pub async fn json_of(request: reqwest::RequestBuilder) -> serde_json::Value {
    request
        .send()
        .await
        .expect("the server answers")
        .json()
        .await
        .expect("a JSON answer")
}

/// `GET {url}{path}` with the test key, as JSON.
pub async fn get_json(url: &str, path: &str) -> serde_json::Value {
    json_of(
        reqwest::Client::new()
            .get(format!("{url}{path}"))
            .bearer_auth(KEY),
    )
    .await
}

/// Polls `GET /v1/jobs/{id}` until the job leaves `queued` (at most
/// `within`), and returns its record.
pub async fn wait_job(url: &str, id: &str, within: Duration) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let record = get_json(url, &format!("/v1/jobs/{id}")).await;
        if record["status"] != "queued" {
            return record;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} never finished: {record}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a chat request in durable mode (`x-keel-mode: queue`), checks the
/// 202, and returns the job id.
pub async fn enqueue_chat(url: &str, content: &str) -> String {
    let accepted = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-keel-mode", "queue")
        .json(&serde_json::json!({
            "model": MODEL,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": content}],
        }))
        .send()
        .await
        .expect("the gateway answers");
    assert_eq!(accepted.status(), 202);
    let body: serde_json::Value = accepted.json().await.expect("a JSON answer");
    assert_eq!(body["status"], "queued");
    body["id"].as_str().expect("a job id").to_owned()
}
