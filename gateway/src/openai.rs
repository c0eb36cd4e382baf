//! The parts of the OpenAI wire format the gateway and the fake node read
//! and write. Unknown fields are kept (`extra`) so requests pass through
//! unchanged.

use axum::Router;
use axum::routing::MethodRouter;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The OpenAI endpoints that the gateway and the fake node both serve,
/// each with its handler: chat and text completions, embeddings, models.
/// A `GET /v1/models` answer listing one model.
pub(crate) fn one_model_list(id: &str, created: u64, owned_by: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    axum::Json(serde_json::json!({
        "object": "list",
        "data": [{"id": id, "object": "model", "created": created, "owned_by": owned_by}],
    }))
    .into_response()
}

pub(crate) fn routes<S: Clone + Send + Sync + 'static>(
    chat: MethodRouter<S>,
    completions: MethodRouter<S>,
    embeddings: MethodRouter<S>,
    models: MethodRouter<S>,
) -> Router<S> {
    Router::new()
        .route("/v1/chat/completions", chat)
        .route("/v1/completions", completions)
        .route("/v1/embeddings", embeddings)
        .route("/v1/models", models)
}

/// A chat message; `content` may be a string or an array of parts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`…
    pub role: String,
    /// The message text (or parts).
    #[serde(default)]
    pub content: Value,
}

impl Message {
    /// The message's text: a string content as is, text parts joined.
    pub fn text(&self) -> String {
        text_of(&self.content)
    }
}

/// The text of a `content` or `prompt` value: a string as is, arrays of
/// strings or of `{"text": …}` parts joined with spaces.
pub fn text_of(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .map(|part| match part {
                Value::String(text) => text.clone(),
                Value::Object(map) => map
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                _ => String::new(),
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChatRequest {
    /// The model (a pool of upstreams at the gateway).
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Completion tokens at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Newer name of `max_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// Stream the answer as server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Every other field, passed through.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatRequest {
    /// `max_completion_tokens`, else `max_tokens`.
    pub fn max_output(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CompletionRequest {
    /// The model.
    pub model: String,
    /// The prompt (a string or an array of strings).
    #[serde(default)]
    pub prompt: Value,
    /// Completion tokens at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Stream the answer as server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Every other field, passed through.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `POST /v1/embeddings`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingRequest {
    /// The model.
    pub model: String,
    /// A string or an array of strings.
    pub input: Value,
    /// Every other field, passed through.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl EmbeddingRequest {
    /// The inputs as strings (a single string is one input).
    pub fn inputs(&self) -> Vec<String> {
        match &self.input {
            Value::String(text) => vec![text.clone()],
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                })
                .collect(),
            other => vec![other.to_string()],
        }
    }
}

/// Token counts of an answer.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u64,
    /// Tokens generated.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Both.
    pub total_tokens: u64,
}

impl Usage {
    /// Usage of `prompt` in and `completion` out.
    pub fn new(prompt: u64, completion: u64) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// A rough token count of `text` (whitespace-separated words, at least one
/// per four bytes of a long word), the same on the gateway and the fake
/// node so estimates and usage agree in tests.
pub fn estimate_tokens(text: &str) -> u64 {
    text.split_whitespace()
        .map(|word| (word.len() as u64).div_ceil(4).max(1))
        .sum()
}
