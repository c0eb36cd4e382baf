//! Streams pass through chunk by chunk; a client that leaves cancels the
//! upstream; a node dying mid-stream ends the stream with an error event.

mod support;

use std::time::Duration;

use futures::StreamExt;
use keel_gateway::fake_node::{FakeNodeConfig, Mode};
use serde_json::json;
use support::{KEY, MODEL, start, total};
use tokio::time::Instant;

fn slow_tokens() -> FakeNodeConfig {
    let mut config = FakeNodeConfig::default();
    config.ttft = Duration::from_millis(50);
    config.prefill = Duration::ZERO;
    config.per_token = Duration::from_millis(40);
    config.jitter = 0.0;
    config
}

fn stream_request(url: &str, tokens: u32) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({
            "model": MODEL,
            "stream": true,
            "max_tokens": tokens,
            "messages": [{"role": "user", "content": "tell me a story"}],
        }))
}

#[tokio::test]
async fn the_first_chunk_arrives_at_the_nodes_ttft_not_after_the_whole_answer() {
    let setup = start(1, slow_tokens(), |_| {}).await;
    let sent = Instant::now();
    let response = stream_request(&setup.url, 25).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    body.next().await.unwrap().unwrap();
    let first = sent.elapsed();
    while body.next().await.is_some() {}
    let whole = sent.elapsed();
    // 50 ms to the first token, 24 × 40 ms more to the last.
    assert!(
        first < Duration::from_millis(500),
        "first chunk after {first:?}"
    );
    assert!(
        whole >= Duration::from_millis(960),
        "whole answer after {whole:?}"
    );
    assert!(
        first * 3 < whole,
        "first {first:?} vs whole {whole:?}: the answer was buffered"
    );
}

#[tokio::test]
async fn a_client_that_leaves_cancels_the_upstream_within_100ms() {
    let setup = start(1, slow_tokens(), |_| {}).await;
    let response = stream_request(&setup.url, 200).send().await.unwrap();
    let mut body = response.bytes_stream();
    body.next().await.unwrap().unwrap();
    assert_eq!(setup.nodes[0].stats().in_flight, 1);
    drop(body);
    let left = Instant::now();
    while setup.nodes[0].stats().cancelled == 0 {
        assert!(
            left.elapsed() < Duration::from_millis(100),
            "the node still streams {:?} after the client left",
            left.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(setup.nodes[0].stats().completed, 0);
}

#[tokio::test]
async fn a_node_dying_mid_stream_gives_an_error_event_not_a_hang() {
    let setup = start(1, slow_tokens(), |_| {}).await;
    setup.nodes[0].set_mode(Mode::FailMidStream { after_tokens: 3 });
    let response = stream_request(&setup.url, 50).send().await.unwrap();
    let text = tokio::time::timeout(Duration::from_secs(5), response.text())
        .await
        .expect("the stream ends")
        .expect("the gateway ends the body cleanly");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 4, "three tokens, then the error: {text}");
    assert!(events[3].contains("\"upstream_failed\""), "{text}");
    assert_eq!(total(&setup.nodes, |s| s.failed), 1);
}
