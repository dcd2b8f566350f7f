//! `POST /tokenize`, `POST /detokenize` and `POST /apply-template`: the
//! llama-server utility endpoints, for seeing exactly what the model is fed.
//!
//! `/tokenize` takes raw `content` (markup parsed, as llama-server does) or,
//! as an extension, OpenAI-style `messages` (and `tools`): those are rendered
//! and tokenized exactly as `/v1/chat/completions` would, client text kept
//! out of control tokens.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, OpenAIError};
use super::openai::{convert, ChatCompletionRequest};
use super::pipeline;
use crate::engine::Token;
use crate::state::AppState;

#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    add_special: Option<bool>,
    #[serde(default)]
    parse_special: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct DetokenizeRequest {
    tokens: Vec<i64>,
}

/// Tokens, with their text when asked.
fn tokens_json(state: &AppState, tokens: &[Token], with_pieces: bool) -> Value {
    let model = state.engine.model();
    if !with_pieces {
        return json!({ "tokens": tokens });
    }
    let items: Vec<Value> = tokens
        .iter()
        .map(|&t| {
            let bytes = model.token_text(t);
            match String::from_utf8(bytes.clone()) {
                Ok(s) => json!({ "id": t, "piece": s }),
                Err(_) => json!({ "id": t, "piece": bytes }),
            }
        })
        .collect();
    json!({ "tokens": items })
}

/// This module's routes.
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/apply-template", post(apply_template))
}

/// `POST /tokenize`
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, OpenAIError> {
    let value: Value = ApiError::parse_json(&body)?;
    let with_pieces = value
        .get("with_pieces")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if value.get("messages").is_some() {
        // The prompt as a chat completion renders it; not held to the
        // context size (measuring a prompt that is too long is a use).
        let req: ChatCompletionRequest = ApiError::parse_json(&body)?;
        let (chat, _) = convert(req)?;
        let tokens = prepared_prompt(&state, chat).await?.tokens;
        return Ok(Json(tokens_json(&state, &tokens, with_pieces)).into_response());
    }
    let req: TokenizeRequest = ApiError::parse_json(&body)?;
    let Some(content) = req.content else {
        return Err(ApiError::invalid_param(
            "content",
            "give `content` (text) or `messages` (a chat)",
        )
        .into());
    };
    let model = state.engine.model().clone();
    let (add, parse) = (
        req.add_special.unwrap_or(false),
        req.parse_special.unwrap_or(true),
    );
    let tokens = tokio::task::spawn_blocking(move || model.tokenize(&content, add, parse))
        .await
        .map_err(|e| ApiError::internal(format!("tokenizer panicked: {e}")))?;
    Ok(Json(tokens_json(&state, &tokens, with_pieces)).into_response())
}

/// `POST /detokenize`
pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, OpenAIError> {
    let req: DetokenizeRequest = ApiError::parse_json(&body)?;
    let model = state.engine.model();
    let n_vocab = model.n_vocab() as i64;
    let mut bytes = Vec::new();
    for (i, &t) in req.tokens.iter().enumerate() {
        if !(0..n_vocab).contains(&t) {
            return Err(ApiError::invalid_param(
                &format!("tokens[{i}]"),
                format!("token {t} is not in the vocabulary (0..{n_vocab})"),
            )
            .into());
        }
        bytes.extend(model.token_text(t as Token));
    }
    Ok(Json(json!({ "content": String::from_utf8_lossy(&bytes) })).into_response())
}

/// `POST /apply-template`: the rendered prompt for an OpenAI chat request.
pub async fn apply_template(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, OpenAIError> {
    let req: ChatCompletionRequest = ApiError::parse_json(&body)?;
    let (chat, _) = convert(req)?;
    let prepared = prepared_prompt(&state, chat).await?;
    Ok(Json(json!({ "prompt": prepared.text })).into_response())
}

/// Render and tokenize a chat as `/v1/chat/completions` would, on the
/// blocking pool.
async fn prepared_prompt(
    state: &Arc<AppState>,
    chat: crate::chat::ChatRequest,
) -> Result<crate::chat::prompt::Prepared, ApiError> {
    let st = state.clone();
    tokio::task::spawn_blocking(move || {
        crate::chat::prompt::prepare(&pipeline::prompt_setup(&st), chat)
    })
    .await
    .map_err(|e| ApiError::internal(format!("prompt preparation panicked: {e}")))?
    .map_err(|e| super::prompt_error(e, "messages"))
}
