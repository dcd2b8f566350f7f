//! A [`ChatRequest`] to prompt tokens: history checks, exact replay, tools
//! through the template or the fallback convention, rendering, safe
//! tokenization, and how to read and constrain the reply.
//!
//! Safe tokenization: the rendered prompt is tokenized with special-token
//! parsing on, because the template's markup (`<|im_start|>`) must become
//! control tokens. Client text must not: a user who types `<|im_end|>` means
//! those characters. Before rendering, every control-token text found in a
//! client string is swapped for a random ASCII sentinel (ASCII, so `tojson`
//! and `trim` leave it alone); after rendering, the prompt is tokenized in
//! pieces, each sentinel as the plain text it stands for. Requests without
//! such text take the single-call fast path.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::grammar::{self, SchemaError};
use super::output::OutputSpec;
use super::reasoning::{detect_markers, prompt_opens_reasoning};
use super::replay::ReplayStore;
use super::template::{ChatTemplate, RenderOptions, TemplateError};
use super::tools::{fallback_system_prompt, fallback_tool_result, ToolFormat, ToolSpec};
use super::{ChatMessage, ChatRequest, Role, Thinking, ToolChoice};
use crate::engine::{Grammar, Model, ReasoningBudget, Token};

/// Why a request cannot be turned into a prompt: all the client's doing.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// Something wrong with message `index` of the history.
    #[error("{message}")]
    History { index: usize, message: String },
    /// A tool named by `tool_choice` is not among the tools.
    #[error("{0}")]
    ToolChoice(String),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Template(#[from] TemplateError),
}

/// The control-token texts of a vocabulary, indexed for scanning client text.
pub struct SpecialTexts {
    by_first: HashMap<u8, Vec<String>>,
}

impl SpecialTexts {
    pub fn new(texts: Vec<String>) -> Self {
        let mut by_first: HashMap<u8, Vec<String>> = HashMap::new();
        for t in texts {
            if let Some(&b) = t.as_bytes().first() {
                by_first.entry(b).or_default().push(t);
            }
        }
        for v in by_first.values_mut() {
            // Longest first, so `<|im_end|>` wins over a shorter `<|im`.
            v.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
            v.dedup();
        }
        SpecialTexts { by_first }
    }

    /// The first control-token text in `s` at or after `from`: (start, text).
    fn find(&self, s: &str, from: usize) -> Option<(usize, &str)> {
        let bytes = s.as_bytes();
        for i in from..bytes.len() {
            if let Some(cands) = self.by_first.get(&bytes[i]) {
                if let Some(t) = cands.iter().find(|t| bytes[i..].starts_with(t.as_bytes())) {
                    return Some((i, t));
                }
            }
        }
        None
    }

    pub fn contains_any(&self, s: &str) -> bool {
        self.find(s, 0).is_some()
    }
}

/// Swaps control-token texts in client strings for sentinels.
struct Protector<'a> {
    specials: &'a SpecialTexts,
    nonce: String,
    literals: Vec<String>,
}

impl Protector<'_> {
    fn sentinel(&self, i: usize) -> String {
        format!("HEARTHLIT{}N{i}Z", self.nonce)
    }

    fn protect(&mut self, s: &str) -> String {
        let Some((first, _)) = self.specials.find(s, 0) else { return s.to_string() };
        let mut out = String::with_capacity(s.len() + 32);
        let mut at = 0;
        let mut next = Some(first);
        while let Some(start) = next {
            let (_, text) = self.specials.find(s, start).expect("found before");
            let text = text.to_string();
            out.push_str(&s[at..start]);
            out.push_str(&self.sentinel(self.literals.len()));
            self.literals.push(text.clone());
            at = start + text.len();
            next = self.specials.find(s, at).map(|(i, _)| i);
        }
        out.push_str(&s[at..]);
        out
    }

    fn protect_value(&mut self, v: &mut Value) {
        match v {
            Value::String(s) => *s = self.protect(s),
            Value::Array(a) => a.iter_mut().for_each(|x| self.protect_value(x)),
            Value::Object(o) => o.values_mut().for_each(|x| self.protect_value(x)),
            _ => {}
        }
    }
}

/// What the prompt builder needs from the server.
pub struct PromptSetup<'a> {
    pub template: &'a ChatTemplate,
    pub format: ToolFormat,
    pub model: &'a Model,
    pub specials: &'a SpecialTexts,
    pub replay: &'a ReplayStore,
}

/// A request ready for the engine.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The rendered prompt, sentinels resolved.
    pub text: String,
    pub tokens: Vec<Token>,
    /// False when client text held control-token texts: the tokens then do
    /// not follow from tokenizing `text`, so the engine must not match by text.
    pub text_exact: bool,
    pub output: OutputSpec,
    pub grammar: Option<Grammar>,
    pub reasoning_budget: Option<ReasoningBudget>,
    /// Stop sequences the format needs (the fallback template's `\nUser:`).
    pub stops: Vec<String>,
}

/// Check the history's tool calls and results; fill in each result's
/// function name from its call.
fn check_history(messages: &mut [ChatMessage]) -> Result<(), PromptError> {
    let mut names: HashMap<String, String> = HashMap::new();
    for (index, m) in messages.iter_mut().enumerate() {
        match m.role {
            Role::Assistant => {
                for c in &m.tool_calls {
                    match serde_json::from_str::<Value>(&c.arguments) {
                        Ok(Value::Object(_)) => {}
                        _ => {
                            return Err(PromptError::History {
                                index,
                                message: format!(
                                    "the arguments of tool call `{}` must be a JSON object, got {:?}",
                                    c.id,
                                    truncate(&c.arguments, 80)
                                ),
                            })
                        }
                    }
                    if c.name.is_empty() {
                        return Err(PromptError::History { index, message: format!("tool call `{}` has no function name", c.id) });
                    }
                    names.insert(c.id.clone(), c.name.clone());
                }
            }
            Role::Tool => {
                let id = m.tool_call_id.clone().unwrap_or_default();
                match names.get(&id) {
                    Some(name) => {
                        if m.name.is_none() {
                            m.name = Some(name.clone());
                        }
                    }
                    None => {
                        return Err(PromptError::History {
                            index,
                            message: format!("tool result for `{id}`, but no earlier assistant message made a tool call with that id"),
                        })
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// OpenAI function objects, what templates expect in `tools`.
fn tool_values(tools: &[ToolSpec]) -> Vec<Value> {
    tools
        .iter()
        .map(|t| {
            json!({
                "type": "function",
                "function": { "name": t.name, "description": t.description, "parameters": t.parameters },
            })
        })
        .collect()
}

/// Tools and tool turns in hearth's fallback convention, for templates that
/// cannot express them: the tools in the system message, calls as Hermes
/// markup in the assistant's text, results as user turns.
fn to_fallback(messages: Vec<ChatMessage>, tools: &[ToolSpec], format: ToolFormat) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if !tools.is_empty() {
        let prompt = fallback_system_prompt(tools);
        match messages.first() {
            Some(m) if m.role == Role::System => {}
            _ => out.push(ChatMessage::new(Role::System, prompt.clone())),
        }
    }
    let mut first = true;
    for m in messages {
        let was_first = std::mem::replace(&mut first, false);
        match m.role {
            Role::System if was_first && !tools.is_empty() => {
                let content = if m.content.is_empty() {
                    fallback_system_prompt(tools)
                } else {
                    format!("{}\n\n{}", m.content, fallback_system_prompt(tools))
                };
                out.push(ChatMessage::new(Role::System, content));
            }
            Role::Assistant if !m.tool_calls.is_empty() => {
                let mut content = m.content.clone();
                for c in &m.tool_calls {
                    if !content.is_empty() {
                        content.push('\n');
                    }
                    content.push_str(&format.render_call(&c.name, &c.arguments));
                }
                out.push(ChatMessage::new(Role::Assistant, content));
            }
            Role::Tool => {
                let text = fallback_tool_result(m.name.as_deref().unwrap_or(""), &m.content);
                match out.last_mut() {
                    // Results of one turn's calls go back together.
                    Some(prev) if prev.role == Role::User && prev.content.ends_with("</tool_response>") => {
                        prev.content.push('\n');
                        prev.content.push_str(&text);
                    }
                    _ => out.push(ChatMessage::new(Role::User, text)),
                }
            }
            _ => out.push(ChatMessage { reasoning: None, ..m }),
        }
    }
    out
}

/// A system message after the conversation started.
fn has_late_system(messages: &[ChatMessage]) -> bool {
    messages.iter().skip_while(|m| m.role == Role::System).any(|m| m.role == Role::System)
}

/// Late system messages become part of the next user turn (or a user turn
/// of their own at the end), marked as system text.
fn fold_late_system(messages: Vec<ChatMessage>) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    let mut pending: Vec<String> = Vec::new();
    let mut started = false;
    for m in messages {
        match m.role {
            Role::System if started => pending.push(m.content),
            Role::User if !pending.is_empty() => {
                let mut text: String = pending.drain(..).map(|p| format!("<system>\n{p}\n</system>\n\n")).collect();
                text.push_str(&m.content);
                out.push(ChatMessage { content: text, ..m });
            }
            _ => {
                started |= m.role != Role::System;
                out.push(m);
            }
        }
        if out.last().is_some_and(|m| m.role != Role::System) {
            started = true;
        }
    }
    if !pending.is_empty() {
        let text: String = pending.drain(..).map(|p| format!("<system>\n{p}\n</system>")).collect::<Vec<_>>().join("\n\n");
        out.push(ChatMessage::new(Role::User, text));
    }
    out
}

/// Build the prompt for `req`.
pub fn prepare(setup: &PromptSetup<'_>, req: ChatRequest) -> Result<Prepared, PromptError> {
    let ChatRequest { mut messages, tools, tool_choice, parallel_tool_calls, response_format, thinking } = req;
    check_history(&mut messages)?;
    if let ToolChoice::Named(name) = &tool_choice {
        if !tools.iter().any(|t| &t.name == name) {
            return Err(PromptError::ToolChoice(format!("tool_choice names `{name}`, which is not among the tools")));
        }
    }
    if matches!(tool_choice, ToolChoice::Required | ToolChoice::Named(_)) && tools.is_empty() {
        return Err(PromptError::ToolChoice("tool_choice requires a tool call, but no tools were given".into()));
    }

    let template = setup.template;
    let native = template.handles_tools() && setup.format != ToolFormat::Fallback;
    let format = if native { setup.format } else { ToolFormat::Fallback };
    let markers = if template.is_fallback() { None } else { detect_markers(template.source()) };

    // Safe text: protect client strings before anything is added around them.
    let needs_protection = messages.iter().any(|m| {
        setup.specials.contains_any(&m.content)
            || m.reasoning.as_deref().is_some_and(|r| setup.specials.contains_any(r))
            || m.tool_calls.iter().any(|c| setup.specials.contains_any(&c.arguments) || setup.specials.contains_any(&c.name))
    }) || tools.iter().any(|t| {
        setup.specials.contains_any(&t.name)
            || setup.specials.contains_any(&t.description)
            || setup.specials.contains_any(&t.parameters.to_string())
    });
    let mut protector = Protector { specials: setup.specials, nonce: nonce(), literals: Vec::new() };

    // Exact replay of past calls, then protection of what the client wrote.
    let mut rendered_msgs = Vec::with_capacity(messages.len());
    for mut m in messages {
        if m.role == Role::Assistant && !m.tool_calls.is_empty() {
            if let Some(raw) = setup.replay.lookup(m.tool_calls.iter().map(|c| c.id.as_str())) {
                // The model's own bytes: trusted, never protected.
                rendered_msgs.push(ChatMessage { content: raw.to_string(), tool_calls: vec![], reasoning: None, ..m });
                continue;
            }
        }
        if needs_protection {
            m.content = protector.protect(&m.content);
            m.reasoning = m.reasoning.map(|r| protector.protect(&r));
            for c in &mut m.tool_calls {
                c.arguments = protector.protect(&c.arguments);
            }
        }
        rendered_msgs.push(m);
    }
    let mut tool_specs = tools.clone();
    if needs_protection {
        for t in &mut tool_specs {
            t.description = protector.protect(&t.description);
            protector.protect_value(&mut t.parameters);
        }
    }

    let has_tool_turns = rendered_msgs.iter().any(|m| m.role == Role::Tool || !m.tool_calls.is_empty());
    let forced = matches!(tool_choice, ToolChoice::Required | ToolChoice::Named(_))
        || (response_format.is_some() && (tools.is_empty() || tool_choice == ToolChoice::None));
    // A forced grammar leaves no room for a thinking block: turn thinking
    // off unless the client asked for it.
    let enable_thinking = match thinking {
        Thinking::Off => Some(false),
        Thinking::On { .. } => Some(true),
        Thinking::Default if forced && markers.is_some() => Some(false),
        Thinking::Default => None,
    };
    let mut opts = RenderOptions { add_generation_prompt: true, enable_thinking, ..Default::default() };
    if native {
        if !tool_specs.is_empty() {
            opts.tools = Some(tool_values(&tool_specs));
        }
    } else if !tool_specs.is_empty() || has_tool_turns {
        rendered_msgs = to_fallback(rendered_msgs, &tool_specs, format);
    }
    let rendered = match template.render_with(&rendered_msgs, &opts) {
        // Many templates allow a system message only first; clients (Claude
        // Code) also send them between turns. Fold those into the user turn
        // that follows and try again.
        Err(TemplateError::Render(_)) if has_late_system(&rendered_msgs) => {
            template.render_with(&fold_late_system(rendered_msgs), &opts)?
        }
        other => other?,
    };

    let (text, tokens) = if protector.literals.is_empty() {
        let tokens = tokenize_rendered(setup.model, &rendered);
        (rendered, tokens)
    } else {
        resolve_sentinels(setup.model, &rendered, &protector)
    };

    // How to read the reply.
    let reasoning = markers.as_ref().map(|(open, close, _)| {
        let opened = prompt_opens_reasoning(&text, open, close);
        (open.clone(), close.clone(), opened)
    });
    let parse_tools = !tools.is_empty() && tool_choice != ToolChoice::None;
    let output = OutputSpec { reasoning: reasoning.clone(), tools: parse_tools.then_some(format) };

    // How to constrain it.
    let mut grammar = None;
    if parse_tools {
        let offered: Vec<&ToolSpec> = match &tool_choice {
            ToolChoice::Named(name) => tools.iter().filter(|t| &t.name == name).collect(),
            _ => tools.iter().collect(),
        };
        // A forced choice is met by one call, and a small model made to
        // call may repeat it until `max_tokens`: forced grammars end after
        // one call. When the model chose to call (`auto`), it may make as
        // many as `parallel_tool_calls` allows.
        let parallel = parallel_tool_calls && !forced;
        if let Some(gbnf) = grammar::tool_calls(format, &offered, parallel)? {
            grammar = Some(if forced {
                Grammar { gbnf, triggers: vec![] }
            } else {
                Grammar { gbnf, triggers: vec![format.call_opener().to_string()] }
            });
        }
    } else if let Some(rf) = &response_format {
        grammar = Some(Grammar { gbnf: grammar::response(rf)?, triggers: vec![] });
    }
    // A prompt that ends inside reasoning: the constraint starts after it.
    if let (Some(g), Some((_, close, true))) = (&mut grammar, &reasoning) {
        if g.triggers.is_empty() {
            g.gbnf = grammar::after_marker(&g.gbnf, close);
            g.triggers = vec![close.clone()];
        }
    }

    let reasoning_budget = match (thinking, &reasoning) {
        (Thinking::On { budget: Some(b) }, Some((_, close, _))) => Some(ReasoningBudget { max_tokens: b, close: close.clone() }),
        _ => None,
    };
    Ok(Prepared {
        text,
        tokens,
        text_exact: protector.literals.is_empty(),
        output,
        grammar,
        reasoning_budget,
        stops: template.fallback_stops().to_vec(),
    })
}

/// Tokenize a rendered prompt: markup becomes special tokens; BOS is added
/// when the model wants one and the template did not write it.
pub fn tokenize_rendered(model: &Model, text: &str) -> Vec<Token> {
    let bos = model.bos_text();
    let add_bos = model.adds_bos() && (bos.is_empty() || !text.starts_with(&bos));
    model.tokenize(text, add_bos, true)
}

/// Tokenize a prompt holding sentinels: markup between them as usual, each
/// sentinel as its literal text with special-token parsing off. Returns the
/// text with the literals put back, and the tokens.
fn resolve_sentinels(model: &Model, rendered: &str, p: &Protector<'_>) -> (String, Vec<Token>) {
    let head = format!("HEARTHLIT{}N", p.nonce);
    let mut text = String::with_capacity(rendered.len());
    let mut tokens = Vec::new();
    let mut rest = rendered;
    let mut first = true;
    let segment = |seg: &str, tokens: &mut Vec<Token>, first: &mut bool| {
        if seg.is_empty() {
            return;
        }
        if std::mem::replace(first, false) {
            tokens.extend(tokenize_rendered(model, seg));
        } else {
            tokens.extend(model.tokenize(seg, false, true));
        }
    };
    while let Some(at) = rest.find(&head) {
        let after = &rest[at + head.len()..];
        let Some(z) = after.find('Z') else { break };
        let Ok(i) = after[..z].parse::<usize>() else { break };
        let Some(lit) = p.literals.get(i) else { break };
        segment(&rest[..at], &mut tokens, &mut first);
        text.push_str(&rest[..at]);
        if first {
            first = false;
            if model.adds_bos() {
                tokens.extend(model.bos());
            }
        }
        tokens.extend(model.tokenize(lit, false, false));
        text.push_str(lit);
        rest = &after[z + 1..];
    }
    segment(rest, &mut tokens, &mut first);
    text.push_str(rest);
    (text, tokens)
}

fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ToolCall;

    fn specials() -> SpecialTexts {
        SpecialTexts::new(vec!["<|im_end|>".into(), "<|im_start|>".into(), "<｜end▁of▁sentence｜>".into()])
    }

    #[test]
    fn protects_every_occurrence() {
        let s = specials();
        let mut p = Protector { specials: &s, nonce: "X".into(), literals: vec![] };
        let out = p.protect("a<|im_end|>b<|im_start|><｜end▁of▁sentence｜>");
        assert_eq!(out, "aHEARTHLITXN0ZbHEARTHLITXN1ZHEARTHLITXN2Z");
        assert_eq!(p.literals, vec!["<|im_end|>", "<|im_start|>", "<｜end▁of▁sentence｜>"]);
        assert_eq!(p.protect("plain"), "plain");
        assert!(!s.contains_any("<|im_en"));
    }

    #[test]
    fn late_system_messages_fold_into_the_next_user_turn() {
        let msgs = vec![
            ChatMessage::new(Role::System, "rules"),
            ChatMessage::new(Role::User, "hi"),
            ChatMessage::new(Role::System, "agents: a, b"),
            ChatMessage::new(Role::Assistant, "ok"),
            ChatMessage::new(Role::User, "go"),
            ChatMessage::new(Role::System, "last"),
        ];
        assert!(has_late_system(&msgs));
        let out = fold_late_system(msgs);
        let roles: Vec<Role> = out.iter().map(|m| m.role).collect();
        assert_eq!(roles, vec![Role::System, Role::User, Role::Assistant, Role::User, Role::User]);
        assert_eq!(out[2].content, "ok");
        assert_eq!(out[3].content, "<system>\nagents: a, b\n</system>\n\ngo");
        assert_eq!(out[4].content, "<system>\nlast\n</system>");
        assert!(!has_late_system(&out));
    }

    #[test]
    fn history_checks() {
        let call = ToolCall { id: "c1".into(), name: "f".into(), arguments: "{\"a\":1}".into() };
        let mut ok = vec![
            ChatMessage::new(Role::User, "hi"),
            ChatMessage { role: Role::Assistant, tool_calls: vec![call.clone()], ..Default::default() },
            ChatMessage::tool_result("c1", None, "42"),
        ];
        check_history(&mut ok).unwrap();
        assert_eq!(ok[2].name.as_deref(), Some("f"));

        let mut unknown = vec![ChatMessage::new(Role::User, "hi"), ChatMessage::tool_result("nope", None, "42")];
        assert!(matches!(check_history(&mut unknown), Err(PromptError::History { index: 1, .. })));

        let bad = ToolCall { arguments: "{not json".into(), ..call };
        let mut bad = vec![ChatMessage { role: Role::Assistant, tool_calls: vec![bad], ..Default::default() }];
        assert!(matches!(check_history(&mut bad), Err(PromptError::History { index: 0, .. })));
    }

    #[test]
    fn fallback_puts_tools_in_the_system_message_and_results_in_user_turns() {
        let tools = vec![ToolSpec { name: "get".into(), description: "d".into(), parameters: json!({"type": "object"}) }];
        let call = ToolCall { id: "c1".into(), name: "get".into(), arguments: "{}".into() };
        let msgs = vec![
            ChatMessage::new(Role::System, "be brief"),
            ChatMessage::new(Role::User, "go"),
            ChatMessage { role: Role::Assistant, tool_calls: vec![call], ..Default::default() },
            ChatMessage::tool_result("c1", Some("get".into()), "r1"),
            ChatMessage::tool_result("c1", Some("get".into()), "r2"),
        ];
        let out = to_fallback(msgs, &tools, ToolFormat::Fallback);
        assert_eq!(out.len(), 4);
        assert!(out[0].content.starts_with("be brief\n\n# Tools"));
        assert!(out[2].content.contains("<tool_call>\n{\"name\": \"get\", \"arguments\": {}}\n</tool_call>"));
        assert_eq!(out[3].role, Role::User);
        assert_eq!(out[3].content.matches("<tool_response>").count(), 2);
    }
}
