//! keel-embed-node's model against sentence-transformers' reference vectors
//! (`gateway/embed/reference.json`), and its micro-batching: concurrent
//! callers share forward passes and each gets its own rows.
//!
//! Needs the model files: `gateway/embed/fetch-model.sh`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use keel_gateway::embed_node::{EmbedError, EmbedNode, EmbedNodeConfig, Embedder, FETCH_SCRIPT};
use serde_json::{Value, json};
use support::embed::{EMBED_MODEL, ReferenceItem, cosine, embedder, reference};

/// A node on a free port serving the shared model with `tweak`ed settings.
async fn node(tweak: impl FnOnce(&mut EmbedNodeConfig)) -> EmbedNode {
    let mut config = EmbedNodeConfig::default();
    config.model = EMBED_MODEL.to_owned();
    tweak(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    EmbedNode::serve(config, embedder(), listener).expect("a valid config")
}

async fn post(url: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/v1/embeddings"))
        .json(&body)
        .send()
        .await
        .expect("the node answers")
}

fn vectors(answer: &Value) -> Vec<Vec<f32>> {
    answer["data"]
        .as_array()
        .expect("data")
        .iter()
        .enumerate()
        .map(|(i, item)| {
            assert_eq!(item["index"], i);
            item["embedding"]
                .as_array()
                .expect("a float embedding")
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

/// The reference sentences up to `max_tokens` long.
fn short_items(max_tokens: usize) -> Vec<&'static ReferenceItem> {
    reference()
        .items
        .iter()
        .filter(|item| item.tokens <= max_tokens)
        .collect()
}

fn assert_matches_reference(items: &[&ReferenceItem]) {
    let sentences: Vec<&str> = items.iter().map(|i| i.sentence.as_str()).collect();
    let ours = embedder().embed(&sentences).unwrap();
    assert_eq!(ours.len(), sentences.len());
    for (item, embedding) in items.iter().zip(&ours) {
        assert_eq!(embedding.vector.len(), 384);
        let similarity = cosine(&embedding.vector, &item.embedding);
        assert!(
            similarity >= 0.999,
            "cosine {similarity} for {:?}",
            item.sentence
        );
        let norm: f32 = embedding.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
        assert_eq!(
            embedding.tokens, item.tokens,
            "tokens of {:?}",
            item.sentence
        );
    }
}

#[test]
fn every_reference_sentence_matches_sentence_transformers() {
    let all: Vec<&ReferenceItem> = reference().items.iter().collect();
    let (long, short): (Vec<_>, Vec<_>) = all.into_iter().partition(|i| i.tokens > 32);
    assert!(!long.is_empty() && long.iter().all(|i| i.tokens == 256));
    // The short ones in one batch (pads up to 23 tokens)...
    assert_matches_reference(&short);
    // ...and the empty input (2 tokens) and a short one padded to the long
    // one (over 256 tokens, truncated): a mask letting pads into attention
    // or pooling would show here.
    let mut padded = vec![short[0]];
    padded.extend(short.iter().filter(|i| i.sentence.is_empty()));
    assert_eq!(padded.len(), 2, "the reference has an empty sentence");
    padded.extend(long);
    assert_matches_reference(&padded);
}

#[test]
fn close_pairs_score_higher_than_unrelated_pairs() {
    let reference = reference();
    let sentences: Vec<&str> = reference
        .items
        .iter()
        .filter(|i| i.tokens <= 32)
        .map(|i| i.sentence.as_str())
        .collect();
    let ours = embedder().embed(&sentences).unwrap();
    let sim = |(a, b): (usize, usize)| {
        assert_eq!(reference.items[a].sentence, sentences[a]);
        assert_eq!(reference.items[b].sentence, sentences[b]);
        cosine(&ours[a].vector, &ours[b].vector)
    };
    let least_close = reference
        .close_pairs
        .iter()
        .map(|&p| (sim(p), p))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap();
    let most_unrelated = reference
        .unrelated_pairs
        .iter()
        .map(|&p| (sim(p), p))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap();
    assert!(
        least_close.0 > most_unrelated.0 + 0.2,
        "least close pair {least_close:?} against most unrelated {most_unrelated:?}"
    );
}

#[test]
fn missing_weights_fail_naming_the_fetch_script() {
    let empty = tempfile::tempdir().unwrap();
    let err = Embedder::load(empty.path(), "cpu").unwrap_err();
    assert!(matches!(err, EmbedError::ModelMissing { .. }), "{err:?}");
    assert!(err.to_string().contains(FETCH_SCRIPT), "{err}");
    assert!(err.to_string().contains("KEEL_MODEL_DIR"), "{err}");
}

#[test]
fn a_device_without_support_in_this_build_is_refused_with_the_reason() {
    support::embed::require_model();
    let dir = keel_gateway::embed_node::default_model_dir();
    for device in ["gpu", "cuda:x"] {
        let err = Embedder::load(&dir, device).unwrap_err();
        assert!(matches!(err, EmbedError::Device { .. }), "{err:?}");
        assert!(err.to_string().contains("cuda:N"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_forward_passes_and_get_their_own_rows() {
    let items = short_items(32);
    // A long wait so the callers' inputs surely meet in a batch.
    let node = Arc::new(
        node(|config| {
            config.max_wait = Duration::from_millis(200);
        })
        .await,
    );
    let answers = futures::future::join_all(items.iter().map(|item| {
        let url = node.url();
        async move {
            let answer = post(&url, json!({"model": EMBED_MODEL, "input": item.sentence})).await;
            assert_eq!(answer.status(), 200);
            answer.json::<Value>().await.unwrap()
        }
    }))
    .await;
    let stats = node.stats();
    assert_eq!(stats.inputs, items.len() as u64);
    assert!(
        stats.batches <= 2 && stats.forward_passes < items.len() as u64 / 2,
        "{} callers took {} batches, {} forward passes",
        items.len(),
        stats.batches,
        stats.forward_passes
    );
    assert!(stats.padding_tokens > 0, "{stats:?}");
    for (item, answer) in items.iter().zip(&answers) {
        let got = &vectors(answer)[0];
        // The same row as a forward pass of this input alone...
        let alone = &embedder().embed(&[&item.sentence]).unwrap()[0];
        let drift = got
            .iter()
            .zip(&alone.vector)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            drift < 1e-4,
            "{:?} drifted {drift} in a batch",
            item.sentence
        );
        // ...and the reference's.
        assert!(cosine(got, &item.embedding) >= 0.999, "{:?}", item.sentence);
        assert_eq!(answer["usage"]["prompt_tokens"], item.tokens);
    }
}

#[tokio::test]
async fn the_openai_answer_shape_usage_and_base64() {
    let node = node(|_| {}).await;
    let reference = reference();
    let inputs: Vec<&str> = reference.items[..3]
        .iter()
        .map(|i| i.sentence.as_str())
        .collect();
    let answer: Value = post(&node.url(), json!({"model": EMBED_MODEL, "input": inputs}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["object"], "list");
    assert_eq!(answer["model"], EMBED_MODEL);
    assert_eq!(answer["data"][0]["object"], "embedding");
    let tokens: usize = reference.items[..3].iter().map(|i| i.tokens).sum();
    assert_eq!(answer["usage"]["prompt_tokens"], tokens);
    assert_eq!(answer["usage"]["total_tokens"], tokens);
    let floats = vectors(&answer);

    let encoded: Value = post(
        &node.url(),
        json!({"model": EMBED_MODEL, "input": inputs, "encoding_format": "base64", "dimensions": 384}),
    )
    .await
    .json()
    .await
    .unwrap();
    for (i, floats) in floats.iter().enumerate() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(
                encoded["data"][i]["embedding"]
                    .as_str()
                    .expect("a base64 string"),
            )
            .unwrap();
        let decoded: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(&decoded, floats);
    }

    let models: Value = reqwest::get(format!("{}/v1/models", node.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], EMBED_MODEL);
    assert_eq!(models["data"][0]["owned_by"], "keel-embed-node");
    let health = reqwest::get(format!("{}/healthz", node.url()))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let metrics = reqwest::get(format!("{}/metrics", node.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "keel_embed_requests_total",
        "keel_embed_batch_seconds",
        "keel_embed_tokens_total",
        "keel_batch_size",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
}

#[tokio::test]
async fn inputs_it_cannot_embed_are_refused_with_400_saying_why() {
    let node = node(|config| config.max_inputs = 4).await;
    let cases = [
        (
            json!({"model": EMBED_MODEL, "input": [[101, 2023, 102]]}),
            "token ids",
        ),
        (json!({"model": EMBED_MODEL, "input": [1, 2]}), "token ids"),
        (
            json!({"model": EMBED_MODEL, "input": []}),
            "must not be empty",
        ),
        (
            json!({"model": EMBED_MODEL, "input": {"text": "x"}}),
            "a string or an array",
        ),
        (
            json!({"model": EMBED_MODEL, "input": ["a", "b", "c", "d", "e"]}),
            "at most 4",
        ),
        (
            json!({"model": EMBED_MODEL, "input": "x", "dimensions": 128}),
            "384 dimensions",
        ),
        (
            json!({"model": EMBED_MODEL, "input": "x", "encoding_format": "int8"}),
            "encoding_format",
        ),
        (json!({"input": "x"}), "invalid request body"),
    ];
    for (body, says) in cases {
        let answer = post(&node.url(), body.clone()).await;
        assert_eq!(answer.status(), 400, "{body}");
        let error: Value = answer.json().await.unwrap();
        assert_eq!(error["error"]["type"], "invalid_request_error");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
    assert_eq!(node.stats().forward_passes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_beyond_max_queued_are_answered_503_with_retry_after() {
    // The first request's two inputs wait 1 s for a batch that never fills,
    // holding the whole queue.
    let node = Arc::new(
        node(|config| {
            config.max_queued = 2;
            config.max_inputs = 2;
            config.max_wait = Duration::from_secs(1);
        })
        .await,
    );
    let first = tokio::spawn({
        let url = node.url();
        async move { post(&url, json!({"model": EMBED_MODEL, "input": ["one", "two"]})).await }
    });
    while node.stats().requests == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let refused = post(&node.url(), json!({"model": EMBED_MODEL, "input": "three"})).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(first.await.unwrap().status(), 200);
    // The queue is free again.
    let later = post(&node.url(), json!({"model": EMBED_MODEL, "input": "three"})).await;
    assert_eq!(later.status(), 200);
    assert_eq!(node.stats().busy, 1);
}
