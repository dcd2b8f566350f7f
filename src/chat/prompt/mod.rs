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

use super::grammar::SchemaError;
use super::output::{OutputParser, OutputSpec};
use super::reasoning::{detect_markers, prompt_opens_reasoning, ReasoningMarkers};
use super::replay::ReplayStore;
use super::template::{ChatTemplate, RenderOptions, TemplateError};
use super::tools::{fallback_system_prompt, fallback_tool_result, ToolFormat, ToolSpec};
use super::{ChatMessage, ChatRequest, Role, Thinking, ToolChoice};
use crate::engine::{Grammar, Model, ReasoningBudget, Token};

mod constrain;

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
        let Some((first, _)) = self.specials.find(s, 0) else {
            return s.to_string();
        };
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
            // Keys too: a schema's property names are rendered with it.
            Value::Object(o) => {
                *o = std::mem::take(o)
                    .into_iter()
                    .map(|(k, mut x)| {
                        let k = self.protect(&k);
                        self.protect_value(&mut x);
                        (k, x)
                    })
                    .collect();
            }
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

/// Whether `raw`, a reply the model wrote, makes exactly `calls` (names and
/// arguments as JSON values, in order): only then may it stand for them.
fn replay_matches(
    raw: &str,
    calls: &[super::ToolCall],
    format: ToolFormat,
    markers: Option<&ReasoningMarkers>,
) -> bool {
    // A reply replays from the reasoning marker on when the prompt opened it.
    let spec = OutputSpec {
        reasoning: markers.map(|m| ReasoningMarkers {
            opened_by_prompt: false,
            ..m.clone()
        }),
        tools: Some(format),
        replay_prefix: String::new(),
    };
    let mut parser = OutputParser::new(&spec, "call_");
    parser.push(raw);
    parser.finish();
    let made = parser.into_output().calls;
    let value = |s: &str| serde_json::from_str::<Value>(s).ok();
    made.len() == calls.len()
        && made.iter().zip(calls).all(|(a, b)| {
            a.name == b.name
                && value(&a.arguments).is_some()
                && value(&a.arguments) == value(&b.arguments)
        })
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
                        return Err(PromptError::History {
                            index,
                            message: format!("tool call `{}` has no function name", c.id),
                        });
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
fn to_fallback(
    messages: Vec<ChatMessage>,
    tools: &[ToolSpec],
    format: ToolFormat,
) -> Vec<ChatMessage> {
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
                    Some(prev)
                        if prev.role == Role::User
                            && prev.content.ends_with("</tool_response>") =>
                    {
                        prev.content.push('\n');
                        prev.content.push_str(&text);
                    }
                    _ => out.push(ChatMessage::new(Role::User, text)),
                }
            }
            _ => out.push(ChatMessage {
                reasoning: None,
                ..m
            }),
        }
    }
    out
}

/// A system message after the conversation started.
fn has_late_system(messages: &[ChatMessage]) -> bool {
    messages
        .iter()
        .skip_while(|m| m.role == Role::System)
        .any(|m| m.role == Role::System)
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
                let mut text: String = pending
                    .drain(..)
                    .map(|p| format!("<system>\n{p}\n</system>\n\n"))
                    .collect();
                text.push_str(&m.content);
                out.push(ChatMessage { content: text, ..m });
            }
            _ => {
                started |= m.role != Role::System;
                out.push(m);
            }
        }
    }
    if !pending.is_empty() {
        let text: String = pending
            .drain(..)
            .map(|p| format!("<system>\n{p}\n</system>"))
            .collect::<Vec<_>>()
            .join("\n\n");
        out.push(ChatMessage::new(Role::User, text));
    }
    out
}

/// Build the prompt for `req`: check it, make client text safe, render,
/// tokenize, then say how to read the reply and how to constrain it.
pub fn prepare(setup: &PromptSetup<'_>, req: ChatRequest) -> Result<Prepared, PromptError> {
    let ChatRequest {
        mut messages,
        tools,
        tool_choice,
        parallel_tool_calls,
        response_format,
        thinking,
    } = req;
    check_history(&mut messages)?;
    check_tool_choice(&tools, &tool_choice)?;

    let template = setup.template;
    let native = template.handles_tools() && setup.format != ToolFormat::Fallback;
    let format = if native {
        setup.format
    } else {
        ToolFormat::Fallback
    };
    let markers = if template.is_fallback() {
        None
    } else {
        detect_markers(template.source())
    };

    let mut protector = Protector {
        specials: setup.specials,
        nonce: nonce(),
        literals: Vec::new(),
    };
    let (mut rendered_msgs, tool_specs) = safe_messages(
        setup,
        &mut protector,
        messages,
        &tools,
        format,
        markers.as_ref(),
    );

    let has_tool_turns = rendered_msgs
        .iter()
        .any(|m| m.role == Role::Tool || !m.tool_calls.is_empty());
    // A reply held to a grammar from its first token: a forced call, or an
    // answer in the response format (which, with `auto` tools, may also be
    // calls; a forced call leaves the format nothing to shape).
    let forced_call =
        !tools.is_empty() && matches!(tool_choice, ToolChoice::Required | ToolChoice::Named(_));
    let forced = forced_call || response_format.is_some();
    // A forced grammar leaves no room for a thinking block: turn thinking
    // off unless the client asked for it.
    let enable_thinking = match thinking {
        Thinking::Off => Some(false),
        Thinking::On { .. } => Some(true),
        Thinking::Default if forced && markers.is_some() => Some(false),
        Thinking::Default => None,
    };
    let mut opts = RenderOptions {
        add_generation_prompt: true,
        enable_thinking,
        ..Default::default()
    };
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

    let reasoning = markers.as_ref().map(|m| ReasoningMarkers {
        opened_by_prompt: prompt_opens_reasoning(&text, &m.open, &m.close),
        ..m.clone()
    });
    let parse_tools = !tools.is_empty() && tool_choice != ToolChoice::None;
    let output = OutputSpec {
        reasoning: reasoning.clone(),
        tools: parse_tools.then_some(format),
        replay_prefix: replay_prefix(&text, reasoning.as_ref()),
    };
    let grammar = constrain::grammar(&constrain::Constraint {
        tools: parse_tools.then_some((tools.as_slice(), &tool_choice)),
        format,
        forced_call,
        parallel: parallel_tool_calls && !forced_call && response_format.is_none(),
        response_format: response_format.as_ref(),
        reasoning: reasoning.as_ref(),
        enable_thinking,
    })?;
    let reasoning_budget = match (thinking, &reasoning) {
        (Thinking::On { budget: Some(b) }, Some(ReasoningMarkers { close, .. })) => {
            Some(ReasoningBudget {
                max_tokens: b,
                close: close.clone(),
            })
        }
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

/// A `tool_choice` that names a missing tool, or forces a call without tools.
fn check_tool_choice(tools: &[ToolSpec], tool_choice: &ToolChoice) -> Result<(), PromptError> {
    if let ToolChoice::Named(name) = tool_choice {
        if !tools.iter().any(|t| &t.name == name) {
            return Err(PromptError::ToolChoice(format!(
                "tool_choice names `{name}`, which is not among the tools"
            )));
        }
    }
    if matches!(tool_choice, ToolChoice::Required | ToolChoice::Named(_)) && tools.is_empty() {
        return Err(PromptError::ToolChoice(
            "tool_choice requires a tool call, but no tools were given".into(),
        ));
    }
    Ok(())
}

/// The messages and tools as the template will see them: past calls
/// replayed as the model's own bytes where they can be, and every client
/// string that spells a control token swapped for a sentinel.
fn safe_messages(
    setup: &PromptSetup<'_>,
    protector: &mut Protector<'_>,
    messages: Vec<ChatMessage>,
    tools: &[ToolSpec],
    format: ToolFormat,
    markers: Option<&ReasoningMarkers>,
) -> (Vec<ChatMessage>, Vec<ToolSpec>) {
    // Every client string a template may write: names and ids too.
    let has = |s: &Option<String>| s.as_deref().is_some_and(|s| setup.specials.contains_any(s));
    let needs_protection = messages.iter().any(|m| {
        setup.specials.contains_any(&m.content)
            || has(&m.reasoning)
            || has(&m.name)
            || has(&m.tool_call_id)
            || m.tool_calls.iter().any(|c| {
                setup.specials.contains_any(&c.arguments)
                    || setup.specials.contains_any(&c.name)
                    || setup.specials.contains_any(&c.id)
            })
    }) || tools.iter().any(|t| {
        setup.specials.contains_any(&t.name)
            || setup.specials.contains_any(&t.description)
            || setup.specials.contains_any(&t.parameters.to_string())
    });

    let mut out = Vec::with_capacity(messages.len());
    for mut m in messages {
        if m.role == Role::Assistant && !m.tool_calls.is_empty() {
            if let Some(raw) = setup
                .replay
                .lookup(m.tool_calls.iter().map(|c| c.id.as_str()))
            {
                // The model's own bytes, rendered as they are. Not when they
                // spell a control token: the text alone cannot tell a
                // generated control token from the same characters
                // generated as text (a call's arguments copying what a
                // client wrote), and tokenized with markup parsing on they
                // would become control tokens. Those replies are
                // re-rendered from their structure, and protected below.
                // And only when the reply made the very calls the client
                // sends back: a client may have changed them.
                if !setup.specials.contains_any(&raw)
                    && replay_matches(&raw, &m.tool_calls, format, markers)
                {
                    out.push(ChatMessage {
                        content: raw.to_string(),
                        tool_calls: vec![],
                        reasoning: None,
                        ..m
                    });
                    continue;
                }
            }
        }
        if needs_protection {
            m.content = protector.protect(&m.content);
            m.reasoning = m.reasoning.map(|r| protector.protect(&r));
            m.name = m.name.map(|n| protector.protect(&n));
            m.tool_call_id = m.tool_call_id.map(|id| protector.protect(&id));
            for c in &mut m.tool_calls {
                c.id = protector.protect(&c.id);
                c.name = protector.protect(&c.name);
                c.arguments = protector.protect(&c.arguments);
            }
        }
        out.push(m);
    }
    let mut tool_specs = tools.to_vec();
    if needs_protection {
        for t in &mut tool_specs {
            t.description = protector.protect(&t.description);
            protector.protect_value(&mut t.parameters);
        }
    }
    (out, tool_specs)
}

/// A reply that starts inside reasoning the prompt opened is replayed
/// with the prompt's opening (`<think>\n`): the bytes the KV cache holds.
fn replay_prefix(text: &str, reasoning: Option<&ReasoningMarkers>) -> String {
    match reasoning {
        Some(ReasoningMarkers {
            open,
            opened_by_prompt: true,
            ..
        }) => text
            .rfind(open.as_str())
            .map(|at| text[at..].to_string())
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// Tokenize a rendered prompt: markup becomes special tokens; BOS is added
/// when the model wants one and the template did not write it.
pub fn tokenize_rendered(model: &Model, text: &str) -> Vec<Token> {
    let bos = model.bos_text();
    let add_bos = model.adds_bos() && (bos.is_empty() || !text.starts_with(&bos));
    model.tokenize(text, add_bos, true)
}

/// Tokenize a prompt holding sentinels. Returns the text with the literals
/// put back, and its tokens: the control-token texts the template wrote
/// become control tokens; everything between them, the literals included,
/// is tokenized as text in one piece, as it would be if the literals were
/// ordinary words (so `hi <|im_end|>` splits as `hi`, ` <`, ... and not
/// `hi`, ` `, `<`).
fn resolve_sentinels(model: &Model, rendered: &str, p: &Protector<'_>) -> (String, Vec<Token>) {
    let head = format!("HEARTHLIT{}N", p.nonce);
    let mut text = String::with_capacity(rendered.len());
    // Byte ranges of the literals in `text`.
    let mut literals: Vec<(usize, usize)> = Vec::new();
    let mut rest = rendered;
    while let Some(at) = rest.find(&head) {
        let after = &rest[at + head.len()..];
        let Some(z) = after.find('Z') else { break };
        let Ok(i) = after[..z].parse::<usize>() else {
            break;
        };
        let Some(lit) = p.literals.get(i) else { break };
        text.push_str(&rest[..at]);
        literals.push((text.len(), text.len() + lit.len()));
        text.push_str(lit);
        rest = &after[z + 1..];
    }
    text.push_str(rest);

    let mut tokens = Vec::new();
    let bos = model.bos_text();
    let template_wrote_bos =
        !bos.is_empty() && text.starts_with(&bos) && literals.first().is_none_or(|&(s, _)| s != 0);
    if model.adds_bos() && !template_wrote_bos {
        tokens.extend(model.bos());
    }
    let (mut plain_from, mut from) = (0, 0);
    while let Some((at, mark)) = p.specials.find(&text, from) {
        let end = at + mark.len();
        if literals.iter().any(|&(s, e)| at < e && s < end) {
            from = at + 1;
            continue;
        }
        if at > plain_from {
            tokens.extend(model.tokenize(&text[plain_from..at], false, false));
        }
        tokens.extend(model.tokenize(mark, false, true));
        (plain_from, from) = (end, end);
    }
    if plain_from < text.len() {
        tokens.extend(model.tokenize(&text[plain_from..], false, false));
    }
    (text, tokens)
}

fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_uppercase()
}

#[cfg(test)]
mod tests;
