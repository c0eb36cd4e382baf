//! Durable mode: `x-keel-mode: queue` (or `POST /v1/jobs`) is answered 202
//! with a job id; a worker runs it through the same stack; `GET
//! /v1/jobs/{id}` returns the result.

mod support;

use std::time::Duration;

use keel_gateway::fake_node::FakeNodeConfig;
use serde_json::{Value, json};
use support::{KEY, MODEL, json_of, start, total};

async fn wait_done(_client: &reqwest::Client, url: &str, id: &str) -> Value {
    support::wait_job(url, id, Duration::from_secs(10)).await
}

async fn queued_chat(url: &str, _client: &reqwest::Client) -> String {
    support::enqueue_chat(url, "later").await
}

#[tokio::test]
async fn a_queued_request_is_run_by_the_worker_and_its_result_kept() {
    let setup = start(2, FakeNodeConfig::instant(), |_| {}).await;
    let client = reqwest::Client::new();
    let id = queued_chat(&setup.url, &client).await;
    let record = wait_done(&client, &setup.url, &id).await;
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["http_status"], 200);
    assert_eq!(record["result"]["usage"]["completion_tokens"], 4);
    assert_eq!(total(&setup.nodes, |s| s.completed), 1);

    // The envelope form, for an embedding.
    let accepted = json_of(
        client
            .post(format!("{}/v1/jobs", setup.url))
            .bearer_auth(KEY)
            .json(&json!({"route": "/v1/embeddings", "body": {"model": MODEL, "input": "x"}})),
    )
    .await;
    let record = wait_done(&client, &setup.url, accepted["id"].as_str().unwrap()).await;
    assert_eq!(
        record["result"]["data"][0]["object"], "embedding",
        "{record}"
    );
}

#[tokio::test]
async fn unknown_jobs_and_bad_envelopes_are_refused() {
    let setup = start(1, FakeNodeConfig::instant(), |_| {}).await;
    let client = reqwest::Client::new();
    let missing = client
        .get(format!("{}/v1/jobs/no-such-job", setup.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let bad = client
        .post(format!("{}/v1/jobs", setup.url))
        .bearer_auth(KEY)
        .json(&json!({"route": "/v1/nothing", "body": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let anonymous = client
        .get(format!("{}/v1/jobs/x", setup.url))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(total(&setup.nodes, |s| s.requests), 0);
}

/// The Redis-backed queue with results in Redis, as `keel-worker`
/// processes use it (the worker embedded here).
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_durable_queue_on_redis() {
    use keel_testkit::{Namespace, require_redis};
    let url = require_redis().await;
    let ns = Namespace::new("gw_durable_redis").with_redis_cleanup(url.clone());
    let queue = ns.prefix().to_owned();
    let setup = start(1, FakeNodeConfig::instant(), |config| {
        config.redis_url = Some(url.clone());
        config.durable.backend = keel_gateway::config::DurableBackend::Redis;
        config.durable.queue = queue.clone();
        config.durable.embedded_worker = true;
    })
    .await;
    let client = reqwest::Client::new();
    let ids: Vec<String> =
        futures::future::join_all((0..10).map(|_| queued_chat(&setup.url, &client))).await;
    for id in ids {
        let record = wait_done(&client, &setup.url, &id).await;
        assert_eq!(record["status"], "completed", "{record}");
    }
    assert_eq!(total(&setup.nodes, |s| s.completed), 10);
}
