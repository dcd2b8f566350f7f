//! The Messages event stream: `message_start`, content blocks (thinking
//! with its signature, text, `tool_use`) opened, filled and closed as the
//! reply is read, then `message_delta` and `message_stop`; and the shapes
//! a whole reply shares with it (stop reason, usage).

use axum::response::sse::Event as SseEvent;
use serde_json::{json, Value};

use crate::api::betas;
use crate::api::error::Protocol;
use crate::api::reply::{Ended, Ending, Logprobs, Wire};
use crate::api::sse;
use crate::chat::output::OutputEvent;
use crate::engine::{FinishReason, Usage};

/// Anthropic's `stop_reason` and `stop_sequence`.
pub(super) fn stop_reason(reason: &FinishReason, calls: bool) -> (&'static str, Option<&str>) {
    match Ending::of(reason, calls) {
        Ending::ToolCalls => ("tool_use", None),
        Ending::EndOfTurn => ("end_turn", None),
        Ending::StopSequence(s) => ("stop_sequence", Some(s)),
        Ending::Length => ("max_tokens", None),
    }
}

/// Anthropic counts only uncached prompt tokens as `input_tokens`.
pub(super) fn usage_json(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens - u.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": u.cached_tokens,
        "output_tokens": u.completion_tokens,
    })
}

/// A call's arguments as the `input` object.
pub(super) fn input_object(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({}),
    }
}

/// The kind of content block being streamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Block {
    Thinking,
    Text,
    /// A tool call: its index among the reply's calls.
    ToolUse(usize),
}

/// The wire of the Messages event sequence.
pub(super) struct EventWire {
    pub(super) id: String,
    pub(super) model: String,
    pub(super) input_tokens: u32,
    /// The block being streamed.
    pub(super) open: Option<Block>,
    /// Content blocks started so far (the next block's index).
    pub(super) blocks: u32,
    /// The open thinking block's text, for its signature.
    pub(super) thinking: String,
    /// `thinking.display: omitted`: thinking blocks carry no text deltas.
    pub(super) omit_thinking: bool,
    /// The request sent `context_management`: the reply reports its edits.
    pub(super) context_management: bool,
}

impl EventWire {
    fn start(&mut self, block: Block, content_block: Value, out: &mut Vec<SseEvent>) {
        self.close_block(out);
        out.push(sse::named(
            "content_block_start",
            &json!({ "type": "content_block_start", "index": self.blocks, "content_block": content_block }),
        ));
        self.open = Some(block);
    }

    fn delta(&self, delta: Value, out: &mut Vec<SseEvent>) {
        out.push(sse::named(
            "content_block_delta",
            &json!({ "type": "content_block_delta", "index": self.blocks, "delta": delta }),
        ));
    }

    fn close_block(&mut self, out: &mut Vec<SseEvent>) {
        if let Some(block) = self.open.take() {
            if block == Block::Thinking {
                let sig = betas::signature(&std::mem::take(&mut self.thinking), self.omit_thinking);
                self.delta(json!({ "type": "signature_delta", "signature": sig }), out);
            }
            out.push(sse::named(
                "content_block_stop",
                &json!({ "type": "content_block_stop", "index": self.blocks }),
            ));
            self.blocks += 1;
        }
    }

    fn output_events(&mut self, events: Vec<OutputEvent>, out: &mut Vec<SseEvent>) {
        for ev in events {
            match ev {
                OutputEvent::Reasoning(r) => {
                    if self.open != Some(Block::Thinking) {
                        self.start(
                            Block::Thinking,
                            json!({ "type": "thinking", "thinking": "", "signature": "" }),
                            out,
                        );
                    }
                    self.thinking.push_str(&r);
                    if !self.omit_thinking {
                        self.delta(json!({ "type": "thinking_delta", "thinking": r }), out);
                    }
                }
                OutputEvent::Text(t) => {
                    if self.open != Some(Block::Text) {
                        self.start(Block::Text, json!({ "type": "text", "text": "" }), out);
                    }
                    self.delta(json!({ "type": "text_delta", "text": t }), out);
                }
                OutputEvent::CallStart { index, id, name } => {
                    self.start(
                        Block::ToolUse(index),
                        json!({ "type": "tool_use", "id": id, "name": name, "input": {} }),
                        out,
                    );
                }
                OutputEvent::CallArgs { fragment, .. } => {
                    self.delta(
                        json!({ "type": "input_json_delta", "partial_json": fragment }),
                        out,
                    );
                }
                OutputEvent::CallEnd { .. } => self.close_block(out),
            }
        }
    }
}

impl Wire for EventWire {
    const PROTOCOL: Protocol = Protocol::Anthropic;

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

    fn output(&mut self, pieces: Vec<OutputEvent>, _: &mut Logprobs) -> Vec<SseEvent> {
        let mut out = Vec::new();
        self.output_events(pieces, &mut out);
        out
    }

    fn ending(&mut self, end: Ended<'_>, usage: &Usage) -> Vec<SseEvent> {
        let mut out = Vec::new();
        // A reply with nothing in it still carries one (empty) text block.
        if self.blocks == 0 && self.open.is_none() {
            self.start(Block::Text, json!({ "type": "text", "text": "" }), &mut out);
        }
        self.close_block(&mut out);
        let (reason, stop_sequence) = stop_reason(end.reason, !end.output.calls.is_empty());
        let mut delta = json!({
            "type": "message_delta",
            "delta": { "stop_reason": reason, "stop_sequence": stop_sequence },
            "usage": usage_json(usage),
        });
        if self.context_management {
            delta["context_management"] = betas::context_management_reply();
        }
        out.push(sse::named("message_delta", &delta));
        out.push(sse::named(
            "message_stop",
            &json!({ "type": "message_stop" }),
        ));
        out
    }
}
