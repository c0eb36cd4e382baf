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
//! One warm-up run, then `--runs` measured runs of each side, alternating;
//! the best of each counts. The last line printed is one JSON object:
//! `{"keel_items_per_s": N, "mpsc_items_per_s": N, "ratio": R}`.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::time::Duration;

use clap::Parser;
use keel_scheduler::{Scheduler, SchedulerConfig, TenantId, Ticket};
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
        .max_queued_per_tenant(args.submitters * 2);
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

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Some(side) = &args.only {
        runtime.block_on(async {
            for run in 1..=args.runs {
                let rate = match side.as_str() {
                    "keel" => keel(&args).await,
                    "mpsc" => mpsc_hand_off(&args).await,
                    other => panic!("--only takes keel or mpsc, not {other}"),
                };
                println!("run {run}        {side} {rate:>12.0}/s");
            }
        });
        return;
    }
    runtime.block_on(async {
        println!(
            "admission + dispatch to a no-op service: {} requests per run, {} submitters, {} tenants",
            args.items, args.submitters, args.tenants
        );
        let warm = Args {
            items: args.items / 4,
            only: None,
            ..args
        };
        let (k, m) = (keel(&warm).await, mpsc_hand_off(&warm).await);
        println!("warm-up      keel {k:>12.0}/s   mpsc {m:>12.0}/s");
        let (mut best_keel, mut best_mpsc) = (0f64, 0f64);
        for run in 1..=args.runs {
            let k = keel(&args).await;
            let m = mpsc_hand_off(&args).await;
            println!("run {run}        keel {k:>12.0}/s   mpsc {m:>12.0}/s   ratio {:.3}", k / m);
            best_keel = best_keel.max(k);
            best_mpsc = best_mpsc.max(m);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ratio = best_keel / best_mpsc;
        println!("best         keel {best_keel:>12.0}/s   mpsc {best_mpsc:>12.0}/s   ratio {ratio:.3}");
        println!(
            "{{\"keel_items_per_s\": {}, \"mpsc_items_per_s\": {}, \"ratio\": {:.3}}}",
            best_keel.round() as u64,
            best_mpsc.round() as u64,
            ratio
        );
    });
}
