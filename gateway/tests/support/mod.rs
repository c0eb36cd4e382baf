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

/// Writes `config` as a TOML file in a new temporary directory (removed
/// when the returned guard is dropped); returns the guard and the path.
pub fn config_file(config: &GatewayConfig) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, toml::to_string(config).unwrap()).unwrap();
    (dir, path)
}

impl GatewayProcess {
    /// Starts the binary on `config` (its `listen` replaced by a free
    /// loopback port) and returns once it is ready.
    pub async fn start(mut config: GatewayConfig) -> GatewayProcess {
        config.listen = "127.0.0.1:0".parse().unwrap();
        let (dir, path) = config_file(&config);
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

/// A `keel-worker` process (the binary) on a gateway's config file, with
/// its `/healthz` and `/metrics` on a free loopback port; killed with
/// SIGKILL when dropped.
pub struct WorkerChild {
    pub child: std::process::Child,
    pub url: String,
}

impl WorkerChild {
    /// Starts the binary on the config file at `config` and returns once
    /// it listens (it has connected its queue by then).
    pub fn spawn(config: &std::path::Path) -> WorkerChild {
        let (child, url) = spawn_announcing(
            std::process::Command::new(env!("CARGO_BIN_EXE_keel-worker"))
                .arg("--config")
                .arg(config)
                .arg("--listen")
                .arg("127.0.0.1:0"),
            "keel-worker",
        );
        WorkerChild { child, url }
    }

    /// Kills it with SIGKILL (no drain) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerChild {
    fn drop(&mut self) {
        self.kill();
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

/// A chat request with key `key` whose prompt (`hello`) is estimated at 1
/// token, asking for `max_tokens` (the fake node answers exactly that many,
/// so it costs 1 + `max_tokens` tokens, as reserved).
pub fn chat_as(url: &str, key: &str, max_tokens: u32, stream: bool) -> reqwest::RequestBuilder {
    chat_with(&reqwest::Client::new(), url, key, max_tokens, stream)
}

/// [`chat_as`] on `client` (its connections reused).
pub fn chat_with(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    max_tokens: u32,
    stream: bool,
) -> reqwest::RequestBuilder {
    client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&serde_json::json!({
            "model": MODEL,
            "stream": stream,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hello"}],
        }))
}

/// [`chat_as`] with [`KEY`].
pub fn chat(url: &str, max_tokens: u32, stream: bool) -> reqwest::RequestBuilder {
    chat_as(url, KEY, max_tokens, stream)
}

/// A deterministic chat request (`temperature` 0, 4 tokens) for `prompt`
/// with key `key` on `client`, which the gateway's cache answers when it
/// can.
pub fn deterministic_chat(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    prompt: &str,
) -> reqwest::RequestBuilder {
    client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&serde_json::json!({
            "model": MODEL,
            "temperature": 0,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": prompt}],
        }))
}

/// What callers pressing on one token limit saw.
#[derive(Debug, Default)]
pub struct LimitRun {
    /// Requests answered 200.
    pub admitted: u64,
    /// Requests answered 429.
    pub limited: u64,
    /// Requests answered anything else, by status.
    pub other: std::collections::BTreeMap<u16, u64>,
    /// Requests that got no answer (a transport error or 30 s without one).
    pub unanswered: u64,
    /// From the first request to the last answer.
    pub elapsed: Duration,
}

impl LimitRun {
    /// Tokens admitted (100 a request).
    pub fn admitted_tokens(&self) -> f64 {
        self.admitted as f64 * 100.0
    }

    /// What GCRA allows over the run on the server's clock, for
    /// `tokens_per_minute` with a bucket of one minute's tokens: the burst
    /// plus the rate times the elapsed time.
    pub fn allowed_tokens(&self, tokens_per_minute: u64) -> f64 {
        let rate = tokens_per_minute as f64 / 60.0;
        tokens_per_minute as f64 + rate * self.elapsed.as_secs_f64()
    }

    /// Asserts the limit was reached and the tokens admitted are within
    /// `tolerance` (0.02 for 2 %) of what it allows, give or take one
    /// request; returns admitted / allowed.
    pub fn assert_within(&self, tokens_per_minute: u64, tolerance: f64) -> f64 {
        let allowed = self.allowed_tokens(tokens_per_minute);
        let admitted = self.admitted_tokens();
        assert!(self.limited > 0, "the limit was never reached: {self:?}");
        assert!(
            admitted <= allowed * (1.0 + tolerance) + 100.0
                && admitted >= allowed * (1.0 - tolerance) - 100.0,
            "admitted {admitted} tokens, the limit allows {allowed:.0} over {:.2}s ({self:?})",
            self.elapsed.as_secs_f64()
        );
        admitted / allowed
    }
}

/// `callers` callers per URL in `urls` send 100-token chat requests
/// ([`chat_as`] with `key`, `max_tokens` 99, each bounded to 30 s) for
/// `run`, each pausing `pause` after every answer, and count the answers.
pub async fn press_on_limit(
    urls: &[String],
    key: &str,
    callers: usize,
    run: Duration,
    pause: Duration,
) -> LimitRun {
    let started = tokio::time::Instant::now();
    let tasks: Vec<_> = urls
        .iter()
        .flat_map(|url| (0..callers).map(move |_| url.clone()))
        .map(|url| {
            let key = key.to_owned();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut seen = LimitRun::default();
                while started.elapsed() < run {
                    let status = chat_with(&client, &url, &key, 99, false)
                        .timeout(Duration::from_secs(30))
                        .send()
                        .await
                        .map(|answer| answer.status().as_u16());
                    match status {
                        Ok(200) => seen.admitted += 1,
                        Ok(429) => seen.limited += 1,
                        Ok(other) => *seen.other.entry(other).or_default() += 1,
                        Err(_) => seen.unanswered += 1,
                    }
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
                seen
            })
        })
        .collect();
    let mut total = LimitRun::default();
    for task in tasks {
        let seen = task.await.unwrap();
        total.admitted += seen.admitted;
        total.limited += seen.limited;
        for (status, count) in seen.other {
            *total.other.entry(status).or_default() += count;
        }
        total.unanswered += seen.unanswered;
    }
    total.elapsed = started.elapsed();
    total
}

/// Two `keel-gateway` processes, each in front of the same two instant
/// fake nodes, sharing the Redis that `shared` puts in their config;
/// tenant `tenant` (key [`KEY`]) may use 3,000 tokens a minute. Twelve
/// callers press on the limit for 2 s: the tokens admitted through both
/// must be within 2 % of what one limit allows (GCRA on the server's
/// clock: the burst plus the rate times the elapsed time).
pub async fn two_gateways_share_a_token_limit(
    shared: impl FnOnce(&mut GatewayConfig),
    tenant: &str,
) -> LimitRun {
    // 3,000 tokens a minute (50 a second), a bucket of one minute's
    // tokens; every request costs 1 (prompt) + 99 (max_tokens) = 100
    // tokens, as used.
    let nodes = [
        FakeNode::start(FakeNodeConfig::instant(), "127.0.0.1:0")
            .await
            .unwrap(),
        FakeNode::start(FakeNodeConfig::instant(), "127.0.0.1:0")
            .await
            .unwrap(),
    ];
    let mut config = config_for(&nodes);
    shared(&mut config);
    config.tenants[0].name = tenant.to_owned();
    config.tenants[0].tokens_per_minute = Some(3_000);
    config.keys[0].tenant = tenant.to_owned();
    let a = GatewayProcess::start(config.clone()).await;
    let b = GatewayProcess::start(config).await;
    let run = press_on_limit(
        &[a.url.clone(), b.url.clone()],
        KEY,
        6,
        Duration::from_secs(2),
        Duration::ZERO,
    )
    .await;
    assert!(
        run.other.is_empty() && run.unanswered == 0,
        "only 200 and 429 are expected: {run:?}"
    );
    let ratio = run.assert_within(3_000, 0.02);
    println!(
        "shared limit: {} admitted, {} limited over {:.2}s; {:.0} tokens admitted of {:.0} allowed ({ratio:.3})",
        run.admitted,
        run.limited,
        run.elapsed.as_secs_f64(),
        run.admitted_tokens(),
        run.allowed_tokens(3_000),
    );
    drop((a, b));
    run
}

/// The sum of the samples of metric `name` whose labels contain `label`
/// (`""`: all) in the Prometheus text at `{url}/metrics`; 0 when it has
/// none.
pub async fn metric(url: &str, name: &str, label: &str) -> f64 {
    let text = reqwest::Client::new()
        .get(format!("{url}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("the process answers /metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
                && line.contains(label)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
