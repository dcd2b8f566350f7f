//! Requests to prompt text, and generated text back to structure.
//!
//! Every API module converts its wire request into a [`ChatRequest`]: the
//! protocol-neutral conversation (messages with their tool calls and
//! results), the tools on offer and the controls. [`prompt`] renders it
//! through the model's chat template (or hearth's fallback conventions) and
//! tokenizes it safely; [`output`] splits what the model generates into
//! reasoning, visible text and tool calls, as it streams.

pub mod grammar;
pub mod output;
pub mod prompt;
pub mod reasoning;
pub mod replay;
pub mod template;
pub mod tools;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

pub use tools::ToolSpec;

/// Who said a message. Protocol modules map their own role names onto these
/// (OpenAI `developer` becomes `System`; Anthropic `tool_result` blocks and
/// Responses `function_call_output` items become `Tool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    #[default]
    User,
    Assistant,
    Tool,
}

/// A tool call the assistant made, as the history carries it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (an object; checked when converted).
    pub arguments: String,
}

/// One message of a conversation, its content already flattened to text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
    /// The assistant's reasoning, when the history carries it.
    pub reasoning: Option<String>,
    /// The assistant's calls.
    pub tool_calls: Vec<ToolCall>,
    /// A tool result: the call it answers.
    pub tool_call_id: Option<String>,
    /// A tool result: the function's name.
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            ..Default::default()
        }
    }

    /// A tool's result.
    pub fn tool_result(
        call_id: impl Into<String>,
        name: Option<String>,
        content: impl Into<String>,
    ) -> Self {
        Self {
            role: Role::Tool,
            content: content.into(),
            tool_call_id: Some(call_id.into()),
            name,
            ..Default::default()
        }
    }
}

/// How templates see a message: the shape transformers passes, with
/// `tool_calls[].function.arguments` as an object (what templates index and
/// `tojson`), and optional keys only when set.
impl Serialize for ChatMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("role", &self.role)?;
        m.serialize_entry("content", &self.content)?;
        if let Some(r) = &self.reasoning {
            m.serialize_entry("reasoning_content", r)?;
        }
        if !self.tool_calls.is_empty() {
            let calls: Vec<serde_json::Value> = self
                .tool_calls
                .iter()
                .map(|c| {
                    let args: serde_json::Value = serde_json::from_str(&c.arguments)
                        .unwrap_or_else(|_| serde_json::Value::String(c.arguments.clone()));
                    serde_json::json!({
                        "id": c.id,
                        "type": "function",
                        "function": { "name": c.name, "arguments": args },
                    })
                })
                .collect();
            m.serialize_entry("tool_calls", &calls)?;
        }
        if let Some(id) = &self.tool_call_id {
            m.serialize_entry("tool_call_id", id)?;
        }
        if let Some(n) = &self.name {
            m.serialize_entry("name", n)?;
        }
        m.end()
    }
}

/// Which tool the model may or must call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model decides (the default when tools are offered).
    #[default]
    Auto,
    /// No calls: tools are still described to the model, but it answers in text.
    None,
    /// At least one call, of any tool (OpenAI `required`, Anthropic `any`).
    Required,
    /// A call of this tool.
    Named(String),
}

/// Structured output the answer must follow.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON matching this schema.
    JsonSchema(serde_json::Value),
}

/// Whether the model should think before answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Thinking {
    /// The template's default.
    #[default]
    Default,
    /// Off, where the template allows it (`enable_thinking = false`).
    Off,
    /// On; at most this many reasoning tokens when given.
    On { budget: Option<u32> },
}

/// A protocol-neutral chat request: what every API module builds.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub tools: Vec<ToolSpec>,
    pub tool_choice: ToolChoice,
    /// More than one call per reply allowed.
    pub parallel_tool_calls: bool,
    pub response_format: Option<ResponseFormat>,
    pub thinking: Thinking,
}

impl ChatRequest {
    pub fn new(messages: Vec<ChatMessage>) -> Self {
        Self {
            messages,
            parallel_tool_calls: true,
            ..Default::default()
        }
    }
}
