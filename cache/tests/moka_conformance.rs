//! The conformance suite on the moka backend and on `PrefixCache` over a
//! moka cache shared by every case.
#![cfg(feature = "moka")]

use std::sync::{Arc, OnceLock};

use keel_cache::conformance::CacheSubject;
use keel_cache::{MokaCache, PrefixCache};

keel_cache::cache_conformance!(moka, |_namespace: String| async move {
    CacheSubject::new(MokaCache::new(Default::default()).expect("valid config"))
});

/// One moka cache under every `PrefixCache` case, so namespaces really share
/// a backend.
fn shared_moka() -> Arc<MokaCache> {
    static SHARED: OnceLock<Arc<MokaCache>> = OnceLock::new();
    SHARED
        .get_or_init(|| Arc::new(MokaCache::new(Default::default()).expect("valid config")))
        .clone()
}

keel_cache::cache_conformance!(prefix, |namespace: String| async move {
    CacheSubject::new(PrefixCache::new(shared_moka(), namespace))
});

keel_cache::cache_conformance!(tiered, |_namespace: String| async move {
    let l2 = MokaCache::new(Default::default()).expect("valid config");
    let tiered = keel_cache::Tiered::builder(keel_cache::TieredConfig::new("conformance"))
        .l2(l2)
        .build()
        .expect("valid config");
    CacheSubject::new(tiered)
});

keel_cache::cache_conformance!(tiered_l1_only, |_namespace: String| async move {
    CacheSubject::new(
        keel_cache::Tiered::builder(keel_cache::TieredConfig::new("conformance"))
            .build()
            .expect("valid config"),
    )
});
