//! The cache tier against its raw dependencies, in the same run.
//!
//! ```text
//! cargo run --release -p keel-cache --example bench --all-features
//! ```
//!
//! Three measurements, against the Redis at `REDIS_URL` (default
//! `redis://127.0.0.1:6379`):
//!
//! 1. **L1 hits**: `get` ops/s of `Tiered` (through `dyn Cache`) on keys in
//!    L1, against `get` on a raw `moka::future::Cache<String, Bytes>` with
//!    the same keys and values (`Tiered` keeps its L1 in moka's synchronous
//!    cache; a raw `moka::sync::Cache` is printed as context). One task per Tokio worker thread, each
//!    reading the keys round-robin from its own offset; `--threads` gives
//!    one count or a list (`--threads 1,2,4`), each measured in the same
//!    run on its own runtime, and a `threads N: median l1 ratio R` line
//!    reports each. Without `--threads`: one task on two worker threads.
//! 2. **L2 hits**: mean latency of `Tiered::get` on keys that are in Redis
//!    and not in L1 (each key read once, so every read goes to L2 and fills
//!    L1), against a raw `GET` through deadpool-redis (`pool.get()` then
//!    `GET`, the pool's documented use). Sequential, one request at a time.
//! 3. **Stampede**: 1,000 concurrent `get_or_load` on one cold key whose
//!    loader takes 20 ms; the number of loader calls.
//!
//! The last line printed is one JSON object:
//! `{"l1_ratio": R, "l2_latency_ratio": R, "stampede_origin_calls": N}`
//! where `l1_ratio` is Keel ops/s over raw ops/s for the **last** thread
//! count given (higher is better) and
//! `l2_latency_ratio` is Keel mean latency over raw mean latency (lower is
//! better). Each is the median over paired runs whose order alternates, so
//! both sides of a pair see the same interference on a shared machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use keel_cache::{
    Cache, MokaCache, MokaCacheConfig, RedisCache, RedisCacheConfig, Tiered, TieredConfig,
};
use keel_testkit::{bench_runtime, thread_list};
use tokio::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// L1 `get`s per measured run.
    #[arg(long, default_value_t = 500_000)]
    l1_ops: usize,
    /// Distinct keys held in L1.
    #[arg(long, default_value_t = 10_000)]
    l1_keys: usize,
    /// L2 reads per measured run (each a distinct key).
    #[arg(long, default_value_t = 3_000)]
    l2_ops: usize,
    /// Concurrent callers in the stampede.
    #[arg(long, default_value_t = 1_000)]
    stampede: usize,
    /// Measured pairs of runs (order alternating); the median ratio counts.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Tokio worker threads for the L1 measurement, one count or a
    /// comma-separated list; as many tasks read concurrently. The JSON
    /// line reports the last. Default: one task on two threads.
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
}

fn value() -> Bytes {
    Bytes::from(vec![7u8; 512])
}

fn tiered_config() -> TieredConfig {
    TieredConfig::new("bench")
        .ttl(Duration::from_secs(600))
        .l1_ttl(Duration::from_secs(600))
        .l1_capacity_bytes(512 << 20)
}

/// What the L1 measurement reads through: a Keel cache (as `dyn Cache`)
/// or raw moka.
trait Reader: Clone + Send + Sync + 'static {
    /// Whether `key` was found.
    fn hit(&self, key: &str) -> impl Future<Output = bool> + Send;
}

impl Reader for Arc<dyn Cache> {
    async fn hit(&self, key: &str) -> bool {
        self.get(key).await.expect("get").is_some()
    }
}

impl Reader for moka::future::Cache<String, Bytes> {
    async fn hit(&self, key: &str) -> bool {
        self.get(key).await.is_some()
    }
}

impl Reader for moka::sync::Cache<String, Bytes> {
    async fn hit(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

/// `tasks` concurrent readers, `ops` gets in all, each task from its own
/// offset in `keys`; every read must hit. Answers ops/s.
async fn l1_run(cache: &impl Reader, keys: &Arc<Vec<String>>, ops: usize, tasks: usize) -> f64 {
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (cache, keys) = (cache.clone(), keys.clone());
            tokio::spawn(async move {
                let offset = t * keys.len() / tasks;
                let mut found = 0usize;
                for i in 0..ops / tasks {
                    if cache.hit(&keys[(offset + i) % keys.len()]).await {
                        found += 1;
                    }
                }
                assert_eq!(found, ops / tasks, "every read is an L1 hit");
            })
        })
        .collect();
    for handle in handles {
        handle.await.expect("reader");
    }
    (ops / tasks * tasks) as f64 / start.elapsed().as_secs_f64()
}

/// The median ratio of Keel's L1-hit ops/s to raw moka's, over paired
/// runs, with `tasks` concurrent readers.
async fn l1(args: &Args, tasks: usize, label: &str) -> f64 {
    let keys: Arc<Vec<String>> =
        Arc::new((0..args.l1_keys).map(|i| format!("l1-key-{i}")).collect());
    let tiered = Tiered::builder(tiered_config()).build().expect("config");
    let raw: moka::future::Cache<String, Bytes> = moka::future::Cache::builder()
        .max_capacity(512 << 20)
        .weigher(|k: &String, v: &Bytes| (k.len() + v.len() + 64) as u32)
        .time_to_live(Duration::from_secs(600))
        .build();
    // For context: moka's synchronous cache, which `Tiered` keeps as L1.
    let raw_sync: moka::sync::Cache<String, Bytes> = moka::sync::Cache::builder()
        .max_capacity(512 << 20)
        .weigher(|k: &String, v: &Bytes| (k.len() + v.len() + 64) as u32)
        .time_to_live(Duration::from_secs(600))
        .build();
    for key in keys.iter() {
        tiered
            .set(key, value(), Duration::from_secs(600))
            .await
            .expect("set");
        raw.insert(key.clone(), value()).await;
        raw_sync.insert(key.clone(), value());
    }
    // For context: Keel's moka backend on its own.
    let backend =
        MokaCache::new(MokaCacheConfig::default().max_capacity_bytes(512 << 20)).expect("config");
    for key in keys.iter() {
        backend
            .set(key, value(), Duration::from_secs(600))
            .await
            .expect("set");
    }
    let dyn_cache: Arc<dyn Cache> = Arc::new(tiered);
    let dyn_backend: Arc<dyn Cache> = Arc::new(backend);
    // Warm-up.
    l1_run(&dyn_cache, &keys, args.l1_ops / 4, tasks).await;
    l1_run(&raw, &keys, args.l1_ops / 4, tasks).await;
    // Paired runs, order alternating, so both sides of a pair see the same
    // interference; the median of the pairs' ratios counts.
    let mut ratios = Vec::with_capacity(args.runs);
    let mut backend_ratios = Vec::with_capacity(args.runs);
    let mut sync_ratios = Vec::with_capacity(args.runs);
    for run in 0..args.runs {
        let (keel, raw_ops) = if run % 2 == 0 {
            let keel = l1_run(&dyn_cache, &keys, args.l1_ops, tasks).await;
            (keel, l1_run(&raw, &keys, args.l1_ops, tasks).await)
        } else {
            let raw_ops = l1_run(&raw, &keys, args.l1_ops, tasks).await;
            (l1_run(&dyn_cache, &keys, args.l1_ops, tasks).await, raw_ops)
        };
        let backend_ops = l1_run(&dyn_backend, &keys, args.l1_ops, tasks).await;
        let sync_ops = l1_run(&raw_sync, &keys, args.l1_ops, tasks).await;
        println!(
            "threads {label} l1 run {run}: keel Tiered::get {keel:.0} ops/s, raw moka get {raw_ops:.0} ops/s, \
             ratio {:.3} (keel MokaCache::get {backend_ops:.0} ops/s, raw moka::sync get {sync_ops:.0} ops/s)",
            keel / raw_ops
        );
        ratios.push(keel / raw_ops);
        backend_ratios.push(backend_ops / raw_ops);
        sync_ratios.push(sync_ops / raw_ops);
    }
    println!(
        "threads {label} l1 context: MokaCache (no freshness check, no L2) median ratio {:.3}; \
         raw moka::sync::Cache median ratio {:.3}",
        median(&mut backend_ratios),
        median(&mut sync_ratios)
    );
    median(&mut ratios)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Mean and p99 of `samples`.
fn summary(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
    (mean, p99)
}

/// Latencies of `Tiered::get` on keys that are in L2 only (a fresh L1).
async fn keel_l2_run(l2: &RedisCache, keys: &[String]) -> Vec<Duration> {
    let tiered = Tiered::builder(tiered_config())
        .l2(l2.clone())
        .build()
        .expect("config");
    let mut samples = Vec::with_capacity(keys.len());
    for key in keys {
        let start = Instant::now();
        let got = tiered.get(key).await.expect("get");
        samples.push(start.elapsed());
        assert!(got.is_some(), "an L2 hit");
    }
    samples
}

/// Latencies of `pool.get()` + `GET` through deadpool-redis.
async fn raw_l2_run(pool: &deadpool_redis::Pool, prefix: &str, keys: &[String]) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(keys.len());
    for key in keys {
        let start = Instant::now();
        let mut conn = pool.get().await.expect("pooled connection");
        let got: Option<Vec<u8>> = deadpool_redis::redis::cmd("GET")
            .arg(format!("{prefix}{key}"))
            .query_async(&mut *conn)
            .await
            .expect("GET");
        drop(conn);
        samples.push(start.elapsed());
        assert!(got.is_some(), "a hit");
    }
    samples
}

/// The median ratio of Keel's mean L2-hit latency to raw deadpool-redis
/// `GET`s, over paired runs (order alternating).
async fn l2(args: &Args, url: &str, prefix: &str) -> f64 {
    let l2 = RedisCache::connect(RedisCacheConfig::new(url).prefix(prefix))
        .await
        .expect("connect to redis");
    let pool = deadpool_redis::Config::from_url(url)
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .expect("pool");
    let keys: Vec<String> = (0..args.l2_ops).map(|i| format!("l2-key-{i}")).collect();
    // The values Tiered wrote are what both sides read: the same bytes.
    let writer = Tiered::builder(tiered_config())
        .l2(l2.clone())
        .build()
        .expect("config");
    for chunk in keys.chunks(500) {
        let pairs: Vec<(&str, Bytes)> = chunk.iter().map(|k| (k.as_str(), value())).collect();
        writer
            .set_many(&pairs, Duration::from_secs(600))
            .await
            .expect("set_many");
    }
    // Warm-up: connections and server caches.
    keel_l2_run(&l2, &keys[..keys.len().min(500)]).await;
    raw_l2_run(&pool, prefix, &keys[..keys.len().min(500)]).await;
    let mut ratios = Vec::with_capacity(args.runs);
    for run in 0..args.runs {
        let (mut keel, mut raw) = if run % 2 == 0 {
            let keel = keel_l2_run(&l2, &keys).await;
            (keel, raw_l2_run(&pool, prefix, &keys).await)
        } else {
            let raw = raw_l2_run(&pool, prefix, &keys).await;
            (keel_l2_run(&l2, &keys).await, raw)
        };
        let (keel_mean, keel_p99) = summary(&mut keel);
        let (raw_mean, raw_p99) = summary(&mut raw);
        let ratio = keel_mean.as_secs_f64() / raw_mean.as_secs_f64();
        println!(
            "l2 run {run}: keel Tiered::get (L1 miss, L2 hit) mean {keel_mean:?} p99 {keel_p99:?}; \
             raw deadpool get+GET mean {raw_mean:?} p99 {raw_p99:?}; ratio {ratio:.3}"
        );
        ratios.push(ratio);
    }
    // For context: a raw GET on a connection held across requests (no
    // pool checkout), the floor any client can reach.
    let mut conn = pool.get().await.expect("pooled connection");
    let mut held = Vec::with_capacity(keys.len());
    for key in &keys {
        let start = Instant::now();
        let _: Option<Vec<u8>> = deadpool_redis::redis::cmd("GET")
            .arg(format!("{prefix}{key}"))
            .query_async(&mut *conn)
            .await
            .expect("GET");
        held.push(start.elapsed());
    }
    let (held_mean, held_p99) = summary(&mut held);
    println!("l2 context: raw GET on a held connection mean {held_mean:?} p99 {held_p99:?}");
    median(&mut ratios)
}

/// Loader calls for `callers` concurrent `get_or_load`s of one cold key.
async fn stampede(callers: usize, url: &str, prefix: &str) -> usize {
    let l2 = RedisCache::connect(RedisCacheConfig::new(url).prefix(prefix))
        .await
        .expect("connect to redis");
    let cache = Tiered::builder(tiered_config())
        .l2(l2)
        .build()
        .expect("config");
    let calls = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(callers);
    for _ in 0..callers {
        let cache = cache.clone();
        let calls = calls.clone();
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load("stampede-cold-key", move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, std::convert::Infallible>(value())
                })
                .await
        }));
    }
    for task in tasks {
        task.await.expect("task").expect("get_or_load");
    }
    let calls = calls.load(Ordering::SeqCst);
    println!(
        "stampede: {callers} concurrent get_or_load on a cold key -> {calls} origin call(s) in {:?}",
        start.elapsed()
    );
    calls
}

/// Deletes the bench's keys.
async fn cleanup(url: &str, prefix: &str) {
    let pool = deadpool_redis::Config::from_url(url)
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .expect("pool");
    let mut conn = pool.get().await.expect("connection");
    let keys: Vec<String> = deadpool_redis::redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut *conn)
        .await
        .unwrap_or_default();
    for chunk in keys.chunks(1000) {
        let _: Result<(), _> = deadpool_redis::redis::cmd("DEL")
            .arg(chunk)
            .query_async(&mut *conn)
            .await;
    }
}

fn main() {
    let args = Args::parse();
    let url = bench_runtime(Some(1)).block_on(keel_testkit::require_redis());
    // (worker threads, concurrent readers) per L1 measurement.
    let counts: Vec<(usize, usize)> = if args.threads.is_empty() {
        vec![(2, 1)]
    } else {
        args.threads.iter().map(|&n| (n.max(1), n.max(1))).collect()
    };
    println!(
        "keel-cache bench: {} L1 gets over {} keys, {} L2 reads, {} stampede callers; \
         512-byte values; {} paired runs, median ratio; threads {}",
        args.l1_ops,
        args.l1_keys,
        args.l2_ops,
        args.stampede,
        args.runs,
        thread_list(counts.iter().map(|(n, _)| n))
    );
    let mut l1_ratio = 0.0;
    for &(threads, tasks) in &counts {
        let label = threads.to_string();
        l1_ratio = bench_runtime(Some(threads)).block_on(l1(&args, tasks, &label));
        println!("threads {label}: median l1 ratio {l1_ratio:.3}");
    }
    let rt = bench_runtime(Some(counts.last().map_or(2, |&(n, _)| n)));
    rt.block_on(async {
        let prefix = format!("keel-bench-cache-{}:", std::process::id());
        let l2_ratio = l2(&args, &url, &prefix).await;
        let calls = stampede(args.stampede, &url, &prefix).await;
        cleanup(&url, &prefix).await;
        println!(
            "median l1 ratio {l1_ratio:.3} (target >= 0.9), median l2 latency ratio {l2_ratio:.3} \
             (target <= 1.2), stampede origin calls {calls} (target 1)"
        );
        println!(
            "{{\"l1_ratio\": {l1_ratio:.3}, \"l2_latency_ratio\": {l2_ratio:.3}, \"stampede_origin_calls\": {calls}}}"
        );
    });
}
