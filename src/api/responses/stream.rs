//! The official stream of typed Responses events, with sequence numbers:
//! output items opened, filled and closed as the reply is read.

use std::sync::Arc;

use axum::response::sse::Event as SseEvent;
use serde_json::{json, Value};

use super::output::*;
use super::request::*;
use crate::api::error::{ApiError, ErrorKind, Protocol};
use crate::api::new_id;
use crate::api::reply::{Ended, Logprobs, Wire};
use crate::api::sse;
use crate::chat::output::OutputEvent;
use crate::chat::{ChatMessage, ToolCall};
use crate::engine::Usage;
use crate::state::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Reasoning,
    Message,
    Call,
}

/// The output item being streamed.
pub(super) struct OpenItem {
    pub(super) kind: Kind,
    pub(super) id: String,
    pub(super) index: usize,
    /// Its text, reasoning or arguments so far.
    pub(super) text: String,
    pub(super) call: Option<ToolCall>,
}

/// Output events to the official stream of item events.
#[derive(Default)]
pub(super) struct Items {
    pub(super) seq: u64,
    pub(super) done: Vec<Value>,
    pub(super) open: Option<OpenItem>,
    /// Whitespace between items, held until text follows it.
    pub(super) held: String,
    pub(super) events: Vec<SseEvent>,
}

impl Items {
    pub(super) fn emit(&mut self, kind: &str, fields: Value) {
        let event = self.event(kind, fields);
        self.events.push(event);
    }

    /// One event with the next sequence number.
    pub(super) fn event(&mut self, kind: &str, fields: Value) -> SseEvent {
        let mut body = json!({ "type": kind, "sequence_number": self.seq });
        if let (Some(b), Value::Object(f)) = (body.as_object_mut(), fields) {
            b.extend(f);
        }
        self.seq += 1;
        sse::named(kind, &body)
    }

    pub(super) fn take(&mut self) -> Vec<SseEvent> {
        std::mem::take(&mut self.events)
    }

    pub(super) fn start(&mut self, kind: Kind, call: Option<ToolCall>) {
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
    pub(super) fn close(&mut self, status: &str) {
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

    pub(super) fn feed(&mut self, ev: OutputEvent) {
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
    pub(super) fn finish(&mut self, cut_short: bool) {
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
pub(super) struct ResponseEvents {
    pub(super) id: String,
    pub(super) created_at: u64,
    pub(super) echo: Echo,
    pub(super) items: Items,
    /// The conversation to store, before this reply.
    pub(super) conversation: Vec<ChatMessage>,
    pub(super) state: Arc<AppState>,
}

impl ResponseEvents {
    /// The response object while it is being generated: no output yet.
    fn in_progress(&self) -> Value {
        self.echo.object(
            &self.id,
            self.created_at,
            "in_progress",
            vec![],
            Value::Null,
            Value::Null,
            Value::Null,
        )
    }

    /// End the response as failed, with the error in the Responses shape.
    pub(super) fn fail(&mut self, api: ApiError) {
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
        let object = self.in_progress();
        self.items
            .emit("response.created", json!({ "response": object }));
        self.items
            .emit("response.in_progress", json!({ "response": object }));
        self.items.take()
    }

    /// `response.in_progress` again: a comment would keep the connection
    /// open, but Codex's stream idle timer (and any client that times out
    /// on events) counts only events, and this one every client already
    /// reads (the SDKs check its id and keep their snapshot).
    fn heartbeat(&mut self) -> SseEvent {
        let object = self.in_progress();
        self.items
            .event("response.in_progress", json!({ "response": object }))
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
