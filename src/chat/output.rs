//! Generated text to structure, as it streams: reasoning first (split at
//! the template's thinking markers), then tool calls (the format's
//! incremental parser), and whatever is left is the visible answer.
//!
//! Every API adapter feeds the engine's `Text` events into one
//! [`OutputParser`] and turns its [`OutputEvent`]s into its own wire events;
//! non-streaming handlers read the [`Output`] summary at the end.

use super::reasoning::{ReasoningMarkers, ReasoningPiece, ReasoningSplitter};
use super::tools::{ToolEvent, ToolFormat, ToolParser};
use super::ToolCall;

/// One piece of structured output, in generation order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputEvent {
    Reasoning(String),
    Text(String),
    /// A call begins; `id` is fresh, in the protocol's style.
    CallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// A fragment of the call's arguments JSON; a call's fragments
    /// concatenate to its full arguments.
    CallArgs {
        index: usize,
        fragment: String,
    },
    CallEnd {
        index: usize,
    },
}

/// How to read one reply: decided by `prompt::prepare` from the template
/// and the request.
#[derive(Debug, Clone, Default)]
pub struct OutputSpec {
    /// The reasoning markers, and whether the prompt already opened the
    /// reasoning.
    pub reasoning: Option<ReasoningMarkers>,
    /// Parse tool calls in this format (tools offered, choice not `none`).
    pub tools: Option<ToolFormat>,
    /// What the prompt wrote of the reply before generation began (the
    /// opened reasoning, `<think>\n`): part of the reply when it is
    /// replayed, though not generated.
    pub replay_prefix: String,
}

/// Everything one reply said, gathered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    pub text: String,
    pub reasoning: String,
    pub calls: Vec<ToolCall>,
    /// The reply exactly as the prompt and the model wrote it, for exact
    /// replay: [`OutputSpec::replay_prefix`], then the generated text.
    pub raw: String,
}

/// The incremental reader of one reply.
pub struct OutputParser {
    splitter: Option<ReasoningSplitter>,
    tools: Option<Box<dyn ToolParser>>,
    id_prefix: &'static str,
    out: Output,
}

impl OutputParser {
    /// `id_prefix` names the calls: `call_` (OpenAI chat and Responses),
    /// `toolu_` (Anthropic).
    pub fn new(spec: &OutputSpec, id_prefix: &'static str) -> Self {
        OutputParser {
            splitter: spec.reasoning.as_ref().map(|m| {
                ReasoningSplitter::new(m.open.clone(), m.close.clone(), m.opened_by_prompt)
            }),
            tools: spec.tools.map(ToolFormat::parser),
            id_prefix,
            out: Output {
                raw: spec.replay_prefix.clone(),
                ..Output::default()
            },
        }
    }

    /// Feed newly generated text; returns what is certain now.
    pub fn push(&mut self, text: &str) -> Vec<OutputEvent> {
        self.out.raw.push_str(text);
        let pieces = match &mut self.splitter {
            Some(s) => s.push(text),
            None => vec![ReasoningPiece::Content(text.to_string())],
        };
        self.route(pieces, false)
    }

    /// Generation ended: flush everything held.
    pub fn finish(&mut self) -> Vec<OutputEvent> {
        let pieces = match &mut self.splitter {
            Some(s) => s.finish(),
            None => vec![],
        };
        self.route(pieces, true)
    }

    /// What the reply said so far (all of it after [`finish`](Self::finish)).
    pub fn output(&self) -> &Output {
        &self.out
    }

    pub fn into_output(self) -> Output {
        self.out
    }

    fn route(&mut self, pieces: Vec<ReasoningPiece>, last: bool) -> Vec<OutputEvent> {
        let mut events = Vec::new();
        for piece in pieces {
            match piece {
                ReasoningPiece::Reasoning(r) if !r.is_empty() => {
                    self.out.reasoning.push_str(&r);
                    events.push(OutputEvent::Reasoning(r));
                }
                ReasoningPiece::Content(c) if !c.is_empty() => match &mut self.tools {
                    Some(p) => {
                        let tool_events = p.push(&c);
                        self.take_tool_events(tool_events, &mut events);
                    }
                    None => {
                        self.out.text.push_str(&c);
                        events.push(OutputEvent::Text(c));
                    }
                },
                _ => {}
            }
        }
        if last {
            if let Some(p) = &mut self.tools {
                let tool_events = p.finish();
                self.take_tool_events(tool_events, &mut events);
            }
        }
        events
    }

    fn take_tool_events(&mut self, tool_events: Vec<ToolEvent>, events: &mut Vec<OutputEvent>) {
        for ev in tool_events {
            match ev {
                ToolEvent::Text(t) => {
                    if t.is_empty() {
                        continue;
                    }
                    self.out.text.push_str(&t);
                    events.push(OutputEvent::Text(t));
                }
                ToolEvent::CallStart { index, name } => {
                    let id = format!(
                        "{}{}",
                        self.id_prefix,
                        &uuid::Uuid::new_v4().simple().to_string()[..24]
                    );
                    self.out.calls.push(ToolCall {
                        id: id.clone(),
                        name: name.clone(),
                        arguments: String::new(),
                    });
                    events.push(OutputEvent::CallStart { index, id, name });
                }
                ToolEvent::CallArgs { index, fragment } => {
                    if let Some(c) = self.out.calls.get_mut(index) {
                        c.arguments.push_str(&fragment);
                    }
                    events.push(OutputEvent::CallArgs { index, fragment });
                }
                ToolEvent::CallEnd { index } => events.push(OutputEvent::CallEnd { index }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(spec: &OutputSpec, pieces: &[&str]) -> (Vec<OutputEvent>, Output) {
        let mut p = OutputParser::new(spec, "call_");
        let mut ev = Vec::new();
        for piece in pieces {
            ev.extend(p.push(piece));
        }
        ev.extend(p.finish());
        (ev, p.into_output())
    }

    #[test]
    fn plain_text_passes_through() {
        let (ev, out) = run(&OutputSpec::default(), &["Hel", "lo"]);
        assert_eq!(
            ev,
            vec![
                OutputEvent::Text("Hel".into()),
                OutputEvent::Text("lo".into())
            ]
        );
        assert_eq!(out.text, "Hello");
        assert_eq!(out.raw, "Hello");
    }

    #[test]
    fn reasoning_then_a_call() {
        let spec = OutputSpec {
            reasoning: Some(ReasoningMarkers::new("<think>", "</think>", false)),
            tools: Some(ToolFormat::Hermes),
            replay_prefix: String::new(),
        };
        let raw = "<think>\nneed weather\n</think>\n\n<tool_call>\n{\"name\": \"get\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let chars: Vec<String> = raw.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        let (ev, out) = run(&spec, &pieces);
        assert_eq!(out.reasoning, "need weather");
        assert_eq!(out.text, "");
        assert_eq!(out.calls.len(), 1);
        assert_eq!(out.calls[0].name, "get");
        assert!(out.calls[0].id.starts_with("call_"));
        let args: serde_json::Value = serde_json::from_str(&out.calls[0].arguments).unwrap();
        assert_eq!(args, serde_json::json!({"city": "Paris"}));
        assert_eq!(out.raw, raw);
        assert!(matches!(ev.last(), Some(OutputEvent::CallEnd { index: 0 })));
    }

    #[test]
    fn a_prompt_opened_reasoning_is_part_of_the_replayed_reply() {
        let spec = OutputSpec {
            reasoning: Some(ReasoningMarkers::new("<think>", "</think>", true)),
            tools: Some(ToolFormat::Hermes),
            replay_prefix: "<think>\n".into(),
        };
        let raw =
            "hmm\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>";
        let (_, out) = run(&spec, &[raw]);
        assert_eq!(out.reasoning, "hmm");
        assert_eq!(out.calls.len(), 1);
        assert_eq!(out.raw, format!("<think>\n{raw}"));
    }
}
