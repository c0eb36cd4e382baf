//! The conformance suite: one set of behaviour tests that every backend and
//! decorator passes unchanged.
//!
//! Enable the `conformance` feature and expand
//! [`cache_conformance!`](crate::cache_conformance) with a factory that
//! builds your cache for a namespace (a fresh name for each case; two calls
//! with the same name must give handles on the same data when the cache is
//! [`shared`](crate::CacheCapabilities::shared)). Each case becomes its own
//! `#[tokio::test]`, gated on the cache's [`CacheCapabilities`]:
//!
//! ```no_run
//! keel_cache::cache_conformance!(moka, |_namespace: String| async move {
//!     keel_cache::conformance::CacheSubject::new(keel_cache::MokaCache::new(Default::default()).unwrap())
//! });
//! ```
//!
//! The cases run on real time (so they also run against real servers) with
//! TTLs of a few hundred milliseconds, and poll for expiry with generous
//! upper bounds, so a loaded machine does not make them flake.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_core::ArgumentError;
use tokio::time::Instant;

use crate::{Cache, CacheCapabilities, CacheError, CacheExt};

/// A cache under test, with whatever must live as long as the test (a
/// clean-up guard that deletes the namespace's keys, a spawned server…).
#[derive(Debug)]
pub struct CacheSubject {
    /// The cache under test.
    pub cache: Arc<dyn Cache>,
    guard: Option<Box<dyn std::fmt::Debug + Send + Sync>>,
}

impl CacheSubject {
    /// A subject with no guard.
    pub fn new(cache: impl Cache) -> Self {
        CacheSubject {
            cache: Arc::new(cache),
            guard: None,
        }
    }

    /// Keeps `guard` alive until the case ends (dropped after the cache).
    #[must_use]
    pub fn with_guard(mut self, guard: impl std::fmt::Debug + Send + Sync + 'static) -> Self {
        self.guard = Some(Box::new(guard));
        self
    }
}

/// A fresh namespace for one case: `keel-conf-<case>-<random>:`.
pub fn namespace(case: &str) -> String {
    format!(
        "keel-conf-{case}-{}:",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Upper bound on "expires promptly" on a loaded two-core machine.
const SLACK: Duration = Duration::from_secs(3);
const LONG: Duration = Duration::from_secs(60);

fn caps(subject: &CacheSubject) -> CacheCapabilities {
    subject.cache.capabilities()
}

/// Polls until `key` reads as missing, failing after `within`.
async fn wait_until_gone(cache: &dyn Cache, key: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if cache.get(key).await.expect("get").is_none() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "`{key}` still present after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Binary values round-trip exactly; a missing key is `None`.
pub async fn round_trip<F: Fn(String) -> Fut, Fut: Future<Output = CacheSubject>>(make: F) {
    let s = make(namespace("round-trip")).await;
    let value = Bytes::from_static(b"\x00\xff binary \xc3\x28 value");
    assert_eq!(s.cache.get("k").await.unwrap(), None);
    s.cache.set("k", value.clone(), LONG).await.unwrap();
    assert_eq!(s.cache.get("k").await.unwrap(), Some(value));
    s.cache.set("empty", Bytes::new(), LONG).await.unwrap();
    assert_eq!(s.cache.get("empty").await.unwrap(), Some(Bytes::new()));
}

/// A second `set` replaces the value.
pub async fn overwrite<F: Fn(String) -> Fut, Fut: Future<Output = CacheSubject>>(make: F) {
    let s = make(namespace("overwrite")).await;
    s.cache.set("k", "one".into(), LONG).await.unwrap();
    s.cache.set("k", "two".into(), LONG).await.unwrap();
    assert_eq!(
        s.cache.get("k").await.unwrap().as_deref(),
        Some(&b"two"[..])
    );
}

/// `delete` removes a key; deleting a missing key is fine.
pub async fn delete<F: Fn(String) -> Fut, Fut: Future<Output = CacheSubject>>(make: F) {
    let s = make(namespace("delete")).await;
    s.cache.set("k", "v".into(), LONG).await.unwrap();
    s.cache.set("other", "v".into(), LONG).await.unwrap();
    s.cache.delete("k").await.unwrap();
    assert_eq!(s.cache.get("k").await.unwrap(), None);
    assert!(s.cache.get("other").await.unwrap().is_some());
    s.cache.delete("never-set").await.unwrap();
}

/// A value is there before its TTL and gone after it.
pub async fn ttl_expires<F: Fn(String) -> Fut, Fut: Future<Output = CacheSubject>>(make: F) {
    let s = make(namespace("ttl")).await;
    let ttl = Duration::from_millis(400);
    let written = Instant::now();
    s.cache.set("short", "v".into(), ttl).await.unwrap();
    s.cache.set("long", "v".into(), LONG).await.unwrap();
    let early = s.cache.get("short").await.unwrap();
    if written.elapsed() < ttl / 2 {
        assert!(early.is_some(), "gone before half its TTL");
    }
    wait_until_gone(&*s.cache, "short", ttl + SLACK).await;
    assert!(
        written.elapsed() >= ttl - Duration::from_millis(5),
        "expired after {:?} of a {ttl:?} TTL",
        written.elapsed()
    );
    assert!(s.cache.get("long").await.unwrap().is_some());
}

/// `set` again renews the TTL.
pub async fn set_renews_ttl<F: Fn(String) -> Fut, Fut: Future<Output = CacheSubject>>(make: F) {
    let s = make(namespace("renew")).await;
    s.cache
        .set("k", "v".into(), Duration::from_millis(300))
        .await
        .unwrap();
    s.cache.set("k", "v2".into(), LONG).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.cache.get("k").await.unwrap().as_deref(), Some(&b"v2"[..]));
}

/// A zero TTL is an `InvalidArgument` and stores nothing; sub-millisecond
/// TTLs round up to 1 ms (accepted, and gone soon after).
pub async fn ttl_edges<F: Fn(String) -> Fut, Fut: Future<Output = CacheSubject>>(make: F) {
    let s = make(namespace("ttl-edges")).await;
    let err = s
        .cache
        .set("zero", "v".into(), Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CacheError::InvalidArgument(ArgumentError { name: "ttl", .. })
        ),
        "zero TTL: {err:?}"
    );
    assert_eq!(s.cache.get("zero").await.unwrap(), None);
    let err = s
        .cache
        .set_many(&[("zero-many", "v".into())], Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::InvalidArgument(_)), "{err:?}");
    assert_eq!(s.cache.get("zero-many").await.unwrap(), None);
    s.cache
        .set("tiny", "v".into(), Duration::from_nanos(1))
        .await
        .unwrap();
    wait_until_gone(&*s.cache, "tiny", SLACK).await;
    let err = s
        .cache
        .set("forever", "v".into(), Duration::MAX)
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::InvalidArgument(_)), "{err:?}");
}

/// Arbitrary UTF-8 keys are stored verbatim and kept apart.
pub async fn arbitrary_keys<F: Fn(String) -> Fut, Fut: Future<Output = CacheSubject>>(make: F) {
    let s = make(namespace("keys")).await;
    let long = "ü".repeat(2_000);
    let keys = [
        "",
        " ",
        "ключ",
        "🔑 with spaces\nand a newline",
        "{hash}:tag",
        "glob*?[a-z]\\",
        "nul\0byte",
        long.as_str(),
    ];
    for (i, key) in keys.iter().enumerate() {
        s.cache
            .set(key, Bytes::from(i.to_string()), LONG)
            .await
            .unwrap();
    }
    for (i, key) in keys.iter().enumerate() {
        let got = s.cache.get(key).await.unwrap();
        assert_eq!(got, Some(Bytes::from(i.to_string())), "key {key:?}");
    }
}

/// A 1 MiB value round-trips.
pub async fn large_value<F: Fn(String) -> Fut, Fut: Future<Output = CacheSubject>>(make: F) {
    let s = make(namespace("large")).await;
    let value: Bytes = (0..(1usize << 20)).map(|i| (i % 251) as u8).collect();
    s.cache.set("big", value.clone(), LONG).await.unwrap();
    assert_eq!(s.cache.get("big").await.unwrap(), Some(value));
}

/// `get_many` answers in order with `None` for missing keys; `set_many`
/// stores every pair.
pub async fn batches<F: Fn(String) -> Fut, Fut: Future<Output = CacheSubject>>(make: F) {
    let s = make(namespace("batches")).await;
    let pairs: Vec<(String, Bytes)> = (0..50)
        .map(|i| (format!("k{i}"), Bytes::from(format!("v{i}"))))
        .collect();
    let refs: Vec<(&str, Bytes)> = pairs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    s.cache.set_many(&refs, LONG).await.unwrap();
    let mut keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    keys.insert(10, "missing");
    let got = s.cache.get_many(&keys).await.unwrap();
    assert_eq!(got.len(), 51);
    assert_eq!(got[10], None);
    for (i, key) in keys.iter().enumerate() {
        if *key != "missing" {
            assert_eq!(
                got[i].as_deref(),
                Some(format!("v{}", &key[1..]).as_bytes())
            );
        }
    }
    assert!(s.cache.get_many(&[]).await.unwrap().is_empty());
}

/// Typed values through [`CacheExt`]; bytes of the wrong shape are a codec
/// error.
pub async fn typed_json<F: Fn(String) -> Fut, Fut: Future<Output = CacheSubject>>(make: F) {
    let s = make(namespace("json")).await;
    let value = serde_json::json!({"model": "m", "tokens": [1, 2, 3]});
    s.cache.set_json("j", &value, LONG).await.unwrap();
    let got: Option<serde_json::Value> = s.cache.get_json("j").await.unwrap();
    assert_eq!(got, Some(value));
    s.cache.set("raw", "not json".into(), LONG).await.unwrap();
    let err = s
        .cache
        .get_json::<serde_json::Value>("raw")
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::Codec { .. }), "{err:?}");
}

/// Two namespaces never see each other's keys.
///
/// A real check where namespaces share storage (Redis, `PrefixCache`); a
/// backend whose factory builds a new in-process cache per namespace (moka,
/// `Tiered` over moka) passes it by construction.
pub async fn namespace_isolation<F: Fn(String) -> Fut, Fut: Future<Output = CacheSubject>>(
    make: F,
) {
    let a = make(namespace("iso-a")).await;
    let b = make(namespace("iso-b")).await;
    a.cache.set("k", "a".into(), LONG).await.unwrap();
    b.cache.set("k", "b".into(), LONG).await.unwrap();
    assert_eq!(a.cache.get("k").await.unwrap().as_deref(), Some(&b"a"[..]));
    assert_eq!(b.cache.get("k").await.unwrap().as_deref(), Some(&b"b"[..]));
    b.cache.delete("k").await.unwrap();
    assert_eq!(a.cache.get("k").await.unwrap().as_deref(), Some(&b"a"[..]));
}

/// A shared cache: two handles on one namespace see each other's writes and
/// deletes. A cache that is not shared across processes (capability
/// `shared` false) makes no promise about a second handle; it must still
/// see its own writes and deletes.
pub async fn shared_handles<F: Fn(String) -> Fut, Fut: Future<Output = CacheSubject>>(make: F) {
    let ns = namespace("shared");
    let a = make(ns.clone()).await;
    let b = make(ns).await;
    if !caps(&a).shared {
        a.cache.set("k", "v".into(), LONG).await.unwrap();
        assert_eq!(a.cache.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
        a.cache.delete("k").await.unwrap();
        assert_eq!(a.cache.get("k").await.unwrap(), None);
        return;
    }
    a.cache.set("k", "v".into(), LONG).await.unwrap();
    assert_eq!(b.cache.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    b.cache.delete("k").await.unwrap();
    assert_eq!(a.cache.get("k").await.unwrap(), None);
}

/// `ping` answers.
pub async fn ping<F: Fn(String) -> Fut, Fut: Future<Output = CacheSubject>>(make: F) {
    let s = make(namespace("ping")).await;
    s.cache.ping().await.unwrap();
}

/// 8 tasks × 100 keys written and read concurrently: every value reads back.
pub async fn concurrent_writers<F: Fn(String) -> Fut, Fut: Future<Output = CacheSubject>>(make: F) {
    let s = make(namespace("concurrent")).await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let cache = s.cache.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                let key = format!("t{t}-{i}");
                cache
                    .set(&key, Bytes::from(key.clone()), LONG)
                    .await
                    .unwrap();
                let got = cache.get(&key).await.unwrap();
                assert_eq!(got.as_deref(), Some(key.as_bytes()));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Operations dropped mid-flight leave the cache usable and consistent:
/// every later read answers the value of its own key.
pub async fn cancelled_operations<F: Fn(String) -> Fut, Fut: Future<Output = CacheSubject>>(
    make: F,
) {
    let s = make(namespace("cancel")).await;
    for i in 0..20 {
        s.cache
            .set(&format!("k{i}"), Bytes::from(format!("v{i}")), LONG)
            .await
            .unwrap();
    }
    for round in 0..20u64 {
        let cache = s.cache.clone();
        let ops = async move {
            for i in 0..20 {
                let _ = cache.get(&format!("k{i}")).await;
                let _ = cache
                    .set(&format!("k{i}"), Bytes::from(format!("v{i}")), LONG)
                    .await;
            }
        };
        // Cut the batch short at a different point each round.
        let _ = tokio::time::timeout(Duration::from_micros(50 + round * 37), ops).await;
    }
    for i in 0..20 {
        let got = s.cache.get(&format!("k{i}")).await.unwrap();
        assert_eq!(got.as_deref(), Some(format!("v{i}").as_bytes()), "k{i}");
    }
}

/// Expands the whole suite into one `#[tokio::test]` per case in a module
/// named `$module`, for the cache built by `$make`: a closure from a
/// namespace (`String`) to a future of [`CacheSubject`].
#[macro_export]
macro_rules! cache_conformance {
    ($module:ident, $make:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $crate::cache_conformance!(@cases $make;
                round_trip, overwrite, delete, ttl_expires, set_renews_ttl, ttl_edges,
                arbitrary_keys, large_value, batches, typed_json, namespace_isolation,
                shared_handles, ping, concurrent_writers, cancelled_operations);
        }
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            $crate::conformance::$case($make).await;
        }
    )*};
}
