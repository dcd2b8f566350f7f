//! How a reply is constrained: the grammar for tool calls, the response
//! format, or both, and where in the reply it starts to hold.

use super::super::grammar;
use super::super::reasoning::ReasoningMarkers;
use super::super::tools::{ToolFormat, ToolSpec};
use super::super::{ResponseFormat, ToolChoice};
use super::PromptError;
use crate::engine::Grammar;

/// What shapes the reply's grammar.
pub(super) struct Constraint<'a> {
    /// The tools the reply may call and the client's choice, when calls are
    /// parsed (tools given and `tool_choice` not `none`).
    pub tools: Option<(&'a [ToolSpec], &'a ToolChoice)>,
    pub format: ToolFormat,
    /// A call is required from the first token.
    pub forced_call: bool,
    /// Calls after the first one are allowed (the lazy grammar only).
    pub parallel: bool,
    pub response_format: Option<&'a ResponseFormat>,
    /// The model's reasoning markers, with whether the prompt opened them.
    pub reasoning: Option<&'a ReasoningMarkers>,
    pub enable_thinking: Option<bool>,
}

/// The grammar the reply is held to, if any.
pub(super) fn grammar(c: &Constraint<'_>) -> Result<Option<Grammar>, PromptError> {
    let mut grammar = match c.tools {
        Some((tools, choice)) => calls(c, tools, choice)?,
        None => match c.response_format {
            Some(rf) => Some(Grammar {
                gbnf: grammar::response(rf)?,
                triggers: vec![],
            }),
            None => None,
        },
    };
    // A prompt that ends inside reasoning: the constraint starts after it.
    // Thinking asked for, and the model opens its reasoning itself: the
    // constraint allows a reasoning block first.
    match (&mut grammar, c.reasoning) {
        (
            Some(g),
            Some(ReasoningMarkers {
                close,
                opened_by_prompt: true,
                ..
            }),
        ) if g.triggers.is_empty() => {
            g.gbnf = grammar::after_marker(&g.gbnf, close);
            g.triggers = vec![close.clone()];
        }
        (
            Some(g),
            Some(ReasoningMarkers {
                open,
                close,
                opened_by_prompt: false,
            }),
        ) if g.triggers.is_empty() && c.enable_thinking == Some(true) => {
            g.gbnf = grammar::optional_reasoning_first(&g.gbnf, open, close);
        }
        _ => {}
    }
    Ok(grammar)
}

/// The grammar of a reply that may (or must) call `tools`.
fn calls(
    c: &Constraint<'_>,
    tools: &[ToolSpec],
    choice: &ToolChoice,
) -> Result<Option<Grammar>, PromptError> {
    let offered: Vec<&ToolSpec> = match choice {
        ToolChoice::Named(name) => tools.iter().filter(|t| &t.name == name).collect(),
        _ => tools.iter().collect(),
    };
    // A forced choice is met by one call, and a small model made to call
    // may repeat it until `max_tokens`: grammars that hold the reply from
    // its first token (a forced call, calls-or-answer) end after one call.
    // When the model chose to call under the lazy grammar, it may make as
    // many as `parallel_tool_calls` allows.
    let Some(gbnf) = grammar::tool_calls(c.format, &offered, c.parallel)? else {
        return Ok(None);
    };
    let opener = c.format.call_opener();
    Ok(Some(match (c.reasoning, c.response_format) {
        _ if c.forced_call => Grammar {
            gbnf,
            triggers: vec![],
        },
        (_, Some(rf)) => Grammar {
            gbnf: grammar::calls_or_answer(&gbnf, &grammar::response(rf)?),
            triggers: vec![],
        },
        // The model may reason first: calls only after the reasoning.
        (
            Some(ReasoningMarkers {
                open,
                close,
                opened_by_prompt: opened,
            }),
            None,
        ) if c.enable_thinking != Some(false) || *opened => {
            let (gbnf, triggers) =
                grammar::calls_after_reasoning(&gbnf, opener, open, close, *opened);
            Grammar { gbnf, triggers }
        }
        _ => Grammar {
            gbnf,
            triggers: vec![opener.to_string()],
        },
    }))
}
