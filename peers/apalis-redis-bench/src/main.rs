//! Peer figure for BENCHMARKS.md: the job cycle of Keel's queue bench
//! (`queue/examples/bench.rs`) run through apalis-redis and an apalis worker,
//! against the local Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`).
//!
//! ```text
//! cargo run --release --manifest-path peers/apalis-redis-bench/Cargo.toml -- --jobs 200000
//! ```
//!
//! Streaming cycle (the peer figure): `--jobs` jobs with 256-byte payloads.
//! One producer task pushes them with `TaskSink::push_bulk` in batches of
//! `--batch` (one `batch_push.lua` call per batch). One apalis worker, at
//! `.concurrency(1)`, fetches `--batch` jobs per `fetch_next.lua` call and
//! runs a handler that only counts. When idle it polls again every
//! `--poll-ms`. Plain `RedisStorage` has no push wake-up, because its jobs
//! never take the path that publishes one. The handler stops the worker at
//! the N-th job. The clock runs from the first push until `Worker::run`
//! returns, and that return comes after the stop has flushed the last acks
//! (`handle_results.lua`). The `queue:done` set is checked to hold all N
//! jobs. The library defaults are kept (lock_tasks, persist_results and
//! emit_events are all on), except that the batch size is `--batch`. There
//! is one warm-up run, then the best of `--runs` counts.
//!
//! Backlog variant: `--backlog` jobs (default 20,000; 0 skips it) are all
//! pushed first, then the same worker drains them. It reports whether that
//! works, stalls or errors.
//!
//! Each run uses its own queue name. Afterwards its keys are found with SCAN
//! and removed with UNLINK. A run is cut off at `--timeout-s` (default 35, so
//! that a warm-up, 3 runs and the backlog run stay within about 3 minutes).
//! A run that is cut off reports its partial rate and is marked INCOMPLETE.
//! The last line is
//! `{"peer": "apalis-redis", "version": "...", "jobs_per_s": N}`. If any
//! measured run was cut off, that line also carries `"partial": true` and
//! `"cutoff_s"`. The line before it is the backlog outcome.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use apalis_redis::{Config, RedisStorage};
use tokio::time::Instant;

/// Keep in step with the `=` pin in Cargo.toml.
const APALIS_REDIS_VERSION: &str = "1.0.0";

struct Args {
    jobs: usize,
    batch: usize,
    warmup: usize,
    runs: usize,
    backlog: usize,
    timeout: Duration,
    poll: Duration,
}

fn parse_args() -> Args {
    let mut args = Args {
        jobs: 200_000,
        batch: 64,
        warmup: 1,
        runs: 3,
        backlog: 20_000,
        timeout: Duration::from_secs(35),
        poll: Duration::from_millis(10),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let n: u64 = value
            .parse()
            .unwrap_or_else(|_| panic!("{flag}: not a number: {value}"));
        match flag.as_str() {
            "--jobs" => args.jobs = n as usize,
            "--batch" => args.batch = n as usize,
            "--warmup" => args.warmup = n as usize,
            "--runs" => args.runs = n as usize,
            "--backlog" => args.backlog = n as usize,
            "--timeout-s" => args.timeout = Duration::from_secs(n),
            "--poll-ms" => args.poll = Duration::from_millis(n),
            _ => panic!(
                "unknown flag {flag} \
                 (--jobs --batch --warmup --runs --backlog --timeout-s --poll-ms)"
            ),
        }
    }
    assert!(
        args.jobs > 0 && args.batch > 0,
        "--jobs and --batch must be > 0"
    );
    args
}

/// What one run achieved; `failure` is set when it did not complete.
struct Outcome {
    done: usize,
    elapsed: Duration,
    enqueue: Option<Duration>,
    failure: Option<String>,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64()
    }

    fn describe(&self, jobs: usize) -> String {
        let enqueue = self
            .enqueue
            .map(|d| format!(", enqueue phase {:.2} s", d.as_secs_f64()))
            .unwrap_or_default();
        let failure = self
            .failure
            .as_ref()
            .map(|f| format!(" -- INCOMPLETE, rate is partial: {f}"))
            .unwrap_or_default();
        format!(
            "{:.0} jobs/s ({} of {jobs} jobs in {:.2} s{enqueue}){failure}",
            self.rate(),
            self.done,
            self.elapsed.as_secs_f64(),
        )
    }
}

/// One full push → fetch → handle → ack cycle of `jobs` jobs on a fresh queue.
/// With `backlog_first`, every job is pushed before the worker starts.
async fn cycle(url: &str, args: &Args, jobs: usize, backlog_first: bool, label: &str) -> Outcome {
    let queue = format!("keel-peer-apalis-{}-{label}", std::process::id());
    let config = Config::default().queue(&queue).batch_size(args.batch);
    // Producer and worker each get their own connection, as Keel's bench uses a pool.
    let producer_conn = apalis_redis::connect(url).await.expect("redis connection");
    let worker_conn = apalis_redis::connect(url).await.expect("redis connection");
    let mut sink = RedisStorage::<String>::new(producer_conn).with_config(config.clone());
    let backend = RedisStorage::<String>::new(worker_conn)
        .with_config(config)
        .poll_with_interval(args.poll);

    let done = Arc::new(AtomicUsize::new(0));
    let counter = done.clone();
    let worker = WorkerBuilder::new(format!("{queue}-worker"))
        .backend(backend)
        .concurrency(1)
        .build(move |_payload: String, worker: WorkerContext| {
            let counter = counter.clone();
            async move {
                if counter.fetch_add(1, Ordering::Relaxed) + 1 == jobs {
                    let _ = worker.stop();
                }
            }
        });

    let payload = "x".repeat(256); // JSON-encoded by apalis: 258 bytes on the wire
    let batch = args.batch;
    let push_all = async move {
        let mut sent = 0;
        while sent < jobs {
            let n = batch.min(jobs - sent);
            sink.push_bulk(vec![payload.clone(); n])
                .await
                .map_err(|e| format!("push failed after {sent} jobs: {e}"))?;
            sent += n;
        }
        Ok::<_, String>(())
    };

    let start = Instant::now();
    let deadline = start + args.timeout;
    let mut failure = None;
    let mut enqueue = None;
    let producer = if backlog_first {
        match tokio::time::timeout_at(deadline, push_all).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some(format!("enqueue timed out after {:?}", args.timeout)),
        }
        enqueue = Some(start.elapsed());
        None
    } else {
        Some(tokio::spawn(push_all))
    };
    if failure.is_none() {
        failure = match tokio::time::timeout_at(deadline, worker.run()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("worker error: {e}")),
            Err(_) => Some(format!("timed out after {:?}", args.timeout)),
        };
    }
    let elapsed = start.elapsed();
    if let Some(producer) = producer {
        if failure.is_some() {
            producer.abort();
        }
        if let Ok(Err(e)) = producer.await {
            failure = Some(failure.map_or(e.clone(), |f| format!("{f}; {e}")));
        }
    }
    let done = done.load(Ordering::Relaxed);
    if failure.is_none() && done < jobs {
        failure = Some(format!("worker returned after {done} jobs"));
    }
    let acked = acked_count(url, &queue).await;
    if failure.is_none() && acked < jobs {
        failure = Some(format!("only {acked} of {jobs} jobs acked in Redis"));
    }
    let deleted = delete_keys(url, &queue).await;
    println!("  ({label}: {acked} jobs acked in Redis; cleaned up {deleted} keys of {queue})");
    Outcome {
        done,
        elapsed,
        enqueue,
        failure,
    }
}

/// How many jobs apalis-redis recorded as done (its `queue:done` set).
async fn acked_count(url: &str, queue: &str) -> usize {
    let mut conn = apalis_redis::connect(url).await.expect("redis connection");
    let done_set = Config::default().queue(queue).done_jobs_set();
    redis::cmd("SCARD")
        .arg(done_set)
        .query_async(&mut conn)
        .await
        .expect("scard")
}

/// Removes every key of the queue namespace: SCAN MATCH `queue:*`, UNLINK.
async fn delete_keys(url: &str, queue: &str) -> usize {
    let mut conn = apalis_redis::connect(url).await.expect("redis connection");
    let pattern = format!("{queue}:*");
    let (mut cursor, mut deleted) = (0u64, 0usize);
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("scan");
        if !keys.is_empty() {
            let n: usize = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .expect("unlink");
            deleted += n;
        }
        cursor = next;
        if cursor == 0 {
            return deleted;
        }
    }
}

/// A JSON string literal (quotes, backslashes and control characters escaped).
fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    println!(
        "apalis-redis {APALIS_REDIS_VERSION} at {url}: {} jobs x 256 B, push/fetch batch {}, \
         worker concurrency 1, idle poll {:?}, per-run timeout {:?}",
        args.jobs, args.batch, args.poll, args.timeout
    );

    let mut best = 0f64;
    let mut incomplete = false;
    for run in 1 - args.warmup.min(1)..=args.runs {
        let outcome = cycle(&url, &args, args.jobs, false, &format!("stream{run}")).await;
        let name = if run == 0 {
            "warm-up".to_owned()
        } else {
            format!("run {run}")
        };
        println!("{name}: {}", outcome.describe(args.jobs));
        if run > 0 {
            incomplete |= outcome.failure.is_some();
            best = best.max(outcome.rate());
        }
    }

    if args.backlog > 0 {
        let outcome = cycle(&url, &args, args.backlog, true, "backlog").await;
        println!("backlog: {}", outcome.describe(args.backlog));
        println!(
            "{{\"peer\": \"apalis-redis\", \"version\": \"{APALIS_REDIS_VERSION}\", \
             \"variant\": \"backlog\", \"jobs\": {}, \"completed\": {}, \"outcome\": {}, \
             \"jobs_per_s\": {:.0}}}",
            args.backlog,
            outcome.done,
            json_str(outcome.failure.as_deref().unwrap_or("ok")),
            outcome.rate(),
        );
    }

    if args.runs == 0 {
        return;
    }
    let partial = if incomplete {
        format!(
            ", \"partial\": true, \"cutoff_s\": {}",
            args.timeout.as_secs()
        )
    } else {
        String::new()
    };
    println!(
        "{{\"peer\": \"apalis-redis\", \"version\": \"{APALIS_REDIS_VERSION}\", \
         \"jobs_per_s\": {best:.0}{partial}}}"
    );
}
