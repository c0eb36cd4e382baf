//! Deadlines cut off a hanging node; a busy node is routed around and not
//! ejected.

mod support;

use std::time::Duration;

use keel_gateway::fake_node::{FakeNodeConfig, Mode};
use serde_json::{Value, json};
use support::{KEY, MODEL, start, total};
use tokio::time::Instant;

fn chat(url: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({
            "model": MODEL,
            "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}],
        }))
}

#[tokio::test]
async fn a_hanging_node_is_cut_off_by_the_deadline() {
    let setup = start(1, FakeNodeConfig::instant(), |_| {}).await;
    setup.nodes[0].set_mode(Mode::Hang);
    let sent = Instant::now();
    let answer = chat(&setup.url)
        .header("x-keel-timeout-ms", "300")
        .send()
        .await
        .unwrap();
    let took = sent.elapsed();
    assert_eq!(answer.status(), 504);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "deadline_exceeded", "{body}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1_500),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_busy_node_is_routed_around_and_not_ejected() {
    let setup = start(3, FakeNodeConfig::instant(), |_| {}).await;
    setup.nodes[0].set_mode(Mode::Busy);
    for _ in 0..60 {
        let answer = chat(&setup.url).send().await.unwrap();
        assert_eq!(answer.status(), 200);
    }
    let served: u64 = total(&setup.nodes[1..], |s| s.completed);
    assert_eq!(served, 60);
    let busy = setup.nodes[0].stats().busy;
    assert!(busy <= 10, "the busy node was asked {busy} times");
    let ready = reqwest::get(format!("{}/readyz", setup.url)).await.unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = reqwest::get(format!("{}/metrics", setup.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics.contains("keel_health_ejections_total{")
            || !metrics.contains(&setup.nodes[0].url()),
        "the busy node must not be ejected"
    );
}

#[tokio::test]
async fn a_repeated_embedding_is_a_cache_hit_and_concurrent_ones_load_once() {
    let mut node = FakeNodeConfig::instant();
    node.ttft = Duration::from_millis(100);
    let setup = start(2, node, |_| {}).await;
    let client = reqwest::Client::new();
    let ask = || {
        client
            .post(format!("{}/v1/embeddings", setup.url))
            .bearer_auth(KEY)
            .json(&json!({"model": MODEL, "input": "the same sentence"}))
            .send()
    };
    let answers = futures::future::join_all((0..20).map(|_| ask())).await;
    let mut misses = 0;
    let mut bodies = Vec::new();
    for answer in answers {
        let answer = answer.unwrap();
        assert_eq!(answer.status(), 200);
        misses += usize::from(answer.headers()["x-keel-cache"] == "miss");
        bodies.push(answer.bytes().await.unwrap());
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        total(&setup.nodes, |s| s.requests),
        1,
        "20 concurrent callers, one load"
    );
    assert_eq!(misses, 1);
    let again = ask().await.unwrap();
    assert_eq!(again.headers()["x-keel-cache"], "hit");
    assert_eq!(total(&setup.nodes, |s| s.requests), 1);
}
