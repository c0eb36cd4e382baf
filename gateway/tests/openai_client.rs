//! A real third-party client, `async-openai`, drives the gateway: chat,
//! streaming chat and embeddings, in front of fake nodes.

mod support;

use async_openai::types::{
    ChatCompletionRequestSystemMessageArgs, ChatCompletionRequestUserMessageArgs,
    CreateChatCompletionRequestArgs, CreateEmbeddingRequestArgs,
};
use futures::StreamExt;
use keel_gateway::fake_node::FakeNodeConfig;
use support::{MODEL, openai, start, total};

fn chat_request(stream: bool) -> async_openai::types::CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .max_tokens(8u32)
        .stream(stream)
        .messages([
            ChatCompletionRequestSystemMessageArgs::default()
                .content("You are terse.")
                .build()
                .unwrap()
                .into(),
            ChatCompletionRequestUserMessageArgs::default()
                .content("Say something.")
                .build()
                .unwrap()
                .into(),
        ])
        .build()
        .unwrap()
}

#[tokio::test]
async fn chat_through_the_gateway() {
    let setup = start(2, FakeNodeConfig::instant(), |_| {}).await;
    let client = openai(&setup.url);
    let answer = client
        .chat()
        .create(chat_request(false))
        .await
        .expect("a chat answer");
    let text = answer.choices[0]
        .message
        .content
        .clone()
        .unwrap_or_default();
    assert_eq!(text.split_whitespace().count(), 8, "{text}");
    assert_eq!(answer.usage.expect("usage").completion_tokens, 8);
    assert_eq!(total(&setup.nodes, |s| s.completed), 1);
}

#[tokio::test]
async fn streaming_chat_through_the_gateway() {
    let setup = start(2, FakeNodeConfig::instant(), |_| {}).await;
    let client = openai(&setup.url);
    let mut stream = client
        .chat()
        .create_stream(chat_request(true))
        .await
        .expect("a stream");
    let mut text = String::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("a well-formed chunk");
        chunks += 1;
        if let Some(choice) = chunk.choices.first()
            && let Some(content) = &choice.delta.content
        {
            text.push_str(content);
        }
    }
    assert_eq!(text.split_whitespace().count(), 8, "{text}");
    assert!(chunks >= 8, "{chunks} chunks");
}

#[tokio::test]
async fn embeddings_through_the_gateway() {
    let setup = start(2, FakeNodeConfig::instant(), |_| {}).await;
    let client = openai(&setup.url);
    let answer = client
        .embeddings()
        .create(
            CreateEmbeddingRequestArgs::default()
                .model(MODEL)
                .input(vec!["first text", "second text"])
                .build()
                .unwrap(),
        )
        .await
        .expect("embeddings");
    assert_eq!(answer.data.len(), 2);
    assert_eq!(answer.data[0].embedding.len(), 16);
    assert!(answer.usage.prompt_tokens > 0);
}

#[tokio::test]
async fn unknown_key_is_refused_by_the_client_library_as_an_api_error() {
    let setup = start(1, FakeNodeConfig::instant(), |_| {}).await;
    let client = async_openai::Client::with_config(
        async_openai::config::OpenAIConfig::new()
            .with_api_base(format!("{}/v1", setup.url))
            .with_api_key("sk-wrong"),
    );
    let err = client.chat().create(chat_request(false)).await.unwrap_err();
    match err {
        async_openai::error::OpenAIError::ApiError(api) => {
            assert_eq!(api.code.as_deref(), Some("invalid_api_key"), "{api:?}");
        }
        other => panic!("expected an API error, got {other:?}"),
    }
    assert_eq!(total(&setup.nodes, |s| s.requests), 0);
}
