//! keel-gateway against LiteLLM's proxy, both in front of the same
//! `keel-fake-node --instant`, driven by the same load generator, in one
//! run; the node alone (direct) is the baseline.
//!
//! ```text
//! cargo run --release -p keel-gateway --example bench
//! ```
//!
//! The bench builds the `keel-gateway` and `keel-fake-node` binaries of its
//! own profile (`cargo build --release -p keel-gateway --bins`; `--no-build`
//! skips that), starts them as processes on 127.0.0.1, and installs LiteLLM's
//! proxy (`litellm[proxy]` from the Python package index) into
//! `target/litellm-venv` through `gateway/bench/litellm.sh` when it is not
//! there yet. The LiteLLM rows are skipped, with a message saying why, only
//! when that install fails (or with `--no-litellm`).
//!
//! Every request is `POST /v1/chat/completions` with one user message and
//! `max_tokens: 16` (the node answers 16 tokens at once), non-streaming or
//! with `stream: true`. Loads:
//!
//! - **open loop** at a fixed rate (requests sent on schedule whatever the
//!   answers do): 50 req/s for all three targets, and 500 req/s for the node
//!   and keel-gateway (LiteLLM's proxy falls behind well below that);
//! - **closed loop** (saturation): 32 connections, each sending its next
//!   request as soon as the last one is answered.
//!
//! Latency is measured from just before a request is sent to the end of
//! its body (full) and to its first body byte (TTFB, streaming). "Added"
//! is a target's percentile minus the node's at the same load in the same
//! run. The last line printed is one JSON object:
//! `{"direct_rps": N, "keel_rps": N, "litellm_rps": N, "keel_added_p50_ms": X,
//! "keel_added_p99_ms": X, "litellm_added_p50_ms": X, "added_p50_vs_litellm": R}`
//! where `*_rps` are closed-loop non-streaming throughputs, keel's added
//! latency is at 500 req/s, LiteLLM's at 50 req/s, and the ratio is
//! `keel_added_p50_ms / litellm_added_p50_ms`.

#[path = "common/machine.rs"]
mod machine;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The API key keel-gateway and LiteLLM (as its master key) accept; every
/// target gets it.
const API_KEY: &str = "sk-keel-bench-5f0c2a9e41d7b38c";
/// Longest wait for one answer; slower counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests in flight at most in an open loop; beyond, a request is not
/// sent and counts as failed.
const MAX_IN_FLIGHT: usize = 4_096;
/// Requests at most in one phase, whatever its duration.
const MAX_REQUESTS: u64 = 2_000_000;

#[derive(Debug, Parser)]
struct Args {
    /// Rate of the moderate open-loop load on the node and keel-gateway.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Rate of the open-loop load that every target, LiteLLM included, gets.
    #[arg(long, default_value_t = 50.0)]
    low_rate: f64,
    /// Connections of the closed-loop (saturation) load.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds of each open-loop phase.
    #[arg(long, default_value_t = 10.0)]
    open_secs: f64,
    /// Seconds of each closed-loop phase.
    #[arg(long, default_value_t = 5.0)]
    closed_secs: f64,
    /// Skip the LiteLLM rows.
    #[arg(long)]
    no_litellm: bool,
    /// Do not build the binaries (they must be next to this example's
    /// profile directory already).
    #[arg(long)]
    no_build: bool,
}

/// Where requests go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Target {
    Direct,
    Keel,
    LiteLlm,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Direct => "direct (node)",
            Target::Keel => "keel-gateway",
            Target::LiteLlm => "LiteLLM proxy",
        }
    }
}

/// How load is offered.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Load {
    /// `rate` requests per second on schedule.
    Open { rate: f64 },
    /// `connections` clients, each waiting for its answer.
    Closed { connections: usize },
}

impl Load {
    fn label(self) -> String {
        match self {
            Load::Open { rate } => format!("open {rate:.0} req/s"),
            Load::Closed { connections } => format!("closed {connections} conns"),
        }
    }
}

/// One measured phase: a load, streaming or not, for some time.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Phase {
    load: Load,
    stream: bool,
    duration: Duration,
}

/// What one request gave.
#[derive(Clone, Copy, Debug)]
struct Sample {
    first_byte: Duration,
    total: Duration,
}

/// What a phase gave.
#[derive(Debug, Default)]
struct Outcome {
    ok: u64,
    failed: u64,
    elapsed: Duration,
    total: Vec<Duration>,
    first_byte: Vec<Duration>,
    /// Open loop: how far behind schedule the generator sent, at most.
    lag: Duration,
    errors: HashMap<String, u64>,
}

impl Outcome {
    fn record(&mut self, result: Result<Sample, String>) {
        match result {
            Ok(sample) => {
                self.ok += 1;
                self.total.push(sample.total);
                self.first_byte.push(sample.first_byte);
            }
            Err(err) => {
                self.failed += 1;
                *self.errors.entry(err).or_default() += 1;
            }
        }
    }

    fn record_all(&mut self, done: Result<Vec<Result<Sample, String>>, tokio::task::JoinError>) {
        match done {
            Ok(results) => results.into_iter().for_each(|r| self.record(r)),
            Err(err) => self.record(Err(format!("task: {err}"))),
        }
    }

    fn finish(&mut self) {
        self.total.sort_unstable();
        self.first_byte.sort_unstable();
    }

    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn p(&self, q: f64) -> Option<f64> {
        percentile(&self.total, q)
    }

    fn ttfb(&self, q: f64) -> Option<f64> {
        percentile(&self.first_byte, q)
    }
}

/// The `q` quantile of sorted durations, in ms.
fn percentile(sorted: &[Duration], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    Some(sorted[index].as_secs_f64() * 1e3)
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .build(connector)
}

/// The requests a target gets.
#[derive(Clone, Debug)]
struct Endpoint {
    url: http::Uri,
    plain: Bytes,
    streaming: Bytes,
}

impl Endpoint {
    fn new(base: &str) -> Self {
        let body = |stream: bool| {
            Bytes::from(
                serde_json::json!({
                    "model": "fake-model",
                    "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
                    "max_tokens": 16,
                    "stream": stream,
                })
                .to_string(),
            )
        };
        Endpoint {
            url: format!("{base}/v1/chat/completions")
                .parse()
                .expect("a valid URL"),
            plain: body(false),
            streaming: body(true),
        }
    }
}

/// Sends one request and reads its whole answer.
async fn one(client: &HttpClient, endpoint: &Endpoint, stream: bool) -> Result<Sample, String> {
    let body = if stream {
        endpoint.streaming.clone()
    } else {
        endpoint.plain.clone()
    };
    let request = http::Request::post(endpoint.url.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::AUTHORIZATION, format!("Bearer {API_KEY}"))
        .body(Full::new(body))
        .map_err(|err| err.to_string())?;
    let start = Instant::now();
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|err| format!("transport: {err}"))?;
        let status = response.status();
        let mut body = response.into_body();
        let mut first_byte = None;
        let mut tail: Vec<u8> = Vec::with_capacity(64);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|err| format!("body: {err}"))?;
            if let Some(data) = frame.data_ref() {
                if first_byte.is_none() && !data.is_empty() {
                    first_byte = Some(start.elapsed());
                }
                tail.extend_from_slice(data);
                if tail.len() > 32 {
                    tail.drain(..tail.len() - 32);
                }
            }
        }
        let total = start.elapsed();
        if !status.is_success() {
            return Err(format!("status {}", status.as_u16()));
        }
        if stream && !tail.windows(6).any(|w| w == b"[DONE]") {
            return Err("stream ended without [DONE]".to_owned());
        }
        Ok(Sample {
            first_byte: first_byte.unwrap_or(total),
            total,
        })
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err("timeout".to_owned()))
}

/// Runs one phase against `endpoint`.
async fn run_phase(endpoint: &Endpoint, phase: Phase) -> Outcome {
    let client = client();
    let endpoint = Arc::new(endpoint.clone());
    let mut outcome = Outcome::default();
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    match phase.load {
        Load::Open { rate } => {
            let interval = Duration::from_secs_f64(1.0 / rate);
            let count = ((rate * phase.duration.as_secs_f64()) as u64).min(MAX_REQUESTS);
            let mut next = start;
            for _ in 0..count {
                tokio::time::sleep_until(next).await;
                outcome.lag = outcome.lag.max(next.elapsed());
                next += interval;
                while let Some(done) = tasks.try_join_next() {
                    outcome.record_all(done);
                }
                if tasks.len() >= MAX_IN_FLIGHT {
                    outcome.record(Err("generator: too many in flight".to_owned()));
                    continue;
                }
                let (client, endpoint) = (client.clone(), endpoint.clone());
                tasks.spawn(async move { vec![one(&client, &endpoint, phase.stream).await] });
            }
        }
        Load::Closed { connections } => {
            let stop = start + phase.duration;
            let per_connection = MAX_REQUESTS / connections as u64;
            for _ in 0..connections {
                let (client, endpoint) = (client.clone(), endpoint.clone());
                tasks.spawn(async move {
                    let mut results = Vec::new();
                    while Instant::now() < stop && (results.len() as u64) < per_connection {
                        results.push(one(&client, &endpoint, phase.stream).await);
                    }
                    results
                });
            }
        }
    }
    // Every request has its own timeout; this bounds the wait regardless.
    let give_up = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(give_up, tasks.join_next()).await {
            Ok(Some(done)) => outcome.record_all(done),
            Ok(None) => break,
            Err(_) => {
                let left = tasks.len() as u64;
                tasks.abort_all();
                outcome.failed += left;
                *outcome.errors.entry("abandoned".to_owned()).or_default() += left;
                break;
            }
        }
    }
    outcome.elapsed = start.elapsed();
    outcome.finish();
    outcome
}

/// A process we started; killed when dropped.
struct Process {
    name: &'static str,
    child: Child,
}

impl Process {
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// Reads stdout up to the `listening on ADDR` line the Keel binaries print
/// (log lines may come before it), then keeps draining it into `log`.
async fn listening_addr(name: &str, child: &mut Child, log: PathBuf) -> Result<SocketAddr, String> {
    let stdout = child.stdout.take().ok_or("stdout is not piped")?;
    let mut lines = BufReader::new(stdout);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while seen.len() < 1_000 {
        let mut line = String::new();
        match tokio::time::timeout_at(deadline, lines.read_line(&mut line)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
        if let Some(addr) = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|addr| addr.parse().ok())
        {
            let _ = std::fs::write(&log, seen.concat());
            tokio::spawn(drain(lines, log));
            return Ok(addr);
        }
        seen.push(line);
    }
    Err(format!(
        "{name} did not print `listening on ADDR` within 20 s; it printed {:?}",
        seen.concat()
    ))
}

async fn drain(mut from: impl AsyncRead + Unpin, log: PathBuf) {
    if let Ok(mut file) = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .await
    {
        let _ = tokio::io::copy(&mut from, &mut file).await;
    } else {
        let _ = tokio::io::copy(&mut from, &mut tokio::io::sink()).await;
    }
}

fn log_file(dir: &Path, name: &str) -> (PathBuf, Stdio) {
    let path = dir.join(format!("{name}.log"));
    let stdio = std::fs::File::create(&path)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null());
    (path, stdio)
}

/// Starts a Keel binary that prints `listening on ADDR`; its stderr goes
/// to `<dir>/<name>.log`, its stdout to `<dir>/<name>.stdout.log`.
async fn start_keel_binary(
    name: &'static str,
    bin: &Path,
    args: &[&str],
    dir: &Path,
) -> Result<(Process, SocketAddr), String> {
    let (_, stderr) = log_file(dir, name);
    let log = dir.join(format!("{name}.stdout.log"));
    let mut child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| format!("cannot start {}: {err}", bin.display()))?;
    let addr = listening_addr(name, &mut child, log).await?;
    Ok((Process { name, child }, addr))
}

/// Builds the two binaries of this example's profile; answers their folder.
fn build_binaries(no_build: bool) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|err| format!("current_exe: {err}"))?;
    // target/<profile>/examples/bench
    let bin_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot find the target directory")?
        .to_path_buf();
    let profile = bin_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("release")
        .to_owned();
    if profile != "release" {
        eprintln!(
            "bench: warning: built as `{profile}`; run with --release for meaningful numbers"
        );
    }
    if !no_build {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        // `--example bench` too: the same targets as the `cargo run` that
        // started us, so the same features, so nothing is rebuilt twice.
        eprintln!("bench: cargo build --profile {profile} -p keel-gateway --bins --example bench");
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "--profile",
                &profile,
                "-p",
                "keel-gateway",
                "--bins",
                "--example",
                "bench",
            ])
            .arg("--manifest-path")
            .arg(&manifest)
            .stdin(Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            return Err(
                "building the binaries failed; run `cargo build --release -p keel-gateway --bins`"
                    .to_owned(),
            );
        }
    }
    for name in ["keel-gateway", "keel-fake-node"] {
        if !bin_dir.join(name).is_file() {
            return Err(format!(
                "{} is missing; run `cargo build --release -p keel-gateway --bins` first",
                bin_dir.join(name).display()
            ));
        }
    }
    Ok(bin_dir)
}

/// Installs LiteLLM's proxy when needed; answers the `litellm` executable,
/// or why it cannot be had.
async fn install_litellm() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/litellm.sh");
    eprintln!(
        "bench: LiteLLM: {} (installs litellm[proxy] into target/litellm-venv once)",
        script.display()
    );
    let run = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(900), run)
        .await
        .map_err(|_| "the install took over 15 minutes".to_owned())?
        .map_err(|err| format!("cannot run {}: {err}", script.display()))?;
    if !output.status.success() {
        return Err(format!("{} failed ({})", script.display(), output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} printed no litellm executable",
            script.display()
        ))
    }
}

/// Starts LiteLLM's proxy (one worker) with `fake-model` pointing at the
/// node as an OpenAI-compatible upstream.
async fn start_litellm(
    litellm: &Path,
    node: SocketAddr,
    dir: &Path,
) -> Result<(Process, SocketAddr), String> {
    let config = dir.join("litellm.yaml");
    let yaml = format!(
        "model_list:\n  - model_name: fake-model\n    litellm_params:\n      \
         model: openai/fake-model\n      api_base: http://{node}/v1\n      api_key: x\n\
         litellm_settings:\n  set_verbose: false\n\
         general_settings:\n  master_key: {API_KEY}\n"
    );
    std::fs::write(&config, yaml)
        .map_err(|err| format!("cannot write {}: {err}", config.display()))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|err| format!("no free port: {err}"))?
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (log, stdout) = log_file(dir, "litellm");
    let stderr = std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null());
    let child = Command::new(litellm)
        .arg("--config")
        .arg(&config)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--num_workers",
            "1",
        ])
        // The cost map ships with the package; nothing to fetch at start.
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_LOG", "ERROR")
        .env("LITELLM_TELEMETRY", "False")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| format!("cannot start {}: {err}", litellm.display()))?;
    let mut process = Process {
        name: "litellm",
        child,
    };
    let probe = client();
    let url: http::Uri = format!("http://{addr}/health/liveliness")
        .parse()
        .expect("a valid URL");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(status) = process.exited() {
            return Err(format!("litellm exited ({status}); see {}", log.display()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "litellm did not answer within 180 s; see {}",
                log.display()
            ));
        }
        let request = http::Request::get(url.clone())
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        let answer = tokio::time::timeout(Duration::from_secs(2), probe.request(request)).await;
        if matches!(answer, Ok(Ok(ref r)) if r.status().is_success()) {
            return Ok((process, addr));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn gateway_config(node: SocketAddr) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\n\n\
         [[models]]\nname = \"fake-model\"\nupstreams = [\"http://{node}\"]\n\
         # the instant node has no slot limit\nslots = 1024\n\n\
         [[tenants]]\nname = \"bench\"\n\n\
         [[keys]]\nsha256 = \"{}\"\ntenant = \"bench\"\n",
        keel_gateway::config::hash_key(API_KEY)
    )
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The cells every report of a run starts with, in order: target, load,
/// mode, requests ok, requests failed, req/s, p50 ms, p99 ms.
fn cells(target: Target, phase: &Phase, outcome: &Outcome) -> [String; 8] {
    [
        target.label().to_owned(),
        phase.load.label(),
        if phase.stream { "stream" } else { "plain" }.to_owned(),
        outcome.ok.to_string(),
        outcome.failed.to_string(),
        format!("{:.0}", outcome.rps()),
        ms(outcome.p(0.5)),
        ms(outcome.p(0.99)),
    ]
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "—".to_owned(), |v| format!("{v:.2}"))
}

fn added(value: Option<f64>, base: Option<f64>) -> Option<f64> {
    Some(value? - base?)
}

fn signed(value: Option<f64>) -> String {
    value.map_or_else(|| "—".to_owned(), |v| format!("{v:+.2}"))
}

fn json_number(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "null".to_owned(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Errors come back here, after every process started was dropped
    // (and so killed).
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let bin_dir = build_binaries(args.no_build)?;
    let dir = bin_dir.join("keel-bench");
    std::fs::create_dir_all(&dir)
        .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    println!(
        "machine: {} × {} ({} logical CPUs), load average {}",
        machine::cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );

    let mut processes = Vec::new();
    let (node, node_addr) = start_keel_binary(
        "keel-fake-node",
        &bin_dir.join("keel-fake-node"),
        &["--listen", "127.0.0.1:0", "--instant"],
        &dir,
    )
    .await?;
    processes.push(node);
    let config = dir.join("gateway.toml");
    std::fs::write(&config, gateway_config(node_addr))
        .map_err(|err| format!("cannot write {}: {err}", config.display()))?;
    let (gateway, gateway_addr) = start_keel_binary(
        "keel-gateway",
        &bin_dir.join("keel-gateway"),
        &["--config", &config.display().to_string()],
        &dir,
    )
    .await?;
    processes.push(gateway);
    println!("fake node at {node_addr}, keel-gateway at {gateway_addr}");

    let mut targets = vec![
        (
            Target::Direct,
            Endpoint::new(&format!("http://{node_addr}")),
        ),
        (
            Target::Keel,
            Endpoint::new(&format!("http://{gateway_addr}")),
        ),
    ];
    let mut litellm_skipped = None;
    if args.no_litellm {
        litellm_skipped = Some("--no-litellm".to_owned());
    } else {
        match install_litellm().await {
            Ok(litellm) => match start_litellm(&litellm, node_addr, &dir).await {
                Ok((process, addr)) => {
                    println!(
                        "LiteLLM proxy (one worker) at {addr}, {}",
                        litellm_version(&litellm)
                    );
                    processes.push(process);
                    targets.push((Target::LiteLlm, Endpoint::new(&format!("http://{addr}"))));
                }
                Err(err) => litellm_skipped = Some(err),
            },
            Err(err) => litellm_skipped = Some(err),
        }
    }
    if let Some(why) = &litellm_skipped {
        println!("LiteLLM rows skipped: {why}");
    }

    // Each target answers, and warms up (connections, caches, the JIT-less
    // Python paths) before anything is measured.
    for (target, endpoint) in &targets {
        for stream in [false, true] {
            if let Err(err) = one(&client(), endpoint, stream).await {
                return Err(format!(
                    "{} does not answer (stream {stream}): {err}",
                    target.label()
                ));
            }
        }
        let warm = if *target == Target::LiteLlm { 3.0 } else { 1.0 };
        for stream in [false, true] {
            let phase = Phase {
                load: Load::Closed { connections: 8 },
                stream,
                duration: Duration::from_secs_f64(warm),
            };
            run_phase(endpoint, phase).await;
        }
    }

    let open = Duration::from_secs_f64(args.open_secs);
    let closed = Duration::from_secs_f64(args.closed_secs);
    let mut phases = Vec::new();
    for stream in [false, true] {
        phases.push((
            Phase {
                load: Load::Open {
                    rate: args.low_rate,
                },
                stream,
                duration: open,
            },
            true,
        ));
        phases.push((
            Phase {
                load: Load::Open { rate: args.rate },
                stream,
                duration: open,
            },
            false,
        ));
        phases.push((
            Phase {
                load: Load::Closed {
                    connections: args.connections,
                },
                stream,
                duration: closed,
            },
            true,
        ));
    }

    let mut results: Vec<(Phase, Target, Outcome)> = Vec::new();
    for (phase, with_litellm) in &phases {
        // The targets take turns at each phase, so noise spreads evenly.
        for (target, endpoint) in &targets {
            if *target == Target::LiteLlm && !with_litellm {
                continue;
            }
            for process in &mut processes {
                if let Some(status) = process.exited() {
                    return Err(format!("{} exited during the run ({status})", process.name));
                }
            }
            let outcome = run_phase(endpoint, *phase).await;
            let [target_label, load, mode, ok, failed, rps, p50, p99] =
                cells(*target, phase, &outcome);
            println!(
                "{target_label:<14} {load:<18} {mode:<9} ok {ok:>7} failed {failed:>5} {rps:>9} req/s  p50 {p50} ms  p99 {p99} ms  ttfb p50 {} ms  p99 {} ms  lag {:.1} ms{}",
                ms(outcome.ttfb(0.5)),
                ms(outcome.ttfb(0.99)),
                outcome.lag.as_secs_f64() * 1e3,
                if outcome.errors.is_empty() {
                    String::new()
                } else {
                    format!("  errors {:?}", outcome.errors)
                }
            );
            results.push((*phase, *target, outcome));
        }
    }

    let find = |phase: &Phase, target: Target| {
        results
            .iter()
            .find(|(p, t, _)| p == phase && *t == target)
            .map(|(_, _, o)| o)
    };
    let mut table = String::new();
    table.push_str(
        "| target | load | mode | ok / failed | req/s | p50 ms | p99 ms | added p50 | added p99 | TTFB p50 | TTFB p99 | added TTFB p50 | added TTFB p99 |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (phase, target, outcome) in &results {
        let base = find(phase, Target::Direct);
        let (ttfb50, ttfb99) = if phase.stream {
            (outcome.ttfb(0.5), outcome.ttfb(0.99))
        } else {
            (None, None)
        };
        let plus = |mine: Option<f64>, theirs: Option<f64>| {
            if *target == Target::Direct {
                "—".to_owned()
            } else {
                signed(added(mine, theirs))
            }
        };
        let [target_label, load, mode, ok, failed, rps, p50, p99] = cells(*target, phase, outcome);
        let _ = writeln!(
            table,
            "| {target_label} | {load} | {mode} | {ok} / {failed} | {rps} | {p50} | {p99} | {} | {} | {} | {} | {} | {} |",
            plus(outcome.p(0.5), base.and_then(|b| b.p(0.5))),
            plus(outcome.p(0.99), base.and_then(|b| b.p(0.99))),
            ms(ttfb50),
            ms(ttfb99),
            if phase.stream {
                plus(ttfb50, base.and_then(|b| b.ttfb(0.5)))
            } else {
                "—".into()
            },
            if phase.stream {
                plus(ttfb99, base.and_then(|b| b.ttfb(0.99)))
            } else {
                "—".into()
            },
        );
    }
    println!();
    print!("{table}");
    println!();

    let saturation = Phase {
        load: Load::Closed {
            connections: args.connections,
        },
        stream: false,
        duration: closed,
    };
    let moderate = Phase {
        load: Load::Open { rate: args.rate },
        stream: false,
        duration: open,
    };
    let low = Phase {
        load: Load::Open {
            rate: args.low_rate,
        },
        stream: false,
        duration: open,
    };
    let rps = |target| find(&saturation, target).map(Outcome::rps);
    let keel_added_p50 = added(
        find(&moderate, Target::Keel).and_then(|o| o.p(0.5)),
        find(&moderate, Target::Direct).and_then(|o| o.p(0.5)),
    );
    let keel_added_p99 = added(
        find(&moderate, Target::Keel).and_then(|o| o.p(0.99)),
        find(&moderate, Target::Direct).and_then(|o| o.p(0.99)),
    );
    let litellm_added_p50 = added(
        find(&low, Target::LiteLlm).and_then(|o| o.p(0.5)),
        find(&low, Target::Direct).and_then(|o| o.p(0.5)),
    );
    let ratio = match (keel_added_p50, litellm_added_p50) {
        (Some(keel), Some(litellm)) if litellm > 0.0 => Some(keel / litellm),
        _ => None,
    };
    let (keel_rps, litellm_rps) = (rps(Target::Keel), rps(Target::LiteLlm));
    println!(
        "targets: keel added p50 {} ms (≤ 1), p99 {} ms (≤ 3) at {:.0} req/s; added p50 vs LiteLLM {} (≤ 0.1); keel_rps / litellm_rps {} (≥ 50)",
        signed(keel_added_p50),
        signed(keel_added_p99),
        args.rate,
        json_number(ratio, 4),
        match (keel_rps, litellm_rps) {
            (Some(k), Some(l)) if l > 0.0 => format!("{:.1}", k / l),
            _ => "—".to_owned(),
        }
    );
    println!(
        "{{\"direct_rps\": {}, \"keel_rps\": {}, \"litellm_rps\": {}, \"keel_added_p50_ms\": {}, \"keel_added_p99_ms\": {}, \"litellm_added_p50_ms\": {}, \"added_p50_vs_litellm\": {}}}",
        json_number(rps(Target::Direct), 0),
        json_number(keel_rps, 0),
        json_number(litellm_rps, 0),
        json_number(keel_added_p50, 3),
        json_number(keel_added_p99, 3),
        json_number(litellm_added_p50, 3),
        json_number(ratio, 4),
    );
    Ok(())
}

fn litellm_version(litellm: &Path) -> String {
    let python = litellm.with_file_name("python");
    std::process::Command::new(python)
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ])
        .output()
        .ok()
        .map(|o| format!("litellm {}", String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_else(|| "litellm (version unknown)".to_owned())
}
