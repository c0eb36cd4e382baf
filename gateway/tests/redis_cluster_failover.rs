//! A Redis Cluster master killed (`SIGKILL`) under load: two `keel-gateway`
//! processes and two `keel-worker` processes share a Redis Cluster of the
//! test's own (keel-testkit's `RedisCluster`, 3 masters and 3 replicas).
//! Producers send durable jobs (`replica_acks = 1`), readers send
//! deterministic requests the response cache answers (L1, the Redis L2, or
//! the origin), and callers press on one tenant's token limit. The master
//! that owns the durable queue's slot is killed; its replica is promoted
//! and the old master comes back as a replica. Nothing is restarted but
//! that master.
//!
//! Checked: every client got an answer (errors during the failover are
//! fine when they are answers: 503, 504); the workers resume unaided and
//! every job answered 202 completes, none lost, with extra upstream runs
//! bounded by what was in flight; no cache request fails while L2 is down,
//! misses go to the origin; the token limit holds within 5 % over the run.
//! The tenant's limit lives on another master than the queue, and limit
//! checks fail closed (`limits_fail_open = false`): while the cluster
//! client relearns the topology it holds back commands for every slot, and
//! a limit that failed open would admit whatever came meanwhile.
#![cfg(feature = "cluster")]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use keel_gateway::GatewayConfig;
use keel_gateway::config::{DurableBackend, KeyConfig, ModelConfig, Tenant};
use keel_gateway::fake_node::{FakeNode, FakeNodeConfig};
use keel_testkit::{Failover, RedisCluster};
use support::{GatewayProcess, MODEL, WorkerChild, metric, total};
use tokio::time::Instant;

/// The durable queue (the cluster is the test's own: no other names).
const QUEUE: &str = "gw-failover";
/// The model durable jobs ask for (nodes of their own, to count runs).
const JOBS_MODEL: &str = "jobs";
const PRODUCER_KEY: &str = "sk-producer";
const READER_KEY: &str = "sk-reader";
const LIMITED_KEY: &str = "sk-limited";
/// The limited tenant's tokens a minute (a bucket of one minute's worth):
/// 60 requests of 100 tokens at once, then one a second.
const TOKENS_PER_MINUTE: u64 = 6_000;
const WORKERS: usize = 2;
/// Jobs each worker runs at once.
const CONCURRENCY: usize = 8;
/// How long the load runs, the kill and the failover inside it.
const LOAD_FOR: Duration = Duration::from_secs(30);
/// Jobs answered 202 before the master is killed.
const KILL_AFTER_JOBS: usize = 100;
/// The longest a failover (or the old master's return) may take here.
const FAILOVER_WITHIN: Duration = Duration::from_secs(30);
/// Load that must run after the cluster is whole again.
const LOAD_AFTER: Duration = Duration::from_secs(5);
/// Bound on each producer's and reader's requests.
const MAX_REQUESTS: usize = 5_000;

/// What one producer saw: the ids answered 202 (with when), and every
/// other answer.
#[derive(Default)]
struct Produced {
    accepted: Vec<(String, Instant)>,
    refused: BTreeMap<u16, u64>,
    unanswered: u64,
}

/// What one reader saw, request by request: when, the status, and whether
/// it was a hit.
#[derive(Default)]
struct Read {
    answers: Vec<(Instant, u16, bool)>,
    unanswered: u64,
}

/// The master that serves `key`'s slot, once the cluster agrees.
async fn master_of(cluster: &RedisCluster, key: &str) -> usize {
    cluster
        .master_for_key(key)
        .await
        .expect("the cluster answers")
}

/// A tenant whose token limit (`keel:rl:{gateway-tenants:<name>}:c`) lives
/// on another master than `avoid`.
async fn tenant_not_on(cluster: &RedisCluster, avoid: usize) -> String {
    for i in 0..64 {
        let name = format!("limited-{i}");
        if master_of(cluster, &format!("keel:rl:{{gateway-tenants:{name}}}:c")).await != avoid {
            return name;
        }
    }
    panic!("no tenant name of 64 lands off master {avoid}");
}

async fn nodes(n: usize, config: FakeNodeConfig) -> Vec<FakeNode> {
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(
            FakeNode::start(config.clone(), "127.0.0.1:0")
                .await
                .unwrap(),
        );
    }
    nodes
}

/// Sends durable jobs through `url` until `until`, one every 30 ms.
async fn produce(url: String, producer: usize, until: Instant) -> Produced {
    let client = reqwest::Client::new();
    let mut seen = Produced::default();
    for n in 0..MAX_REQUESTS {
        if Instant::now() >= until {
            break;
        }
        let sent = client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(PRODUCER_KEY)
            .header("x-keel-mode", "queue")
            .timeout(Duration::from_secs(30))
            .json(&serde_json::json!({
                "model": JOBS_MODEL,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": format!("job {producer}-{n}")}],
            }))
            .send()
            .await;
        match sent {
            Ok(answer) if answer.status() == 202 => {
                let body: serde_json::Value = answer.json().await.expect("a JSON answer");
                let id = body["id"].as_str().expect("a job id").to_owned();
                seen.accepted.push((id, Instant::now()));
            }
            Ok(answer) => *seen.refused.entry(answer.status().as_u16()).or_default() += 1,
            Err(_) => seen.unanswered += 1,
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    seen
}

/// [`support::deterministic_chat`] as a cache reader, bounded to 30 s.
fn deterministic(client: &reqwest::Client, url: &str, prompt: &str) -> reqwest::RequestBuilder {
    support::deterministic_chat(client, url, READER_KEY, prompt).timeout(Duration::from_secs(30))
}

/// Sends deterministic requests until `until`, one every 20 ms, switching
/// gateways every eight: eight hot prompts, and every fourth request one
/// never asked before (a miss that only the origin can answer).
async fn read(urls: [String; 2], reader: usize, until: Instant) -> Read {
    let client = reqwest::Client::new();
    let mut seen = Read::default();
    for n in 0..MAX_REQUESTS {
        if Instant::now() >= until {
            break;
        }
        let prompt = if n % 4 == 0 {
            format!("fresh {reader}-{n}")
        } else {
            format!("hot {}", n % 8)
        };
        // Eight requests (every hot prompt) at one gateway, then eight at
        // the other: each hot prompt is asked at both.
        let sent = deterministic(&client, &urls[(n / 8 + reader) % 2], &prompt)
            .send()
            .await;
        match sent {
            Ok(answer) => {
                let hit = answer
                    .headers()
                    .get("x-keel-cache")
                    .is_some_and(|v| v == "hit");
                let status = answer.status().as_u16();
                let _ = answer.bytes().await;
                seen.answers.push((Instant::now(), status, hit));
            }
            Err(_) => seen.unanswered += 1,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

/// Polls `GET /v1/jobs/{id}` until each job has left `queued`, at most
/// until `deadline`; returns the final status of each (`missing` for a
/// job that never left `queued` or has no record).
async fn outcomes(url: &str, ids: &[String], deadline: Instant) -> BTreeMap<String, u64> {
    let client = reqwest::Client::new();
    let mut counts = BTreeMap::new();
    for id in ids {
        let status = loop {
            let answer = client
                .get(format!("{url}/v1/jobs/{id}"))
                .bearer_auth(PRODUCER_KEY)
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            if let Ok(answer) = answer
                && answer.status() == 200
                && let Ok(record) = answer.json::<serde_json::Value>().await
                && record["status"] != "queued"
            {
                break record["status"].as_str().unwrap_or("?").to_owned();
            }
            if Instant::now() >= deadline {
                break "missing".to_owned();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        *counts.entry(status).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_loses_no_acknowledged_job() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    tokio::time::timeout(Duration::from_secs(300), failover())
        .await
        .expect("the test ends within 5 minutes");
}

async fn failover() {
    let mut cluster = RedisCluster::start().await.expect("start a redis cluster");
    let victim = master_of(&cluster, &format!("keel:{{{QUEUE}}}:delayed")).await;
    let limited = tenant_not_on(&cluster, victim).await;

    let mut job_node = FakeNodeConfig::instant();
    job_node.ttft = Duration::from_millis(10);
    job_node.slots = 64;
    let job_nodes = nodes(2, job_node).await;
    let chat_nodes = nodes(2, FakeNodeConfig::instant()).await;

    let mut config = GatewayConfig::default();
    config.probe_interval = Duration::from_millis(100);
    config.redis_cluster_urls = cluster.urls();
    let mut chat = ModelConfig::new(MODEL, chat_nodes.iter().map(FakeNode::url));
    chat.cache_deterministic = true;
    config.models = vec![
        ModelConfig::new(JOBS_MODEL, job_nodes.iter().map(FakeNode::url)),
        chat,
    ];
    let mut limited_tenant = Tenant::new(limited.clone());
    limited_tenant.tokens_per_minute = Some(TOKENS_PER_MINUTE);
    config.tenants = vec![
        Tenant::new("producers"),
        Tenant::new("readers"),
        limited_tenant,
    ];
    config.keys = vec![
        KeyConfig::new(PRODUCER_KEY, "producers"),
        KeyConfig::new(READER_KEY, "readers"),
        KeyConfig::new(LIMITED_KEY, limited.clone()),
    ];
    config.durable.backend = DurableBackend::Redis;
    config.durable.queue = QUEUE.to_owned();
    config.durable.replica_acks = 1;
    config.durable.concurrency = CONCURRENCY;
    config.durable.lease = Duration::from_secs(2);
    // While the cluster relearns its topology the client holds back the
    // commands of every slot for a second or two, and limit checks time
    // out: refused (503), not admitted, so the limit holds through it.
    config.limits_fail_open = false;

    let a = GatewayProcess::start(config.clone()).await;
    let b = GatewayProcess::start(config.clone()).await;
    let (_dir, path) = support::config_file(&config);
    let mut workers: Vec<WorkerChild> = (0..WORKERS).map(|_| WorkerChild::spawn(&path)).collect();
    let urls = [a.url.clone(), b.url.clone()];

    // The hot prompts, loaded once at A: B's first answer to each comes
    // from the Redis L2.
    let client = reqwest::Client::new();
    for i in 0..8 {
        let answer = deterministic(&client, &a.url, &format!("hot {i}"))
            .send()
            .await
            .expect("the gateway answers");
        assert_eq!(answer.status(), 200);
    }

    let started = Instant::now();
    let until = started + LOAD_FOR;
    let producers: Vec<_> = urls
        .iter()
        .enumerate()
        .map(|(i, url)| tokio::spawn(produce(url.clone(), i, until)))
        .collect();
    let readers: Vec<_> = (0..2)
        .map(|i| tokio::spawn(read(urls.clone(), i, until)))
        .collect();
    let pressing = tokio::spawn({
        let urls = urls.to_vec();
        async move {
            support::press_on_limit(&urls, LIMITED_KEY, 2, LOAD_FOR, Duration::from_millis(50))
                .await
        }
    });

    // Kill the queue's master once enough jobs were answered 202, judged
    // by the job nodes' runs (the producers report at the end).
    let ready_by = Instant::now() + Duration::from_secs(20);
    while total(&job_nodes, |s| s.completed) < KILL_AFTER_JOBS as u64 {
        assert!(
            Instant::now() < ready_by,
            "fewer than {KILL_AFTER_JOBS} jobs ran in 20 s before the kill"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let runs_at_kill = total(&job_nodes, |s| s.completed);
    // Until the old master rejoins (as a replica of the promoted one),
    // every replica-acked enqueue is refused.
    let Failover {
        killed_at: killed,
        promoted_at: promoted,
        rejoined_at: whole,
    } = cluster
        .fail_over(victim, FAILOVER_WITHIN)
        .await
        .expect("a replica takes over and the old master rejoins");
    assert_ne!(
        master_of(&cluster, &format!("keel:{{{QUEUE}}}:delayed")).await,
        victim,
        "the queue's slot moved to the promoted replica"
    );
    assert!(
        whole + LOAD_AFTER <= until,
        "the failover took {:?}, too long for the test's {LOAD_FOR:?} of load",
        whole - killed
    );

    let mut produced = Produced::default();
    for producer in producers {
        let seen = producer.await.expect("a producer did not panic");
        produced.accepted.extend(seen.accepted);
        for (status, count) in seen.refused {
            *produced.refused.entry(status).or_default() += count;
        }
        produced.unanswered += seen.unanswered;
    }
    let mut reads = Read::default();
    for reader in readers {
        let seen = reader.await.expect("a reader did not panic");
        reads.answers.extend(seen.answers);
        reads.unanswered += seen.unanswered;
    }
    let limit = pressing.await.expect("the limit callers did not panic");

    // Every job answered 202 completes; the workers were never restarted.
    let ids: Vec<String> = produced.accepted.iter().map(|(id, _)| id.clone()).collect();
    let finished = outcomes(&a.url, &ids, Instant::now() + Duration::from_secs(90)).await;
    for worker in &mut workers {
        assert!(
            worker.child.try_wait().unwrap().is_none(),
            "a keel-worker exited"
        );
    }
    let runs = total(&job_nodes, |s| s.completed);
    let (mut started_jobs, mut retried, mut dead) = (0.0, 0.0, 0.0);
    for worker in &workers {
        started_jobs += metric(&worker.url, "keel_worker_started_total", "").await;
        retried += metric(&worker.url, "keel_worker_retried_total", "").await;
        dead += metric(&worker.url, "keel_worker_dead_lettered_total", "").await;
    }
    let (mut l2_hits, mut l2_errors, mut breaker_opened, mut limiter_errors) = (0.0, 0.0, 0.0, 0.0);
    for url in &urls {
        l2_hits += metric(url, "keel_cache_hits_total", "tier=\"l2\"").await;
        l2_errors += metric(url, "keel_cache_l2_errors_total", "").await;
        breaker_opened += metric(url, "keel_cache_l2_breaker_opened_total", "").await;
        limiter_errors += metric(url, "keel_rate_limiter_errors_total", "").await;
    }

    let accepted = produced.accepted.len() as u64;
    let phase = |from: Instant, to: Instant| {
        produced
            .accepted
            .iter()
            .filter(|(_, at)| (from..to).contains(at))
            .count()
    };
    let refused: u64 = produced.refused.values().sum();
    let in_window = |at: &Instant| (killed..whole).contains(at);
    let window: Vec<_> = reads
        .answers
        .iter()
        .filter(|(at, ..)| in_window(at))
        .collect();
    let cache_failed = reads.answers.iter().filter(|(_, s, _)| *s != 200).count();
    let hits = reads
        .answers
        .iter()
        .filter(|(_, s, hit)| *s == 200 && *hit)
        .count();
    let window_origin = window
        .iter()
        .filter(|(_, s, hit)| *s == 200 && !hit)
        .count();
    let completed = finished.get("completed").copied().unwrap_or(0);
    println!(
        "failover: master {victim} killed after {runs_at_kill} job runs; replica promoted after \
         {:?}, cluster whole again after {:?}",
        promoted - killed,
        whole - killed
    );
    println!(
        "jobs: {accepted} answered 202 ({} before the kill, {} during the failover, {} after), \
         refused {refused} {:?}, unanswered {}; outcomes {finished:?}; {runs} upstream runs \
         ({} more than jobs answered 202); workers: {started_jobs} started, {retried} retried, \
         {dead} dead-lettered",
        phase(started, killed),
        phase(killed, whole),
        phase(whole, until + Duration::from_secs(60)),
        produced.refused,
        produced.unanswered,
        runs.saturating_sub(accepted),
    );
    println!(
        "cache: {} requests, {hits} hits, {cache_failed} failed, {} unanswered; during the \
         failover {} requests, {window_origin} answered by the origin, {} failed; gateways: \
         {l2_hits} L2 hits, {l2_errors} L2 errors, L2 breaker opened {breaker_opened} times",
        reads.answers.len(),
        reads.unanswered,
        window.len(),
        window.iter().filter(|(_, s, _)| *s != 200).count(),
    );
    println!(
        "limit: {} admitted, {} limited, other {:?}, {} unanswered over {:.1}s; {:.0} tokens \
         admitted of {:.0} allowed; limiter errors {limiter_errors}",
        limit.admitted,
        limit.limited,
        limit.other,
        limit.unanswered,
        limit.elapsed.as_secs_f64(),
        limit.admitted_tokens(),
        limit.allowed_tokens(TOKENS_PER_MINUTE),
    );

    // Every client was told.
    assert_eq!(produced.unanswered, 0, "producers got no answer");
    assert_eq!(reads.unanswered, 0, "readers got no answer");
    assert!(
        produced.refused.keys().all(|s| [503, 504].contains(s)),
        "refusals are 503 or 504: {:?}",
        produced.refused
    );
    // Jobs: none lost, the workers resumed, extra runs bounded.
    assert_eq!(
        completed, accepted,
        "jobs answered 202 that did not complete: {finished:?}"
    );
    assert!(
        phase(whole, until + Duration::from_secs(60)) > 0,
        "no job was answered 202 after the failover"
    );
    // Jobs refused after their write (no replica confirmed) may run once;
    // jobs in flight when the master died, or whose record could not be
    // written during the failover, may run twice.
    let bound = accepted + refused + 2 * (WORKERS * CONCURRENCY) as u64;
    assert!(
        (accepted..=bound).contains(&runs),
        "{runs} upstream runs for {accepted} jobs answered 202 (bound {bound})"
    );
    // The cache: no failed request, misses answered by the origin while L2
    // was down, and answers shared through L2.
    assert_eq!(cache_failed, 0, "cache requests failed");
    assert!(
        window_origin > 0,
        "no miss was answered during the failover"
    );
    assert!(hits > 0 && l2_hits > 0.0, "no hits, or none from L2");
    // The limit.
    assert_eq!(limit.unanswered, 0, "limited callers got no answer");
    assert!(
        limit.other.keys().all(|s| [503, 504].contains(s)),
        "limited callers saw other answers: {limit:?}"
    );
    limit.assert_within(TOKENS_PER_MINUTE, 0.05);
    drop((a, b, workers));
}
