//! OpenAI chat completions: `POST /v1/chat/completions`.
//!
//! Wire types are the official API's; fields hearth does not implement are
//! accepted and ignored, as other OpenAI-compatible servers do, so clients
//! that send them keep working.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, OpenAIError};
use super::error::Protocol;
use super::sse::{self, StreamAdapter};
use super::{check_max_tokens, check_range, collect, new_id, prepare, unix_now, GenOptions};
use crate::chat::{ChatMessage, Role};
use crate::engine::{Event, FinishReason, SamplingParams, Usage};
use crate::server::AppState;

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<WireMessage>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i32>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopField>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<u32>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<WireContent>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum WireContent {
    Text(String),
    Parts(Vec<WirePart>),
}

#[derive(Debug, Deserialize)]
pub struct WirePart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// Flatten a message's content to text. Only text parts are supported.
fn content_text(i: usize, content: Option<WireContent>) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(WireContent::Text(t)) => Ok(t),
        Some(WireContent::Parts(parts)) => {
            let mut out = String::new();
            for (j, part) in parts.into_iter().enumerate() {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(t)) => out.push_str(&t),
                    ("text", None) => {
                        return Err(ApiError::invalid_param(
                            &format!("messages[{i}].content[{j}].text"),
                            "a text part needs a `text` string",
                        ))
                    }
                    (other, _) => {
                        return Err(ApiError::invalid_param(
                            &format!("messages[{i}].content[{j}].type"),
                            format!("content parts of type `{other}` are not supported by this model; send text"),
                        ))
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Convert and validate a request into messages and options.
pub fn convert(req: ChatCompletionRequest) -> Result<(Vec<ChatMessage>, GenOptions), ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "messages must contain at least one message"));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid_param("n", "only n = 1 is supported"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::invalid_param(
                    &format!("messages[{i}].role"),
                    format!("unsupported role `{other}`; expected system, developer, user or assistant"),
                ))
            }
        };
        messages.push(ChatMessage::new(role, content_text(i, m.content)?));
    }
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(v), _) => Some(check_max_tokens("max_completion_tokens", v)?),
        (None, Some(v)) => Some(check_max_tokens("max_tokens", v)?),
        (None, None) => None,
    };
    let defaults = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: req.temperature.map(|t| check_range("temperature", t, 0.0, 2.0)).transpose()?.unwrap_or(defaults.temperature),
        top_p: req.top_p.map(|p| check_range("top_p", p, 0.0, 1.0)).transpose()?.unwrap_or(defaults.top_p),
        top_k: match req.top_k {
            Some(k) if k < 0 => return Err(ApiError::invalid_param("top_k", "top_k must be 0 or more")),
            Some(k) => k,
            None => defaults.top_k,
        },
        min_p: req.min_p.map(|p| check_range("min_p", p, 0.0, 1.0)).transpose()?.unwrap_or(defaults.min_p),
        seed: req.seed.map(|s| s as u64),
    };
    let stop = match req.stop {
        None => vec![],
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    let stop = super::check_stop("stop", stop)?;
    Ok((messages, GenOptions { sampling, max_tokens, stop }))
}

pub fn finish_reason(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::EndOfTurn | FinishReason::StopSequence(_) => "stop",
        FinishReason::MaxTokens | FinishReason::ContextFull => "length",
    }
}

pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": u.cached_tokens },
    })
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, OpenAIError> {
    let req: ChatCompletionRequest = ApiError::parse_json(&body)?;
    let model = req.model.clone().filter(|m| !m.is_empty()).unwrap_or_else(|| state.model_id.clone());
    let stream = req.stream.unwrap_or(false);
    let include_usage = req.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
    let (messages, opts) = convert(req)?;
    let gen = prepare(&state, messages, opts).await?;
    let job = state.submit("chat_completions", &body, gen);
    let id = new_id("chatcmpl-");
    let created = unix_now();
    if stream {
        let adapter = ChunkAdapter { id, created, model, include_usage };
        return Ok(state.stream_job(job, adapter, Protocol::OpenAI));
    }
    let done = collect(job).await?;
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": state.fingerprint,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": done.text, "refusal": null },
            "logprobs": null,
            "finish_reason": finish_reason(&done.reason),
        }],
        "usage": usage_json(&done.usage),
    }))
    .into_response())
}

/// Streams `chat.completion.chunk` objects.
struct ChunkAdapter {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl ChunkAdapter {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        let mut c = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }
}

impl StreamAdapter for ChunkAdapter {
    fn opening(&mut self) -> Vec<axum::response::sse::Event> {
        vec![sse::data(&self.chunk(json!({ "role": "assistant", "content": "" }), None))]
    }

    fn on_event(&mut self, event: Event) -> Vec<axum::response::sse::Event> {
        match event {
            Event::Text(text) => vec![sse::data(&self.chunk(json!({ "content": text }), None))],
            Event::Finished { reason, usage, .. } => {
                let mut out = vec![sse::data(&self.chunk(json!({}), Some(finish_reason(&reason))))];
                if self.include_usage {
                    let mut last = self.chunk(json!({}), None);
                    last["choices"] = json!([]);
                    last["usage"] = usage_json(&usage);
                    out.push(sse::data(&last));
                }
                out.push(axum::response::sse::Event::default().data("[DONE]"));
                out
            }
            Event::Failed(err) => {
                let api: ApiError = err.into();
                if api.kind == super::error::ErrorKind::Internal {
                    tracing::error!(cause = %api.message, "stream failed");
                }
                vec![
                    sse::data(&json!({ "error": api.openai_body() })),
                    axum::response::sse::Event::default().data("[DONE]"),
                ]
            }
            Event::Started { .. } | Event::PrefillProgress { .. } => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<(Vec<ChatMessage>, GenOptions), ApiError> {
        convert(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn converts_roles_and_parts() {
        let (m, o) = parse(json!({
            "model": "x",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
            ],
            "max_completion_tokens": 5, "temperature": 0, "stop": "END"
        }))
        .unwrap();
        assert_eq!(m[0], ChatMessage::new(Role::System, "be brief"));
        assert_eq!(m[1], ChatMessage::new(Role::User, "hi there"));
        assert_eq!(o.max_tokens, Some(5));
        assert!(o.sampling.is_greedy());
        assert_eq!(o.stop, vec!["END"]);
    }

    #[test]
    fn rejects_what_openai_rejects() {
        let cases = [
            json!({"messages": []}),
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": 3}),
            json!({"messages": [{"role": "user", "content": "x"}], "top_p": -1}),
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            json!({"messages": [{"role": "user", "content": "x"}], "n": 2}),
        ];
        for c in cases {
            assert!(parse(c.clone()).is_err(), "{c}");
        }
    }
}
