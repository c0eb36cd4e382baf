//! keel-fake-node behaves as documented: slots, streaming, cancellation,
//! modes. Real HTTP on loopback.

mod support;

use std::time::Duration;

use futures::StreamExt;
use keel_gateway::fake_node::{FakeNode, FakeNodeConfig, Mode};
use serde_json::{Value, json};
use support::json_of;

fn chat(tokens: u32, stream: bool) -> Value {
    json!({
        "model": "fake-model",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
        "max_tokens": tokens,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

async fn node(config: FakeNodeConfig) -> (FakeNode, reqwest::Client) {
    let node = FakeNode::start(config, "127.0.0.1:0")
        .await
        .expect("the node starts");
    (node, reqwest::Client::new())
}

#[tokio::test]
async fn answers_with_usage_and_caches_prefixes() {
    let (node, client) = node(FakeNodeConfig::instant()).await;
    for _ in 0..2 {
        let answer = json_of(
            client
                .post(format!("{}/v1/chat/completions", node.url()))
                .json(&chat(5, false)),
        )
        .await;
        assert_eq!(answer["usage"]["completion_tokens"], 5);
        // estimate_tokens: a token per word, one more per 4 bytes of a long word.
        assert_eq!(answer["usage"]["prompt_tokens"], 7);
    }
    let stats = node.stats();
    assert_eq!(
        (stats.completed, stats.prefix_misses, stats.prefix_hits),
        (2, 1, 1)
    );
}

#[tokio::test]
async fn a_full_node_answers_busy_with_retry_after() {
    let mut config = FakeNodeConfig::default();
    config.slots = 1;
    config.per_token = Duration::from_millis(50);
    let (node, client) = node(config).await;
    let url = format!("{}/v1/chat/completions", node.url());
    let slow = tokio::spawn(client.post(&url).json(&chat(10, false)).send());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = client
        .post(&url)
        .json(&chat(1, false))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    assert_eq!(node.stats().busy, 1);
}

#[tokio::test]
async fn streams_token_by_token_and_sees_a_client_leave() {
    let mut config = FakeNodeConfig::default();
    config.ttft = Duration::from_millis(10);
    config.prefill = Duration::ZERO;
    config.per_token = Duration::from_millis(30);
    let (node, client) = node(config).await;
    let response = client
        .post(format!("{}/v1/chat/completions", node.url()))
        .json(&chat(100, true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: {"), "{first:?}");
    drop(body); // the client goes away after the first token
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while node.stats().cancelled == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never saw the client leave"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(node.stats().completed, 0);
}

#[tokio::test]
async fn a_full_stream_ends_with_usage_and_done() {
    let (node, client) = node(FakeNodeConfig::instant()).await;
    let text = client
        .post(format!("{}/v1/chat/completions", node.url()))
        .json(&chat(3, true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3 + 1 + 1 + 1, "{text}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let usage: Value = serde_json::from_str(events[4].trim_start_matches("data: ")).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn fail_mid_stream_cuts_the_connection() {
    let (node, client) = node(FakeNodeConfig::instant()).await;
    node.set_mode(Mode::FailMidStream { after_tokens: 2 });
    let response = client
        .post(format!("{}/v1/chat/completions", node.url()))
        .json(&chat(10, true))
        .send()
        .await
        .unwrap();
    assert!(
        response.text().await.is_err(),
        "the body must end in an error"
    );
    assert_eq!(node.stats().failed, 1);
}

#[tokio::test]
async fn modes_switch_over_http_and_bad_bodies_are_400() {
    let (node, client) = node(FakeNodeConfig::instant()).await;
    let set = client
        .post(format!("{}/admin/mode", node.url()))
        .body(r#"{"mode": "fail"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    let failed = client
        .post(format!("{}/v1/embeddings", node.url()))
        .json(&json!({"model": "m", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 500);
    let bad = client
        .post(format!("{}/v1/chat/completions", node.url()))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    node.set_mode(Mode::Hang);
    let hung = client
        .get(format!("{}/healthz", node.url()))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(hung.is_err(), "a hung node does not answer health checks");
}

#[tokio::test]
async fn embeddings_are_deterministic_unit_vectors() {
    let (node, client) = node(FakeNodeConfig::instant()).await;
    let ask = || async {
        client
            .post(format!("{}/v1/embeddings", node.url()))
            .json(&json!({"model": "m", "input": ["same text", "other"]}))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let (a, b) = (ask().await, ask().await);
    assert_eq!(a["data"], b["data"]);
    let v: Vec<f64> = a["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let norm: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    assert_ne!(a["data"][0]["embedding"], a["data"][1]["embedding"]);
}
