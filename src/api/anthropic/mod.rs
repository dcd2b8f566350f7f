//! Anthropic Messages: `POST /v1/messages`.
//!
//! Mirrors the real API's validation: `model` and `max_tokens` are
//! required, roles are `user` and `assistant`. Sampling is shared with the
//! OpenAI routes ([`super::sampling`]): a field that would change the reply
//! is honoured or refused with a 400. Fields that cannot change it
//! (`cache_control`, `service_tier`, `metadata`, ...) are accepted and
//! ignored, so no current client is turned away.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::betas::{self, Betas, INTERLEAVED_THINKING};
use super::error::{AnthropicError, ApiError};
use super::pipeline::{self, count_prompt, prepare};
use super::reply::{collect, Reply};
use super::sampling::{SamplingFields, MESSAGES_REFUSED};
use super::{check_max_tokens, check_range, new_id, openai, GenOptions};
use crate::chat::{
    ChatMessage, ChatRequest, ResponseFormat, Role, Thinking, ToolCall, ToolChoice, ToolSpec,
};
use crate::engine::SamplingParams;
use crate::state::AppState;
use stream::*;

mod stream;

#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    pub model: String,
    /// Required by `/v1/messages`, not by `/v1/messages/count_tokens`.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    pub messages: Vec<WireMessage>,
    #[serde(default)]
    pub system: Option<WireContent>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub tools: Option<Vec<WireTool>>,
    #[serde(default)]
    pub tool_choice: Option<WireToolChoice>,
    #[serde(default)]
    pub thinking: Option<WireThinking>,
    /// `format` (structured output) and `effort`.
    #[serde(default)]
    pub output_config: Option<WireOutputConfig>,
    /// The structured-outputs beta's spelling of `output_config.format`.
    #[serde(default)]
    pub output_format: Option<Value>,
    /// The context-management beta's edits: checked, never applied
    /// ([`betas::check_context_management`]).
    #[serde(default)]
    pub context_management: Option<Value>,
    /// `top_k` (Anthropic's own), and the sampling fields of the OpenAI
    /// routes and llama-server's (`seed`, `logit_bias`, penalties, ...),
    /// as llama-server takes them here; every other field too, checked for
    /// ones that may not be ignored.
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Deserialize)]
pub struct WireOutputConfig {
    #[serde(default)]
    pub format: Option<Value>,
    #[serde(default)]
    pub effort: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct WireTool {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub input_schema: Option<Value>,
    /// Advanced tool use: a deferred tool stays out of the prompt.
    #[serde(default)]
    pub defer_loading: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct WireToolChoice {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub disable_parallel_tool_use: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct WireThinking {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub budget_tokens: Option<i64>,
    /// `summarized` or `omitted`.
    #[serde(default)]
    pub display: Option<String>,
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
    /// `tool_use`
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub input: Option<Value>,
    /// `tool_result`
    #[serde(default)]
    pub tool_use_id: Option<String>,
    #[serde(default)]
    pub content: Option<Value>,
    #[serde(default)]
    pub is_error: Option<bool>,
    /// `thinking`
    #[serde(default)]
    pub thinking: Option<String>,
    #[serde(default)]
    pub signature: Option<String>,
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
        .filter(|line| {
            !line
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("x-anthropic-billing-header")
        })
        .collect();
    kept.concat().trim_start_matches('\n').to_string()
}

/// Convert and validate a request. `count_only`: for
/// `/v1/messages/count_tokens`, where `max_tokens` is not required;
/// `betas`: the request's `anthropic-beta` values.
pub fn convert(
    req: MessagesRequest,
    keep_billing_header: bool,
    count_only: bool,
    betas: &Betas,
) -> Result<(ChatRequest, GenOptions), ApiError> {
    let max_tokens = match (req.max_tokens, count_only) {
        (Some(v), _) => check_max_tokens("max_tokens", v)?,
        (None, true) => 1,
        (None, false) => return Err(ApiError::invalid("max_tokens: Field required")),
    };
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages: at least one message is required",
        ));
    }
    let messages = convert_messages(req.system, req.messages, keep_billing_header)?;
    let defaults = SamplingParams::default();
    let temperature = req
        .temperature
        .map(|t| check_range("temperature", t, 0.0, 1.0))
        .transpose()?
        .unwrap_or(defaults.temperature);
    let top_p = req
        .top_p
        .map(|p| check_range("top_p", p, 0.0, 1.0))
        .transpose()?
        .unwrap_or(defaults.top_p);
    let (sampling, ignore_eos) =
        super::sampling::resolve(req.sampling, temperature, top_p, MESSAGES_REFUSED)?;
    let stop = super::check_stop("stop_sequences", req.stop_sequences.unwrap_or_default())?;
    betas::check_context_management(req.context_management.as_ref())?;
    let tools = convert_tools(req.tools.unwrap_or_default())?;
    let (tool_choice, parallel) = convert_tool_choice(req.tool_choice)?;
    let thinking = convert_thinking(req.thinking, max_tokens, count_only, betas)?;
    let response_format = output_format(req.output_config, req.output_format)?;
    let chat = ChatRequest {
        messages,
        tools,
        tool_choice,
        parallel_tool_calls: parallel,
        response_format,
        thinking,
    };
    Ok((
        chat,
        GenOptions {
            sampling,
            max_tokens: Some(max_tokens),
            stop,
            logprobs: None,
            ignore_eos,
        },
    ))
}

/// The system text and the messages, as chat messages. System text is
/// cleaned of the client's billing line unless `keep_billing_header`.
fn convert_messages(
    system: Option<WireContent>,
    messages_in: Vec<WireMessage>,
    keep_billing_header: bool,
) -> Result<Vec<ChatMessage>, ApiError> {
    let mut messages = Vec::with_capacity(messages_in.len() + 1);
    if let Some(system) = system {
        // Each system block is cleaned on its own: the billing line is
        // usually a block by itself.
        let text = match system {
            WireContent::Text(t) if keep_billing_header => t,
            WireContent::Text(t) => strip_billing_header(&t),
            WireContent::Blocks(blocks) => {
                let mut parts = Vec::new();
                for (j, b) in blocks.into_iter().enumerate() {
                    let one = blocks_text(&format!("system.{j}"), WireContent::Blocks(vec![b]))?;
                    let one = if keep_billing_header {
                        one
                    } else {
                        strip_billing_header(&one)
                    };
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
    for (i, m) in messages_in.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            // Claude Code sends system messages between turns.
            "system" => Role::System,
            other => {
                return Err(ApiError::invalid(format!(
                "messages.{i}.role: Input should be 'user', 'assistant' or 'system', got '{other}'"
            )))
            }
        };
        if role == Role::System {
            let text = blocks_text(&format!("messages.{i}.content"), m.content)?;
            let text = if keep_billing_header {
                text
            } else {
                strip_billing_header(&text)
            };
            messages.push(ChatMessage::new(Role::System, text));
            continue;
        }
        convert_message(i, role, m.content, &mut messages)?;
    }
    Ok(messages)
}

/// The custom tools; a server tool is refused, a deferred one left out.
fn convert_tools(wire: Vec<WireTool>) -> Result<Vec<ToolSpec>, ApiError> {
    let mut tools = Vec::new();
    for (i, t) in wire.into_iter().enumerate() {
        if let Some(kind) = t.kind.as_deref().filter(|k| *k != "custom") {
            return Err(ApiError::invalid_param(
                &format!("tools.{i}.type"),
                format!("tools.{i}: server tools of type `{kind}` are not available on this server; define a custom tool with input_schema"),
            ));
        }
        if t.input_schema.is_none() {
            return Err(ApiError::invalid(format!(
                "tools.{i}.input_schema: Field required"
            )));
        }
        let spec = openai::tool_spec(&format!("tools.{i}"), t.name, t.description, t.input_schema)?;
        // A deferred tool is loaded only once a tool search finds it; the
        // real API leaves it out of the prompt until then, and so does hearth.
        if t.defer_loading != Some(true) {
            tools.push(spec);
        }
    }
    openai::check_unique_tools("tools", &tools)?;
    Ok(tools)
}

/// `tool_choice`, with whether parallel calls are allowed.
fn convert_tool_choice(choice: Option<WireToolChoice>) -> Result<(ToolChoice, bool), ApiError> {
    Ok(match choice {
        None => (ToolChoice::Auto, true),
        Some(c) => {
            let parallel = !c.disable_parallel_tool_use.unwrap_or(false);
            let choice = match (c.kind.as_str(), c.name) {
                ("auto", _) => ToolChoice::Auto,
                ("any", _) => ToolChoice::Required,
                ("none", _) => ToolChoice::None,
                ("tool", Some(name)) => ToolChoice::Named(name),
                ("tool", None) => return Err(ApiError::invalid("tool_choice.name: Field required")),
                (other, _) => {
                    return Err(ApiError::invalid(format!(
                        "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none', got '{other}'"
                    )))
                }
            };
            (choice, parallel)
        }
    })
}

/// `thinking`: its budget is checked against `max_tokens` unless the
/// interleaved-thinking beta lets it span the turn.
fn convert_thinking(
    wire: Option<WireThinking>,
    max_tokens: u32,
    count_only: bool,
    betas: &Betas,
) -> Result<Thinking, ApiError> {
    if let Some(t) = &wire {
        betas::omit_thinking(t.display.as_deref())?;
    }
    Ok(match wire {
        None => Thinking::Default,
        Some(t) => match t.kind.as_str() {
            "disabled" => Thinking::Off,
            "enabled" => {
                let budget = t.budget_tokens.ok_or_else(|| {
                    ApiError::invalid("thinking.enabled.budget_tokens: Field required")
                })?;
                if budget < 1024 {
                    return Err(ApiError::invalid("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"));
                }
                // Under interleaved thinking the budget spans the whole
                // turn's thinking and may exceed `max_tokens`.
                if budget >= max_tokens as i64 && !count_only && !betas.has(INTERLEAVED_THINKING) {
                    return Err(ApiError::invalid(
                        "`max_tokens` must be greater than `thinking.budget_tokens`",
                    ));
                }
                Thinking::On {
                    budget: Some(budget.min(u32::MAX as i64) as u32),
                }
            }
            "adaptive" => Thinking::On { budget: None },
            other => {
                return Err(ApiError::invalid(format!(
                "thinking.type: Input should be 'enabled', 'disabled' or 'adaptive', got '{other}'"
            )))
            }
        },
    })
}

/// Structured output: `output_config.format` (or the beta's top-level
/// `output_format`), `{"type": "json_schema", "schema": {...}}`. The
/// `effort` beside it is checked and otherwise has no effect here.
fn output_format(
    config: Option<WireOutputConfig>,
    beta: Option<Value>,
) -> Result<Option<ResponseFormat>, ApiError> {
    let (format, effort) = config.map_or((None, None), |c| (c.format, c.effort));
    if let Some(e) = effort
        .as_deref()
        .filter(|e| !["low", "medium", "high", "xhigh", "max"].contains(e))
    {
        return Err(ApiError::invalid(format!(
            "output_config.effort: Input should be 'low', 'medium', 'high', 'xhigh' or 'max', got '{e}'"
        )));
    }
    let (field, format) = match (format, beta) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "output_format: give either output_config.format or output_format, not both",
            ))
        }
        (Some(f), None) => ("output_config.format", f),
        (None, Some(f)) => ("output_format", f),
        (None, None) => return Ok(None),
    };
    let kind = format.get("type").and_then(Value::as_str);
    if kind != Some("json_schema") {
        let got = kind.map_or_else(|| "nothing".to_string(), |k| format!("'{k}'"));
        return Err(ApiError::invalid(format!(
            "{field}.type: Input should be 'json_schema', got {got}"
        )));
    }
    match format.get("schema") {
        Some(schema) if schema.is_object() => Ok(Some(ResponseFormat::JsonSchema(schema.clone()))),
        Some(_) => Err(ApiError::invalid(format!(
            "{field}.schema: Input should be a valid dictionary"
        ))),
        None => Err(ApiError::invalid(format!("{field}.schema: Field required"))),
    }
}

/// The shared preparation names a bad output schema `response_format`;
/// Anthropic's errors name the field in the message.
fn name_format_field(mut err: ApiError) -> ApiError {
    if err.param.as_deref() == Some("response_format") {
        err.param = Some("output_config.format".into());
        err.message = format!("output_config.format.schema: {}", err.message);
    }
    err
}

/// The text of a `tool_result`'s content: a string, or text blocks.
fn tool_result_text(field: &str, content: Option<Value>) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(blocks)) => {
            let mut parts = Vec::new();
            for (k, b) in blocks.iter().enumerate() {
                match (b.get("type").and_then(Value::as_str), b.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => parts.push(t.to_string()),
                    (Some("text"), None) => return Err(ApiError::invalid(format!("{field}.{k}.text: Field required"))),
                    (Some(other), _) => {
                        return Err(ApiError::invalid(format!("{field}.{k}: content blocks of type `{other}` are not supported in tool results on this server")))
                    }
                    (None, _) => return Err(ApiError::invalid(format!("{field}.{k}.type: Field required"))),
                }
            }
            Ok(parts.join("\n"))
        }
        Some(_) => Err(ApiError::invalid(format!(
            "{field}: Input should be a valid string or a list of content blocks"
        ))),
    }
}

/// One wire message to conversation messages: a user turn's `tool_result`
/// blocks become tool messages (in order, around its text); an assistant
/// turn's `thinking` becomes its reasoning and `tool_use` its calls.
fn convert_message(
    i: usize,
    role: Role,
    content: WireContent,
    out: &mut Vec<ChatMessage>,
) -> Result<(), ApiError> {
    let blocks = match content {
        WireContent::Text(t) => {
            out.push(ChatMessage::new(role, t));
            return Ok(());
        }
        WireContent::Blocks(b) => b,
    };
    let field = format!("messages.{i}.content");
    let mut msg = ChatMessage::new(role, "");
    let mut has_text = false;
    for (j, b) in blocks.into_iter().enumerate() {
        match (role, b.kind.as_str()) {
            (_, "text") => match b.text {
                Some(t) => {
                    msg.content.push_str(&t);
                    has_text = true;
                }
                None => return Err(ApiError::invalid(format!("{field}.{j}.text: Field required"))),
            },
            (Role::Assistant, "thinking") => {
                // A block whose text was omitted gets it back from its signature.
                let t = match b.thinking.filter(|t| !t.is_empty()) {
                    Some(t) => t,
                    None => b.signature.as_deref().and_then(betas::signed_text).unwrap_or_default(),
                };
                if !t.is_empty() {
                    msg.reasoning.get_or_insert_with(String::new).push_str(&t);
                }
            }
            (_, "thinking") | (_, "redacted_thinking") => {}
            (Role::Assistant, "tool_use") => {
                let id = b.id.filter(|s| !s.is_empty()).ok_or_else(|| ApiError::invalid(format!("{field}.{j}.id: Field required")))?;
                let name = b.name.filter(|s| !s.is_empty()).ok_or_else(|| ApiError::invalid(format!("{field}.{j}.name: Field required")))?;
                let input = match b.input {
                    Some(v @ Value::Object(_)) => v,
                    Some(_) => return Err(ApiError::invalid(format!("{field}.{j}.input: Input should be a valid dictionary"))),
                    None => return Err(ApiError::invalid(format!("{field}.{j}.input: Field required"))),
                };
                msg.tool_calls.push(ToolCall { id, name, arguments: input.to_string() });
            }
            (Role::User, "tool_result") => {
                let id = b
                    .tool_use_id
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| ApiError::invalid(format!("{field}.{j}.tool_use_id: Field required")))?;
                // Text written before the result stays before it.
                if has_text {
                    out.push(std::mem::replace(&mut msg, ChatMessage::new(role, "")));
                    has_text = false;
                }
                let mut text = tool_result_text(&format!("{field}.{j}.content"), b.content)?;
                if b.is_error.unwrap_or(false) {
                    text = format!("Error: {text}");
                }
                out.push(ChatMessage::tool_result(id, None, text));
            }
            (_, "tool_use") | (_, "tool_result") => {
                let want = if role == Role::User { "assistant" } else { "user" };
                return Err(ApiError::invalid(format!("{field}.{j}: `{}` blocks belong in {want} messages", b.kind)));
            }
            (_, other) => {
                return Err(ApiError::invalid(format!(
                    "{field}.{j}: content blocks of type `{other}` are not supported by this server yet"
                )))
            }
        }
    }
    if has_text
        || !msg.tool_calls.is_empty()
        || msg.reasoning.is_some()
        || !out.last().is_some_and(|m| m.role == Role::Tool)
    {
        out.push(msg);
    }
    Ok(())
}

/// This module's routes (the server guards them with queue admission).
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
}

/// `POST /v1/messages`
pub async fn messages(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AnthropicError> {
    let req: MessagesRequest = ApiError::parse_json(&body)?;
    let model = req.model.clone();
    let stream = req.stream.unwrap_or(false);
    let omit_thinking = req
        .thinking
        .as_ref()
        .is_some_and(|t| t.display.as_deref() == Some("omitted"));
    let context_management = req
        .context_management
        .as_ref()
        .is_some_and(|v| !v.is_null());
    let (chat, opts) = convert(
        req,
        state.keep_billing_header,
        false,
        &Betas::from_headers(&headers),
    )?;
    let prepared = prepare(&state, chat, opts, "messages")
        .await
        .map_err(name_format_field)?;
    let input_tokens = prepared.request.prompt.len() as u32;
    let job = pipeline::submit(&state, "messages", &body, prepared.request);
    let id = new_id("msg_");
    if stream {
        let wire = EventWire {
            id,
            model,
            input_tokens,
            open: None,
            blocks: 0,
            thinking: String::new(),
            omit_thinking,
            context_management,
        };
        let reply = Reply::new(wire, prepared.output, "toolu_", state.replay.clone());
        return Ok(pipeline::stream_job(&state, job, reply));
    }
    let done = collect(&state.replay, job, &prepared.output, "toolu_").await?;
    let out = &done.output;
    let mut content = Vec::new();
    if !out.reasoning.is_empty() {
        let shown = if omit_thinking {
            ""
        } else {
            out.reasoning.as_str()
        };
        let sig = betas::signature(&out.reasoning, omit_thinking);
        content.push(json!({ "type": "thinking", "thinking": shown, "signature": sig }));
    }
    // A reply with nothing else still has one (empty) text block; reasoning
    // alone (cut short by max_tokens) is a thinking block alone, as streamed.
    if !out.text.is_empty() || (out.calls.is_empty() && out.reasoning.is_empty()) {
        content.push(json!({ "type": "text", "text": out.text }));
    }
    for c in &out.calls {
        content.push(json!({ "type": "tool_use", "id": c.id, "name": c.name, "input": input_object(&c.arguments) }));
    }
    let (reason, stop_sequence) = stop_reason(&done.reason, !out.calls.is_empty());
    let mut reply = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": stop_sequence,
        "usage": usage_json(&done.usage),
    });
    if context_management {
        reply["context_management"] = betas::context_management_reply();
    }
    Ok(Json(reply).into_response())
}

/// `POST /v1/messages/count_tokens`: the prompt tokens `/v1/messages` would
/// send the model for the same request, from the same rendering.
pub async fn count_tokens(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AnthropicError> {
    let req: MessagesRequest = ApiError::parse_json(&body)?;
    let betas = Betas::from_headers(&headers);
    let (chat, _) = convert(req, state.keep_billing_header, true, &betas)?;
    let n = count_prompt(&state, chat, "messages")
        .await
        .map_err(name_format_field)?;
    Ok(Json(json!({ "input_tokens": n })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<(Vec<ChatMessage>, GenOptions), ApiError> {
        let req: MessagesRequest = ApiError::parse_json(v.to_string().as_bytes())?;
        convert(req, false, false, &Betas::default()).map(|(c, o)| (c.messages, o))
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
        assert_eq!(
            m,
            vec![
                ChatMessage::new(Role::System, "sys"),
                ChatMessage::new(Role::User, "hi")
            ]
        );
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
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}),
            json!({"model": "m", "max_tokens": 5, "messages": user, "temperature": 1.5}),
            json!({"model": "m", "max_tokens": "5", "messages": user}),
            json!({"model": "m", "max_tokens": 5, "messages": user, "stop_sequences": vec!["x"; 17]}),
        ];
        for c in cases {
            assert!(parse(c.clone()).is_err(), "{c}");
        }
    }
}
