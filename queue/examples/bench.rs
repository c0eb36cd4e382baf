//! End-to-end queue throughput against the raw dependency, in the same run.
//!
//! ```text
//! cargo run --release -p keel-queue --example bench --all-features -- --backend memory
//! ```
//!
//! The cycle is enqueue → dequeue → ack of 256-byte payloads, batched where
//! the backend allows, with one producer task and one consumer task. The
//! raw baseline does the same cycle with the dependency alone (a tokio
//! bounded mpsc for memory). The last line printed is one JSON object:
//! `{"backend": "...", "keel_jobs_per_s": N, "raw_jobs_per_s": N, "ratio": R}`.
//!
//! `--backend redis-cluster` (feature `cluster`) starts a disposable Redis
//! Cluster of the test kit (3 masters, 3 replicas, all on this machine) and
//! runs the cycle there on a `ShardedQueue` of `--shards N` Redis queues
//! (`name#0` … `name#N-1`, N hash slots; one queue, one slot, one master
//! when N is 1); the raw side is the same `XADD` / `XREADGROUP` / `XACK`
//! pipelines through the cluster client on N hash-tagged streams (the
//! producer's batches round-robin over them, the consumer reads them in
//! turn), producer and consumer on connections of their own. Its JSON line
//! also carries `"shards": N`.
//!
//! `--threads` sets the Tokio worker threads: one count (`--threads 2`) or
//! a list (`--threads 1,2,4`), each measured in the same run on its own
//! runtime, with a `threads N: ... ratio R` line each; the JSON line is the
//! **last** count's. Without it, Tokio's default (one thread per core).
//!
//! `--only keel` or `--only raw` runs one side alone (memory backend), for
//! profiling; then no JSON line is printed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use keel_queue::{DequeueOptions, Job, MemoryQueue, Priority, Queue, QueueConfig};
use keel_testkit::{bench_runtime, thread_list};
use tokio::time::Instant;

#[cfg(feature = "amqp")]
#[path = "../tests/support/amqp.rs"]
mod amqp_support;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Priorities {
    Normal,
    Mixed,
}

#[derive(Debug, Parser)]
struct Args {
    /// memory, redis, redis-cluster or amqp.
    #[arg(long, default_value = "memory")]
    backend: String,
    /// Jobs per measured run.
    #[arg(long, default_value_t = 200_000)]
    jobs: usize,
    /// Jobs per enqueue batch and per dequeue.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Bound the Keel queue to this many jobs (default: unbounded, the
    /// `QueueConfig` default). On Redis a bounded queue enqueues through a
    /// Lua script that checks the bound; an unbounded one with plain jobs
    /// uses an atomic pipeline.
    #[arg(long)]
    capacity: Option<u64>,
    /// Priorities of Keel's jobs: `normal` (all at the default level) or
    /// `mixed` (jobs cycle through the three levels; the raw side has no
    /// priorities, so this shows what serving them costs).
    #[arg(long, default_value = "normal")]
    priorities: Priorities,
    /// Measured runs of each side (alternating); the best run of each counts.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Tokio worker threads: one count or a comma-separated list (the JSON
    /// line reports the last). Default: one per core.
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Run only one side (`keel` or `raw`), for profiling; the JSON line is
    /// printed only when both run. Memory backend only.
    #[arg(long)]
    only: Option<String>,
    /// Shards of the queue for `--backend redis-cluster`.
    #[arg(long, default_value_t = 1)]
    shards: usize,
}

/// One full cycle through a Keel queue; answers jobs per second.
async fn keel_cycle(
    queue: Arc<dyn Queue>,
    jobs: usize,
    batch: usize,
    priorities: Priorities,
) -> f64 {
    let payload = Bytes::from(vec![7u8; 256]);
    let start = Instant::now();
    let producer = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            while sent < jobs {
                let n = batch.min(jobs - sent);
                let batch: Vec<Job> = (sent..sent + n)
                    .map(|k| {
                        let job = Job::new(payload.clone());
                        match priorities {
                            Priorities::Normal => job,
                            Priorities::Mixed => job.priority(Priority((k % 3) as u8)),
                        }
                    })
                    .collect();
                match queue.enqueue_batch(batch).await {
                    Ok(_) => sent += n,
                    Err(err) if err.is_retryable() => tokio::task::yield_now().await,
                    Err(err) => panic!("enqueue failed: {err}"),
                }
            }
        })
    };
    let mut acked = 0;
    let options = DequeueOptions::new(batch)
        .wait(Duration::from_secs(5))
        .lease(Duration::from_secs(60));
    while acked < jobs {
        let deliveries = queue.dequeue(options).await.expect("dequeue");
        assert!(!deliveries.is_empty(), "consumer starved for 5 s");
        let n = deliveries.len();
        let receipts: Vec<_> = deliveries.into_iter().map(|d| d.receipt).collect();
        queue.ack_batch(&receipts).await.expect("ack");
        acked += n;
    }
    producer.await.expect("producer");
    jobs as f64 / start.elapsed().as_secs_f64()
}

/// The same cycle through a tokio bounded mpsc.
async fn raw_memory_cycle(jobs: usize, batch: usize) -> f64 {
    let payload = Bytes::from(vec![7u8; 256]);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16_384);
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        for _ in 0..jobs {
            tx.send(payload.clone()).await.expect("send");
        }
    });
    let mut received = 0;
    let mut buf = Vec::with_capacity(batch);
    while received < jobs {
        buf.clear();
        let n = rx.recv_many(&mut buf, batch).await;
        assert!(n > 0, "channel closed early");
        received += n;
    }
    producer.await.expect("producer");
    jobs as f64 / start.elapsed().as_secs_f64()
}

/// The same cycle with raw `XADD` / `XREADGROUP` / `XACK` pipelines through
/// deadpool-redis.
#[cfg(feature = "redis")]
async fn raw_redis_cycle(url: &str, key: &str, jobs: usize, batch: usize) -> f64 {
    let pool = deadpool_redis::Config::from_url(url)
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .expect("pool");
    {
        let mut conn = pool.get().await.expect("redis connection");
        let _: Result<(), _> = deadpool_redis::redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg("g")
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut *conn)
            .await;
    }
    let payload = vec![7u8; 256];
    let start = Instant::now();
    let producer = {
        let pool = pool.clone();
        let key = key.to_owned();
        tokio::spawn(async move {
            let mut sent = 0;
            while sent < jobs {
                let n = batch.min(jobs - sent);
                let mut pipe = deadpool_redis::redis::pipe();
                for _ in 0..n {
                    pipe.cmd("XADD")
                        .arg(&key)
                        .arg("*")
                        .arg("p")
                        .arg(&payload[..])
                        .ignore();
                }
                let mut conn = pool.get().await.expect("redis connection");
                let () = pipe.query_async(&mut *conn).await.expect("xadd");
                sent += n;
            }
        })
    };
    let mut acked = 0;
    while acked < jobs {
        type Reply = Vec<(String, Vec<(String, Vec<(String, Vec<u8>)>)>)>;
        let mut conn = pool.get().await.expect("redis connection");
        let reply: Option<Reply> = deadpool_redis::redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(batch)
            .arg("BLOCK")
            .arg(5000)
            .arg("STREAMS")
            .arg(key)
            .arg(">")
            .query_async(&mut *conn)
            .await
            .expect("xreadgroup");
        let entries = reply
            .and_then(|mut r| r.pop())
            .map(|(_, e)| e)
            .unwrap_or_default();
        assert!(!entries.is_empty(), "raw consumer starved for 5 s");
        let ids: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
        let () = deadpool_redis::redis::cmd("XACK")
            .arg(key)
            .arg("g")
            .arg(&ids)
            .query_async(&mut *conn)
            .await
            .expect("xack");
        acked += entries.len();
    }
    producer.await.expect("producer");
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    let mut conn = pool.get().await.expect("redis connection");
    let _: Result<(), _> = deadpool_redis::redis::cmd("DEL")
        .arg(key)
        .query_async(&mut *conn)
        .await;
    rate
}

/// The raw cycle on a Redis Cluster: `XADD` pipelines from a producer on
/// one cluster connection, `XREADGROUP BLOCK` + `XACK` from a consumer on
/// another (a blocking read must not share the producer's connection).
#[cfg(feature = "cluster")]
async fn raw_cluster_cycle(seeds: &[String], keys: &[String], jobs: usize, batch: usize) -> f64 {
    use keel_core::redis::{RedisConfig, RedisPool};
    let connect = || async {
        RedisPool::connect(RedisConfig::cluster(seeds.iter().cloned()))
            .await
            .expect("connect to the redis cluster")
            .connection()
            .await
            .expect("cluster connection")
    };
    let (mut producer_conn, mut conn) = (connect().await, connect().await);
    for key in keys {
        let _: Result<(), _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg("g")
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
    }
    let payload = vec![7u8; 256];
    let start = Instant::now();
    let producer = {
        let keys = keys.to_vec();
        tokio::spawn(async move {
            let mut sent = 0;
            let mut next = 0;
            while sent < jobs {
                let n = batch.min(jobs - sent);
                let key = &keys[next % keys.len()];
                next += 1;
                let mut pipe = redis::pipe();
                for _ in 0..n {
                    pipe.cmd("XADD")
                        .arg(key)
                        .arg("*")
                        .arg("p")
                        .arg(&payload[..])
                        .ignore();
                }
                let () = pipe.query_async(&mut producer_conn).await.expect("xadd");
                sent += n;
            }
        })
    };
    let mut acked = 0;
    let mut turn = 0;
    let mut empty_since: Option<Instant> = None;
    while acked < jobs {
        type Reply = Vec<(String, Vec<(String, Vec<(String, Vec<u8>)>)>)>;
        let key = &keys[turn % keys.len()];
        turn += 1;
        // One stream: a blocking read. Several: each in turn without
        // blocking (a blocking read of an empty one would stall the rest).
        let block = if keys.len() == 1 { 1000 } else { 0 };
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP").arg("g").arg("c").arg("COUNT").arg(batch);
        if block > 0 {
            read.arg("BLOCK").arg(block);
        }
        let reply: Option<Reply> = read
            .arg("STREAMS")
            .arg(key)
            .arg(">")
            .query_async(&mut conn)
            .await
            .expect("xreadgroup");
        let entries = reply
            .and_then(|mut r| r.pop())
            .map(|(_, e)| e)
            .unwrap_or_default();
        if entries.is_empty() {
            let since = *empty_since.get_or_insert_with(Instant::now);
            assert!(
                since.elapsed() < Duration::from_secs(5),
                "raw consumer starved for 5 s"
            );
            if block == 0 && turn % keys.len() == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            continue;
        }
        empty_since = None;
        let ids: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
        let () = redis::cmd("XACK")
            .arg(key)
            .arg("g")
            .arg(&ids)
            .query_async(&mut conn)
            .await
            .expect("xack");
        acked += entries.len();
    }
    producer.await.expect("producer");
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    for key in keys {
        let _: Result<(), _> = redis::cmd("DEL").arg(key).query_async(&mut conn).await;
    }
    rate
}

#[cfg(feature = "redis")]
async fn redis_keel_queue(url: &str, config: QueueConfig) -> Result<Arc<dyn Queue>, String> {
    let queue = keel_queue::RedisQueue::connect(keel_queue::RedisQueueConfig::new(url, config))
        .await
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(queue))
}

#[cfg(feature = "redis")]
fn redis_cleanup(url: &str, name: &str) {
    let _ = keel_testkit::redis_cleanup(url, name);
}

/// The same cycle with raw lapin: confirm-publish in batches to a durable
/// quorum queue, and a consumer with the same prefetch acking each delivery.
#[cfg(feature = "amqp")]
async fn raw_amqp_cycle(url: &str, queue: &str, jobs: usize, batch: usize) -> f64 {
    use futures::StreamExt;
    use lapin::options::*;
    use lapin::types::{AMQPValue, FieldTable, LongString};

    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("rabbitmq connection");
    let publisher = conn.create_channel().await.expect("channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(b"quorum".to_vec())),
    );
    publisher
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("declare");
    let consumer_channel = conn.create_channel().await.expect("channel");
    consumer_channel
        .basic_qos(64, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consumer_channel
        .basic_consume(
            queue.into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let payload = vec![7u8; 256];
    let start = Instant::now();
    let producer = {
        let queue = queue.to_owned();
        tokio::spawn(async move {
            let mut sent = 0;
            while sent < jobs {
                let n = batch.min(jobs - sent);
                let mut confirms = Vec::with_capacity(n);
                for _ in 0..n {
                    confirms.push(
                        publisher
                            .basic_publish(
                                "".into(),
                                queue.as_str().into(),
                                BasicPublishOptions {
                                    mandatory: true,
                                    ..Default::default()
                                },
                                &payload,
                                lapin::BasicProperties::default().with_delivery_mode(2),
                            )
                            .await
                            .expect("publish"),
                    );
                }
                for confirm in confirms {
                    confirm.await.expect("confirm");
                }
                sent += n;
            }
            publisher
        })
    };
    let mut acked = 0;
    while acked < jobs {
        let delivery = consumer
            .next()
            .await
            .expect("consumer ended")
            .expect("delivery");
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
        acked += 1;
    }
    let publisher = producer.await.expect("producer");
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    let _ = publisher
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "bench done".into()).await;
    rate
}

/// The names of run `run`'s Keel queue and raw queue on a server, unique
/// to this process.
#[cfg(any(feature = "redis", feature = "amqp"))]
fn server_names(run: usize) -> (String, String) {
    let pid = std::process::id();
    (
        format!("keel-bench-{pid}-{run}"),
        format!("keel-bench-raw-{pid}-{run}"),
    )
}

/// The Keel queue's settings for one run.
fn queue_config(args: &Args, name: &str) -> QueueConfig {
    let config = QueueConfig::new(name);
    match args.capacity {
        Some(capacity) => config.capacity(capacity),
        None => config,
    }
}

async fn measure(args: &Args) -> Result<(f64, f64), String> {
    let mut best_keel = 0f64;
    let mut best_raw = 0f64;
    for run in 0..args.runs + 1 {
        let (keel, raw) = match args.backend.as_str() {
            "memory" => {
                let queue = MemoryQueue::new(queue_config(args, &format!("bench-{run}")))
                    .map_err(|e| e.to_string())?;
                (
                    keel_cycle(Arc::new(queue), args.jobs, args.batch, args.priorities).await,
                    raw_memory_cycle(args.jobs, args.batch).await,
                )
            }
            #[cfg(feature = "redis")]
            "redis" => {
                let url = keel_testkit::redis_url();
                let (name, raw_name) = server_names(run);
                let queue = redis_keel_queue(&url, queue_config(args, &name)).await?;
                let keel = keel_cycle(queue, args.jobs, args.batch, args.priorities).await;
                redis_cleanup(&url, &name);
                let raw = raw_redis_cycle(&url, &raw_name, args.jobs, args.batch).await;
                (keel, raw)
            }
            #[cfg(feature = "cluster")]
            "redis-cluster" => {
                let cluster = keel_testkit::RedisCluster::shared()
                    .await
                    .map_err(|e| format!("could not start a redis cluster: {e}"))?;
                let (name, raw_name) = server_names(run);
                let pool = keel_core::redis::RedisPool::new(
                    keel_core::redis::RedisConfig::cluster(cluster.urls()),
                )
                .map_err(|e| e.to_string())?;
                let mut shards = Vec::with_capacity(args.shards);
                for i in 0..args.shards {
                    let config = queue_config(args, &format!("{name}#{i}"));
                    shards.push(
                        keel_queue::RedisQueue::with_pool(
                            pool.clone(),
                            keel_queue::RedisQueueConfig::with_redis(pool.config().clone(), config),
                        )
                        .await
                        .map_err(|e| e.to_string())?,
                    );
                }
                let queue = keel_queue::ShardedQueue::new(shards).map_err(|e| e.to_string())?;
                let keel = keel_cycle(
                    Arc::new(queue.clone()),
                    args.jobs,
                    args.batch,
                    args.priorities,
                )
                .await;
                queue.delete().await.map_err(|e| e.to_string())?;
                let keys: Vec<String> = (0..args.shards)
                    .map(|i| format!("{{{raw_name}#{i}}}:stream"))
                    .collect();
                let raw = raw_cluster_cycle(&cluster.urls(), &keys, args.jobs, args.batch).await;
                (keel, raw)
            }
            #[cfg(feature = "amqp")]
            "amqp" => {
                let url = keel_testkit::amqp_url();
                let (name, raw_name) = server_names(run);
                let config = queue_config(args, &name);
                let levels = config.priority_levels;
                let queue = keel_queue::AmqpQueue::connect(keel_queue::AmqpQueueConfig::new(
                    url.as_str(),
                    config,
                ))
                .await
                .map_err(|e| e.to_string())?;
                let keel = keel_cycle(
                    Arc::new(queue.clone()),
                    args.jobs,
                    args.batch,
                    args.priorities,
                )
                .await;
                drop(queue);
                // Best effort: a broker that went away keeps the queues.
                let _ = amqp_support::delete_topology(&url, &name, levels).await;
                let raw = raw_amqp_cycle(&url, &raw_name, args.jobs, args.batch).await;
                (keel, raw)
            }
            other => {
                return Err(format!(
                    "--backend {other}: unknown or not compiled in (memory{}{}{})",
                    if cfg!(feature = "redis") {
                        ", redis"
                    } else {
                        ""
                    },
                    if cfg!(feature = "cluster") {
                        ", redis-cluster"
                    } else {
                        ""
                    },
                    if cfg!(feature = "amqp") { ", amqp" } else { "" },
                ));
            }
        };
        if run == 0 {
            println!("warm-up: keel {keel:.0} jobs/s, raw {raw:.0} jobs/s");
            continue;
        }
        println!(
            "run {run}: keel {keel:.0} jobs/s, raw {raw:.0} jobs/s, ratio {:.3}",
            keel / raw
        );
        best_keel = best_keel.max(keel);
        best_raw = best_raw.max(raw);
    }
    Ok((best_keel, best_raw))
}

/// One side alone, for profiling (`--only`).
async fn only(args: &Args, side: &str, label: &str) -> Result<(), String> {
    if args.backend != "memory" {
        return Err("--only is for --backend memory".to_owned());
    }
    for run in 1..=args.runs {
        let rate = match side {
            "keel" => {
                let queue = MemoryQueue::new(queue_config(args, &format!("bench-{run}")))
                    .map_err(|e| e.to_string())?;
                keel_cycle(Arc::new(queue), args.jobs, args.batch, args.priorities).await
            }
            "raw" => raw_memory_cycle(args.jobs, args.batch).await,
            other => return Err(format!("--only takes keel or raw, not {other}")),
        };
        println!("threads {label} run {run}: {side} {rate:.0} jobs/s");
    }
    Ok(())
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let counts: Vec<Option<usize>> = if args.threads.is_empty() {
        vec![None]
    } else {
        args.threads.iter().map(|&n| Some(n)).collect()
    };
    let label = |n: Option<usize>| n.map_or_else(|| "default".to_owned(), |n| n.to_string());
    if let Some(side) = &args.only {
        for &n in &counts {
            bench_runtime(n).block_on(only(&args, side, &label(n)))?;
        }
        return Ok(());
    }
    println!(
        "backend {}: {} jobs of 256 bytes per run, batches of {}, 1 producer + 1 consumer, best of {} runs, priorities {:?}, capacity {}, threads {}",
        args.backend,
        args.jobs,
        args.batch,
        args.runs,
        args.priorities,
        args.capacity
            .map_or("unbounded".to_owned(), |c| c.to_string()),
        thread_list(counts.iter().map(|&n| label(n)))
    );
    let mut last = (0.0, 0.0);
    for &n in &counts {
        let (keel, raw) = bench_runtime(n).block_on(measure(&args))?;
        println!(
            "threads {}: keel {keel:.0} jobs/s, raw {raw:.0} jobs/s, ratio {:.3}",
            label(n),
            keel / raw
        );
        last = (keel, raw);
    }
    let (keel, raw) = last;
    let shards = if args.backend == "redis-cluster" {
        format!(", \"shards\": {}", args.shards)
    } else {
        String::new()
    };
    println!(
        "{{\"backend\": \"{}\"{shards}, \"keel_jobs_per_s\": {:.0}, \"raw_jobs_per_s\": {:.0}, \"ratio\": {:.3}}}",
        args.backend,
        keel,
        raw,
        keel / raw
    );
    Ok(())
}
