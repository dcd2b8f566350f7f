//! Grammars that make a small model's structured output valid by
//! construction: tool calls in the model's own markup with arguments that
//! match each tool's JSON Schema, and JSON answers for `response_format`.
//!
//! llama.cpp converts a JSON Schema to GBNF (`engine::grammar`). A tool call
//! is that JSON framed by the format's markup, so the call grammar is built
//! from [`ToolFormat::render_call`] itself: the call is rendered around a
//! placeholder, and the text on either side becomes literal grammar. Each
//! tool's converted grammar gets its rules renamed (`t0-root`, `t0-space`)
//! so several tools live in one grammar.

use std::collections::HashSet;

use serde_json::{json, Value};

use super::tools::{ToolFormat, ToolSpec};
use super::ResponseFormat;
use crate::engine::grammar::json_schema_to_grammar;

/// Why a grammar could not be built: the client's schema is at fault.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SchemaError(pub String);

const ARGS: &str = "\u{0}HEARTH-ARGS\u{0}";

/// The arguments schema as a grammar wants it: an object schema, even when
/// the tool declares no parameters.
fn args_schema(tool: &ToolSpec) -> Value {
    match &tool.parameters {
        Value::Object(o) if o.is_empty() => json!({"type": "object"}),
        Value::Object(o) if !o.contains_key("type") && !o.contains_key("$ref") && !o.contains_key("anyOf") && !o.contains_key("oneOf") => {
            let mut o = o.clone();
            o.insert("type".into(), json!("object"));
            Value::Object(o)
        }
        Value::Null => json!({"type": "object"}),
        other => other.clone(),
    }
}

/// A grammar for tool calls in `format`: one call of one of `tools` (several
/// in a row when `parallel`, for formats that write calls one after
/// another). None when the format has no JSON arguments to constrain
/// (DeepSeek V4 DSML spells arguments as tags).
pub fn tool_calls(format: ToolFormat, tools: &[&ToolSpec], parallel: bool) -> Result<Option<String>, SchemaError> {
    if tools.is_empty() || format == ToolFormat::DeepSeekV4Dsml {
        return Ok(None);
    }
    let mut out = String::new();
    let mut alternatives = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let gbnf = json_schema_to_grammar(&args_schema(tool))
            .map_err(|e| SchemaError(format!("the parameters schema of tool `{}` cannot be used: {e}", tool.name)))?;
        let prefix = format!("t{i}-");
        out.push_str(&prefix_rules(&gbnf, &prefix));
        out.push('\n');
        let rendered = format.render_call(&tool.name, ARGS);
        let (before, after) = rendered.split_once(ARGS).expect("render_call embeds the arguments");
        alternatives.push(format!("{} {prefix}root {}", literal(before), literal(after)));
    }
    out.push_str(&format!("call ::= {}\n", alternatives.join(" | ")));
    let repeats = parallel && matches!(format, ToolFormat::Hermes | ToolFormat::Fallback | ToolFormat::Llama3Json);
    if repeats {
        out.push_str("root ::= call (\"\\n\" call)*\n");
    } else {
        out.push_str("root ::= call\n");
    }
    Ok(Some(out))
}

/// A grammar for a JSON answer.
pub fn response(format: &ResponseFormat) -> Result<String, SchemaError> {
    let schema = match format {
        ResponseFormat::JsonObject => json!({"type": "object"}),
        ResponseFormat::JsonSchema(s) => s.clone(),
    };
    json_schema_to_grammar(&schema).map_err(|e| SchemaError(format!("the JSON schema cannot be used: {e}")))
}

/// Wrap a grammar so it starts at a literal marker (a lazy grammar whose
/// trigger is that marker): `root ::= "marker" space? old-root`.
pub fn after_marker(gbnf: &str, marker: &str) -> String {
    let mut out = prefix_rules(gbnf, "g-");
    out.push_str(&format!("\nroot ::= {} [ \\t\\n]* g-root\n", literal(marker)));
    out
}

/// A GBNF string literal for `s`.
pub fn literal(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Prefix every rule name defined in `gbnf` (definitions and references),
/// leaving literals and character classes alone.
pub fn prefix_rules(gbnf: &str, prefix: &str) -> String {
    let defined: HashSet<&str> = gbnf
        .lines()
        .filter_map(|l| l.split_once("::=").map(|(name, _)| name.trim()))
        .filter(|n| !n.is_empty())
        .collect();
    let mut out = String::with_capacity(gbnf.len() + 64);
    let mut chars = gbnf.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' | '[' => {
                let close = if c == '"' { '"' } else { ']' };
                out.push(c);
                while let Some((_, d)) = chars.next() {
                    out.push(d);
                    if d == '\\' {
                        if let Some((_, e)) = chars.next() {
                            out.push(e);
                        }
                    } else if d == close {
                        break;
                    }
                }
            }
            '#' => {
                // A comment runs to the end of the line.
                out.push(c);
                while let Some(&(_, d)) = chars.peek() {
                    if d == '\n' {
                        break;
                    }
                    out.push(d);
                    chars.next();
                }
            }
            c if c.is_ascii_alphanumeric() || c == '-' || c == '_' => {
                let mut end = i + c.len_utf8();
                while let Some(&(j, d)) = chars.peek() {
                    if d.is_ascii_alphanumeric() || d == '-' || d == '_' {
                        end = j + d.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                let word = &gbnf[i..end];
                if defined.contains(word) {
                    out.push_str(prefix);
                }
                out.push_str(word);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_rules_but_not_literals() {
        let g = "root ::= \"{\" space item \"root\" [a-z\\]root] # root\nspace ::= \" \"?\nitem ::= [0-9]+";
        let p = prefix_rules(g, "t0-");
        assert_eq!(
            p,
            "t0-root ::= \"{\" t0-space t0-item \"root\" [a-z\\]root] # root\nt0-space ::= \" \"?\nt0-item ::= [0-9]+"
        );
    }

    #[test]
    fn literals_escape_markup() {
        assert_eq!(literal("<tool_call>\n{\"a\\"), "\"<tool_call>\\n{\\\"a\\\\\"");
    }
}
