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
        Value::Object(o)
            if !o.contains_key("type")
                && !o.contains_key("$ref")
                && !o.contains_key("anyOf")
                && !o.contains_key("oneOf") =>
        {
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
/// another). None when there are no tools.
pub fn tool_calls(
    format: ToolFormat,
    tools: &[&ToolSpec],
    parallel: bool,
) -> Result<Option<String>, SchemaError> {
    if tools.is_empty() {
        return Ok(None);
    }
    if format == ToolFormat::DeepSeekV4Dsml {
        return dsml_calls(tools, parallel).map(Some);
    }
    let mut out = String::new();
    let mut alternatives = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let gbnf = json_schema_to_grammar(&args_schema(tool)).map_err(|e| {
            SchemaError(format!(
                "the parameters schema of tool `{}` cannot be used: {e}",
                tool.name
            ))
        })?;
        let prefix = format!("t{i}-");
        out.push_str(&prefix_rules(&gbnf, &prefix));
        out.push('\n');
        let rendered = format.render_call(&tool.name, ARGS);
        let (before, after) = rendered
            .split_once(ARGS)
            .expect("render_call embeds the arguments");
        alternatives.push(format!(
            "{} {prefix}root {}",
            literal(before),
            literal(after)
        ));
    }
    out.push_str(&format!("call ::= {}\n", alternatives.join(" | ")));
    let repeats = parallel
        && matches!(
            format,
            ToolFormat::Hermes | ToolFormat::Fallback | ToolFormat::Llama3Json
        );
    if repeats {
        out.push_str("root ::= call (\"\\n\" call)*\n");
    } else {
        out.push_str("root ::= call\n");
    }
    Ok(Some(out))
}

/// DeepSeek V4 DSML calls, whose arguments are parameter tags rather than
/// a JSON object: one tag per property, in the schema's order (required
/// ones always, the others optionally). A string property's value is raw
/// text without DSML markup, any other property's a JSON value matching its own schema (with
/// the root's definitions, so references resolve). A schema without
/// properties allows any parameters. The layout is `dsml::render_call`'s.
fn dsml_calls(tools: &[&ToolSpec], parallel: bool) -> Result<String, SchemaError> {
    use super::tools::dsml::{
        BLOCK_CLOSE, BLOCK_OPEN, INVOKE_CLOSE, INVOKE_OPEN, PARAM_CLOSE, PARAM_OPEN,
    };
    // Raw values hold no DSML markup: `｜DSML｜` is in every tag, the
    // parameter's closing tag too.
    let mut out = text_without("dsml-text", "｜DSML｜");
    out.push_str(&format!(
        "dsml-any ::= {} [^\"\n]+ {} ( \"true\" | \"false\" ) {} dsml-text {}\n",
        literal(&format!("{PARAM_OPEN} name=\"")),
        literal("\" string=\""),
        literal("\">"),
        literal(&format!("{PARAM_CLOSE}\n")),
    ));
    let mut alternatives = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let schema = args_schema(tool);
        let required: HashSet<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut params = Vec::new();
        match schema.get("properties").and_then(Value::as_object) {
            Some(props) if !props.is_empty() => {
                for (k, (key, prop)) in props.iter().enumerate() {
                    let rule = format!("t{i}-p{k}");
                    let open = |string: bool| {
                        literal(&format!("{PARAM_OPEN} name=\"{key}\" string=\"{string}\">"))
                    };
                    let string_enum = prop
                        .get("enum")
                        .and_then(Value::as_array)
                        .filter(|v| v.iter().all(Value::is_string));
                    let value = if let Some(values) = string_enum {
                        // A string enum is still a string: raw text, one of the values.
                        let alts: Vec<String> = values
                            .iter()
                            .filter_map(Value::as_str)
                            .map(literal)
                            .collect();
                        format!("{} ( {} )", open(true), alts.join(" | "))
                    } else if prop.get("type").and_then(Value::as_str) == Some("string") {
                        format!("{} dsml-text", open(true))
                    } else {
                        let mut own = prop.clone();
                        for defs in ["$defs", "definitions"] {
                            if let (Some(d), Some(o)) = (schema.get(defs), own.as_object_mut()) {
                                o.entry(defs).or_insert_with(|| d.clone());
                            }
                        }
                        let gbnf = json_schema_to_grammar(&own).map_err(|e| {
                            SchemaError(format!("the parameters schema of tool `{}` cannot be used (property `{key}`): {e}", tool.name))
                        })?;
                        out.push_str(&prefix_rules(&gbnf, &format!("{rule}-")));
                        out.push('\n');
                        format!("{} {rule}-root", open(false))
                    };
                    out.push_str(&format!(
                        "{rule} ::= {value} {}\n",
                        literal(&format!("{PARAM_CLOSE}\n"))
                    ));
                    params.push(if required.contains(key.as_str()) {
                        rule
                    } else {
                        format!("{rule}?")
                    });
                }
            }
            _ => params.push("dsml-any*".to_string()),
        }
        let head = literal(&format!("{INVOKE_OPEN} name=\"{}\">\n", tool.name));
        out.push_str(&format!(
            "t{i}-call ::= {head} {} {}\n",
            params.join(" "),
            literal(INVOKE_CLOSE)
        ));
        alternatives.push(format!("t{i}-call"));
    }
    out.push_str(&format!("call ::= {}\n", alternatives.join(" | ")));
    let (open, close) = (
        literal(&format!("{BLOCK_OPEN}\n")),
        literal(&format!("\n{BLOCK_CLOSE}")),
    );
    if parallel {
        out.push_str(&format!("root ::= {open} call (\"\\n\" call)* {close}\n"));
    } else {
        out.push_str(&format!("root ::= {open} call {close}\n"));
    }
    Ok(out)
}

/// A grammar for a JSON answer.
pub fn response(format: &ResponseFormat) -> Result<String, SchemaError> {
    let schema = match format {
        ResponseFormat::JsonObject => json!({"type": "object"}),
        ResponseFormat::JsonSchema(s) => s.clone(),
    };
    json_schema_to_grammar(&schema)
        .map_err(|e| SchemaError(format!("the JSON schema cannot be used: {e}")))
}

/// A grammar for a reply that is either tool calls (`calls_gbnf`, as
/// [`tool_calls`] builds it) or a JSON answer (`answer_gbnf`, as
/// [`response`] builds it): an `auto` tool choice with a response format.
pub fn calls_or_answer(calls_gbnf: &str, answer_gbnf: &str) -> String {
    let mut out = prefix_rules(calls_gbnf, "c-");
    out.push('\n');
    out.push_str(&prefix_rules(answer_gbnf, "a-"));
    out.push_str("\nroot ::= c-root | a-root\n");
    out
}

/// Wrap a grammar so it starts at a literal marker (a lazy grammar whose
/// trigger is that marker): `root ::= "marker" space? old-root`.
pub fn after_marker(gbnf: &str, marker: &str) -> String {
    let mut out = prefix_rules(gbnf, "g-");
    out.push_str(&format!(
        "\nroot ::= {} [ \\t\\n]* g-root\n",
        literal(marker)
    ));
    out
}

/// A grammar that may start with a reasoning block (`open`, any text
/// without `close`, `close`) before what `gbnf` holds: a forced grammar
/// for a model asked to think whose prompt does not open the reasoning.
pub fn optional_reasoning_first(gbnf: &str, open: &str, close: &str) -> String {
    let mut out = prefix_rules(gbnf, "g-");
    out.push('\n');
    out.push_str(&text_without("think-text", close));
    out.push_str(&format!(
        "root ::= ({} think-text {} [ \\t\\n]*)? g-root\n",
        literal(open),
        literal(close)
    ));
    out
}

/// The lazy grammar of `auto` tool calls for a model that may reason
/// first. A plain lazy grammar starts at the call opener wherever it shows
/// up, inside the reasoning too: a model that writes `<tool_call>` while
/// thinking would be held to a call there, its call read as reasoning and
/// the reply ended. Here the grammar starts where the reasoning does (the
/// opening marker, or the closing one when the prompt opened the
/// reasoning): the reasoning is any text up to the closing marker, the
/// answer any text without the opener, then the calls (`calls_gbnf`, as
/// [`tool_calls`] builds it). A call made before any reasoning still
/// starts at the opener. The triggers to use come back with the grammar.
pub fn calls_after_reasoning(
    calls_gbnf: &str,
    opener: &str,
    open: &str,
    close: &str,
    prompt_opened: bool,
) -> (String, Vec<String>) {
    let mut out = prefix_rules(calls_gbnf, "g-");
    out.push('\n');
    out.push_str(&text_without("answer-text", opener));
    out.push_str("answer ::= answer-text g-root?\n");
    if prompt_opened {
        out.push_str(&format!("root ::= {} answer\n", literal(close)));
        return (out, vec![close.to_string()]);
    }
    out.push_str(&text_without("think-text", close));
    out.push_str(&format!(
        "root ::= {} think-text ({} answer)? | g-root\n",
        literal(open),
        literal(close)
    ));
    (out, vec![open.to_string(), opener.to_string()])
}

/// Rules for `name`: any text (the empty text too) in which `word` does
/// not occur. One rule per matched prefix of `word`, following the
/// Knuth-Morris-Pratt automaton; each may end the text.
pub fn text_without(name: &str, word: &str) -> String {
    let w: Vec<char> = word.chars().collect();
    if w.is_empty() {
        return format!("{name} ::= [^\\x00]*\n");
    }
    let mut chars: Vec<char> = w.clone();
    chars.sort_unstable();
    chars.dedup();
    // The longest prefix of `word` that ends `seen`.
    let longest = |seen: &[char]| {
        (0..=seen.len().min(w.len() - 1))
            .rev()
            .find(|&k| seen.ends_with(&w[..k]))
            .unwrap_or(0)
    };
    let class: String = chars.iter().map(|&c| class_char(c)).collect();
    let mut out = format!("{name} ::= {name}-0\n");
    for state in 0..w.len() {
        let mut alts = vec![format!("[^{class}] {name}-0")];
        for &c in &chars {
            let mut seen = w[..state].to_vec();
            seen.push(c);
            if seen.len() == w.len() && seen == w {
                continue; // the word itself: not allowed
            }
            alts.push(format!(
                "{} {name}-{}",
                literal(&c.to_string()),
                longest(&seen)
            ));
        }
        out.push_str(&format!("{name}-{state} ::= ( {} )?\n", alts.join(" | ")));
    }
    out
}

/// One character inside a GBNF character class.
fn class_char(c: char) -> String {
    match c {
        ']' | '[' | '\\' | '^' | '-' => format!("\\{c}"),
        '\n' => "\\n".into(),
        '\r' => "\\r".into(),
        '\t' => "\\t".into(),
        c => c.to_string(),
    }
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

    /// Run the rules `text_without` writes over `s`, as a grammar engine
    /// would: true when `s` is a text the rules allow.
    fn allows(rules: &str, name: &str, s: &str) -> bool {
        let mut table: Vec<(Vec<(char, usize)>, usize)> = Vec::new();
        for line in rules.lines().skip(1) {
            let body = line.split_once("::= ( ").unwrap().1.trim_end_matches(" )?");
            let mut lits = Vec::new();
            let mut other = usize::MAX;
            for alt in body.split(" | ") {
                let (sym, next) = alt.rsplit_once(' ').unwrap();
                let next: usize = next
                    .strip_prefix(&format!("{name}-"))
                    .unwrap()
                    .parse()
                    .unwrap();
                if sym.starts_with("[^") {
                    other = next;
                } else {
                    let c: String = serde_json::from_str(sym).unwrap();
                    lits.push((c.chars().next().unwrap(), next));
                }
            }
            table.push((lits, other));
        }
        let word_chars: HashSet<char> = rules
            .lines()
            .nth(1)
            .unwrap()
            .split("[^")
            .nth(1)
            .unwrap()
            .chars()
            .collect();
        let mut state = 0;
        for c in s.chars() {
            let (lits, other) = &table[state];
            state = match lits.iter().find(|(l, _)| *l == c) {
                Some((_, n)) => *n,
                None if !word_chars.contains(&c) => *other,
                None => return false,
            };
        }
        true
    }

    #[test]
    fn text_without_a_word_allows_everything_else() {
        for word in ["<tool_call>", "</think>", "aab", "abab", "[TOOL_CALLS]"] {
            let rules = text_without("t", word);
            let alphabet: Vec<char> = word.chars().chain(['x']).collect();
            let mut seed = 7u64;
            for _ in 0..3000 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let len = (seed >> 60) as usize + word.len();
                let s: String = (0..len)
                    .map(|i| alphabet[((seed >> (i % 50)) as usize ^ (i * 31)) % alphabet.len()])
                    .collect();
                // Also the word itself, at a random place.
                let with = format!("{}{word}{}", &s[..s.len() / 2], &s[s.len() / 2..]);
                for t in [&s, &with] {
                    assert_eq!(
                        allows(&rules, "t", t),
                        !t.contains(word),
                        "{word:?} in {t:?}\n{rules}"
                    );
                }
            }
        }
    }

    #[test]
    fn calls_wait_for_the_end_of_the_reasoning() {
        let calls = "root ::= \"<tool_call>\" x\nx ::= \"{}\"\n";
        let (g, triggers) =
            calls_after_reasoning(calls, "<tool_call>", "<think>", "</think>", true);
        assert_eq!(triggers, vec!["</think>"]);
        assert!(g.contains("root ::= \"</think>\" answer\n"), "{g}");
        assert!(g.contains("answer ::= answer-text g-root?\n"), "{g}");
        assert!(g.contains("g-root ::= \"<tool_call>\" g-x"), "{g}");
        let (g, triggers) =
            calls_after_reasoning(calls, "<tool_call>", "<think>", "</think>", false);
        assert_eq!(triggers, vec!["<think>", "<tool_call>"]);
        assert!(
            g.contains("root ::= \"<think>\" think-text (\"</think>\" answer)? | g-root\n"),
            "{g}"
        );
        assert!(g.contains("think-text-0 ::="), "{g}");
    }

    #[test]
    fn dsml_parameters_follow_the_schema() {
        let tool = ToolSpec {
            name: "f".into(),
            description: String::new(),
            parameters: json!({"type": "object", "properties": {
                "path": {"type": "string"},
                "mode": {"type": "string", "enum": ["r", "w"]},
                "n": {"type": "integer"},
            }, "required": ["path"]}),
        };
        let g = tool_calls(ToolFormat::DeepSeekV4Dsml, &[&tool], false)
            .unwrap()
            .unwrap();
        // Required first and always, the others optional, in schema order.
        assert!(g.contains("t0-call ::= \"<｜DSML｜invoke name=\\\"f\\\">\\n\" t0-p0 t0-p1? t0-p2? \"</｜DSML｜invoke>\"\n"), "{g}");
        // Raw text for a string, the values for a string enum, JSON for the rest.
        assert!(g.contains("t0-p0 ::= \"<｜DSML｜parameter name=\\\"path\\\" string=\\\"true\\\">\" dsml-text "), "{g}");
        assert!(
            g.contains("string=\\\"true\\\">\" ( \"r\" | \"w\" )"),
            "{g}"
        );
        assert!(
            g.contains(
                "t0-p2 ::= \"<｜DSML｜parameter name=\\\"n\\\" string=\\\"false\\\">\" t0-p2-root "
            ),
            "{g}"
        );
        assert!(
            g.contains("root ::= \"<｜DSML｜tool_calls>\\n\" call \"\\n</｜DSML｜tool_calls>\"\n"),
            "{g}"
        );
        let free = ToolSpec {
            name: "g".into(),
            description: String::new(),
            parameters: json!({}),
        };
        let g = tool_calls(ToolFormat::DeepSeekV4Dsml, &[&free], true)
            .unwrap()
            .unwrap();
        assert!(
            g.contains("t0-call ::= \"<｜DSML｜invoke name=\\\"g\\\">\\n\" dsml-any* "),
            "{g}"
        );
        assert!(g.contains("call (\"\\n\" call)*"), "{g}");
    }

    #[test]
    fn calls_or_answer_keeps_both_grammars_apart() {
        let calls = "root ::= \"<tool_call>\" obj\nobj ::= \"{}\"\n";
        let answer = "root ::= obj\nobj ::= \"{\" space \"}\"\nspace ::= \" \"?\n";
        let g = calls_or_answer(calls, answer);
        assert!(g.contains("c-root ::= \"<tool_call>\" c-obj\n"), "{g}");
        assert!(g.contains("a-root ::= a-obj\n"), "{g}");
        assert!(g.contains("a-obj ::= \"{\" a-space \"}\""), "{g}");
        assert!(g.ends_with("root ::= c-root | a-root\n"), "{g}");
        assert_eq!(
            g.lines().filter(|l| l.starts_with("root ::=")).count(),
            1,
            "{g}"
        );
    }

    #[test]
    fn literals_escape_markup() {
        assert_eq!(
            literal("<tool_call>\n{\"a\\"),
            "\"<tool_call>\\n{\\\"a\\\\\""
        );
    }
}
