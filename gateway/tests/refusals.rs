//! Bad input is refused with OpenAI error JSON and never reaches an
//! upstream: 401, 413, 400, 404.

mod support;

use keel_gateway::fake_node::FakeNodeConfig;
use serde_json::{Value, json};
use support::{KEY, MODEL, start, total};

#[tokio::test]
async fn refusals_make_no_upstream_call() {
    let setup = start(2, FakeNodeConfig::instant(), |config| {
        config.max_body_bytes = 4_096;
    })
    .await;
    let client = reqwest::Client::new();
    let chat = format!("{}/v1/chat/completions", setup.url);
    let good = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (client.post(&chat).json(&good), 401, "invalid_api_key"),
        (
            client.post(&chat).bearer_auth("sk-unknown").json(&good),
            401,
            "invalid_api_key",
        ),
        (
            client.post(&chat).bearer_auth(KEY).body(format!(
                "{{\"model\": \"{MODEL}\", \"pad\": \"{}\"}}",
                "x".repeat(10_000)
            )),
            413,
            "payload_too_large",
        ),
        (
            client.post(&chat).bearer_auth(KEY).body("{not json"),
            400,
            "invalid_request",
        ),
        (
            client
                .post(&chat)
                .bearer_auth(KEY)
                .json(&json!({"model": MODEL})),
            400,
            "invalid_request",
        ),
        (
            client
                .post(&chat)
                .bearer_auth(KEY)
                .json(&json!({"messages": []})),
            400,
            "invalid_request",
        ),
        (
            client.post(&chat).bearer_auth(KEY).json(
                &json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
            ),
            404,
            "model_not_found",
        ),
        (
            client
                .post(format!("{}/v1/embeddings", setup.url))
                .bearer_auth(KEY)
                .json(&json!({"model": MODEL})),
            400,
            "invalid_request",
        ),
        // A job envelope without its route, or without the request.
        (
            client
                .post(format!("{}/v1/jobs", setup.url))
                .bearer_auth(KEY)
                .json(&good),
            400,
            "invalid_request",
        ),
        (
            client
                .post(format!("{}/v1/jobs", setup.url))
                .bearer_auth(KEY)
                .json(&json!({"route": "/v1/chat/completions"})),
            400,
            "invalid_request",
        ),
    ];
    let mut jobs_refused = 0;
    for (request, status, code) in cases {
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status(), status);
        assert_eq!(answer.headers()["content-type"], "application/json");
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert!(body["error"]["type"].is_string());
        if body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("/v1/jobs"))
        {
            jobs_refused += 1;
            // The refusal shows the envelope it wants.
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("\"route\"") && m.contains("\"body\"")),
                "{body}"
            );
        }
    }
    assert_eq!(jobs_refused, 2, "both job envelopes were refused as such");
    assert_eq!(
        total(&setup.nodes, |s| s.requests),
        0,
        "no request reached a node"
    );
}

#[tokio::test]
async fn a_tenant_sees_only_its_models() {
    let setup = start(1, FakeNodeConfig::instant(), |config| {
        let mut other =
            keel_gateway::config::ModelConfig::new("private", ["http://127.0.0.1:9".to_owned()]);
        other.slots = 1;
        config.models.push(other);
        config.tenants[0].models = vec![MODEL.to_owned()];
    })
    .await;
    let client = reqwest::Client::new();
    let models = support::get_json(&setup.url, "/v1/models").await;
    assert_eq!(models["data"].as_array().unwrap().len(), 1, "{models}");
    // The entry is the upstream's own, merged under the gateway's name.
    let entry = &models["data"][0];
    assert_eq!(entry["id"], MODEL, "{models}");
    assert_eq!(entry["owned_by"], "keel-fake-node", "{models}");
    assert_eq!(entry["created"], 1_700_000_000, "{models}");
    let refused = client
        .post(format!("{}/v1/chat/completions", setup.url))
        .bearer_auth(KEY)
        .json(&json!({"model": "private", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 404);
}
