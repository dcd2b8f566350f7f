//! Input items to messages: `instructions`, a stored conversation and the
//! `input` items (messages, function calls and their outputs, reasoning)
//! as one conversation, with where each message came from.

use std::collections::HashSet;

use serde_json::{Map, Value};

use crate::api::error::ApiError;
use crate::chat::{ChatMessage, Role, ToolCall};

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
pub(super) struct Builder {
    pub(super) conv: Conversation,
    /// The last message is an assistant turn that later items may extend.
    pub(super) open: bool,
    /// Reasoning waiting for the assistant turn it belongs to.
    pub(super) reasoning: Option<String>,
    /// Ids of the calls made so far, which results may answer.
    pub(super) calls: HashSet<String>,
}

impl Builder {
    pub(super) fn push(&mut self, m: ChatMessage, origin: String) {
        self.conv.messages.push(m);
        self.conv.origins.push(origin);
    }

    /// The open assistant turn to extend, or a new one.
    pub(super) fn assistant(&mut self, i: usize, text_first: bool) -> &mut ChatMessage {
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

    pub(super) fn item(&mut self, i: usize, item: &Value) -> Result<(), ApiError> {
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

pub(super) fn required_str(
    obj: &Map<String, Value>,
    i: usize,
    field: &str,
) -> Result<String, ApiError> {
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
pub(super) fn message_text(param: &str, content: Option<&Value>) -> Result<String, ApiError> {
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
pub(super) fn reasoning_text(obj: &Map<String, Value>) -> String {
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
