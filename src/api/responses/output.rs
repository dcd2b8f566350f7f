//! The response object and its output items (reasoning, the message,
//! function calls), usage, and keeping a finished response in the store.

use std::sync::Arc;

use serde_json::{json, Value};

use super::request::*;
use crate::api::reply::Ending;
use crate::api::{new_id, unix_now};
use crate::chat::output::Output;
use crate::chat::{ChatMessage, Role, ToolCall};
use crate::engine::{FinishReason, Usage};
use crate::state::responses::StoredResponse;
use crate::state::AppState;

impl Echo {
    /// The response object: every field of the API's shape, named at each
    /// call site.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn object(
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

pub(super) fn usage_json(u: &Usage, reasoning_tokens: u32) -> Value {
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
pub(super) fn reasoning_tokens(state: &AppState, reasoning: &str, usage: &Usage) -> u32 {
    if reasoning.is_empty() {
        return 0;
    }
    (state.engine.model().tokenize(reasoning, false, false).len() as u32)
        .min(usage.completion_tokens)
}

/// Cut short by `max_output_tokens` or the context.
pub(super) fn incomplete(reason: &FinishReason) -> bool {
    Ending::of(reason, false) == Ending::Length
}

pub(super) fn output_text_part(text: &str) -> Value {
    json!({ "type": "output_text", "text": text, "annotations": [], "logprobs": [] })
}

pub(super) fn reasoning_part(text: &str) -> Value {
    json!({ "type": "reasoning_text", "text": text })
}

pub(super) fn reasoning_item(id: &str, text: Option<&str>) -> Value {
    json!({ "id": id, "type": "reasoning", "summary": [], "content": text.map(|t| vec![reasoning_part(t)]).unwrap_or_default() })
}

pub(super) fn message_item(id: &str, text: Option<&str>, status: &str) -> Value {
    json!({
        "id": id, "type": "message", "status": status, "role": "assistant",
        "content": text.map(|t| vec![output_text_part(t)]).unwrap_or_default(),
    })
}

pub(super) fn call_item(id: &str, call: &ToolCall, status: &str) -> Value {
    json!({ "id": id, "type": "function_call", "status": status, "arguments": call.arguments, "call_id": call.id, "name": call.name })
}

/// A whole reply's output items: reasoning, the message, the calls.
pub(super) fn output_items(out: &Output, cut_short: bool) -> Vec<Value> {
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
pub(super) fn assistant_turn(out: &Output) -> ChatMessage {
    ChatMessage {
        role: Role::Assistant,
        content: out.text.clone(),
        reasoning: (!out.reasoning.is_empty()).then(|| out.reasoning.clone()),
        tool_calls: out.calls.clone(),
        ..Default::default()
    }
}

/// Keep a finished response, when the request allows it.
pub(super) fn store(
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
