//! Model-based checks: random sequences of operations on the in-memory
//! caches answer exactly like a `HashMap` (TTLs long enough never to expire
//! within a case, capacity large enough never to evict).
#![cfg(feature = "moka")]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_cache::{Cache, MokaCache, PrefixCache, Tiered, TieredConfig};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Set(u8, Vec<u8>),
    Get(u8),
    Delete(u8),
    SetMany(Vec<(u8, Vec<u8>)>),
    GetMany(Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0u8..8;
    let value = proptest::collection::vec(any::<u8>(), 0..16);
    prop_oneof![
        (key.clone(), value.clone()).prop_map(|(k, v)| Op::Set(k, v)),
        key.clone().prop_map(Op::Get),
        key.clone().prop_map(Op::Delete),
        proptest::collection::vec((key.clone(), value), 0..4).prop_map(Op::SetMany),
        proptest::collection::vec(key, 0..5).prop_map(Op::GetMany),
    ]
}

fn name(key: u8) -> String {
    // Keys that differ only in odd characters must stay apart.
    ["", "a", "a ", "ключ", "{t}", "*", "a\n", "🔑"][usize::from(key)].to_owned()
}

async fn check(cache: &dyn Cache, ops: &[Op]) -> Result<(), TestCaseError> {
    let ttl = Duration::from_secs(600);
    let mut model: HashMap<String, Bytes> = HashMap::new();
    for op in ops {
        match op {
            Op::Set(k, v) => {
                cache
                    .set(&name(*k), Bytes::from(v.clone()), ttl)
                    .await
                    .unwrap();
                model.insert(name(*k), Bytes::from(v.clone()));
            }
            Op::Get(k) => {
                let got = cache.get(&name(*k)).await.unwrap();
                prop_assert_eq!(got.as_ref(), model.get(&name(*k)), "get {:?}", name(*k));
            }
            Op::Delete(k) => {
                cache.delete(&name(*k)).await.unwrap();
                model.remove(&name(*k));
            }
            Op::SetMany(pairs) => {
                let owned: Vec<(String, Bytes)> = pairs
                    .iter()
                    .map(|(k, v)| (name(*k), Bytes::from(v.clone())))
                    .collect();
                let refs: Vec<(&str, Bytes)> =
                    owned.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                cache.set_many(&refs, ttl).await.unwrap();
                model.extend(owned);
            }
            Op::GetMany(keys) => {
                let names: Vec<String> = keys.iter().map(|k| name(*k)).collect();
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                let got = cache.get_many(&refs).await.unwrap();
                let want: Vec<Option<Bytes>> =
                    names.iter().map(|n| model.get(n).cloned()).collect();
                prop_assert_eq!(got, want);
            }
        }
    }
    Ok(())
}

fn run(cache: &dyn Cache, ops: &[Op]) -> Result<(), TestCaseError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(check(cache, ops))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn moka_behaves_like_a_map(ops in proptest::collection::vec(op(), 0..40)) {
        run(&MokaCache::new(Default::default()).unwrap(), &ops)?;
    }

    #[test]
    fn tiered_behaves_like_a_map(ops in proptest::collection::vec(op(), 0..40)) {
        let tiered = Tiered::builder(TieredConfig::new("model"))
            .l2(MokaCache::new(Default::default()).unwrap())
            .build()
            .unwrap();
        run(&tiered, &ops)?;
    }

    #[test]
    fn prefixed_tiered_over_a_shared_l2_behaves_like_a_map(
        ops in proptest::collection::vec(op(), 0..40),
        noise in proptest::collection::vec(op(), 0..10),
    ) {
        // A neighbour namespace on the same L2 never shows through.
        let l2 = Arc::new(MokaCache::new(Default::default()).unwrap());
        let neighbour = PrefixCache::new(l2.clone(), "b:");
        run(&neighbour, &noise)?;
        let tiered = Tiered::builder(TieredConfig::new("model"))
            .l2(PrefixCache::new(l2, "a:"))
            .build()
            .unwrap();
        run(&tiered, &ops)?;
    }
}
