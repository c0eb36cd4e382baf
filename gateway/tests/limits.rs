//! Token-aware admission: a request reserves its estimate and settles to
//! the upstream's `usage`; over the limit is 429 with `Retry-After` and
//! OpenAI error JSON.

mod support;

use std::time::Duration;

use keel_gateway::fake_node::FakeNodeConfig;
use serde_json::Value;
use support::{chat, start, total};

#[tokio::test]
async fn a_stream_is_settled_from_its_final_usage() {
    let mut node = FakeNodeConfig::instant();
    node.stop_after = Some(10); // the model stops early
    let setup = start(1, node, |config| {
        config.tenants[0].tokens_per_minute = Some(1_000);
    })
    .await;
    // Reserves 1 + 900 of the tenant's 1,000; uses 1 + 10.
    let first = chat(&setup.url, 900, true).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let text = first.text().await.unwrap();
    assert!(
        text.contains("\"usage\""),
        "the stream ends with its usage: {text}"
    );
    // Settlement runs when the stream ends; give it a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Without the refund only ~99 tokens would be left.
    let second = chat(&setup.url, 900, false).send().await.unwrap();
    assert_eq!(second.status(), 200, "the unused reservation was refunded");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let third = chat(&setup.url, 990, false).send().await.unwrap();
    assert_eq!(third.status(), 429);
    let retry_after: u64 = third.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_exceeded", "{body}");
    assert_eq!(
        total(&setup.nodes, |s| s.requests),
        2,
        "the refused request reached no node"
    );
}

#[tokio::test]
async fn a_key_limit_applies_on_top_of_the_tenant() {
    let setup = start(1, FakeNodeConfig::instant(), |config| {
        config.keys[0].requests_per_minute = Some(2);
    })
    .await;
    for _ in 0..2 {
        assert_eq!(
            chat(&setup.url, 5, false).send().await.unwrap().status(),
            200
        );
    }
    let refused = chat(&setup.url, 5, false).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
}

/// Two gateway processes sharing Redis admit one tenant's tokens per
/// minute within 2 % (GCRA on the server's clock: burst + rate × elapsed).
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_token_limit_through_redis() {
    use keel_testkit::{Namespace, require_redis};

    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let url = require_redis().await;
    let ns = Namespace::new("gw_shared_tokens").with_redis_cleanup(url.clone());
    support::two_gateways_share_a_token_limit(|config| config.redis_url = Some(url), ns.prefix())
        .await;
}
