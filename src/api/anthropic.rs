//! Anthropic Messages: `POST /v1/messages`.
//!
//! Mirrors the real API's validation: `model` and `max_tokens` are
//! required, roles are `user` and `assistant`. Newer fields the SDKs send
//! (`cache_control`, `thinking`, `output_config`, `service_tier`,
//! `metadata`, ...) are accepted and ignored until hearth implements them,
//! so no current client is turned away.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{AnthropicError, ApiError, ErrorKind};
use super::error::Protocol;
use super::sse::{self, StreamAdapter};
use super::{check_max_tokens, check_range, collect, new_id, prepare, GenOptions};
use crate::chat::{ChatMessage, Role};
use crate::engine::{Event, FinishReason, SamplingParams, Usage};
use crate::server::AppState;

#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    pub model: String,
    pub max_tokens: i64,
    pub messages: Vec<WireMessage>,
    #[serde(default)]
    pub system: Option<WireContent>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub metadata: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    pub content: WireContent,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum WireContent {
    Text(String),
    Blocks(Vec<WireBlock>),
}

#[derive(Debug, Deserialize)]
pub struct WireBlock {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// Flatten content blocks to text. Earlier thinking blocks are dropped, as
/// the real API drops them from the prompt.
fn blocks_text(field: &str, content: WireContent) -> Result<String, ApiError> {
    match content {
        WireContent::Text(t) => Ok(t),
        WireContent::Blocks(blocks) => {
            let mut out = String::new();
            for (j, b) in blocks.into_iter().enumerate() {
                match b.kind.as_str() {
                    "text" => match b.text {
                        Some(t) => out.push_str(&t),
                        None => return Err(ApiError::invalid(format!("{field}.{j}.text: Field required"))),
                    },
                    "thinking" | "redacted_thinking" => {}
                    other => {
                        return Err(ApiError::invalid(format!(
                            "{field}.{j}: content blocks of type `{other}` are not supported by this server yet"
                        )))
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Claude Code starts its system prompt with a line such as
/// `x-anthropic-billing-header: cc_version=...; cch=...;` that changes on
/// every request. Left in, it would make every prompt miss the KV cache
/// from its first tokens on; it carries nothing the model needs.
pub fn strip_billing_header(system: &str) -> String {
    if !system.contains("x-anthropic-billing-header") {
        return system.to_string();
    }
    let kept: Vec<&str> = system
        .split_inclusive('\n')
        .filter(|line| !line.trim_start().to_ascii_lowercase().starts_with("x-anthropic-billing-header"))
        .collect();
    kept.concat().trim_start_matches('\n').to_string()
}

pub fn convert(req: MessagesRequest, keep_billing_header: bool) -> Result<(Vec<ChatMessage>, GenOptions), ApiError> {
    let max_tokens = check_max_tokens("max_tokens", req.max_tokens)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages: at least one message is required"));
    }
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if let Some(system) = req.system {
        // Each system block is cleaned on its own: the billing line is
        // usually a block by itself.
        let text = match system {
            WireContent::Text(t) if keep_billing_header => t,
            WireContent::Text(t) => strip_billing_header(&t),
            WireContent::Blocks(blocks) => {
                let mut parts = Vec::new();
                for (j, b) in blocks.into_iter().enumerate() {
                    let one = blocks_text(&format!("system.{j}"), WireContent::Blocks(vec![b]))?;
                    let one = if keep_billing_header { one } else { strip_billing_header(&one) };
                    if !one.is_empty() {
                        parts.push(one);
                    }
                }
                parts.join("\n")
            }
        };
        if !text.is_empty() {
            messages.push(ChatMessage::new(Role::System, text));
        }
    }
    for (i, m) in req.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::invalid(format!(
                    "messages.{i}.role: Input should be 'user' or 'assistant', got '{other}'"
                )))
            }
        };
        messages.push(ChatMessage::new(role, blocks_text(&format!("messages.{i}.content"), m.content)?));
    }
    let defaults = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: req.temperature.map(|t| check_range("temperature", t, 0.0, 1.0)).transpose()?.unwrap_or(defaults.temperature),
        top_p: req.top_p.map(|p| check_range("top_p", p, 0.0, 1.0)).transpose()?.unwrap_or(defaults.top_p),
        top_k: match req.top_k {
            Some(k) if !(0..=i32::MAX as i64).contains(&k) => {
                return Err(ApiError::invalid("top_k: must be a non-negative integer"))
            }
            Some(k) => k as i32,
            None => defaults.top_k,
        },
        min_p: defaults.min_p,
        seed: None,
    };
    let stop = super::check_stop("stop_sequences", req.stop_sequences.unwrap_or_default())?;
    Ok((messages, GenOptions { sampling, max_tokens: Some(max_tokens), stop }))
}

fn stop_reason(reason: &FinishReason) -> (&'static str, Option<&str>) {
    match reason {
        FinishReason::EndOfTurn => ("end_turn", None),
        FinishReason::StopSequence(s) => ("stop_sequence", Some(s.as_str())),
        FinishReason::MaxTokens | FinishReason::ContextFull => ("max_tokens", None),
    }
}

/// Anthropic counts only uncached prompt tokens as `input_tokens`.
fn usage_json(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens - u.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": u.cached_tokens,
        "output_tokens": u.completion_tokens,
    })
}

/// `POST /v1/messages`
pub async fn messages(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, AnthropicError> {
    let req: MessagesRequest = ApiError::parse_json(&body)?;
    let model = req.model.clone();
    let stream = req.stream.unwrap_or(false);
    let (messages, opts) = convert(req, state.keep_billing_header)?;
    let gen = prepare(&state, messages, opts).await?;
    let input_tokens = gen.prompt.len() as u32;
    let job = state.submit("messages", &body, gen);
    let id = new_id("msg_");
    if stream {
        let adapter = EventAdapter { id, model, input_tokens, block_open: false, blocks: 0 };
        return Ok(state.stream_job(job, adapter, Protocol::Anthropic));
    }
    let done = collect(job).await?;
    let (reason, stop_sequence) = stop_reason(&done.reason);
    Ok(Json(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{ "type": "text", "text": done.text }],
        "stop_reason": reason,
        "stop_sequence": stop_sequence,
        "usage": usage_json(&done.usage),
    }))
    .into_response())
}

/// Streams the Messages event sequence.
struct EventAdapter {
    id: String,
    model: String,
    input_tokens: u32,
    block_open: bool,
    /// Content blocks started so far (the next block's index).
    blocks: u32,
}

impl EventAdapter {
    fn open_text_block(&mut self, out: &mut Vec<SseEvent>) {
        if !self.block_open {
            out.push(sse::named(
                "content_block_start",
                &json!({ "type": "content_block_start", "index": self.blocks, "content_block": { "type": "text", "text": "" } }),
            ));
            self.block_open = true;
        }
    }

    fn close_block(&mut self, out: &mut Vec<SseEvent>) {
        if self.block_open {
            out.push(sse::named("content_block_stop", &json!({ "type": "content_block_stop", "index": self.blocks })));
            self.block_open = false;
            self.blocks += 1;
        }
    }
}

impl StreamAdapter for EventAdapter {
    fn opening(&mut self) -> Vec<SseEvent> {
        vec![sse::named(
            "message_start",
            &json!({
                "type": "message_start",
                "message": {
                    "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": { "input_tokens": self.input_tokens, "cache_creation_input_tokens": 0,
                               "cache_read_input_tokens": 0, "output_tokens": 0 },
                },
            }),
        )]
    }

    fn on_event(&mut self, event: Event) -> Vec<SseEvent> {
        let mut out = Vec::new();
        match event {
            Event::Text(text) => {
                self.open_text_block(&mut out);
                out.push(sse::named(
                    "content_block_delta",
                    &json!({ "type": "content_block_delta", "index": self.blocks, "delta": { "type": "text_delta", "text": text } }),
                ));
            }
            Event::Finished { reason, usage, .. } => {
                // A reply with no text still carries one (empty) text block.
                if self.blocks == 0 {
                    self.open_text_block(&mut out);
                }
                self.close_block(&mut out);
                let (reason, stop_sequence) = stop_reason(&reason);
                out.push(sse::named(
                    "message_delta",
                    &json!({
                        "type": "message_delta",
                        "delta": { "stop_reason": reason, "stop_sequence": stop_sequence },
                        "usage": usage_json(&usage),
                    }),
                ));
                out.push(sse::named("message_stop", &json!({ "type": "message_stop" })));
            }
            Event::Failed(err) => {
                let api: ApiError = err.into();
                if api.kind == ErrorKind::Internal {
                    tracing::error!(cause = %api.message, "stream failed");
                }
                out.push(sse::named("error", &api.anthropic_body()));
            }
            Event::Started { .. } | Event::PrefillProgress { .. } => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<(Vec<ChatMessage>, GenOptions), ApiError> {
        let req: MessagesRequest = ApiError::parse_json(v.to_string().as_bytes())?;
        convert(req, false)
    }

    #[test]
    fn accepts_newer_fields_and_blocks() {
        let (m, o) = parse(json!({
            "model": "claude-x", "max_tokens": 10,
            "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}],
            "thinking": {"type": "disabled"}, "output_config": {"effort": "low"}, "service_tier": "auto",
            "metadata": {"user_id": "u"}, "stop_sequences": ["X"]
        }))
        .unwrap();
        assert_eq!(m, vec![ChatMessage::new(Role::System, "sys"), ChatMessage::new(Role::User, "hi")]);
        assert_eq!(o.max_tokens, Some(10));
        assert_eq!(o.stop, vec!["X"]);
    }

    #[test]
    fn drops_the_billing_line_only() {
        let sys = "x-anthropic-billing-header: cc_version=2.1.3; cch=ab12;\nYou are Claude Code.\nBe brief.";
        assert_eq!(strip_billing_header(sys), "You are Claude Code.\nBe brief.");
        assert_eq!(strip_billing_header("No header here."), "No header here.");
        let (m, _) = parse(json!({"model": "m", "max_tokens": 5,
            "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=1;"}, {"type": "text", "text": "Rules."}],
            "messages": [{"role": "user", "content": "hi"}]})).unwrap();
        assert_eq!(m[0], ChatMessage::new(Role::System, "Rules."));
    }

    #[test]
    fn rejects_what_the_real_api_rejects() {
        let user = json!([{"role": "user", "content": "hi"}]);
        let cases = [
            json!({"model": "m", "messages": user}),
            json!({"max_tokens": 5, "messages": user}),
            json!({"model": "m", "max_tokens": 0, "messages": user}),
            json!({"model": "m", "max_tokens": 5, "messages": []}),
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
            json!({"model": "m", "max_tokens": 5, "messages": user, "temperature": 1.5}),
            json!({"model": "m", "max_tokens": "5", "messages": user}),
            json!({"model": "m", "max_tokens": 5, "messages": user, "stop_sequences": vec!["x"; 17]}),
        ];
        for c in cases {
            assert!(parse(c.clone()).is_err(), "{c}");
        }
    }
}
