//! OpenAI Responses: `POST /v1/responses` and `GET /v1/responses/{id}`
//! (what Codex CLI speaks).
//!
//! The request's `instructions` and `input` items become one conversation:
//! messages as they are, consecutive `function_call` items (and the
//! assistant message before them) as one assistant turn with several calls,
//! `function_call_output` items as tool results, `reasoning` items as the
//! next assistant turn's reasoning. `previous_response_id` puts a stored
//! response's conversation (without its instructions, as the official API
//! does) before the new input. The reply comes back as output items
//! (reasoning, message, function calls), whole or as the official stream of
//! typed events with sequence numbers. With `truncation: auto`, a
//! conversation too long for the context loses its oldest whole turns.
//!
//! Hosted tools hearth cannot run (`web_search`, `local_shell`, `custom`,
//! ...) are left out of the prompt with a log line instead of failing the
//! request: Codex sends some of them with every request.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::{ApiError, ErrorKind, OpenAIError, Protocol};
use super::openai::{check_unique_tools, thinking_from_effort, tool_spec};
use super::pipeline::{self, count_prompt, prepare};
use super::reply::{collect, Ended, Ending, Logprobs, Reply, Wire};
use super::sampling::{SamplingFields, RESPONSES_REFUSED};
use super::sse;
use super::{check_max_tokens, new_id, unix_now, GenOptions};
use crate::chat::output::{Output, OutputEvent};
use crate::chat::{ChatMessage, ChatRequest, ResponseFormat, Role, ToolCall, ToolChoice, ToolSpec};
use crate::engine::{FinishReason, Usage};
use crate::state::responses::StoredResponse;
use crate::state::AppState;

// --- the request ----------------------------------------------------------------

#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub input: Option<Value>,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub max_output_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub reasoning: Option<ReasoningParam>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub text: Option<Value>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub include: Option<Vec<String>>,
    #[serde(default)]
    pub prompt_cache_key: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub safety_identifier: Option<String>,
    #[serde(default)]
    pub truncation: Option<String>,
    #[serde(default)]
    pub service_tier: Option<String>,
    #[serde(default)]
    pub background: Option<bool>,
    #[serde(default)]
    pub conversation: Option<Value>,
    #[serde(default)]
    pub prompt: Option<Value>,
    #[serde(default)]
    pub max_tool_calls: Option<i64>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    /// Not the official API's: the sampling fields of the other OpenAI
    /// routes and llama-server's (`logit_bias`, penalties, `seed`, `top_k`,
    /// ...), taken here too; every other field as well, checked for ones
    /// that may not be ignored.
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Deserialize, Default)]
pub struct ReasoningParam {
    #[serde(default)]
    pub effort: Option<String>,
    #[serde(default)]
    pub summary: Option<String>,
    /// The older name of `summary`.
    #[serde(default)]
    pub generate_summary: Option<String>,
}

/// Hosted tool types of the official API: hearth runs none of them, and
/// leaves them out of the prompt rather than rejecting the request.
const HOSTED_TOOLS: &[&str] = &[
    "web_search",
    "web_search_preview",
    "web_search_preview_2025_03_11",
    "web_search_2025_08_26",
    "file_search",
    "computer",
    "computer_use",
    "computer_use_preview",
    "code_interpreter",
    "image_generation",
    "local_shell",
    "shell",
    "apply_patch",
    "custom",
    "mcp",
    "namespace",
    "tool_search",
    "programmatic_tool_calling",
];

/// Log each ignored tool type once per process, not on every request.
fn log_ignored_tool(kind: &str) {
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if seen
        .get_or_insert_with(HashSet::new)
        .insert(kind.to_string())
    {
        tracing::info!(
            tool_type = kind,
            "ignoring a hosted tool hearth does not run (this is logged once per type)"
        );
    }
}

/// The conversation built from `instructions`, a stored response and the
/// input items, with where each message came from (for error params).
#[derive(Debug, Default)]
pub struct Conversation {
    pub messages: Vec<ChatMessage>,
    /// The request field each message came from: `instructions`,
    /// `previous_response_id` or `input[i]`.
    pub origins: Vec<String>,
    /// Where the conversation to store begins (after the instructions).
    pub stored_from: usize,
}

/// Input items to messages.
struct Builder {
    conv: Conversation,
    /// The last message is an assistant turn that later items may extend.
    open: bool,
    /// Reasoning waiting for the assistant turn it belongs to.
    reasoning: Option<String>,
    /// Ids of the calls made so far, which results may answer.
    calls: HashSet<String>,
}

impl Builder {
    fn push(&mut self, m: ChatMessage, origin: String) {
        self.conv.messages.push(m);
        self.conv.origins.push(origin);
    }

    /// The open assistant turn to extend, or a new one.
    fn assistant(&mut self, i: usize, text_first: bool) -> &mut ChatMessage {
        let extend = self.open
            && self.reasoning.is_none()
            && !(text_first
                && self
                    .conv
                    .messages
                    .last()
                    .is_some_and(|m| !m.tool_calls.is_empty()));
        if !extend {
            let mut m = ChatMessage::new(Role::Assistant, "");
            m.reasoning = self.reasoning.take();
            self.push(m, format!("input[{i}]"));
            self.open = true;
        }
        self.conv.messages.last_mut().expect("just pushed")
    }

    fn item(&mut self, i: usize, item: &Value) -> Result<(), ApiError> {
        let Some(obj) = item.as_object() else {
            return Err(ApiError::invalid_param(
                &format!("input[{i}]"),
                "each input item must be an object",
            ));
        };
        let kind = match obj.get("type") {
            None | Some(Value::Null) if obj.contains_key("role") => "message",
            None | Some(Value::Null) => {
                return Err(ApiError::invalid_param(
                    &format!("input[{i}].type"),
                    "an input item needs a `type` (or a `role`, for a message)",
                ))
            }
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(ApiError::invalid_param(
                    &format!("input[{i}].type"),
                    "`type` must be a string",
                ))
            }
        };
        match kind {
            "message" => {
                let role = obj.get("role").and_then(Value::as_str).unwrap_or("");
                let text = message_text(&format!("input[{i}].content"), obj.get("content"))?;
                match role {
                    "user" | "system" | "developer" => {
                        let role = if role == "user" { Role::User } else { Role::System };
                        self.reasoning = None;
                        self.open = false;
                        self.push(ChatMessage::new(role, text), format!("input[{i}]"));
                    }
                    "assistant" => {
                        let m = self.assistant(i, true);
                        if !m.content.is_empty() && !text.is_empty() {
                            m.content.push('\n');
                        }
                        m.content.push_str(&text);
                    }
                    other => {
                        return Err(ApiError::invalid_param(
                            &format!("input[{i}].role"),
                            format!("unsupported role `{other}`; expected user, assistant, system or developer"),
                        ))
                    }
                }
            }
            "function_call" => {
                let call_id = required_str(obj, i, "call_id")?;
                let name = required_str(obj, i, "name")?;
                let arguments = match obj.get("arguments") {
                    Some(Value::String(s)) => s.clone(),
                    _ => return Err(ApiError::invalid_param(&format!("input[{i}].arguments"), "a function_call needs `arguments`, a JSON object serialized as a string")),
                };
                if serde_json::from_str::<Value>(&arguments).map(|v| !v.is_object()).unwrap_or(true) {
                    return Err(ApiError::invalid_param(&format!("input[{i}].arguments"), "arguments must be a JSON object serialized as a string"));
                }
                self.calls.insert(call_id.clone());
                let m = self.assistant(i, false);
                m.tool_calls.push(ToolCall { id: call_id, name, arguments });
            }
            "function_call_output" => {
                let call_id = required_str(obj, i, "call_id")?;
                if !self.calls.contains(&call_id) {
                    return Err(ApiError::invalid_param(
                        &format!("input[{i}].call_id"),
                        format!("No tool call found for function call output with call_id {call_id}."),
                    ));
                }
                let output = match obj.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v @ Value::Array(_)) => message_text(&format!("input[{i}].output"), Some(v))?,
                    _ => return Err(ApiError::invalid_param(&format!("input[{i}].output"), "a function_call_output needs `output`, a string or a list of input_text parts")),
                };
                self.reasoning = None;
                self.open = false;
                self.push(ChatMessage::tool_result(call_id, None, output), format!("input[{i}]"));
            }
            "reasoning" => {
                let text = reasoning_text(obj);
                if !text.is_empty() {
                    match &mut self.reasoning {
                        Some(r) => {
                            r.push_str("\n\n");
                            r.push_str(&text);
                        }
                        None => self.reasoning = Some(text),
                    }
                }
                // Whatever follows is a new assistant turn.
                self.open = false;
            }
            "item_reference" => {
                return Err(ApiError::invalid_param(&format!("input[{i}]"), "item references are not supported; send the item itself"));
            }
            other => {
                return Err(ApiError::invalid_param(
                    &format!("input[{i}].type"),
                    format!("input items of type `{other}` are not supported; expected message, function_call, function_call_output or reasoning"),
                ))
            }
        }
        Ok(())
    }
}

fn required_str(obj: &Map<String, Value>, i: usize, field: &str) -> Result<String, ApiError> {
    match obj.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(ApiError::invalid_param(
            &format!("input[{i}].{field}"),
            format!("Missing required parameter: 'input[{i}].{field}'."),
        )),
    }
}

/// A message's (or a tool output's) content as text: a string, or text
/// parts (`input_text`, `output_text`, `refusal`). Parts are joined with a
/// newline.
fn message_text(param: &str, content: Option<&Value>) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Err(ApiError::invalid_param(
            param,
            format!("Missing required parameter: '{param}'."),
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                let field = match kind {
                    "input_text" | "output_text" | "text" => "text",
                    "refusal" => "refusal",
                    "" => return Err(ApiError::invalid_param(&format!("{param}[{j}].type"), "a content part needs a `type`")),
                    other => {
                        return Err(ApiError::invalid_param(
                            &format!("{param}[{j}].type"),
                            format!("content parts of type `{other}` are not supported by this model; send input_text"),
                        ))
                    }
                };
                match part.get(field).and_then(Value::as_str) {
                    Some(t) => texts.push(t),
                    None => {
                        return Err(ApiError::invalid_param(
                            &format!("{param}[{j}].{field}"),
                            format!("a `{kind}` part needs a `{field}` string"),
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(ApiError::invalid_param(
            param,
            "content must be a string or a list of content parts",
        )),
    }
}

/// A reasoning item's text: its `content` (the reasoning itself) when it
/// has any, else its summary.
fn reasoning_text(obj: &Map<String, Value>) -> String {
    let texts = |field: &str| -> Vec<String> {
        obj.get(field)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .filter(|t| !t.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    let content = texts("content");
    if !content.is_empty() {
        return content.join("\n\n");
    }
    texts("summary").join("\n\n")
}

/// `instructions`, the stored conversation and the input, as messages.
pub fn conversation(
    instructions: Option<&str>,
    previous: Option<&[ChatMessage]>,
    input: Option<Value>,
) -> Result<Conversation, ApiError> {
    let mut b = Builder {
        conv: Conversation::default(),
        open: false,
        reasoning: None,
        calls: HashSet::new(),
    };
    if let Some(text) = instructions.filter(|t| !t.is_empty()) {
        b.push(ChatMessage::new(Role::System, text), "instructions".into());
    }
    b.conv.stored_from = b.conv.messages.len();
    for m in previous.unwrap_or_default() {
        b.calls.extend(m.tool_calls.iter().map(|c| c.id.clone()));
        b.push(m.clone(), "previous_response_id".into());
    }
    match input {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                "input",
                "Missing required parameter: 'input'.",
            ))
        }
        Some(Value::String(s)) => b.push(ChatMessage::new(Role::User, s), "input".into()),
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(ApiError::invalid_param(
                    "input",
                    "input must contain at least one item",
                ));
            }
            for (i, item) in items.iter().enumerate() {
                b.item(i, item)?;
            }
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                "input",
                "input must be a string or a list of input items",
            ))
        }
    }
    Ok(b.conv)
}

/// Function tools to specs; hosted tools are left out. Returns the specs
/// and the accepted tools as the response echoes them.
fn tools(tools: Vec<Value>) -> Result<(Vec<ToolSpec>, Vec<Value>), ApiError> {
    let mut specs = Vec::new();
    let mut echo = Vec::new();
    for (i, t) in tools.into_iter().enumerate() {
        let kind = t.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "function" => {
                let name = match t.get("name") {
                    Some(Value::String(n)) => n.clone(),
                    _ => {
                        return Err(ApiError::invalid_param(
                            &format!("tools[{i}].name"),
                            format!("Missing required parameter: 'tools[{i}].name'."),
                        ))
                    }
                };
                let description = t
                    .get("description")
                    .and_then(Value::as_str)
                    .map(String::from);
                let parameters = t.get("parameters").cloned().filter(|p| !p.is_null());
                specs.push(tool_spec(
                    &format!("tools[{i}]"),
                    name.clone(),
                    description.clone(),
                    parameters.clone(),
                )?);
                echo.push(json!({
                    "type": "function",
                    "name": name,
                    "description": description,
                    "parameters": parameters,
                    "strict": t.get("strict").and_then(Value::as_bool).unwrap_or(true),
                }));
            }
            k if HOSTED_TOOLS.contains(&k) => {
                log_ignored_tool(k);
                echo.push(t);
            }
            "" => {
                return Err(ApiError::invalid_param(
                    &format!("tools[{i}].type"),
                    format!("Missing required parameter: 'tools[{i}].type'."),
                ))
            }
            other => {
                return Err(ApiError::invalid_param(
                    &format!("tools[{i}].type"),
                    format!("tools of type `{other}` are not supported; use function"),
                ))
            }
        }
    }
    check_unique_tools("tools", &specs)?;
    Ok((specs, echo))
}

/// The Responses `tool_choice`: `"auto" | "none" | "required"`,
/// `{"type": "function", "name": ...}`, or `{"type": "allowed_tools",
/// "mode": "auto" | "required", "tools": [...]}` (which narrows `specs`).
fn tool_choice(
    value: Option<Value>,
    specs: &mut Vec<ToolSpec>,
) -> Result<(ToolChoice, Value), ApiError> {
    let bad = |msg: &str| ApiError::invalid_param("tool_choice", msg.to_string());
    let usage = "tool_choice must be \"auto\", \"none\", \"required\", {\"type\": \"function\", \"name\": ...} or {\"type\": \"allowed_tools\", ...}";
    match value {
        None | Some(Value::Null) => Ok((ToolChoice::Auto, json!("auto"))),
        Some(Value::String(s)) => match super::tool_mode(&s) {
            Some(choice) => Ok((choice, json!(s))),
            None => Err(bad(usage)),
        },
        Some(Value::Object(o)) => match o.get("type").and_then(Value::as_str) {
            Some("function") => {
                let name = o.get("name").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid_param(
                        "tool_choice.name",
                        "Missing required parameter: 'tool_choice.name'.",
                    )
                })?;
                Ok((
                    ToolChoice::Named(name.to_string()),
                    json!({"type": "function", "name": name}),
                ))
            }
            Some("allowed_tools") => {
                let choice = match o.get("mode").and_then(Value::as_str) {
                    Some("auto") => ToolChoice::Auto,
                    Some("required") => ToolChoice::Required,
                    _ => {
                        return Err(ApiError::invalid_param(
                            "tool_choice.mode",
                            "tool_choice.mode must be \"auto\" or \"required\"",
                        ))
                    }
                };
                let Some(list) = o.get("tools").and_then(Value::as_array) else {
                    return Err(ApiError::invalid_param(
                        "tool_choice.tools",
                        "Missing required parameter: 'tool_choice.tools'.",
                    ));
                };
                let mut allowed = HashSet::new();
                for (j, t) in list.iter().enumerate() {
                    match (
                        t.get("type").and_then(Value::as_str),
                        t.get("name").and_then(Value::as_str),
                    ) {
                        (Some("function"), Some(name)) => {
                            allowed.insert(name.to_string());
                        }
                        (Some(k), _) if HOSTED_TOOLS.contains(&k) => {}
                        _ => {
                            return Err(ApiError::invalid_param(
                                &format!("tool_choice.tools[{j}]"),
                                "allowed tools must be {\"type\": \"function\", \"name\": ...}",
                            ))
                        }
                    }
                }
                specs.retain(|s| allowed.contains(&s.name));
                Ok((choice, Value::Object(o)))
            }
            Some(other) => Err(ApiError::invalid_param(
                "tool_choice.type",
                format!("tool_choice of type `{other}` is not supported; {usage}"),
            )),
            None => Err(bad(usage)),
        },
        Some(_) => Err(bad(usage)),
    }
}

/// `text.format` to a response format; also the `text` to echo.
fn text_format(text: Option<Value>) -> Result<(Option<ResponseFormat>, Value), ApiError> {
    let Some(text) = text.filter(|t| !t.is_null()) else {
        return Ok((None, json!({"format": {"type": "text"}})));
    };
    let Some(obj) = text.as_object() else {
        return Err(ApiError::invalid_param("text", "text must be an object"));
    };
    if let Some(v) = obj.get("verbosity").filter(|v| !v.is_null()) {
        if !matches!(v.as_str(), Some("low" | "medium" | "high")) {
            return Err(ApiError::invalid_param(
                "text.verbosity",
                "text.verbosity must be low, medium or high",
            ));
        }
    }
    let mut echo = text.clone();
    let format = match obj.get("format").filter(|f| !f.is_null()) {
        None => {
            echo["format"] = json!({"type": "text"});
            None
        }
        Some(f) => match f.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(ResponseFormat::JsonObject),
            Some("json_schema") => {
                if !f.get("name").is_some_and(Value::is_string) {
                    return Err(ApiError::invalid_param("text.format.name", "Missing required parameter: 'text.format.name'."));
                }
                match f.get("schema") {
                    Some(s) if s.is_object() => Some(ResponseFormat::JsonSchema(s.clone())),
                    Some(_) => return Err(ApiError::invalid_param("text.format.schema", "the schema must be a JSON object")),
                    None => return Err(ApiError::invalid_param("text.format.schema", "Missing required parameter: 'text.format.schema'.")),
                }
            }
            Some(other) => {
                return Err(ApiError::invalid_param(
                    "text.format.type",
                    format!("unsupported text.format type `{other}`; expected text, json_object or json_schema"),
                ))
            }
            None => return Err(ApiError::invalid_param("text.format.type", "Missing required parameter: 'text.format.type'.")),
        },
    };
    Ok((format, echo))
}

/// What a response object repeats of its request.
#[derive(Debug, Clone)]
pub struct Echo {
    pub model: String,
    pub instructions: Value,
    pub max_output_tokens: Value,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Value,
    pub reasoning: Value,
    pub temperature: f32,
    pub top_p: f32,
    pub text: Value,
    pub tool_choice: Value,
    pub tools: Value,
    pub truncation: String,
    pub metadata: Value,
    pub store: bool,
    pub user: Value,
    pub prompt_cache_key: Value,
    pub service_tier: String,
}

/// A validated request.
pub struct Converted {
    pub chat: ChatRequest,
    pub opts: GenOptions,
    pub conv_origins: Vec<String>,
    /// The conversation to store (the instructions left out).
    pub stored_from: usize,
    pub echo: Echo,
    pub stream: bool,
}

/// Validate a request and build its conversation; `previous` is the stored
/// conversation `previous_response_id` names.
pub fn convert(
    req: ResponsesRequest,
    previous: Option<&[ChatMessage]>,
    default_model: &str,
) -> Result<Converted, ApiError> {
    if req.background == Some(true) {
        return Err(ApiError::invalid_param(
            "background",
            "background responses are not supported",
        ));
    }
    if req.conversation.as_ref().is_some_and(|c| !c.is_null()) {
        return Err(ApiError::invalid_param(
            "conversation",
            "conversations are not supported; use previous_response_id or send the whole input",
        ));
    }
    if req.prompt.as_ref().is_some_and(|p| !p.is_null()) {
        return Err(ApiError::invalid_param(
            "prompt",
            "prompt templates are not supported; send instructions and input",
        ));
    }
    // Log-probabilities are given on chat completions and completions only;
    // an empty list here would read as "no tokens", so asking is an error.
    if req.top_logprobs.is_some_and(|n| n != 0) {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            "logprobs are not available on /v1/responses; use /v1/chat/completions",
        ));
    }
    if req
        .include
        .iter()
        .flatten()
        .any(|i| i == "message.output_text.logprobs")
    {
        return Err(ApiError::invalid_param("include", "message.output_text.logprobs is not available on /v1/responses; use /v1/chat/completions"));
    }
    let truncation = match req.truncation.as_deref() {
        None => "disabled",
        Some(t @ ("auto" | "disabled")) => t,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "truncation",
                format!("truncation must be auto or disabled, got `{other}`"),
            ))
        }
    };
    let metadata = match req.metadata {
        None | Some(Value::Null) => json!({}),
        Some(m @ Value::Object(_)) => m,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "metadata",
                "metadata must be an object of strings",
            ))
        }
    };
    let max_tokens = req
        .max_output_tokens
        .map(|v| check_max_tokens("max_output_tokens", v))
        .transpose()?;
    let (sampling, ignore_eos) =
        super::openai_sampling(req.temperature, req.top_p, req.sampling, RESPONSES_REFUSED)?;
    let (mut specs, tools_echo) = tools(req.tools.unwrap_or_default())?;
    let (choice, choice_echo) = tool_choice(req.tool_choice, &mut specs)?;
    let (response_format, text_echo) = text_format(req.text)?;
    let reasoning = req.reasoning.unwrap_or_default();
    let thinking = thinking_from_effort(reasoning.effort.as_deref()).map_err(|mut e| {
        e.param = Some("reasoning.effort".into());
        e
    })?;
    let summary = reasoning.summary.or(reasoning.generate_summary);
    let reasoning_echo = if reasoning.effort.is_none() && summary.is_none() {
        Value::Null
    } else {
        json!({"effort": reasoning.effort, "summary": summary})
    };
    let conv = conversation(req.instructions.as_deref(), previous, req.input)?;
    let echo = Echo {
        model: req
            .model
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| default_model.to_string()),
        instructions: req.instructions.map_or(Value::Null, Value::String),
        max_output_tokens: req.max_output_tokens.map_or(Value::Null, Value::from),
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
        previous_response_id: req.previous_response_id.map_or(Value::Null, Value::String),
        reasoning: reasoning_echo,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        text: text_echo,
        tool_choice: choice_echo,
        tools: Value::Array(tools_echo),
        truncation: truncation.to_string(),
        metadata,
        store: req.store.unwrap_or(true),
        user: req.user.map_or(Value::Null, Value::String),
        prompt_cache_key: req.prompt_cache_key.map_or(Value::Null, Value::String),
        service_tier: req
            .service_tier
            .filter(|s| s != "auto")
            .unwrap_or_else(|| "default".into()),
    };
    let chat = ChatRequest {
        messages: conv.messages,
        tools: specs,
        tool_choice: choice,
        parallel_tool_calls: echo.parallel_tool_calls,
        response_format,
        thinking,
    };
    Ok(Converted {
        chat,
        opts: GenOptions {
            sampling,
            max_tokens,
            stop: vec![],
            logprobs: None,
            ignore_eos,
        },
        conv_origins: conv.origins,
        stored_from: conv.stored_from,
        echo,
        stream: req.stream.unwrap_or(false),
    })
}

/// Name the request's own fields in errors from the shared preparation:
/// `input[N]` there counts messages, here it names the item they came from.
fn rename_param(mut err: ApiError, origins: &[String]) -> ApiError {
    let renamed = match err.param.as_deref() {
        Some(p) if p.starts_with("input[") => {
            p["input[".len()..].split_once(']').and_then(|(n, tail)| {
                let origin = origins.get(n.parse::<usize>().ok()?)?;
                Some(format!("{origin}{tail}"))
            })
        }
        Some("max_tokens") => Some("max_output_tokens".into()),
        Some("response_format") => Some("text.format".into()),
        _ => None,
    };
    if renamed.is_some() {
        err.param = renamed;
    }
    err
}

// --- the response ----------------------------------------------------------------

impl Echo {
    /// The response object: every field of the API's shape, named at each
    /// call site.
    #[allow(clippy::too_many_arguments)]
    fn object(
        &self,
        id: &str,
        created_at: u64,
        status: &str,
        output: Vec<Value>,
        usage: Value,
        incomplete: Value,
        error: Value,
    ) -> Value {
        json!({
            "id": id,
            "object": "response",
            "created_at": created_at,
            "status": status,
            "background": false,
            "completed_at": if status == "completed" { Value::from(unix_now()) } else { Value::Null },
            "error": error,
            "incomplete_details": incomplete,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": null,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": self.previous_response_id,
            "prompt_cache_key": self.prompt_cache_key,
            "reasoning": self.reasoning,
            "service_tier": self.service_tier,
            "store": self.store,
            "temperature": self.temperature,
            "text": self.text,
            "tool_choice": self.tool_choice,
            "tools": self.tools,
            "top_logprobs": 0,
            "top_p": self.top_p,
            "truncation": self.truncation,
            "usage": usage,
            "user": self.user,
            "metadata": self.metadata,
        })
    }
}

fn usage_json(u: &Usage, reasoning_tokens: u32) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": { "cached_tokens": u.cached_tokens, "cache_write_tokens": 0 },
        "output_tokens": u.completion_tokens,
        "output_tokens_details": { "reasoning_tokens": reasoning_tokens },
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// About how many of the output tokens were reasoning (the engine counts
/// tokens, the parser splits text: the reasoning is tokenized again).
fn reasoning_tokens(state: &AppState, reasoning: &str, usage: &Usage) -> u32 {
    if reasoning.is_empty() {
        return 0;
    }
    (state.engine.model().tokenize(reasoning, false, false).len() as u32)
        .min(usage.completion_tokens)
}

/// Cut short by `max_output_tokens` or the context.
fn incomplete(reason: &FinishReason) -> bool {
    Ending::of(reason, false) == Ending::Length
}

fn output_text_part(text: &str) -> Value {
    json!({ "type": "output_text", "text": text, "annotations": [], "logprobs": [] })
}

fn reasoning_part(text: &str) -> Value {
    json!({ "type": "reasoning_text", "text": text })
}

fn reasoning_item(id: &str, text: Option<&str>) -> Value {
    json!({ "id": id, "type": "reasoning", "summary": [], "content": text.map(|t| vec![reasoning_part(t)]).unwrap_or_default() })
}

fn message_item(id: &str, text: Option<&str>, status: &str) -> Value {
    json!({
        "id": id, "type": "message", "status": status, "role": "assistant",
        "content": text.map(|t| vec![output_text_part(t)]).unwrap_or_default(),
    })
}

fn call_item(id: &str, call: &ToolCall, status: &str) -> Value {
    json!({ "id": id, "type": "function_call", "status": status, "arguments": call.arguments, "call_id": call.id, "name": call.name })
}

/// A whole reply's output items: reasoning, the message, the calls.
fn output_items(out: &Output, cut_short: bool) -> Vec<Value> {
    let mut items = Vec::new();
    if !out.reasoning.is_empty() {
        items.push(reasoning_item(&new_id("rs_"), Some(&out.reasoning)));
    }
    if !out.text.trim().is_empty() || (out.calls.is_empty() && out.reasoning.is_empty()) {
        items.push(message_item(&new_id("msg_"), Some(&out.text), "completed"));
    }
    for c in &out.calls {
        items.push(call_item(&new_id("fc_"), c, "completed"));
    }
    if cut_short {
        if let Some(last) = items.last_mut().filter(|i| i.get("status").is_some()) {
            last["status"] = json!("incomplete");
        }
    }
    items
}

/// The assistant turn a continuation sees for this reply.
fn assistant_turn(out: &Output) -> ChatMessage {
    ChatMessage {
        role: Role::Assistant,
        content: out.text.clone(),
        reasoning: (!out.reasoning.is_empty()).then(|| out.reasoning.clone()),
        tool_calls: out.calls.clone(),
        ..Default::default()
    }
}

/// Keep a finished response, when the request allows it.
fn store(
    state: &AppState,
    echo: &Echo,
    id: &str,
    object: &Value,
    mut conversation: Vec<ChatMessage>,
    out: &Output,
) {
    if !echo.store {
        return;
    }
    conversation.push(assistant_turn(out));
    state.responses.insert(
        id.to_string(),
        StoredResponse {
            object: object.clone(),
            messages: Arc::new(conversation),
        },
    );
}

/// The routes that read a request into a prompt (the server guards them
/// with queue admission).
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/responses", post(create))
        .route("/v1/responses/input_tokens", post(input_tokens))
}

/// The routes over stored responses, which queue nothing.
pub fn stored_router() -> Router<Arc<AppState>> {
    Router::new().route("/v1/responses/{id}", get(retrieve).delete(delete))
}

/// `POST /v1/responses`
pub async fn create(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, OpenAIError> {
    let req: ResponsesRequest = ApiError::parse_json(&body)?;
    let previous = previous_response(&state, req.previous_response_id.as_deref())?;
    let converted = convert(
        req,
        previous.as_ref().map(|p| p.messages.as_slice()),
        &state.model_id,
    )?;
    let Converted {
        chat,
        opts,
        conv_origins,
        stored_from,
        echo,
        stream,
    } = converted;
    let conversation: Vec<ChatMessage> = if echo.store {
        chat.messages[stored_from..].to_vec()
    } else {
        Vec::new()
    };
    let prepared = if echo.truncation == "auto" {
        prepare_truncated(&state, chat, opts, &conv_origins).await?
    } else {
        prepare(&state, chat, opts, "input")
            .await
            .map_err(|e| rename_param(e, &conv_origins))?
    };
    let job = pipeline::submit(&state, "responses", &body, prepared.request);
    let id = new_id("resp_");
    let created_at = unix_now();
    if stream {
        let wire = ResponseEvents {
            id,
            created_at,
            echo,
            items: Items::default(),
            conversation,
            state: state.clone(),
        };
        let reply = Reply::new(wire, prepared.output, "call_", state.replay.clone());
        return Ok(pipeline::stream_job(&state, job, reply));
    }
    let done = collect(&state.replay, job, &prepared.output, "call_").await?;
    let cut_short = incomplete(&done.reason);
    let output = output_items(&done.output, cut_short);
    let usage = usage_json(
        &done.usage,
        reasoning_tokens(&state, &done.output.reasoning, &done.usage),
    );
    let (status, details) = if cut_short {
        ("incomplete", json!({"reason": "max_output_tokens"}))
    } else {
        ("completed", Value::Null)
    };
    let object = echo.object(&id, created_at, status, output, usage, details, Value::Null);
    store(&state, &echo, &id, &object, conversation, &done.output);
    Ok(Json(object).into_response())
}

/// Where the conversation may be cut for `truncation: auto`: the start of
/// each user turn after the first message that is not a system message
/// (the instructions stay). Cutting at `cuts[k]` drops the `k + 1` oldest
/// turns whole (a call's results go with it) and keeps the last user turn.
fn turn_cuts(messages: &[ChatMessage]) -> (usize, Vec<usize>) {
    let first = messages
        .iter()
        .position(|m| m.role != Role::System)
        .unwrap_or(messages.len());
    let cuts = messages
        .iter()
        .enumerate()
        .skip(first + 1)
        .filter(|(_, m)| m.role == Role::User)
        .map(|(i, _)| i)
        .collect();
    (first, cuts)
}

/// `truncation: auto`: prepare the conversation as it is if it fits, else
/// with the fewest oldest turns dropped that make it fit, leaving room for
/// `max_output_tokens` (at most half the context). Found by bisection, so
/// a long history costs a few renderings, not one per turn.
async fn prepare_truncated(
    state: &Arc<AppState>,
    chat: ChatRequest,
    opts: GenOptions,
    origins: &[String],
) -> Result<pipeline::PreparedJob, ApiError> {
    let n_ctx = state.engine.n_ctx() as usize;
    let reserve = opts.max_tokens.map_or(0, |m| (m as usize).min(n_ctx / 2));
    let (first, cuts) = turn_cuts(&chat.messages);
    // Some(job) when the conversation cut before `cuts[k - 1]` (k = 0: whole) fits.
    let last = cuts.len();
    let attempt = |k: usize| {
        let mut chat = chat.clone();
        let mut origins = origins.to_vec();
        if k > 0 {
            chat.messages.drain(first..cuts[k - 1]);
            origins.drain(first..cuts[k - 1]);
        }
        let opts = opts.clone();
        async move {
            match prepare(state, chat, opts, "input").await {
                Ok(job) if job.request.prompt.len() + reserve <= n_ctx || k == last => {
                    Ok(Some(job))
                }
                Ok(_) => Ok(None),
                Err(e) if e.code == Some("context_length_exceeded") && k < last => Ok(None),
                Err(e) => Err(rename_param(e, &origins)),
            }
        }
    };
    if let Some(job) = attempt(0).await? {
        return Ok(job);
    }
    // Dropping every turn but the last fits (or fails with the error a
    // client must see); find the fewest that fit.
    let (mut lo, mut hi) = (0, cuts.len());
    let Some(mut best) = attempt(hi).await? else {
        return Err(ApiError::internal(
            "truncation: the last attempt neither fitted nor failed",
        ));
    };
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        match attempt(mid).await? {
            Some(job) => (hi, best) = (mid, job),
            None => lo = mid,
        }
    }
    // `hi` is at least 1 here: the whole conversation did not fit.
    tracing::info!(
        dropped = cuts[hi - 1] - first,
        of = chat.messages.len(),
        prompt_tokens = best.request.prompt.len(),
        "truncation: dropped the oldest messages to fit the context"
    );
    Ok(best)
}

/// The stored response `previous_response_id` names.
fn previous_response(
    state: &AppState,
    id: Option<&str>,
) -> Result<Option<Arc<StoredResponse>>, ApiError> {
    match id {
        None | Some("") => Ok(None),
        Some(id) => state.responses.get(id).map(Some).ok_or_else(|| {
            ApiError::invalid_param(
                "previous_response_id",
                format!("Previous response with id '{id}' not found."),
            )
            .with_code("previous_response_not_found")
        }),
    }
}

/// `POST /v1/responses/input_tokens`: the input's length in tokens, from
/// the same rendering as `POST /v1/responses` (whole: `truncation` is not
/// applied, and a count past the context is still a count).
pub async fn input_tokens(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, OpenAIError> {
    let req: ResponsesRequest = ApiError::parse_json(&body)?;
    let previous = previous_response(&state, req.previous_response_id.as_deref())?;
    let converted = convert(
        req,
        previous.as_ref().map(|p| p.messages.as_slice()),
        &state.model_id,
    )?;
    let n = count_prompt(&state, converted.chat, "input")
        .await
        .map_err(|e| rename_param(e, &converted.conv_origins))?;
    Ok(Json(json!({ "object": "response.input_tokens", "input_tokens": n })).into_response())
}

/// `GET /v1/responses/{id}`
pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, OpenAIError> {
    match state.responses.get(&id) {
        Some(stored) => Ok(Json(stored.object.clone()).into_response()),
        None => Err(ApiError::not_found(format!("Response with id '{id}' not found.")).into()),
    }
}

/// `DELETE /v1/responses/{id}`
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, OpenAIError> {
    if state.responses.remove(&id) {
        Ok(
            Json(json!({ "id": id, "object": "response.deleted", "deleted": true }))
                .into_response(),
        )
    } else {
        Err(ApiError::not_found(format!("Response with id '{id}' not found.")).into())
    }
}

// --- streaming ----------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Reasoning,
    Message,
    Call,
}

/// The output item being streamed.
struct OpenItem {
    kind: Kind,
    id: String,
    index: usize,
    /// Its text, reasoning or arguments so far.
    text: String,
    call: Option<ToolCall>,
}

/// Output events to the official stream of item events.
#[derive(Default)]
struct Items {
    seq: u64,
    done: Vec<Value>,
    open: Option<OpenItem>,
    /// Whitespace between items, held until text follows it.
    held: String,
    events: Vec<SseEvent>,
}

impl Items {
    fn emit(&mut self, kind: &str, fields: Value) {
        let mut body = json!({ "type": kind, "sequence_number": self.seq });
        if let (Some(b), Value::Object(f)) = (body.as_object_mut(), fields) {
            b.extend(f);
        }
        self.seq += 1;
        self.events.push(sse::named(kind, &body));
    }

    fn take(&mut self) -> Vec<SseEvent> {
        std::mem::take(&mut self.events)
    }

    fn start(&mut self, kind: Kind, call: Option<ToolCall>) {
        self.close("completed");
        let index = self.done.len();
        let (id, item) = match kind {
            Kind::Reasoning => {
                let id = new_id("rs_");
                let item = reasoning_item(&id, None);
                (id, item)
            }
            Kind::Message => {
                let id = new_id("msg_");
                let item = message_item(&id, None, "in_progress");
                (id, item)
            }
            Kind::Call => {
                let id = new_id("fc_");
                let item = call_item(
                    &id,
                    call.as_ref().expect("a call item has its call"),
                    "in_progress",
                );
                (id, item)
            }
        };
        self.emit(
            "response.output_item.added",
            json!({ "output_index": index, "item": item }),
        );
        match kind {
            Kind::Reasoning => self.emit(
                "response.content_part.added",
                json!({ "item_id": id, "output_index": index, "content_index": 0, "part": reasoning_part("") }),
            ),
            Kind::Message => self.emit(
                "response.content_part.added",
                json!({ "item_id": id, "output_index": index, "content_index": 0, "part": output_text_part("") }),
            ),
            Kind::Call => {}
        }
        self.open = Some(OpenItem {
            kind,
            id,
            index,
            text: String::new(),
            call,
        });
    }

    /// Finish the open item, if any.
    fn close(&mut self, status: &str) {
        let Some(item) = self.open.take() else { return };
        let (id, index, text) = (item.id.as_str(), item.index, item.text.as_str());
        let full = match item.kind {
            Kind::Reasoning => {
                self.emit("response.reasoning_text.done", json!({ "item_id": id, "output_index": index, "content_index": 0, "text": text }));
                self.emit(
                    "response.content_part.done",
                    json!({ "item_id": id, "output_index": index, "content_index": 0, "part": reasoning_part(text) }),
                );
                reasoning_item(id, Some(text))
            }
            Kind::Message => {
                self.emit(
                    "response.output_text.done",
                    json!({ "item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": [] }),
                );
                self.emit(
                    "response.content_part.done",
                    json!({ "item_id": id, "output_index": index, "content_index": 0, "part": output_text_part(text) }),
                );
                message_item(id, Some(text), status)
            }
            Kind::Call => {
                let mut call = item.call.clone().expect("a call item has its call");
                call.arguments = item.text.clone();
                self.emit(
                    "response.function_call_arguments.done",
                    json!({ "item_id": id, "output_index": index, "arguments": text }),
                );
                call_item(id, &call, status)
            }
        };
        self.emit(
            "response.output_item.done",
            json!({ "output_index": index, "item": full }),
        );
        self.done.push(full);
    }

    fn feed(&mut self, ev: OutputEvent) {
        match ev {
            OutputEvent::Reasoning(r) => {
                if self.open.as_ref().map(|o| o.kind) != Some(Kind::Reasoning) {
                    self.held.clear();
                    self.start(Kind::Reasoning, None);
                }
                let open = self.open.as_mut().expect("just opened");
                open.text.push_str(&r);
                let (id, index) = (open.id.clone(), open.index);
                self.emit(
                    "response.reasoning_text.delta",
                    json!({ "item_id": id, "output_index": index, "content_index": 0, "delta": r }),
                );
            }
            OutputEvent::Text(t) => {
                let mut t = t;
                if self.open.as_ref().map(|o| o.kind) != Some(Kind::Message) {
                    if t.trim().is_empty() {
                        self.held.push_str(&t);
                        return;
                    }
                    t = std::mem::take(&mut self.held) + &t;
                    self.start(Kind::Message, None);
                }
                let open = self.open.as_mut().expect("just opened");
                open.text.push_str(&t);
                let (id, index) = (open.id.clone(), open.index);
                self.emit(
                    "response.output_text.delta",
                    json!({ "item_id": id, "output_index": index, "content_index": 0, "delta": t, "logprobs": [] }),
                );
            }
            OutputEvent::CallStart { id, name, .. } => {
                self.held.clear();
                self.start(
                    Kind::Call,
                    Some(ToolCall {
                        id,
                        name,
                        arguments: String::new(),
                    }),
                );
            }
            OutputEvent::CallArgs { fragment, .. } => {
                let Some(open) = self.open.as_mut().filter(|o| o.kind == Kind::Call) else {
                    return;
                };
                open.text.push_str(&fragment);
                let (id, index) = (open.id.clone(), open.index);
                self.emit(
                    "response.function_call_arguments.delta",
                    json!({ "item_id": id, "output_index": index, "delta": fragment }),
                );
            }
            OutputEvent::CallEnd { .. } => {
                if self.open.as_ref().is_some_and(|o| o.kind == Kind::Call) {
                    self.close("completed");
                }
            }
        }
    }

    /// Generation ended: close what is open; a reply with nothing in it
    /// still has one (empty) message.
    fn finish(&mut self, cut_short: bool) {
        self.close(if cut_short { "incomplete" } else { "completed" });
        if self.done.is_empty() {
            let held = std::mem::take(&mut self.held);
            self.start(Kind::Message, None);
            if !held.is_empty() {
                self.feed(OutputEvent::Text(held));
            }
            self.close(if cut_short { "incomplete" } else { "completed" });
        }
    }
}

/// The wire of the official Responses events.
struct ResponseEvents {
    id: String,
    created_at: u64,
    echo: Echo,
    items: Items,
    /// The conversation to store, before this reply.
    conversation: Vec<ChatMessage>,
    state: Arc<AppState>,
}

impl ResponseEvents {
    /// End the response as failed, with the error in the Responses shape.
    fn fail(&mut self, api: ApiError) {
        self.items.close("incomplete");
        let code = api.code.unwrap_or(match api.kind {
            ErrorKind::InvalidRequest => "invalid_prompt",
            ErrorKind::Overloaded => "rate_limit_exceeded",
            _ => "server_error",
        });
        let error = json!({ "code": code, "message": api.message });
        let object = self.echo.object(
            &self.id,
            self.created_at,
            "failed",
            self.items.done.clone(),
            Value::Null,
            Value::Null,
            error,
        );
        self.items
            .emit("response.failed", json!({ "response": object }));
    }
}

impl Wire for ResponseEvents {
    const PROTOCOL: Protocol = Protocol::OpenAI;

    fn opening(&mut self) -> Vec<SseEvent> {
        let object = self.echo.object(
            &self.id,
            self.created_at,
            "in_progress",
            vec![],
            Value::Null,
            Value::Null,
            Value::Null,
        );
        self.items
            .emit("response.created", json!({ "response": object }));
        self.items
            .emit("response.in_progress", json!({ "response": object }));
        self.items.take()
    }

    fn output(&mut self, pieces: Vec<OutputEvent>, _: &mut Logprobs) -> Vec<SseEvent> {
        for piece in pieces {
            self.items.feed(piece);
        }
        self.items.take()
    }

    fn ending(&mut self, end: Ended<'_>, usage: &Usage) -> Vec<SseEvent> {
        let (reason, output) = (end.reason, end.output);
        let cut_short = incomplete(reason);
        self.items.finish(cut_short);
        let usage = usage_json(
            usage,
            reasoning_tokens(&self.state, &output.reasoning, usage),
        );
        let (status, details) = if cut_short {
            ("incomplete", json!({"reason": "max_output_tokens"}))
        } else {
            ("completed", Value::Null)
        };
        let object = self.echo.object(
            &self.id,
            self.created_at,
            status,
            self.items.done.clone(),
            usage,
            details,
            Value::Null,
        );
        store(
            &self.state,
            &self.echo,
            &self.id,
            &object,
            std::mem::take(&mut self.conversation),
            output,
        );
        self.items
            .emit(&format!("response.{status}"), json!({ "response": object }));
        self.items.take()
    }

    fn error(&mut self, err: &ApiError) -> Vec<SseEvent> {
        self.fail(err.clone());
        self.items.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(input: Value) -> Result<Vec<ChatMessage>, ApiError> {
        conversation(None, None, Some(input)).map(|c| c.messages)
    }

    #[test]
    fn truncation_cuts_only_at_user_turns_after_the_instructions() {
        let input = json!([
            {"role": "user", "content": "a"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "r"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
            {"role": "user", "content": "e"},
        ]);
        let messages = conversation(Some("be brief"), None, Some(input))
            .unwrap()
            .messages;
        let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
        assert_eq!(roles[0], Role::System);
        let (first, cuts) = turn_cuts(&messages);
        assert_eq!(first, 1);
        // Never before the first turn; each cut starts a user turn, and the
        // call with its result falls wholly before the first cut.
        assert_eq!(cuts.len(), 2);
        assert!(cuts.iter().all(|&c| messages[c].role == Role::User));
        assert!(messages[first..cuts[0]]
            .iter()
            .any(|m| m.role == Role::Tool));
        assert_eq!(messages[*cuts.last().unwrap()].content, "e");
        // A lone turn cannot be cut.
        assert!(turn_cuts(&conv(json!("hi")).unwrap()).1.is_empty());
    }

    #[test]
    fn items_become_messages() {
        let m = conv(json!([
            {"role": "developer", "content": "be brief"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "need a tool"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "call_id": "c1", "name": "get", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call", "call_id": "c2", "name": "get", "arguments": "{\"city\":\"Rome\"}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
        ]))
        .unwrap();
        assert_eq!(m.len(), 5, "{m:#?}");
        assert_eq!(m[0], ChatMessage::new(Role::System, "be brief"));
        assert_eq!(m[1], ChatMessage::new(Role::User, "weather?"));
        assert_eq!(m[2].role, Role::Assistant);
        assert_eq!(m[2].content, "Checking.");
        assert_eq!(m[2].reasoning.as_deref(), Some("need a tool"));
        assert_eq!(
            m[2].tool_calls
                .iter()
                .map(|c| c.id.as_str())
                .collect::<Vec<_>>(),
            ["c1", "c2"]
        );
        assert_eq!(m[3], ChatMessage::tool_result("c1", None, "sunny"));
        assert_eq!(m[4], ChatMessage::tool_result("c2", None, "rain"));
    }

    #[test]
    fn a_string_is_one_user_message_after_the_instructions() {
        let c = conversation(Some("rules"), None, Some(json!("hi"))).unwrap();
        assert_eq!(
            c.messages,
            vec![
                ChatMessage::new(Role::System, "rules"),
                ChatMessage::new(Role::User, "hi")
            ]
        );
        assert_eq!(c.stored_from, 1);
        assert_eq!(c.origins, ["instructions", "input"]);
    }

    #[test]
    fn a_continuation_may_answer_stored_calls() {
        let prev = vec![
            ChatMessage::new(Role::User, "go"),
            ChatMessage {
                role: Role::Assistant,
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "f".into(),
                    arguments: "{}".into(),
                }],
                ..Default::default()
            },
        ];
        let c = conversation(
            Some("sys"),
            Some(&prev),
            Some(json!([{"type": "function_call_output", "call_id": "call_1", "output": "ok"}])),
        )
        .unwrap();
        assert_eq!(c.messages.len(), 4);
        assert_eq!(
            c.origins,
            [
                "instructions",
                "previous_response_id",
                "previous_response_id",
                "input[0]"
            ]
        );
        assert!(conversation(
            None,
            None,
            Some(json!([{"type": "function_call_output", "call_id": "call_1", "output": "ok"}]))
        )
        .is_err());
    }

    #[test]
    fn rejects_bad_items_naming_them() {
        let cases = [
            (json!([]), "input"),
            (json!(5), "input"),
            (
                json!([{"type": "message", "role": "wizard", "content": "x"}]),
                "input[0].role",
            ),
            (
                json!([{"role": "user", "content": "x"}, {"type": "function_call_output", "call_id": "nope", "output": "x"}]),
                "input[1].call_id",
            ),
            (
                json!([{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]),
                "input[0].arguments",
            ),
            (
                json!([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
                "input[0].content[0].type",
            ),
            (
                json!([{"type": "web_search_call", "id": "x"}]),
                "input[0].type",
            ),
            (json!(["text"]), "input[0]"),
        ];
        for (input, param) in cases {
            let err = conv(input.clone()).unwrap_err();
            assert_eq!(
                err.param.as_deref(),
                Some(param),
                "{input}: {}",
                err.message
            );
        }
    }

    #[test]
    fn hosted_tools_are_left_out_and_choices_parse() {
        let (specs, echo) = tools(vec![
            json!({"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {}}}),
            json!({"type": "local_shell"}),
            json!({"type": "web_search"}),
        ])
        .unwrap();
        assert_eq!(specs.len(), 1);
        assert_eq!(echo.as_slice().len(), 3);
        assert!(tools(vec![json!({"type": "teleport"})]).is_err());
        let mut s = specs.clone();
        assert_eq!(
            tool_choice(Some(json!({"type": "function", "name": "shell"})), &mut s)
                .unwrap()
                .0,
            ToolChoice::Named("shell".into())
        );
        let (c, _) = tool_choice(Some(json!({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "other"}]})), &mut s).unwrap();
        assert_eq!(c, ToolChoice::Required);
        assert!(s.is_empty());
        assert!(tool_choice(Some(json!("sometimes")), &mut vec![]).is_err());
        assert!(tool_choice(Some(json!({"type": "file_search"})), &mut vec![]).is_err());
    }

    #[test]
    fn prompt_errors_name_the_item() {
        let origins = vec![
            "instructions".to_string(),
            "input[0]".into(),
            "input[3]".into(),
        ];
        let e = rename_param(ApiError::invalid_param("input[2]", "x"), &origins);
        assert_eq!(e.param.as_deref(), Some("input[3]"));
        let e = rename_param(ApiError::invalid_param("max_tokens", "x"), &origins);
        assert_eq!(e.param.as_deref(), Some("max_output_tokens"));
    }

    #[test]
    fn streamed_items_follow_the_official_order() {
        let mut items = Items::default();
        items.feed(OutputEvent::Reasoning("hm".into()));
        items.feed(OutputEvent::Text("\n\n".into()));
        items.feed(OutputEvent::Text("Hi".into()));
        items.feed(OutputEvent::CallStart {
            index: 0,
            id: "call_1".into(),
            name: "f".into(),
        });
        items.feed(OutputEvent::CallArgs {
            index: 0,
            fragment: "{\"a\":".into(),
        });
        items.feed(OutputEvent::CallArgs {
            index: 0,
            fragment: "1}".into(),
        });
        items.feed(OutputEvent::CallEnd { index: 0 });
        items.finish(false);
        assert_eq!(items.done.len(), 3);
        assert_eq!(items.done[1]["content"][0]["text"], "\n\nHi");
        assert_eq!(items.done[2]["arguments"], "{\"a\":1}");
        assert_eq!(items.done[2]["call_id"], "call_1");
        assert_eq!(items.seq as usize, items.events.len());
    }
}
