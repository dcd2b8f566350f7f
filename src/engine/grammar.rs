//! Grammar-constrained output: JSON Schema to GBNF, grammar validation, and
//! the llama.cpp grammar sampler the [`super::sampling::Sampler`] runs
//! before its chain.
//!
//! Everything goes through `llama-cpp-sys-2`'s C wrappers
//! (`llama_rs_*`), which catch llama.cpp's C++ exceptions: a bad schema or
//! grammar from a client becomes a [`GrammarError`], never an abort.
//!
//! A lazy grammar (non-empty [`Grammar::triggers`]) lets output run free
//! until one of the trigger words appears in the generated text (special
//! tokens count with their text, `<tool_call>`); from the start of that
//! word on, the grammar holds, so the grammar must itself begin with the
//! trigger word.

use std::ffi::{c_char, CStr, CString};
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::llama::{capture_log, Model};
use super::Grammar;

/// Why a JSON Schema or a grammar cannot be used. The client's input is
/// at fault: the HTTP side answers 400 with the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    /// The JSON Schema could not be converted to a grammar.
    #[error("invalid or unsupported JSON schema: {0}")]
    Schema(String),
    /// llama.cpp rejected the GBNF grammar.
    #[error("invalid grammar: {0}")]
    Grammar(String),
    /// A trigger word is empty or holds a NUL byte.
    #[error("invalid grammar trigger: {0}")]
    Trigger(String),
}

/// Schemas nested deeper than this are refused before they reach
/// llama.cpp's recursive converter (its stack, not ours, would overflow).
pub const MAX_SCHEMA_DEPTH: usize = 64;

/// The most times llama.cpp's grammar parser repeats one item
/// (`MAX_REPETITION_THRESHOLD` in `llama-grammar.cpp`). A larger lower
/// bound (`minItems`, `minLength`) is refused there, before any expansion;
/// a larger upper bound is loosened to "no upper bound".
pub const MAX_SCHEMA_REPETITION: u64 = 2000;

/// Convert a JSON Schema to a GBNF grammar (root rule `root`) with
/// llama.cpp's converter, the one llama-server uses for `response_format`
/// and tool parameters.
///
/// The wrapper reports a C++ exception only as a status, not with its
/// text, so conversion failures (an unresolvable `$ref`, a bad `pattern`)
/// carry a fixed explanation.
pub fn json_schema_to_grammar(schema: &serde_json::Value) -> Result<String, GrammarError> {
    let depth = json_depth(schema);
    if depth > MAX_SCHEMA_DEPTH {
        return Err(GrammarError::Schema(format!(
            "nested {depth} levels deep (at most {MAX_SCHEMA_DEPTH})"
        )));
    }
    if let Some((keyword, n)) = repetition_over_limit(schema) {
        return Err(GrammarError::Schema(format!(
            "{keyword} {n} is more than a grammar can repeat (at most {MAX_SCHEMA_REPETITION})"
        )));
    }
    match schema {
        serde_json::Value::Object(_) | serde_json::Value::Bool(_) => {}
        _ => {
            return Err(GrammarError::Schema(
                "a schema must be an object or a boolean".into(),
            ))
        }
    }
    // serde_json escapes NUL inside strings, so the text has none.
    let text = serde_json::to_string(schema).map_err(|e| GrammarError::Schema(e.to_string()))?;
    let text =
        CString::new(text).map_err(|_| GrammarError::Schema("contains a NUL byte".into()))?;
    let mut out: *mut c_char = std::ptr::null_mut();
    // SAFETY: `text` is NUL-terminated and outlives the call; the wrapper
    // catches C++ exceptions and sets `out` only to a string it allocated.
    let (status, log) = capture_log(|| unsafe {
        sys::llama_rs_json_schema_to_grammar(text.as_ptr(), true, &mut out)
    });
    if status != sys::LLAMA_RS_STATUS_OK || out.is_null() {
        if !out.is_null() {
            // SAFETY: `out` came from the wrapper and is freed once.
            unsafe { sys::llama_rs_string_free(out) };
        }
        let reason = match status {
            sys::LLAMA_RS_STATUS_ALLOCATION_FAILED => "out of memory".to_string(),
            _ if !log.is_empty() => log.join("; "),
            _ => "llama.cpp cannot convert it to a grammar (an unresolvable $ref, an unsupported pattern or keyword, \
                  or an invalid value)"
                .to_string(),
        };
        return Err(GrammarError::Schema(reason));
    }
    // SAFETY: on success `out` is a NUL-terminated string the wrapper
    // allocated; it is read here and freed once just after.
    let gbnf = unsafe { CStr::from_ptr(out) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: as above: freed once, after the copy.
    unsafe { sys::llama_rs_string_free(out) };
    Ok(gbnf)
}

/// Check that llama.cpp accepts `grammar` for this model: parses it and
/// builds (then frees) the sampler, so a bad grammar is refused with a 400
/// before it is queued. Safe on any thread: it only reads the vocabulary.
pub fn validate(model: &Model, grammar: &Grammar) -> Result<(), GrammarError> {
    let sampler = init_sampler(model, grammar)?;
    // SAFETY: the sampler was just built and nothing else holds it.
    unsafe { sys::llama_sampler_free(sampler.as_ptr()) };
    Ok(())
}

/// Build llama.cpp's grammar sampler for `grammar` (lazy when it has
/// triggers). The caller owns (and frees) the sampler.
pub(crate) fn init_sampler(
    model: &Model,
    grammar: &Grammar,
) -> Result<NonNull<sys::llama_sampler>, GrammarError> {
    let gbnf = CString::new(grammar.gbnf.as_str())
        .map_err(|_| GrammarError::Grammar("contains a NUL byte".into()))?;
    if grammar.gbnf.trim().is_empty() {
        return Err(GrammarError::Grammar("empty grammar".into()));
    }
    let patterns = trigger_patterns(&grammar.triggers)?;
    let patterns: Vec<CString> = patterns
        .into_iter()
        .map(CString::new)
        .collect::<Result<_, _>>()
        .map_err(|_| GrammarError::Trigger("contains a NUL byte".into()))?;
    let root = c"root";
    let vocab = model.vocab_ptr();
    // SAFETY: the vocab lives as long as `model`, borrowed for this call;
    // the grammar, root and pattern strings are NUL-terminated and outlive
    // it; the wrapper catches C++ exceptions and returns null on failure.
    let (raw, log) = capture_log(|| unsafe {
        if patterns.is_empty() {
            sys::llama_rs_sampler_init_grammar(vocab, gbnf.as_ptr(), root.as_ptr())
        } else {
            let mut ptrs: Vec<*const c_char> = patterns.iter().map(|p| p.as_ptr()).collect();
            sys::llama_rs_sampler_init_grammar_lazy_patterns(
                vocab,
                gbnf.as_ptr(),
                root.as_ptr(),
                ptrs.as_mut_ptr(),
                ptrs.len(),
                std::ptr::null(),
                0,
            )
        }
    });
    NonNull::new(raw).ok_or_else(|| {
        // llama.cpp prints the parser's detailed complaint to stderr and
        // logs a summary ("failed to parse grammar", "grammar does not
        // contain a 'root' symbol", "left recursion detected ...").
        let msg = if log.is_empty() {
            "llama.cpp could not parse it".to_string()
        } else {
            log.join("; ")
        };
        GrammarError::Grammar(msg)
    })
}

/// The regular expressions (ECMAScript, as llama.cpp's `std::regex` reads
/// them) that match the trigger words literally.
pub fn trigger_patterns(triggers: &[String]) -> Result<Vec<String>, GrammarError> {
    triggers
        .iter()
        .map(|t| {
            if t.is_empty() {
                Err(GrammarError::Trigger("an empty trigger word".into()))
            } else if t.contains('\0') {
                Err(GrammarError::Trigger("contains a NUL byte".into()))
            } else {
                Ok(regex_escape(t))
            }
        })
        .collect()
}

/// Escape every character special to an ECMAScript regex (the same set as
/// llama.cpp's `regex_escape`).
pub fn regex_escape(word: &str) -> String {
    let mut out = String::with_capacity(word.len() + 8);
    for c in word.chars() {
        if matches!(
            c,
            '.' | '^' | '$' | '|' | '(' | ')' | '*' | '+' | '?' | '[' | ']' | '{' | '}' | '\\'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Nesting depth of arrays and objects (a scalar is 0).
fn json_depth(v: &serde_json::Value) -> usize {
    // Iterative: the value itself may be deeper than our own stack allows.
    let mut max = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, d)) = stack.pop() {
        match v {
            serde_json::Value::Array(a) => {
                max = max.max(d + 1);
                stack.extend(a.iter().map(|x| (x, d + 1)));
            }
            serde_json::Value::Object(o) => {
                max = max.max(d + 1);
                stack.extend(o.values().map(|x| (x, d + 1)));
            }
            _ => {}
        }
    }
    max
}

/// A lower repetition bound llama.cpp would refuse, named, so the client
/// reads which keyword is at fault rather than "failed to parse grammar".
/// Values (`const`, `enum`, `default`, `examples`) are data, not schemas.
fn repetition_over_limit(v: &serde_json::Value) -> Option<(String, u64)> {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Array(a) => stack.extend(a),
            serde_json::Value::Object(o) => {
                for (k, v) in o {
                    match k.as_str() {
                        "minItems" | "minLength" => {
                            let n = v.as_u64().or_else(|| v.as_f64().map(|f| f as u64));
                            if let Some(n) = n.filter(|&n| n > MAX_SCHEMA_REPETITION) {
                                return Some((k.clone(), n));
                            }
                        }
                        "const" | "enum" | "default" | "examples" => {}
                        _ => stack.push(v),
                    }
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn repetitions_beyond_the_grammar_limit_are_named() {
        let err = json_schema_to_grammar(&json!({
            "type": "object",
            "properties": {"xs": {"type": "array", "minItems": 5_000_000}},
        }))
        .unwrap_err();
        assert!(err.to_string().contains("minItems 5000000"), "{err}");
        let err = json_schema_to_grammar(&json!({"type": "string", "minLength": 1e7})).unwrap_err();
        assert!(err.to_string().contains("minLength 10000000"), "{err}");
        // At the limit, and as data, it converts.
        assert!(json_schema_to_grammar(&json!({"type": "array", "minItems": 2000})).is_ok());
        assert!(json_schema_to_grammar(&json!({"const": {"minItems": 9999}})).is_ok());
    }

    #[test]
    fn trigger_words_are_matched_literally() {
        assert_eq!(regex_escape("<tool_call>"), "<tool_call>");
        assert_eq!(regex_escape("[TOOL_CALLS]"), "\\[TOOL_CALLS\\]");
        assert_eq!(
            regex_escape("a.b*c+d?(e)|f{1}^$\\"),
            "a\\.b\\*c\\+d\\?\\(e\\)\\|f\\{1\\}\\^\\$\\\\"
        );
        assert_eq!(
            regex_escape("<｜tool▁calls▁begin｜>"),
            "<｜tool▁calls▁begin｜>"
        );
        assert_eq!(regex_escape("<|python_tag|>"), "<\\|python_tag\\|>");
    }

    #[test]
    fn empty_triggers_are_refused() {
        assert!(trigger_patterns(&["".into()]).is_err());
        assert!(trigger_patterns(&["a\0b".into()]).is_err());
        assert_eq!(
            trigger_patterns(&["x".into(), "[y]".into()]).unwrap(),
            vec!["x".to_string(), "\\[y\\]".to_string()]
        );
    }

    #[test]
    fn schema_to_grammar_works_without_a_model() {
        let g = json_schema_to_grammar(
            &json!({"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}),
        )
        .unwrap();
        assert!(g.contains("root ::="), "{g}");
        assert!(g.contains("city"), "{g}");
    }

    #[test]
    fn bad_schemas_are_errors_not_aborts() {
        assert!(matches!(
            json_schema_to_grammar(&json!({"$ref": "#/definitions/missing"})),
            Err(GrammarError::Schema(_))
        ));
        assert!(matches!(
            json_schema_to_grammar(&json!({"type": "string", "pattern": "^(a$"})),
            Err(GrammarError::Schema(_))
        ));
        assert!(matches!(
            json_schema_to_grammar(&json!(42)),
            Err(GrammarError::Schema(_))
        ));
        let mut deep = json!({"type": "string"});
        for _ in 0..100 {
            deep = json!({"type": "array", "items": deep});
        }
        assert!(matches!(
            json_schema_to_grammar(&deep),
            Err(GrammarError::Schema(_))
        ));
    }

    #[test]
    fn depth_counts_containers() {
        assert_eq!(json_depth(&json!(1)), 0);
        assert_eq!(json_depth(&json!({"a": [1, {"b": 2}]})), 3);
    }
}
