//! The fake node's HTTP handlers.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State as Shared;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use keel_core::{ErrorKind, HttpError, stable_hash, stable_hash_seeded};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::{Mode, State};
use crate::openai::{
    self, ChatRequest, CompletionRequest, EmbeddingRequest, Usage, estimate_tokens, text_of,
};

pub(crate) fn router(state: Arc<State>) -> Router {
    openai::routes(post(chat), post(completions), post(embeddings), get(models))
        .route("/healthz", get(healthz))
        .route("/health", get(healthz))
        .route("/admin/mode", post(set_mode))
        .route("/admin/stats", get(stats))
        .with_state(state)
}

/// Counts a request in flight; one dropped before `finish` was cancelled
/// by its client.
struct InFlight {
    state: Arc<State>,
    done: bool,
}

impl InFlight {
    fn new(state: &Arc<State>) -> InFlight {
        state.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            state: state.clone(),
            done: false,
        }
    }

    fn finish(mut self, completed: bool) {
        self.done = true;
        let counter = if completed {
            &self.state.counters.completed
        } else {
            &self.state.counters.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state
            .counters
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
        if !self.done {
            self.state
                .counters
                .cancelled
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn error(kind: ErrorKind, message: &str) -> Response {
    HttpError::from_kind(kind, message)
        .into_response()
        .map(Body::from)
}

fn server_error(message: &str) -> Response {
    let mut response = error(ErrorKind::Internal, message);
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response
}

fn busy(state: &State) -> Response {
    state.counters.busy.fetch_add(1, Ordering::Relaxed);
    error(
        ErrorKind::Overloaded {
            retry_after: Some(Duration::from_secs(state.config.retry_after_secs.max(1))),
        },
        "every batch slot is taken; retry later",
    )
}

/// The request body as `T`, or the 400 answer for it.
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|err| {
        Box::new(error(
            ErrorKind::InvalidInput,
            &format!("invalid request body: {err}"),
        ))
    })
}

/// The admission every inference request goes through: mode, error rate,
/// slots. `Ok` carries the slot.
async fn admit(state: &Arc<State>) -> Result<(Mode, OwnedSemaphorePermit), Response> {
    state.counters.requests.fetch_add(1, Ordering::Relaxed);
    let mode = *state.mode.lock();
    match mode {
        Mode::Hang => {
            let _guard = InFlight::new(state);
            std::future::pending::<()>().await;
            unreachable!("a pending future never completes");
        }
        Mode::Fail => {
            state.counters.failed.fetch_add(1, Ordering::Relaxed);
            return Err(server_error("the node is failing (fail mode)"));
        }
        Mode::Busy => return Err(busy(state)),
        Mode::Normal | Mode::Slow { .. } | Mode::FailMidStream { .. } => {}
    }
    if state.draws_error() {
        state.counters.failed.fetch_add(1, Ordering::Relaxed);
        return Err(server_error("injected failure (error_rate)"));
    }
    match state.slots.clone().try_acquire_owned() {
        Ok(permit) => Ok((mode, permit)),
        Err(_) => Err(busy(state)),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Chat,
    Completion,
}

struct Generation {
    shape: Shape,
    model: String,
    usage: Usage,
    ttft: Duration,
    per_token: Duration,
    include_usage: bool,
}

async fn chat(Shared(state): Shared<Arc<State>>, body: Bytes) -> Response {
    let request: ChatRequest = match parse(&body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let prompt: String = request
        .messages
        .iter()
        .map(|m| m.text())
        .collect::<Vec<_>>()
        .join("\n");
    let prefix = request
        .messages
        .first()
        .map(|m| m.text())
        .unwrap_or_default();
    let include_usage = wants_usage(&request.extra);
    generate(
        state,
        Shape::Chat,
        request.model.clone(),
        &prompt,
        &prefix,
        request.max_output(),
        request.stream.unwrap_or(false),
        include_usage,
    )
    .await
}

async fn completions(Shared(state): Shared<Arc<State>>, body: Bytes) -> Response {
    let request: CompletionRequest = match parse(&body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let prompt = text_of(&request.prompt);
    let prefix: String = prompt.chars().take(256).collect();
    let include_usage = wants_usage(&request.extra);
    generate(
        state,
        Shape::Completion,
        request.model.clone(),
        &prompt,
        &prefix,
        request.max_tokens,
        request.stream.unwrap_or(false),
        include_usage,
    )
    .await
}

/// Whether the request asked for a final usage chunk
/// (`stream_options.include_usage`).
fn wants_usage(extra: &serde_json::Map<String, Value>) -> bool {
    extra
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

#[allow(clippy::too_many_arguments)]
async fn generate(
    state: Arc<State>,
    shape: Shape,
    model: String,
    prompt: &str,
    prefix: &str,
    max_tokens: Option<u32>,
    stream: bool,
    include_usage: bool,
) -> Response {
    let (mode, permit) = match admit(&state).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let guard = InFlight::new(&state);
    let hit = state.touch_prefix(stable_hash(prefix.as_bytes()));
    let prefill = if hit {
        Duration::ZERO
    } else {
        state.config.prefill
    };
    let asked = max_tokens.unwrap_or(state.config.default_max_tokens);
    let completion = u64::from(
        state
            .config
            .stop_after
            .map_or(asked, |stop| stop.min(asked)),
    );
    let generation = Generation {
        shape,
        model,
        usage: Usage::new(estimate_tokens(prompt), completion),
        ttft: state.delay(state.config.ttft + prefill, mode),
        per_token: state.delay(state.config.per_token, mode),
        include_usage,
    };
    let cut_after = match mode {
        Mode::FailMidStream { after_tokens } => Some(u64::from(after_tokens)),
        _ => None,
    };
    if stream {
        return stream_answer(generation, cut_after, guard, permit);
    }
    pause(generation.ttft + generation.per_token * completion as u32).await;
    drop(permit);
    if cut_after.is_some() {
        guard.finish(false);
        return cut_connection();
    }
    guard.finish(true);
    let text = tokens(completion);
    let body = match generation.shape {
        Shape::Chat => json!({
            "id": format!("chatcmpl-{}", fastrand::u64(..)),
            "object": "chat.completion",
            "created": now_secs(),
            "model": generation.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }],
            "usage": generation.usage,
        }),
        Shape::Completion => json!({
            "id": format!("cmpl-{}", fastrand::u64(..)),
            "object": "text_completion",
            "created": now_secs(),
            "model": generation.model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            "usage": generation.usage,
        }),
    };
    axum::Json(body).into_response()
}

/// Sleeps for `delay`; a zero delay does not wait for the timer's next
/// tick (an instant node answers at once).
async fn pause(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

/// A response whose body fails at once: hyper cuts the connection.
fn cut_connection() -> Response {
    let failing = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("the node died mid-answer"))
    });
    Body::from_stream(failing).into_response()
}

fn stream_answer(
    generation: Generation,
    cut_after: Option<u64>,
    guard: InFlight,
    permit: OwnedSemaphorePermit,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let _permit = permit;
        let total = generation.usage.completion_tokens;
        let id = format!("chatcmpl-{}", fastrand::u64(..));
        let created = now_secs();
        for index in 0..total {
            let wait = if index == 0 {
                generation.ttft
            } else {
                generation.per_token
            };
            if wait.is_zero() {
                if tx.is_closed() {
                    return; // the client went away: `guard` counts it
                }
            } else {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = tx.closed() => return, // the client went away: `guard` counts it
                }
            }
            if cut_after == Some(index) {
                let _ = tx
                    .send(Err(std::io::Error::other("the node died mid-stream")))
                    .await;
                guard.finish(false);
                return;
            }
            let chunk = chunk(&generation, &id, created, index, None);
            if tx.send(Ok(sse(&chunk))).await.is_err() {
                return;
            }
        }
        let mut tail = vec![sse(&chunk(&generation, &id, created, total, Some("stop")))];
        if generation.include_usage {
            let usage = json!({
                "id": id,
                "object": object_of(generation.shape, true),
                "created": created,
                "model": generation.model,
                "choices": [],
                "usage": generation.usage,
            });
            tail.push(sse(&usage));
        }
        tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
        for bytes in tail {
            if tx.send(Ok(bytes)).await.is_err() {
                return;
            }
        }
        guard.finish(true);
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut response = Body::from_stream(body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn object_of(shape: Shape, chunk: bool) -> &'static str {
    match (shape, chunk) {
        (Shape::Chat, true) => "chat.completion.chunk",
        (Shape::Chat, false) => "chat.completion",
        (Shape::Completion, _) => "text_completion",
    }
}

fn chunk(
    generation: &Generation,
    id: &str,
    created: u64,
    index: u64,
    finish: Option<&str>,
) -> Value {
    let token = if finish.is_some() {
        String::new()
    } else {
        token(index)
    };
    let choice = match generation.shape {
        Shape::Chat => {
            let mut delta = json!({"content": token});
            if index == 0 && finish.is_none() {
                delta["role"] = json!("assistant");
            }
            if finish.is_some() {
                delta = json!({});
            }
            json!({"index": 0, "delta": delta, "finish_reason": finish})
        }
        Shape::Completion => json!({"index": 0, "text": token, "finish_reason": finish}),
    };
    json!({
        "id": id,
        "object": object_of(generation.shape, true),
        "created": created,
        "model": generation.model,
        "choices": [choice],
    })
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn token(index: u64) -> String {
    const WORDS: [&str; 8] = [
        "the ", "node ", "answers ", "one ", "token ", "at ", "a ", "time ",
    ];
    WORDS[(index % WORDS.len() as u64) as usize].to_owned()
}

fn tokens(count: u64) -> String {
    (0..count).map(token).collect()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn embeddings(Shared(state): Shared<Arc<State>>, body: Bytes) -> Response {
    let request: EmbeddingRequest = match parse(&body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let (mode, permit) = match admit(&state).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let guard = InFlight::new(&state);
    let inputs = request.inputs();
    pause(state.delay(state.config.ttft, mode)).await;
    drop(permit);
    if matches!(mode, Mode::FailMidStream { .. }) {
        guard.finish(false);
        return cut_connection();
    }
    let dims = state.config.embedding_dims;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            json!({"object": "embedding", "index": index, "embedding": embed(text, dims)})
        })
        .collect();
    let prompt_tokens: u64 = inputs.iter().map(|t| estimate_tokens(t)).sum();
    guard.finish(true);
    axum::Json(json!({
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response()
}

/// A deterministic unit vector for `text`.
pub(crate) fn embed(text: &str, dims: usize) -> Vec<f32> {
    let raw: Vec<f64> = (0..dims as u64)
        .map(|i| (stable_hash_seeded(text.as_bytes(), i) as f64 / u64::MAX as f64) * 2.0 - 1.0)
        .collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    raw.iter().map(|x| (x / norm) as f32).collect()
}

/// The `created` time the fake node gives its model (2023-11-14).
const FAKE_MODEL_CREATED: u64 = 1_700_000_000;

async fn models(Shared(state): Shared<Arc<State>>) -> Response {
    crate::openai::one_model_list(&state.config.model, FAKE_MODEL_CREATED, "keel-fake-node")
}

async fn healthz(Shared(state): Shared<Arc<State>>) -> Response {
    let mode = *state.mode.lock();
    match mode {
        Mode::Hang => {
            std::future::pending::<()>().await;
            unreachable!("a pending future never completes");
        }
        Mode::Fail => server_error("failing"),
        Mode::Normal | Mode::Slow { .. } | Mode::Busy | Mode::FailMidStream { .. } => {
            (StatusCode::OK, "ok").into_response()
        }
    }
}

async fn set_mode(Shared(state): Shared<Arc<State>>, body: Bytes) -> Response {
    match serde_json::from_slice::<Mode>(&body) {
        Ok(mode) => {
            *state.mode.lock() = mode;
            axum::Json(mode).into_response()
        }
        Err(err) => error(
            ErrorKind::InvalidInput,
            &format!(
                "expected {{\"mode\": \"normal|slow|hang|fail|busy|fail_mid_stream\", …}}: {err}"
            ),
        ),
    }
}

async fn stats(Shared(state): Shared<Arc<State>>) -> Response {
    axum::Json(state.stats()).into_response()
}
