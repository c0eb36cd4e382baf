//! Per-request overhead of each policy over 16 in-process endpoints, against
//! tower's `p2c::Balance` with `PeakEwma` over the same endpoints, in the
//! same run.
//!
//! ```text
//! cargo run --release -p keel-balancer --example bench
//! ```
//!
//! Each request is `ready().await` then `call(request).await` on one task of
//! a current-thread runtime; the endpoints answer at once, so what is
//! measured is the balancer: discovery check, pick, slot accounting, clock
//! reads, completion tracking. The last line printed is one JSON object:
//! `{"keel_p2c_ewma_ns": N, "tower_p2c_ewma_ns": N, "ratio": R}`.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use keel_balancer::{
    AffinityKey, Balancer, HashConfig, Policy, PrefixConfig, Prompt, RequestExtensions,
};
use tokio::time::Instant;
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

async fn keel(policy: Policy, requests: u64, make: MakeRequest) -> f64 {
    let mut balancer = Balancer::builder()
        .policy(policy)
        .seed(1)
        .build(ServiceList::new(endpoints()))
        .expect("valid config");
    drive(&mut balancer, requests / 10, make).await;
    drive(&mut balancer, requests, make).await
}

async fn tower_p2c(requests: u64) -> f64 {
    let discover = PeakEwmaDiscover::new(
        ServiceList::new(endpoints()),
        Duration::from_secs(1),
        Duration::from_secs(10),
        CompleteOnResponse::default(),
    );
    let mut balance = tower::balance::p2c::Balance::new(discover);
    drive(&mut balance, requests / 10, plain).await;
    drive(&mut balance, requests, plain).await
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let requests = args.requests;

    let others: [(&str, Policy, MakeRequest); 6] = [
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
    ];
    println!(
        "16 in-process endpoints, {requests} requests per run, ready + call + await on one task"
    );
    for (name, policy, make) in others {
        let ns = keel(policy, requests, make).await;
        println!("keel {name:<48} {ns:>8.1} ns/request");
    }

    let mut best_keel = f64::MAX;
    let mut best_tower = f64::MAX;
    for run in 0..args.runs {
        let k = keel(Policy::PeakEwma, requests, plain).await;
        let t = tower_p2c(requests).await;
        println!(
            "run {run}: keel p2c peak-ewma {k:>8.1} ns/request   tower p2c PeakEwma {t:>8.1} ns/request"
        );
        best_keel = best_keel.min(k);
        best_tower = best_tower.min(t);
    }
    println!(
        "best of {}: keel {best_keel:.1} ns, tower {best_tower:.1} ns",
        args.runs
    );
    println!(
        "{{\"keel_p2c_ewma_ns\": {:.1}, \"tower_p2c_ewma_ns\": {:.1}, \"ratio\": {:.3}}}",
        best_keel,
        best_tower,
        best_keel / best_tower
    );
}
