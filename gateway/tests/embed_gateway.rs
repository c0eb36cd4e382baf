//! The gateway in front of two real `keel-embed-node` processes
//! (all-MiniLM-L6-v2): real embeddings through a real OpenAI client, a
//! repeated request served from the cache, and a node killed mid-load
//! costing no more failures than the retry budget allows.
//!
//! Needs the model files: `gateway/embed/fetch-model.sh`.

mod support;

use std::time::Duration;

use async_openai::types::CreateEmbeddingRequestArgs;
use serde_json::{Value, json};
use support::embed::{EMBED_MODEL, EmbedProcess, cosine, gateway, reference};
use support::{KEY, openai};
use tokio::time::Instant;

fn embed(url: &str, input: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(format!("{url}/v1/embeddings"))
        .bearer_auth(KEY)
        .json(&json!({"model": EMBED_MODEL, "input": input}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_real_embeddings_and_caches_a_repeated_request() {
    let nodes = [EmbedProcess::start(&[]), EmbedProcess::start(&[])];
    let setup = gateway(nodes.iter().map(|n| n.url.clone()).collect(), |_| {}).await;
    let reference = reference();

    // A real OpenAI client, several inputs in one request.
    let inputs: Vec<String> = reference.items[..4]
        .iter()
        .map(|i| i.sentence.clone())
        .collect();
    let answer = openai(&setup.url)
        .embeddings()
        .create(
            CreateEmbeddingRequestArgs::default()
                .model(EMBED_MODEL)
                .input(inputs)
                .build()
                .unwrap(),
        )
        .await
        .expect("embeddings through the gateway");
    assert_eq!(answer.data.len(), 4);
    for (item, data) in reference.items.iter().zip(&answer.data) {
        assert!(
            cosine(&data.embedding, &item.embedding) >= 0.999,
            "{:?}",
            item.sentence
        );
    }
    let tokens: usize = reference.items[..4].iter().map(|i| i.tokens).sum();
    assert_eq!(answer.usage.prompt_tokens as usize, tokens);

    let sentence = &reference.items[5];
    let first = embed(&setup.url, &sentence.sentence).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-keel-cache"], "miss");
    let first: Value = first.json().await.unwrap();
    let vector: Vec<f32> = serde_json::from_value(first["data"][0]["embedding"].clone()).unwrap();
    assert!(cosine(&vector, &sentence.embedding) >= 0.999);

    let again = embed(&setup.url, &sentence.sentence).send().await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["x-keel-cache"], "hit");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again, first);
}

/// Callers sending distinct inputs (no cache hits) for `run`; (ok, failed).
async fn load(url: &str, run: Duration, round: &str) -> (u64, u64) {
    let stop = Instant::now() + run;
    let callers: Vec<_> = (0..4)
        .map(|caller| {
            let url = url.to_owned();
            let round = round.to_owned();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut n = 0;
                while Instant::now() < stop {
                    n += 1;
                    let input = format!("{round}: caller {caller} asks question number {n}");
                    match embed(&url, &input)
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                    {
                        Ok(200) => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    support::sum_callers(callers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_load_loses_no_request_beyond_the_retry_budget() {
    let mut nodes = [EmbedProcess::start(&[]), EmbedProcess::start(&[])];
    let setup = gateway(nodes.iter().map(|n| n.url.clone()).collect(), |config| {
        config.probe_interval = Duration::from_millis(100);
    })
    .await;
    let (ok, failed) = load(&setup.url, Duration::from_millis(800), "before").await;
    assert_eq!(failed, 0, "{ok} ok before the kill");

    // SIGKILL in the middle of a load: requests in flight on it are cut.
    let during = tokio::spawn({
        let url = setup.url.clone();
        async move { load(&url, Duration::from_millis(2_000), "during").await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes[0].kill();
    let (ok, failed) = during.await.unwrap();
    // Retries within the budget hide the dead node; what fails is bounded
    // by the budget (10 % of requests plus its floor of 10).
    assert!(ok > 0, "nothing was served while a node died");
    assert!(
        failed <= 10 + ok / 10,
        "{failed} failed, {ok} ok while a node died"
    );

    let (ok, failed) = load(&setup.url, Duration::from_millis(800), "after").await;
    assert_eq!(failed, 0, "{ok} ok on the surviving node");
    assert!(ok > 0);
}
