//! Per-request overhead of each policy over 16 in-process endpoints, against
//! tower's `p2c::Balance` with `PeakEwma` over the same endpoints, in the
//! same run.
//!
//! ```text
//! cargo run --release -p keel-balancer --example bench
//! cargo run --release -p keel-balancer --example bench -- --threads 1,2,4
//! ```
//!
//! Each request is `ready().await` then `call(request).await`; the
//! endpoints answer at once, so what is measured is the balancer:
//! discovery check, pick, slot accounting, clock reads, completion
//! tracking. A warm-up of a tenth of `--requests`, then `--requests`
//! measured; the Keel p2c-ewma and tower sides alternate for `--runs` runs
//! and the best of each counts.
//!
//! Without `--threads`: one task on a current-thread runtime drives every
//! request, owning the balancer (as before `--threads` existed).
//!
//! `--threads` gives one count or a list (`--threads 1,2,4`). For each
//! count N, a multi-thread runtime with N workers of its own, and N tasks
//! that each drive `--requests` requests at once through one shared
//! balancer; a figure is the run's wall time divided by `--requests`, the
//! cost of one request as seen by each of the N tasks (flat across N is
//! perfect scaling), and a line `threads N best: ... ratio R` reports each
//! count. The two sides share their balancer the way a user would:
//!
//! - Keel's `Balancer` is cloned, one clone per task; the clones share one
//!   endpoint set and its load figures (its `poll_ready` and `call` take
//!   `&mut self` of the clone only).
//! - tower's `Balance` needs `&mut self` for `poll_ready` and `call` and is
//!   not `Clone`, so for N > 1 it sits behind `tower::buffer::Buffer`
//!   (bound N, one slot per task): every request goes through the
//!   buffer's channel to the one worker task that owns the `Balance`.
//!   For N = 1 the one task owns the `Balance`, as a single-task user
//!   would, so the tower figure at 1 includes no `Buffer` and the step
//!   from 1 to 2 includes the buffer's cost; the `threads 1` lines also
//!   print tower through a `Buffer` from one task, for context (not in
//!   the ratio).
//!
//! The last line printed is one JSON object,
//! `{"keel_p2c_ewma_ns": N, "tower_p2c_ewma_ns": N, "ratio": R}`, for the
//! **last** thread count given.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use keel_balancer::{
    AffinityKey, Balancer, HashConfig, Policy, PrefixConfig, Prompt, RequestExtensions,
};
use keel_testkit::{bench_runtime, thread_list};
use tokio::time::Instant;
use tower::buffer::Buffer;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover};
use tower::{Service, ServiceExt};

#[derive(Debug, Parser)]
struct Args {
    /// Requests per measured run.
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// Measured runs of Keel p2c-ewma and tower p2c (alternating); the best
    /// run of each counts.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Tokio worker threads, one count or a comma-separated list; as many
    /// tasks drive requests at once through one shared balancer. The JSON
    /// line reports the last. Default: one task, current-thread runtime.
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
}

/// A request type with extensions, like any `http::Request`.
#[derive(Clone, Debug, Default)]
struct Req(http::Extensions);

impl RequestExtensions for Req {
    fn extensions(&self) -> &http::Extensions {
        &self.0
    }

    fn extensions_mut(&mut self) -> &mut http::Extensions {
        &mut self.0
    }
}

type Endpoint = tower::util::ServiceFn<fn(Req) -> Ready<Result<u32, Infallible>>>;

fn endpoints() -> Vec<Endpoint> {
    fn answer(_: Req) -> Ready<Result<u32, Infallible>> {
        ready(Ok(1))
    }
    (0..16)
        .map(|_| tower::service_fn(answer as fn(Req) -> _))
        .collect()
}

/// Drives `requests` requests through `svc`; answers ns per request.
async fn drive<S>(svc: &mut S, requests: u64, make: impl Fn(u64) -> Req) -> f64
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    for i in 0..requests {
        let request = make(i);
        let response = svc.ready().await.expect("ready").call(request).await;
        std::hint::black_box(response.expect("response"));
    }
    start.elapsed().as_nanos() as f64 / requests as f64
}

/// Builds the request number `i`.
type MakeRequest = fn(u64) -> Req;

fn plain(_: u64) -> Req {
    Req::default()
}

fn keyed(i: u64) -> Req {
    let mut request = Req::default();
    AffinityKey(i % 1024).apply(&mut request);
    request
}

fn prompted(i: u64) -> Req {
    let mut request = Req::default();
    let mut text = vec![b'p'; 256];
    text.extend_from_slice(&(i % 64).to_le_bytes());
    Prompt(Bytes::from(text)).apply(&mut request);
    request
}

/// Who drives the requests.
#[derive(Clone, Copy, Debug)]
enum Drivers {
    /// The calling task, owning the one service (no `--threads`).
    Inline,
    /// This many spawned tasks at once, one service each.
    Tasks(usize),
}

/// `services.len()` spawned tasks, each driving `requests` requests through
/// its own service at once; answers the run's wall time in ns per request
/// of one task, and the services (for the next run).
async fn drive_tasks<S>(services: Vec<S>, requests: u64, make: MakeRequest) -> (f64, Vec<S>)
where
    S: Service<Req> + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    let handles: Vec<_> = services
        .into_iter()
        .map(|mut svc| {
            tokio::spawn(async move {
                drive(&mut svc, requests, make).await;
                svc
            })
        })
        .collect();
    let mut services = Vec::with_capacity(handles.len());
    for handle in handles {
        services.push(handle.await.expect("driver task"));
    }
    (
        start.elapsed().as_nanos() as f64 / requests as f64,
        services,
    )
}

/// A warm-up of a tenth of `requests`, then `requests` measured; ns per
/// request. `Drivers::Inline` drives the first service on this task.
async fn measure<S>(mut services: Vec<S>, drivers: Drivers, requests: u64, make: MakeRequest) -> f64
where
    S: Service<Req> + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    match drivers {
        Drivers::Inline => {
            let svc = &mut services[0];
            drive(svc, requests / 10, make).await;
            drive(svc, requests, make).await
        }
        Drivers::Tasks(_) => {
            let (_, services) = drive_tasks(services, requests / 10, make).await;
            drive_tasks(services, requests, make).await.0
        }
    }
}

async fn keel(policy: Policy, drivers: Drivers, requests: u64, make: MakeRequest) -> f64 {
    let balancer = Balancer::builder()
        .policy(policy)
        .seed(1)
        .build(ServiceList::new(endpoints()))
        .expect("valid config");
    let services = match drivers {
        Drivers::Inline => vec![balancer],
        Drivers::Tasks(n) => {
            // One clone per task: the clones share the endpoint set.
            vec![balancer; n]
        }
    };
    measure(services, drivers, requests, make).await
}

/// How the tower side is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tower {
    /// Owned by the one task that drives it.
    Owned,
    /// Behind a `Buffer`, one clone per task.
    Buffered,
}

impl Tower {
    /// Owned for one driver, buffered for more.
    fn for_drivers(drivers: Drivers) -> Tower {
        match drivers {
            Drivers::Inline | Drivers::Tasks(1) => Tower::Owned,
            Drivers::Tasks(_) => Tower::Buffered,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Tower::Owned => "owned",
            Tower::Buffered => "Buffer",
        }
    }
}

async fn tower_p2c(drivers: Drivers, held: Tower, requests: u64) -> f64 {
    let discover = PeakEwmaDiscover::new(
        ServiceList::new(endpoints()),
        Duration::from_secs(1),
        Duration::from_secs(10),
        CompleteOnResponse::default(),
    );
    let balance = tower::balance::p2c::Balance::new(discover);
    match held {
        Tower::Owned => measure(vec![balance], drivers, requests, plain).await,
        Tower::Buffered => {
            let n = match drivers {
                Drivers::Inline => 1,
                Drivers::Tasks(n) => n,
            };
            // One slot per task: a task never waits for a slot, only for
            // the worker that owns the `Balance`.
            let buffer = Buffer::new(balance, n);
            measure(vec![buffer; n], drivers, requests, plain).await
        }
    }
}

/// The other policies, one row each.
fn others() -> [(&'static str, Policy, MakeRequest); 6] {
    [
        ("round_robin", Policy::RoundRobin, plain),
        ("random", Policy::Random, plain),
        ("least_outstanding", Policy::LeastOutstanding, plain),
        ("weighted", Policy::Weighted, plain),
        (
            "consistent_hash (AffinityKey in extensions)",
            Policy::ConsistentHash(HashConfig::default()),
            keyed,
        ),
        (
            "prefix_affinity (264-byte Prompt in extensions)",
            Policy::PrefixAffinity(PrefixConfig::default()),
            prompted,
        ),
    ]
}

/// Best ns per request of each side for one count.
#[derive(Clone, Copy, Debug)]
struct Best {
    keel: f64,
    tower: f64,
}

/// The rows of one count: the other policies, then `runs` alternating
/// runs of Keel p2c-ewma and tower p2c. `label` prefixes each line.
async fn rows(args: &Args, drivers: Drivers, label: &str) -> Best {
    let requests = args.requests;
    for (name, policy, make) in others() {
        let ns = keel(policy, drivers, requests, make).await;
        println!("{label}keel {name:<48} {ns:>8.1} ns/request");
    }
    let held = Tower::for_drivers(drivers);
    // One task through a `Buffer`: the buffer's own cost, for context.
    let context = matches!(drivers, Drivers::Tasks(1));
    let mut best = Best {
        keel: f64::MAX,
        tower: f64::MAX,
    };
    let mut best_buffered = f64::MAX;
    for run in 0..args.runs {
        let k = keel(Policy::PeakEwma, drivers, requests, plain).await;
        let t = tower_p2c(drivers, held, requests).await;
        let tower_name = match drivers {
            Drivers::Inline => String::new(),
            Drivers::Tasks(_) => format!(" ({})", held.name()),
        };
        print!(
            "{label}run {run}: keel p2c peak-ewma {k:>8.1} ns/request   tower p2c PeakEwma{tower_name} {t:>8.1} ns/request"
        );
        if context {
            let b = tower_p2c(drivers, Tower::Buffered, requests).await;
            print!("   (tower via Buffer {b:>8.1})");
            best_buffered = best_buffered.min(b);
        }
        println!();
        best.keel = best.keel.min(k);
        best.tower = best.tower.min(t);
    }
    if context {
        println!(
            "{label}context: tower p2c PeakEwma through a Buffer from 1 task, best {best_buffered:.1} ns/request"
        );
    }
    best
}

fn main() {
    let args = Args::parse();
    let requests = args.requests;
    if args.threads.is_empty() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        println!(
            "16 in-process endpoints, {requests} requests per run, ready + call + await on one task"
        );
        let best = runtime.block_on(rows(&args, Drivers::Inline, ""));
        println!(
            "best of {}: keel {:.1} ns, tower {:.1} ns",
            args.runs, best.keel, best.tower
        );
        json(best);
        return;
    }
    let counts: Vec<usize> = args.threads.iter().map(|&n| n.max(1)).collect();
    println!(
        "16 in-process endpoints, {requests} requests per task per run, ready + call + await; \
         threads {}: N tasks on N worker threads share one balancer \
         (keel: a clone per task; tower: owned at 1, behind a Buffer above 1)",
        thread_list(&counts)
    );
    let mut last = None;
    for &n in &counts {
        let runtime = bench_runtime(Some(n));
        let label = format!("threads {n} ");
        let best = runtime.block_on(rows(&args, Drivers::Tasks(n), &label));
        let held = Tower::for_drivers(Drivers::Tasks(n));
        println!(
            "threads {n} best of {}: keel {:.1} ns ({:.2} M req/s in all), tower ({}) {:.1} ns ({:.2} M req/s in all), ratio {:.3}",
            args.runs,
            best.keel,
            n as f64 * 1e3 / best.keel,
            held.name(),
            best.tower,
            n as f64 * 1e3 / best.tower,
            best.keel / best.tower
        );
        last = Some(best);
    }
    json(last.expect("at least one thread count"));
}

fn json(best: Best) {
    println!(
        "{{\"keel_p2c_ewma_ns\": {:.1}, \"tower_p2c_ewma_ns\": {:.1}, \"ratio\": {:.3}}}",
        best.keel,
        best.tower,
        best.keel / best.tower
    );
}
