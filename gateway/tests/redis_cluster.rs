//! Gateway processes sharing a Redis Cluster of the tests' own (keel-testkit's
//! `RedisCluster`: 3 masters, 3 replicas; the test fails with the install
//! command when `redis-server` or `redis-cli` is missing): one tenant's
//! token limit holds across two gateways within 2 %, and an answer one
//! gateway loaded is a cache hit at the other (the response cache's Redis
//! L2). The tests share one cluster (stopped when the last of them ends),
//! each with names of its own.
#![cfg(feature = "cluster")]

mod support;

use std::time::Duration;

use keel_gateway::fake_node::{FakeNode, FakeNodeConfig};
use keel_testkit::{Namespace, RedisCluster};
use support::{GatewayProcess, KEY, total};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_token_limit_on_a_redis_cluster() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let cluster = RedisCluster::shared().await.expect("start a redis cluster");
    let ns = Namespace::new("gw_cluster_tokens");
    tokio::time::timeout(
        Duration::from_secs(60),
        support::two_gateways_share_a_token_limit(
            |config| config.redis_cluster_urls = cluster.urls(),
            ns.prefix(),
        ),
    )
    .await
    .expect("bounded in time");
}

/// [`support::deterministic_chat`] with [`KEY`], bounded to 10 s.
fn deterministic(url: &str, prompt: &str) -> reqwest::RequestBuilder {
    support::deterministic_chat(&reqwest::Client::new(), url, KEY, prompt)
        .timeout(Duration::from_secs(10))
}

/// Sends `request` and returns its status, its `x-keel-cache` header and
/// its body.
async fn answer(request: reqwest::RequestBuilder) -> (u16, String, String) {
    let answer = request.send().await.expect("the gateway answers");
    let status = answer.status().as_u16();
    let cache = answer
        .headers()
        .get("x-keel-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, cache, answer.text().await.unwrap_or_default())
}

/// Answers gateway A loaded (spread over the cluster's slots) are hits at
/// gateway B, whose own memory never held them: they came from Redis, and
/// the node answered each prompt once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_cached_answers_through_the_cluster() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    tokio::time::timeout(Duration::from_secs(60), async {
        let cluster = RedisCluster::shared().await.expect("start a redis cluster");
        let ns = Namespace::new("gw_cluster_cache");
        let nodes = [FakeNode::start(FakeNodeConfig::instant(), "127.0.0.1:0")
            .await
            .unwrap()];
        let mut config = support::config_for(&nodes);
        config.redis_cluster_urls = cluster.urls();
        config.models[0].cache_deterministic = true;
        let a = GatewayProcess::start(config.clone()).await;
        let b = GatewayProcess::start(config).await;
        let prompts: Vec<String> = (0..12).map(|i| ns.name(&format!("prompt-{i}"))).collect();
        let mut loaded = Vec::new();
        for prompt in &prompts {
            let (status, cache, body) = answer(deterministic(&a.url, prompt)).await;
            assert_eq!((status, cache.as_str()), (200, "miss"), "{body}");
            loaded.push(body);
        }
        for (prompt, first) in prompts.iter().zip(&loaded) {
            let (status, cache, body) = answer(deterministic(&b.url, prompt)).await;
            assert_eq!(
                (status, cache.as_str()),
                (200, "hit"),
                "B answers {prompt} from the cluster: {body}"
            );
            assert_eq!(&body, first, "the same answer");
        }
        assert_eq!(
            total(&nodes, |s| s.completed),
            prompts.len() as u64,
            "the node answered each prompt once"
        );
        println!(
            "shared cache: {} answers loaded at A, all {} hits at B",
            prompts.len(),
            prompts.len()
        );
    })
    .await
    .expect("bounded in time");
}
