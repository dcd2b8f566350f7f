//! OpenAI chat completions: `POST /v1/chat/completions`.
//!
//! Wire types are the official API's. A field that would change the reply
//! is honoured or refused with a 400 ([`super::sampling`]); fields that
//! cannot change it (`user`, `metadata`, `store`, ...) are accepted and
//! ignored, so clients that send them keep working.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::chain::{add_usage, chain, ChainJob};
use super::completions::MAX_N;
use super::error::Protocol;
use super::error::{ApiError, OpenAIError};
use super::pipeline::{self, prepare};
use super::reply::{collect, Collected, Ended, Ending, Logprobs, Reply, Wire};
use super::sampling::{SamplingFields, CHAT_REFUSED};
use super::sse;
use super::{check_max_tokens, new_id, unix_now, GenOptions};
use crate::chat::output::OutputEvent;
use crate::chat::{
    ChatMessage, ChatRequest, ResponseFormat, Role, Thinking, ToolCall, ToolChoice, ToolSpec,
};
use crate::engine::{FinishReason, GenerateRequest, TokenLogprob, Usage};
use crate::state::AppState;

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
    pub stop: Option<StopField>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub tools: Option<Vec<WireTool>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub reasoning_effort: Option<String>,
    /// `logit_bias`, penalties, `seed` and llama-server's extensions; every
    /// other field too, checked for ones that may not be ignored.
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Deserialize)]
pub struct WireTool {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub function: Option<WireFunction>,
}

#[derive(Debug, Deserialize)]
pub struct WireFunction {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
    /// Accepted; calls are always held to the schema when a grammar applies.
    #[serde(default)]
    pub strict: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct WireToolCall {
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub function: WireCallFunction,
}

#[derive(Debug, Deserialize)]
pub struct WireCallFunction {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The model name a reply carries (the request's, else the server's),
/// whether it streams, and whether a stream reports usage.
pub fn reply_settings(
    state: &AppState,
    model: &Option<String>,
    stream: Option<bool>,
    options: &Option<StreamOptions>,
) -> (String, bool, bool) {
    let model = model
        .clone()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| state.model_id.clone());
    let include_usage = options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    (model, stream.unwrap_or(false), include_usage)
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
    #[serde(default)]
    pub tool_calls: Option<Vec<WireToolCall>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// Reasoning of an earlier assistant turn, as hearth (and DeepSeek,
    /// vLLM, llama-server) return it.
    #[serde(default)]
    pub reasoning_content: Option<String>,
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

/// A tool offered to the model, validated.
pub fn tool_spec(
    param: &str,
    name: String,
    description: Option<String>,
    parameters: Option<Value>,
) -> Result<ToolSpec, ApiError> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
    {
        return Err(ApiError::invalid_param(
            &format!("{param}.name"),
            format!("invalid function name {name:?}: use letters, digits, underscores, dashes, dots or colons, at most 128 characters"),
        ));
    }
    let parameters = parameters.unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    if !parameters.is_object() {
        return Err(ApiError::invalid_param(
            &format!("{param}.parameters"),
            "parameters must be a JSON Schema object",
        ));
    }
    Ok(ToolSpec {
        name,
        description: description.unwrap_or_default(),
        parameters,
    })
}

/// Check that no two tools share a name.
pub fn check_unique_tools(param: &str, tools: &[ToolSpec]) -> Result<(), ApiError> {
    for (i, t) in tools.iter().enumerate() {
        if tools[..i].iter().any(|u| u.name == t.name) {
            return Err(ApiError::invalid_param(
                &format!("{param}[{i}]"),
                format!("tool name `{}` is used twice", t.name),
            ));
        }
    }
    Ok(())
}

/// OpenAI `tool_choice`: `"auto" | "none" | "required"` or
/// `{"type": "function", "function": {"name": ...}}`.
pub fn tool_choice(value: Option<Value>) -> Result<ToolChoice, ApiError> {
    let bad = || {
        ApiError::invalid_param("tool_choice", "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}")
    };
    match value {
        None | Some(Value::Null) => Ok(ToolChoice::Auto),
        Some(Value::String(s)) => super::tool_mode(&s).ok_or_else(bad),
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .or_else(|| o.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(bad)?;
            Ok(ToolChoice::Named(name.to_string()))
        }
        Some(_) => Err(bad()),
    }
}

/// OpenAI `response_format`.
fn response_format(value: Option<Value>) -> Result<Option<ResponseFormat>, ApiError> {
    let Some(v) = value else { return Ok(None) };
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(ResponseFormat::JsonObject)),
        "json_schema" => {
            let schema = v
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .cloned()
                .ok_or_else(|| ApiError::invalid_param("response_format.json_schema.schema", "a json_schema response format needs json_schema.schema"))?;
            if !schema.is_object() {
                return Err(ApiError::invalid_param("response_format.json_schema.schema", "the schema must be a JSON object"));
            }
            Ok(Some(ResponseFormat::JsonSchema(schema)))
        }
        other => Err(ApiError::invalid_param(
            "response_format.type",
            format!("unsupported response_format type `{other}`; expected text, json_object or json_schema"),
        )),
    }
}

/// OpenAI `reasoning_effort`: `none` (or `minimal`) turns thinking off.
pub fn thinking_from_effort(effort: Option<&str>) -> Result<Thinking, ApiError> {
    match effort {
        None => Ok(Thinking::Default),
        Some("none") | Some("minimal") => Ok(Thinking::Off),
        Some("low") | Some("medium") | Some("high") | Some("xhigh") => {
            Ok(Thinking::On { budget: None })
        }
        Some(other) => Err(ApiError::invalid_param(
            "reasoning_effort",
            format!("reasoning_effort must be none, minimal, low, medium or high, got `{other}`"),
        )),
    }
}

/// Convert and validate a request into a conversation and options.
pub fn convert(req: ChatCompletionRequest) -> Result<(ChatRequest, GenOptions), ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must contain at least one message",
        ));
    }
    if let Some(n) = req.n.filter(|n| !(1..=MAX_N as u32).contains(n)) {
        return Err(ApiError::invalid_param(
            "n",
            format!("n must be between 1 and {MAX_N}, got {n}"),
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" | "function" => Role::Tool,
            other => {
                return Err(ApiError::invalid_param(
                    &format!("messages[{i}].role"),
                    format!("unsupported role `{other}`; expected system, developer, user, assistant or tool"),
                ))
            }
        };
        let mut msg = ChatMessage::new(role, content_text(i, m.content)?);
        match role {
            Role::Assistant => {
                msg.reasoning = m.reasoning_content.filter(|r| !r.is_empty());
                for (j, c) in m.tool_calls.unwrap_or_default().into_iter().enumerate() {
                    if c.kind.as_deref().is_some_and(|k| k != "function") {
                        return Err(ApiError::invalid_param(
                            &format!("messages[{i}].tool_calls[{j}].type"),
                            "only function tool calls are supported",
                        ));
                    }
                    if serde_json::from_str::<Value>(&c.function.arguments)
                        .map(|v| !v.is_object())
                        .unwrap_or(true)
                    {
                        return Err(ApiError::invalid_param(
                            &format!("messages[{i}].tool_calls[{j}].function.arguments"),
                            "function.arguments must be a JSON object serialized as a string",
                        ));
                    }
                    msg.tool_calls.push(ToolCall {
                        id: c.id,
                        name: c.function.name,
                        arguments: c.function.arguments,
                    });
                }
            }
            Role::Tool => {
                let Some(id) = m.tool_call_id.filter(|id| !id.is_empty()) else {
                    return Err(ApiError::invalid_param(
                        &format!("messages[{i}].tool_call_id"),
                        "a tool message needs the tool_call_id it answers",
                    ));
                };
                msg.tool_call_id = Some(id);
                msg.name = m.name;
            }
            _ => {}
        }
        messages.push(msg);
    }
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(v), _) => Some(check_max_tokens("max_completion_tokens", v)?),
        (None, Some(v)) => Some(check_max_tokens("max_tokens", v)?),
        (None, None) => None,
    };
    let (sampling, ignore_eos) =
        super::openai_sampling(req.temperature, req.top_p, req.sampling, CHAT_REFUSED)?;
    let stop = match req.stop {
        None => vec![],
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    let stop = super::check_stop("stop", stop)?;
    let mut tools = Vec::new();
    for (i, t) in req.tools.unwrap_or_default().into_iter().enumerate() {
        if t.kind != "function" {
            return Err(ApiError::invalid_param(
                &format!("tools[{i}].type"),
                format!("tools of type `{}` are not supported; use function", t.kind),
            ));
        }
        let Some(f) = t.function else {
            return Err(ApiError::invalid_param(
                &format!("tools[{i}].function"),
                "a function tool needs `function`",
            ));
        };
        tools.push(tool_spec(
            &format!("tools[{i}].function"),
            f.name,
            f.description,
            f.parameters,
        )?);
    }
    check_unique_tools("tools", &tools)?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (_, Some(n)) if !(0..=20).contains(&n) => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                format!("top_logprobs must be between 0 and 20, got {n}"),
            ))
        }
        (false, Some(n)) if n > 0 => {
            return Err(ApiError::invalid_param(
                "logprobs",
                "top_logprobs needs logprobs: true",
            ))
        }
        (true, n) => Some(n.unwrap_or(0) as u32),
        (false, _) => None,
    };
    let chat = ChatRequest {
        messages,
        tools,
        tool_choice: tool_choice(req.tool_choice)?,
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
        response_format: response_format(req.response_format)?,
        thinking: thinking_from_effort(req.reasoning_effort.as_deref())?,
    };
    Ok((
        chat,
        GenOptions {
            sampling,
            max_tokens,
            stop,
            logprobs,
            ignore_eos,
        },
    ))
}

/// OpenAI's `finish_reason`: a reply that made calls (`calls`) finished
/// to have them run, unless it was cut short.
pub fn finish_reason(reason: &FinishReason, calls: bool) -> &'static str {
    match Ending::of(reason, calls) {
        Ending::ToolCalls => "tool_calls",
        Ending::EndOfTurn | Ending::StopSequence(_) => "stop",
        Ending::Length => "length",
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

/// Chat logprobs entries: `{token, logprob, bytes, top_logprobs}`.
pub fn logprobs_content(lps: &[TokenLogprob]) -> Value {
    Value::Array(
        lps.iter()
            .map(|t| {
                json!({
                    "token": t.token,
                    "logprob": t.logprob,
                    "bytes": t.bytes,
                    "top_logprobs": t.top.iter().map(|a| json!({"token": a.token, "logprob": a.logprob, "bytes": a.bytes})).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// A reply's calls in OpenAI's message shape.
pub fn tool_calls_json(calls: &[ToolCall]) -> Value {
    Value::Array(
        calls
            .iter()
            .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect(),
    )
}

const ROUTE: &str = "chat_completions";

/// This module's routes (the server guards them with queue admission).
pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/v1/chat/completions", post(chat_completions))
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, OpenAIError> {
    let req: ChatCompletionRequest = ApiError::parse_json(&body)?;
    let (model, stream, include_usage) =
        reply_settings(&state, &req.model, req.stream, &req.stream_options);
    let n = req.n.unwrap_or(1);
    let (chat, opts) = convert(req)?;
    let want_logprobs = opts.logprobs.is_some();
    let prepared = prepare(&state, chat, opts, "messages").await?;
    // `n` choices are `n` jobs of one prompt, forked from one prefill and
    // decoded together; with a seed, each its own.
    let requests: Vec<GenerateRequest> = (0..n)
        .map(|j| {
            let mut r = prepared.request.clone();
            r.sampling.seed = r.sampling.seed.map(|s| s.wrapping_add(j as u64));
            r
        })
        .collect();
    let id = new_id("chatcmpl-");
    let created = unix_now();
    if stream {
        let job = if n == 1 {
            let request = requests.into_iter().next().expect("n is at least 1");
            pipeline::submit(&state, ROUTE, &body, request)
        } else {
            let jobs = requests
                .into_iter()
                .enumerate()
                .map(|(j, request)| ChainJob {
                    request,
                    first_of_prompt: j == 0,
                })
                .collect();
            chain(state.clone(), ROUTE, body, jobs)
        };
        let head = ChunkHead {
            id,
            object: "chat.completion.chunk",
            created,
            model,
            fingerprint: Some(state.fingerprint.clone()),
            include_usage,
        };
        let wire = ChunkWire {
            head,
            want_logprobs,
            index: 0,
        };
        let reply = Reply::new(wire, prepared.output, "call_", state.replay.clone());
        return Ok(pipeline::stream_job(&state, job, reply));
    }
    let mut choices = Vec::with_capacity(requests.len());
    let mut usage = Usage::default();
    // All choices are queued at once: one prefill, decoded together.
    let handles = pipeline::submit_group(&state, ROUTE, &body, requests);
    for (j, handle) in handles.into_iter().enumerate() {
        let done = collect(&state.replay, handle, &prepared.output, "call_").await?;
        add_usage(&mut usage, &done.usage, j == 0);
        choices.push(choice_json(j, &done, want_logprobs));
    }
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": state.fingerprint,
        "choices": choices,
        "usage": usage_json(&usage),
    }))
    .into_response())
}

/// One finished choice of a chat completion.
fn choice_json(index: usize, done: &Collected, want_logprobs: bool) -> Value {
    let out = &done.output;
    let mut message = json!({
        "role": "assistant",
        "content": if out.text.is_empty() && !out.calls.is_empty() { Value::Null } else { Value::String(out.text.clone()) },
        "refusal": null,
    });
    if !out.reasoning.is_empty() {
        message["reasoning_content"] = Value::String(out.reasoning.clone());
    }
    if !out.calls.is_empty() {
        message["tool_calls"] = tool_calls_json(&out.calls);
    }
    let logprobs = if want_logprobs {
        json!({ "content": logprobs_content(&done.logprobs), "refusal": null })
    } else {
        Value::Null
    };
    json!({
        "index": index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": finish_reason(&done.reason, !out.calls.is_empty()),
    })
}

/// What every chunk of an OpenAI stream (chat or legacy completions)
/// carries around its choices.
pub struct ChunkHead {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// Chat chunks name the build; legacy completion chunks do not.
    pub fingerprint: Option<String>,
    /// `stream_options.include_usage`: every chunk has `usage`, null but
    /// in the last.
    pub include_usage: bool,
}

impl ChunkHead {
    /// A chunk with these `choices`.
    pub fn chunk(&self, choices: Value) -> Value {
        let mut c = json!({
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
        });
        if let Some(f) = &self.fingerprint {
            c["system_fingerprint"] = json!(f);
        }
        c["choices"] = choices;
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// What ends the stream: the last chunk, with no choices and the whole
    /// request's usage, when the client asked for it; then `[DONE]`.
    pub fn tail(&self, usage: &Usage) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if self.include_usage {
            let mut last = self.chunk(json!([]));
            last["usage"] = usage_json(usage);
            out.push(sse::data(&last));
        }
        out.push(SseEvent::default().data("[DONE]"));
        out
    }
}

/// The wire of `chat.completion.chunk` objects.
struct ChunkWire {
    head: ChunkHead,
    want_logprobs: bool,
    /// The choice being streamed; with `n` above 1 the choices come in
    /// turn, each closed where the chain says it ended.
    index: u32,
}

impl ChunkWire {
    /// A chunk of the current choice, carrying the logprobs still to send.
    fn chunk(
        &self,
        delta: Value,
        finish: Option<&str>,
        logprobs: &mut Vec<TokenLogprob>,
    ) -> SseEvent {
        let logprobs = if self.want_logprobs && !logprobs.is_empty() {
            json!({ "content": logprobs_content(&std::mem::take(logprobs)), "refusal": null })
        } else {
            Value::Null
        };
        let choice = json!({ "index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish });
        sse::data(&self.head.chunk(json!([choice])))
    }

    /// The current choice's finish chunk.
    fn finish(&self, end: Ended<'_>) -> SseEvent {
        let reason = finish_reason(end.reason, !end.output.calls.is_empty());
        self.chunk(json!({}), Some(reason), end.logprobs)
    }
}

impl Wire for ChunkWire {
    const PROTOCOL: Protocol = Protocol::OpenAI;

    fn opening(&mut self) -> Vec<SseEvent> {
        let delta = json!({ "role": "assistant", "content": "" });
        vec![self.chunk(delta, None, &mut Vec::new())]
    }

    fn output(&mut self, pieces: Vec<OutputEvent>, logprobs: &mut Logprobs) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for piece in pieces {
            let delta = match piece {
                OutputEvent::Text(t) => json!({ "content": t }),
                OutputEvent::Reasoning(r) => json!({ "reasoning_content": r }),
                OutputEvent::CallStart { index, id, name } => json!({ "tool_calls": [{
                    "index": index, "id": id, "type": "function", "function": { "name": name, "arguments": "" },
                }]}),
                OutputEvent::CallArgs { index, fragment } => {
                    json!({ "tool_calls": [{ "index": index, "function": { "arguments": fragment } }]})
                }
                OutputEvent::CallEnd { .. } => continue,
            };
            out.push(self.chunk(delta, None, logprobs));
        }
        out
    }

    fn choice_end(&mut self, end: Ended<'_>) -> Vec<SseEvent> {
        let fin = self.finish(end);
        self.index += 1;
        vec![fin]
    }

    fn ending(&mut self, end: Ended<'_>, usage: &Usage) -> Vec<SseEvent> {
        let mut out = vec![self.finish(end)];
        out.extend(self.head.tail(usage));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<(Vec<ChatMessage>, GenOptions), ApiError> {
        convert(serde_json::from_value(v).unwrap()).map(|(c, o)| (c.messages, o))
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
            json!({"messages": [{"role": "user", "content": "x"}], "n": 9}),
        ];
        for c in cases {
            assert!(parse(c.clone()).is_err(), "{c}");
        }
    }
}
