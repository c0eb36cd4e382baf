//! The embedding node's HTTP handlers.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State as Shared;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use bytes::Bytes;
use keel_core::{ErrorKind, HttpError};
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

use super::{Counters, State};
use crate::openai::{EmbeddingRequest, Usage};

pub(super) fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/healthz", get(healthz))
        .route("/health", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    HttpError::from_kind(kind, message)
        .into_response()
        .map(Body::from)
}

/// How the vectors are written in the answer.
#[derive(Clone, Copy)]
enum Format {
    Float,
    Base64,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct Item {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Serialize)]
struct Answer<'a> {
    object: &'static str,
    data: Vec<Item>,
    model: &'a str,
    usage: Usage,
}

/// The request's inputs, or why it cannot be embedded.
fn texts(input: &Value) -> Result<Vec<String>, String> {
    match input {
        Value::String(text) => Ok(vec![text.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => Ok(text.clone()),
                Value::Number(_) | Value::Array(_) => Err(
                    "token ids are not accepted: send `input` as a string or an array of strings"
                        .to_owned(),
                ),
                other => Err(format!(
                    "`input` must be a string or an array of strings, not an array holding {other}"
                )),
            })
            .collect(),
        other => Err(format!(
            "`input` must be a string or an array of strings, not {other}"
        )),
    }
}

/// The request's `encoding_format` and `dimensions`, checked.
fn options(request: &EmbeddingRequest, dims: usize) -> Result<Format, String> {
    let format = match request.extra.get("encoding_format") {
        None | Some(Value::Null) => Format::Float,
        Some(Value::String(f)) if f == "float" => Format::Float,
        Some(Value::String(f)) if f == "base64" => Format::Base64,
        Some(other) => {
            return Err(format!(
                "`encoding_format` must be \"float\" or \"base64\", not {other}"
            ));
        }
    };
    match request.extra.get("dimensions") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if n.as_u64() == Some(dims as u64) => {}
        Some(other) => {
            return Err(format!(
                "this model answers {dims} dimensions and cannot shorten them (`dimensions` was {other})"
            ));
        }
    }
    Ok(format)
}

/// Inputs admitted into the queue; given back when dropped.
struct Queued<'a> {
    state: &'a State,
    inputs: usize,
}

impl<'a> Queued<'a> {
    fn admit(state: &'a State, inputs: usize) -> Option<Queued<'a>> {
        let limit = state.config.max_queued;
        state
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued + inputs <= limit).then_some(queued + inputs)
            })
            .ok()?;
        Some(Queued { state, inputs })
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.state.queued.fetch_sub(self.inputs, Ordering::AcqRel);
    }
}

/// Counts a request's outcome once: a handler dropped before it finished
/// was cancelled by its client.
struct Outcome<'a> {
    state: &'a State,
    started: Instant,
    outcome: &'static str,
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        let model = self.state.config.model.clone();
        metrics::counter!("keel_embed_requests_total", "model" => model.clone(), "outcome" => self.outcome)
            .increment(1);
        metrics::histogram!("keel_embed_request_seconds", "model" => model.clone())
            .record(self.started.elapsed().as_secs_f64());
        metrics::gauge!("keel_embed_queued", "model" => model)
            .set(self.state.queued.load(Ordering::Acquire) as f64);
    }
}

async fn embeddings(Shared(state): Shared<Arc<State>>, body: Bytes) -> Response {
    let counters = &state.counters;
    Counters::add(&counters.requests, 1);
    let mut outcome = Outcome {
        state: &state,
        started: Instant::now(),
        outcome: "cancelled",
    };
    let bad = |outcome: &mut Outcome<'_>, message: String| {
        outcome.outcome = "bad_request";
        error(ErrorKind::InvalidInput, message)
    };
    let request: EmbeddingRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => return bad(&mut outcome, format!("invalid request body: {err}")),
    };
    let inputs = match texts(&request.input) {
        Ok(inputs) => inputs,
        Err(message) => return bad(&mut outcome, message),
    };
    if inputs.is_empty() {
        return bad(&mut outcome, "`input` must not be empty".to_owned());
    }
    let max_inputs = state.config.max_inputs;
    if inputs.len() > max_inputs {
        return bad(
            &mut outcome,
            format!(
                "`input` holds {} items; this node takes at most {max_inputs} per request",
                inputs.len()
            ),
        );
    }
    let format = match options(&request, state.dims) {
        Ok(format) => format,
        Err(message) => return bad(&mut outcome, message),
    };

    let Some(_queued) = Queued::admit(&state, inputs.len()) else {
        Counters::add(&counters.busy, 1);
        outcome.outcome = "busy";
        return error(
            ErrorKind::Overloaded {
                retry_after: Some(Duration::from_secs(1)),
            },
            format!(
                "more than {} inputs are waiting for the model; retry later",
                state.config.max_queued
            ),
        );
    };
    let count = inputs.len();
    let results =
        futures::future::try_join_all(inputs.into_iter().map(|text| state.batcher.submit(text)))
            .await;
    let embeddings = match results {
        Ok(embeddings) => embeddings,
        Err(err) => {
            Counters::add(&counters.failed, 1);
            outcome.outcome = "failed";
            tracing::error!(error = %err, "embedding failed");
            let mut message = err.to_string();
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                message.push_str(": ");
                message.push_str(&cause.to_string());
                source = cause.source();
            }
            return error(ErrorKind::Internal, message);
        }
    };
    let tokens: u64 = embeddings.iter().map(|e| e.tokens as u64).sum();
    let data = embeddings
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| Item {
            object: "embedding",
            index,
            embedding: match format {
                Format::Float => Vector::Float(embedding.vector),
                Format::Base64 => Vector::Base64(base64_of(&embedding.vector)),
            },
        })
        .collect();
    let answer = Answer {
        object: "list",
        data,
        model: &state.config.model,
        usage: Usage {
            prompt_tokens: tokens,
            completion_tokens: 0,
            total_tokens: tokens,
        },
    };
    Counters::add(&counters.inputs, count as u64);
    Counters::add(&counters.completed, 1);
    metrics::counter!("keel_embed_inputs_total", "model" => state.config.model.clone())
        .increment(count as u64);
    outcome.outcome = "ok";
    axum::Json(answer).into_response()
}

/// Little-endian `f32`s, base64 (what OpenAI's `encoding_format: "base64"`
/// answers).
fn base64_of(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn models(Shared(state): Shared<Arc<State>>) -> Response {
    crate::openai::one_model_list(&state.config.model, state.created, "keel-embed-node")
}

async fn healthz() -> Response {
    (StatusCode::OK, "ok").into_response()
}

async fn metrics() -> Response {
    let mut response = crate::metrics::render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}
