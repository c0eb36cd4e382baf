//! Admission + dispatch throughput against a plain tokio mpsc hand-off,
//! measured in the same run.
//!
//! ```text
//! cargo run --release -p keel-scheduler --example bench
//! ```
//!
//! Both sides run the same load: `--submitters` tasks, each submitting
//! requests one after another (a request, then its answer, then the next)
//! to a no-op service, `--items` requests in total.
//!
//! - **keel**: `Scheduler::submit` with a ticket (one of `--tenants`
//!   tenants, normal priority, no deadline), so every request goes through
//!   the admission checks, the ordered queue (class, tenant round robin,
//!   deadline order), the dispatcher and back.
//! - **mpsc**: the minimal equivalent without ordering: each request and a
//!   oneshot for its answer go through a bounded tokio mpsc to one
//!   dispatcher task that calls the service and sends the answer back.
//!
//! `--threads` sets the Tokio worker threads: one count (`--threads 2`) or
//! a list (`--threads 1,2,4`), each measured in the same run on its own
//! runtime, rounds interleaved across the counts; without it, Tokio's
//! default (one per core). For each count: one warm-up run, then `--runs`
//! measured runs of each side, alternating; the best of each counts, and
//! a line `threads N: ... ratio R` reports it.
//!
//! The last line printed is one JSON object,
//! `{"keel_items_per_s": N, "mpsc_items_per_s": N, "ratio": R}`, for the
//! **last** thread count given (the only one without a list).

use std::convert::Infallible;
use std::future::{Ready, ready};

use clap::Parser;
use keel_scheduler::{Scheduler, SchedulerConfig, TenantId, Ticket};
use keel_testkit::{bench_runtime, thread_list};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

#[derive(Debug, Parser)]
struct Args {
    /// Requests per measured run.
    #[arg(long, default_value_t = 250_000)]
    items: usize,
    /// Concurrent submitting tasks.
    #[arg(long, default_value_t = 64)]
    submitters: usize,
    /// Tenants the requests are spread over.
    #[arg(long, default_value_t = 8)]
    tenants: usize,
    /// Measured runs of each side (alternating); the best of each counts.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Run only one side (`keel` or `mpsc`), for profiling; the JSON line
    /// is printed only when both run.
    #[arg(long)]
    only: Option<String>,
    /// Tokio worker threads: one count or a comma-separated list (the
    /// JSON line reports the last). Default: one per core.
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Per-tenant queue bound (default: the total bound, `2 × submitters`,
    /// so the total bound alone applies).
    #[arg(long)]
    max_queued_per_tenant: Option<usize>,
}

/// The no-op service both sides call.
#[derive(Clone, Copy)]
struct Noop;

impl Service<u64> for Noop {
    type Response = u64;
    type Error = Infallible;
    type Future = Ready<Result<u64, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: u64) -> Self::Future {
        ready(Ok(req))
    }
}

/// Splits `items` over `submitters`.
fn shares(items: usize, submitters: usize) -> impl Iterator<Item = usize> {
    (0..submitters).map(move |i| items / submitters + usize::from(i < items % submitters))
}

async fn keel(args: &Args) -> f64 {
    let config = SchedulerConfig::new("bench")
        .max_queued(args.submitters * 2)
        .max_queued_per_tenant(args.max_queued_per_tenant.unwrap_or(args.submitters * 2));
    let scheduler = Scheduler::new(config, Noop).expect("valid config");
    let tenants: Vec<TenantId> = (0..args.tenants)
        .map(|t| TenantId::new(format!("tenant-{t}")))
        .collect();
    let start = Instant::now();
    let tasks: Vec<_> = shares(args.items, args.submitters)
        .enumerate()
        .map(|(i, n)| {
            let scheduler = scheduler.clone();
            let tenant = tenants[i % tenants.len()].clone();
            tokio::spawn(async move {
                for k in 0..n as u64 {
                    let answer = scheduler
                        .submit(Ticket::new(&tenant), k)
                        .await
                        .expect("admitted");
                    debug_assert_eq!(answer, k);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("submitter");
    }
    args.items as f64 / start.elapsed().as_secs_f64()
}

async fn mpsc_hand_off(args: &Args) -> f64 {
    let (tx, mut rx) = mpsc::channel::<(u64, oneshot::Sender<u64>)>(1_024);
    let dispatcher = tokio::spawn(async move {
        let mut service = Noop;
        while let Some((req, reply)) = rx.recv().await {
            let svc = service.ready().await.expect("ready");
            let answer = svc.call(req).await.expect("no-op");
            let _ = reply.send(answer);
        }
    });
    let start = Instant::now();
    let tasks: Vec<_> = shares(args.items, args.submitters)
        .map(|n| {
            let tx = tx.clone();
            tokio::spawn(async move {
                for k in 0..n as u64 {
                    let (reply, answer) = oneshot::channel();
                    tx.send((k, reply)).await.expect("dispatcher alive");
                    let answer = answer.await.expect("answered");
                    debug_assert_eq!(answer, k);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("submitter");
    }
    let rate = args.items as f64 / start.elapsed().as_secs_f64();
    drop(tx);
    dispatcher.await.expect("dispatcher");
    rate
}

/// The best rates of one thread count so far.
#[derive(Default, Clone, Copy)]
struct Best {
    keel: f64,
    mpsc: f64,
}

fn main() {
    let args = Args::parse();
    let counts: Vec<Option<usize>> = if args.threads.is_empty() {
        vec![None]
    } else {
        args.threads.iter().map(|&n| Some(n.max(1))).collect()
    };
    let label = |n: Option<usize>| n.map_or_else(|| "default".to_owned(), |n| n.to_string());
    let runtimes: Vec<_> = counts.iter().map(|&n| bench_runtime(n)).collect();
    if let Some(side) = &args.only {
        for (rt, &n) in runtimes.iter().zip(&counts) {
            rt.block_on(async {
                for run in 1..=args.runs {
                    let rate = match side.as_str() {
                        "keel" => keel(&args).await,
                        "mpsc" => mpsc_hand_off(&args).await,
                        other => panic!("--only takes keel or mpsc, not {other}"),
                    };
                    println!("threads {} run {run}  {side} {rate:>12.0}/s", label(n));
                }
            });
        }
        return;
    }
    println!(
        "admission + dispatch to a no-op service: {} requests per run, {} submitters, {} tenants, threads {}",
        args.items,
        args.submitters,
        args.tenants,
        thread_list(counts.iter().map(|&n| label(n)))
    );
    let warm = Args {
        items: args.items / 4,
        only: None,
        threads: Vec::new(),
        ..args
    };
    for (rt, &n) in runtimes.iter().zip(&counts) {
        let (k, m) = rt.block_on(async { (keel(&warm).await, mpsc_hand_off(&warm).await) });
        println!(
            "threads {:>2} warm-up  keel {k:>12.0}/s   mpsc {m:>12.0}/s",
            label(n)
        );
    }
    let mut best = vec![Best::default(); counts.len()];
    for run in 1..=args.runs {
        for ((rt, &n), best) in runtimes.iter().zip(&counts).zip(&mut best) {
            let (k, m) = rt.block_on(async { (keel(&args).await, mpsc_hand_off(&args).await) });
            println!(
                "threads {:>2} run {run}    keel {k:>12.0}/s   mpsc {m:>12.0}/s   ratio {:.3}",
                label(n),
                k / m
            );
            best.keel = best.keel.max(k);
            best.mpsc = best.mpsc.max(m);
        }
    }
    for (&n, best) in counts.iter().zip(&best) {
        println!(
            "threads {:>2} best     keel {:>12.0}/s   mpsc {:>12.0}/s   ratio {:.3}",
            label(n),
            best.keel,
            best.mpsc,
            best.keel / best.mpsc
        );
    }
    let last = best.last().copied().unwrap_or_default();
    println!(
        "{{\"keel_items_per_s\": {}, \"mpsc_items_per_s\": {}, \"ratio\": {:.3}}}",
        last.keel.round() as u64,
        last.mpsc.round() as u64,
        last.keel / last.mpsc
    );
}
