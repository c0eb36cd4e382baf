//! Token-aware admission: a request reserves its estimate and settles to
//! the upstream's `usage`; over the limit is 429 with `Retry-After` and
//! OpenAI error JSON.

mod support;

use std::time::Duration;

use keel_gateway::fake_node::FakeNodeConfig;
use serde_json::{Value, json};
use support::{KEY, MODEL, start, total};

fn request(url: &str, max_tokens: u32, stream: bool) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({
            "model": MODEL,
            "stream": stream,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hello"}],
        }))
}

#[tokio::test]
async fn a_stream_is_settled_from_its_final_usage() {
    let mut node = FakeNodeConfig::instant();
    node.stop_after = Some(10); // the model stops early
    let setup = start(1, node, |config| {
        config.tenants[0].tokens_per_minute = Some(1_000);
    })
    .await;
    // Reserves 1 + 900 of the tenant's 1,000; uses 1 + 10.
    let first = request(&setup.url, 900, true).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let text = first.text().await.unwrap();
    assert!(
        text.contains("\"usage\""),
        "the stream ends with its usage: {text}"
    );
    // Settlement runs when the stream ends; give it a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Without the refund only ~99 tokens would be left.
    let second = request(&setup.url, 900, false).send().await.unwrap();
    assert_eq!(second.status(), 200, "the unused reservation was refunded");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let third = request(&setup.url, 990, false).send().await.unwrap();
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
            request(&setup.url, 5, false).send().await.unwrap().status(),
            200
        );
    }
    let refused = request(&setup.url, 5, false).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
}

/// Two gateway processes sharing Redis admit one tenant's tokens per
/// minute within 2 % (GCRA on the server's clock: burst + rate × elapsed).
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_token_limit_through_redis() {
    use keel_gateway::fake_node::FakeNode;
    use keel_testkit::{Namespace, require_redis};
    use support::GatewayProcess;
    use tokio::time::Instant;

    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let url = require_redis().await;
    let ns = Namespace::new("gw_shared_tokens").with_redis_cleanup(url.clone());
    let tenant = ns.prefix().to_owned();
    // 3,000 tokens a minute (50 a second), a bucket of one minute's
    // tokens; every request costs 1 (prompt) + 99 (max_tokens) = 100
    // tokens, as used.
    let nodes = [
        FakeNode::start(FakeNodeConfig::instant(), "127.0.0.1:0")
            .await
            .unwrap(),
        FakeNode::start(FakeNodeConfig::instant(), "127.0.0.1:0")
            .await
            .unwrap(),
    ];
    let mut config = support::config_for(&nodes);
    config.redis_url = Some(url.clone());
    config.tenants[0].name = tenant.clone();
    config.tenants[0].tokens_per_minute = Some(3_000);
    config.keys[0].tenant = tenant.clone();
    let a = GatewayProcess::start(config.clone()).await;
    let b = GatewayProcess::start(config).await;
    let started = Instant::now();
    let run = Duration::from_secs(2);
    let callers: Vec<_> = [a.url.clone(), b.url.clone()]
        .into_iter()
        .flat_map(|url| (0..6).map(move |_| url.clone()))
        .map(|url| {
            tokio::spawn(async move {
                let (mut admitted, mut limited) = (0u64, 0u64);
                while started.elapsed() < run {
                    match request(&url, 99, false)
                        .send()
                        .await
                        .unwrap()
                        .status()
                        .as_u16()
                    {
                        200 => admitted += 1,
                        429 => limited += 1,
                        other => panic!("unexpected status {other}"),
                    }
                }
                (admitted, limited)
            })
        })
        .collect();
    let (mut admitted, mut limited) = (0u64, 0u64);
    for caller in callers {
        let (a, l) = caller.await.unwrap();
        admitted += a;
        limited += l;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed_tokens = 3_000.0 + 50.0 * elapsed;
    let admitted_tokens = admitted as f64 * 100.0;
    assert!(limited > 0, "the limit was never reached");
    assert!(
        admitted_tokens <= allowed_tokens * 1.02 + 100.0
            && admitted_tokens >= allowed_tokens * 0.98 - 100.0,
        "admitted {admitted_tokens} tokens, the limit allows {allowed_tokens:.0} over {elapsed:.2}s"
    );
    drop((a, b));
}
