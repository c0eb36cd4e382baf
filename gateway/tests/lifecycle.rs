//! A node killed under load is routed around and comes back after restart;
//! SIGTERM drains: in-flight streams complete, new requests are refused.

mod support;

use std::time::Duration;

use futures::StreamExt;
use keel_gateway::fake_node::{FakeNode, FakeNodeConfig};
use serde_json::json;
use support::{KEY, MODEL, start};
use tokio::time::Instant;

fn chat(url: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}))
}

/// Steady load for `run`; answers (ok, failed).
async fn load(url: &str, run: Duration) -> (u64, u64) {
    let stop = Instant::now() + run;
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let url = url.to_owned();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < stop {
                    match chat(&url).send().await.map(|r| r.status().as_u16()) {
                        Ok(200) => ok += 1,
                        other => {
                            // The first few, so a failed bound says why.
                            if failed < 3 {
                                eprintln!("a caller's request failed: {other:?}");
                            }
                            failed += 1;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (ok, failed)
            })
        })
        .collect();
    support::sum_callers(callers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_routed_around_and_returns_after_restart() {
    let mut node = FakeNodeConfig::instant();
    node.ttft = Duration::from_millis(5);
    let mut setup = start(3, node.clone(), |config| {
        config.probe_interval = Duration::from_millis(100);
        config.ejection_time = Duration::from_millis(300);
    })
    .await;
    let (before, failed) = load(&setup.url, Duration::from_millis(500)).await;
    assert_eq!(failed, 0, "{before} ok before the kill");
    let addr = setup.nodes[0].addr();
    setup.nodes[0].crash();
    let (ok, failed) = load(&setup.url, Duration::from_secs(1)).await;
    // Retries within the budget hide the dead node; what fails is bounded
    // by the budget: its floor of 10 plus 10 % of the requests in its
    // window (10 s, so the requests before the kill count too).
    let requests = before + ok + failed;
    assert!(
        failed <= 10 + requests / 10,
        "{failed} failed, {ok} ok while a node was dead ({requests} requests in the budget's window)"
    );
    // Back on the same address: probes re-admit it, slow start ramps it.
    setup.nodes[0] = FakeNode::start(node, &addr.to_string()).await.unwrap();
    let (ok, failed) = load(&setup.url, Duration::from_secs(2)).await;
    assert_eq!(failed, 0, "{ok} ok after the restart");
    let back = setup.nodes[0].stats().completed;
    assert!(back > 0, "the restarted node got no traffic");
    assert!(
        back < ok / 2,
        "slow start: the restarted node took {back} of {ok} at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_streams_and_refuses_new_requests() {
    let mut node = FakeNodeConfig::default();
    node.ttft = Duration::from_millis(10);
    node.prefill = Duration::ZERO;
    node.per_token = Duration::from_millis(20);
    let node = FakeNode::start(node, "127.0.0.1:0").await.unwrap();
    let mut config = support::config_for(std::slice::from_ref(&node));
    config.drain_timeout = Duration::from_secs(10);
    let gateway = support::GatewayProcess::start(config).await;
    let url = gateway.url.clone();

    let stream = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": MODEL, "stream": true, "max_tokens": 40, "messages": [{"role": "user", "content": "go"}]}))
        .send()
        .await
        .unwrap();
    let mut body = stream.bytes_stream();
    let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    gateway.terminate();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(KEY)
        .timeout(Duration::from_secs(2))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "late"}]}))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "a draining gateway accepts no new connection: {refused:?}"
    );
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(
            &chunk.expect("the stream finishes cleanly"),
        ));
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let mut gateway = gateway;
    let exited = tokio::task::spawn_blocking(move || gateway.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exited.success(), "{exited:?}");
    assert_eq!(node.stats().completed, 1);
}
