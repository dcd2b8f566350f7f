//! The Responses request: its fields, the tools it offers (hosted ones
//! left out), `tool_choice` and `text.format`, what the response object
//! echoes of it, and its validation into a conversation and options.

use std::collections::HashSet;
use std::sync::Mutex;

use serde::Deserialize;
use serde_json::{json, Value};

use super::input::*;
use crate::api::error::ApiError;
use crate::api::openai::{check_unique_tools, thinking_from_effort, tool_spec};
use crate::api::sampling::{SamplingFields, RESPONSES_REFUSED};
use crate::api::{check_max_tokens, GenOptions};
use crate::chat::{ChatMessage, ChatRequest, ResponseFormat, ToolChoice, ToolSpec};

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
pub(super) const HOSTED_TOOLS: &[&str] = &[
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
pub(super) fn log_ignored_tool(kind: &str) {
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

/// Function tools to specs; hosted tools are left out. Returns the specs
/// and the accepted tools as the response echoes them.
pub(super) fn tools(tools: Vec<Value>) -> Result<(Vec<ToolSpec>, Vec<Value>), ApiError> {
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
pub(super) fn tool_choice(
    value: Option<Value>,
    specs: &mut Vec<ToolSpec>,
) -> Result<(ToolChoice, Value), ApiError> {
    let bad = |msg: &str| ApiError::invalid_param("tool_choice", msg.to_string());
    let usage = "tool_choice must be \"auto\", \"none\", \"required\", {\"type\": \"function\", \"name\": ...} or {\"type\": \"allowed_tools\", ...}";
    match value {
        None | Some(Value::Null) => Ok((ToolChoice::Auto, json!("auto"))),
        Some(Value::String(s)) => match crate::api::tool_mode(&s) {
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
pub(super) fn text_format(
    text: Option<Value>,
) -> Result<(Option<ResponseFormat>, Value), ApiError> {
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
        crate::api::openai_sampling(req.temperature, req.top_p, req.sampling, RESPONSES_REFUSED)?;
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
pub(super) fn rename_param(mut err: ApiError, origins: &[String]) -> ApiError {
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
