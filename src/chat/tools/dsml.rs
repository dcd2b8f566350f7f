//! DeepSeek V4 DSML tool calls. The syntax, as DeepSeek's reference encoder
//! (`encoding/encoding_dsv4.py` in huggingface.co/deepseek-ai/DeepSeek-V4-Pro)
//! writes and parses it:
//!
//! ```text
//! <｜DSML｜tool_calls>
//! <｜DSML｜invoke name="get_weather">
//! <｜DSML｜parameter name="location" string="true">Beijing</｜DSML｜parameter>
//! <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
//! </｜DSML｜invoke>
//! </｜DSML｜tool_calls>
//! ```
//!
//! `string="true"` values are raw text (we JSON-escape them); `string="false"`
//! values are JSON literals, copied as they are. The arguments object is
//! built and streamed as the tags arrive: `{"location": "Beij`... V3.2's
//! `<｜DSML｜function_calls>` wrapper is accepted too.

use super::scan::{scan, Scan, Sink};
use serde_json::Value;

pub(crate) const BLOCK_OPEN: &str = "<｜DSML｜tool_calls>";
pub(crate) const BLOCK_CLOSE: &str = "</｜DSML｜tool_calls>";
const BLOCKS: [(&str, &str); 2] = [
    (BLOCK_OPEN, BLOCK_CLOSE),
    ("<｜DSML｜function_calls>", "</｜DSML｜function_calls>"),
];
pub(crate) const INVOKE_OPEN: &str = "<｜DSML｜invoke";
pub(crate) const INVOKE_CLOSE: &str = "</｜DSML｜invoke>";
pub(crate) const PARAM_OPEN: &str = "<｜DSML｜parameter";
pub(crate) const PARAM_CLOSE: &str = "</｜DSML｜parameter>";
/// Longer than any real tag's attributes: past this it is not a tag.
const MAX_TAG: usize = 512;

/// Incremental parser for DSML tool calls.
#[derive(Debug, Default)]
pub struct DsmlParser {
    buf: String,
    sink: Sink,
    state: State,
    index: usize,
    /// The closing tag of the block we are in.
    block_close: &'static str,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Text,
    /// Between invokes; `raw` (empty once a call was announced) is shown if
    /// the block turns out to hold none.
    Block {
        raw: String,
    },
    /// After `<｜DSML｜invoke`, up to `>`.
    InvokeTag {
        raw: String,
    },
    /// Between parameters of a call; `first`: nothing emitted after `CallStart`.
    Params {
        first: bool,
    },
    /// After `<｜DSML｜parameter`, up to `>`.
    ParamTag {
        first: bool,
    },
    Value(Kind),
}

/// How a parameter's value becomes JSON.
#[derive(Debug)]
enum Kind {
    /// `string="true"`: escaped into a JSON string.
    Str,
    /// `string="false"`: already JSON.
    Json,
    /// No `string` attribute: held whole, then JSON if it parses, else a string.
    Unknown(String),
}

/// `key="value"` pairs of a tag, or None if it does not read as attributes.
fn attributes(s: &str) -> Option<Vec<(&str, &str)>> {
    let mut out = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let key = &rest[..eq];
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        let after = rest[eq + 1..].strip_prefix('"')?;
        let end = after.find('"')?;
        out.push((key, &after[..end]));
        rest = after[end + 1..].trim_start();
    }
    Some(out)
}

fn attr<'a>(attrs: &[(&'a str, &'a str)], key: &str) -> Option<&'a str> {
    attrs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// A raw string as the inside of a JSON string literal. Escaping is per
/// char, so escaping pieces and joining them equals escaping the whole.
fn escape(s: &str) -> String {
    let quoted = Value::from(s).to_string();
    quoted[1..quoted.len() - 1].to_string()
}

impl DsmlParser {
    pub fn new() -> Self {
        Self::default()
    }

    fn abandon(&mut self, raw: &str) {
        self.sink.text(raw);
        self.state = State::Text;
    }

    /// Close the current call's arguments object and the call.
    fn end_call(&mut self, first: bool) {
        self.sink.args(self.index, if first { "{}" } else { "}" });
        self.sink.call_end(self.index);
        self.index += 1;
    }

    fn run(&mut self, eof: bool) {
        let mut pos = 0;
        loop {
            let rest = &self.buf[pos..];
            let ws = rest.len() - rest.trim_start().len();
            let trimmed = &rest[ws..];
            // Only whitespace, or the start of an expected tag.
            let partial = |lits: &[&str]| lits.iter().any(|l| l.starts_with(trimmed));
            match &mut self.state {
                State::Text => match scan(rest, &[BLOCKS[0].0, BLOCKS[1].0], eof) {
                    Scan::Found { at, which } => {
                        self.sink.text(&rest[..at]);
                        let (open, close) = BLOCKS[which];
                        pos += at + open.len();
                        self.block_close = close;
                        self.state = State::Block { raw: open.into() };
                    }
                    Scan::Plain(n) => {
                        self.sink.text(&rest[..n]);
                        pos += n;
                        break;
                    }
                },
                State::Block { raw } => {
                    if trimmed.starts_with(INVOKE_OPEN) {
                        raw.push_str(&rest[..ws + INVOKE_OPEN.len()]);
                        pos += ws + INVOKE_OPEN.len();
                        self.state = State::InvokeTag {
                            raw: std::mem::take(raw),
                        };
                    } else if trimmed.starts_with(self.block_close) {
                        pos += ws + self.block_close.len();
                        self.state = State::Text;
                    } else if partial(&[INVOKE_OPEN, self.block_close]) && !eof {
                        break;
                    } else if partial(&[INVOKE_OPEN, self.block_close]) && raw.is_empty() {
                        // Generation stopped inside the block's closing tag.
                        pos += rest.len();
                        self.state = State::Text;
                    } else {
                        let raw = std::mem::take(raw);
                        self.abandon(&raw);
                    }
                }
                State::InvokeTag { raw } => {
                    let name = rest.find('>').filter(|&end| end < MAX_TAG).and_then(|end| {
                        let attrs = attributes(&rest[..end])?;
                        Some((end, attr(&attrs, "name")?.to_string()))
                    });
                    match name {
                        Some((end, name)) => {
                            pos += end + 1;
                            self.sink.call_start(self.index, name);
                            self.state = State::Params { first: true };
                        }
                        None if !eof && !rest.contains('>') && rest.len() < MAX_TAG => break,
                        None => {
                            let raw = std::mem::take(raw);
                            self.abandon(&raw);
                        }
                    }
                }
                State::Params { first } => {
                    let first = *first;
                    if trimmed.starts_with(PARAM_OPEN) {
                        pos += ws + PARAM_OPEN.len();
                        self.state = State::ParamTag { first };
                    } else if trimmed.starts_with(INVOKE_CLOSE) {
                        pos += ws + INVOKE_CLOSE.len();
                        self.end_call(first);
                        self.state = State::Block { raw: String::new() };
                    } else if partial(&[PARAM_OPEN, INVOKE_CLOSE]) && !eof {
                        break;
                    } else {
                        // Junk or end of input between parameters: what we have is
                        // complete. A tag cut off by the end of input is dropped.
                        if partial(&[PARAM_OPEN, INVOKE_CLOSE]) {
                            pos += rest.len();
                        }
                        self.end_call(first);
                        self.state = State::Text;
                    }
                }
                State::ParamTag { first } => {
                    let first = *first;
                    let tag = rest.find('>').filter(|&end| end < MAX_TAG).and_then(|end| {
                        let attrs = attributes(&rest[..end])?;
                        let name = attr(&attrs, "name")?.to_string();
                        let kind = match attr(&attrs, "string") {
                            Some("true") => Kind::Str,
                            Some("false") => Kind::Json,
                            _ => Kind::Unknown(String::new()),
                        };
                        Some((end, name, kind))
                    });
                    match tag {
                        Some((end, name, kind)) => {
                            pos += end + 1;
                            let sep = if first { "{" } else { ", " };
                            let quote = if matches!(kind, Kind::Str) { "\"" } else { "" };
                            let head = format!("{sep}{}: {quote}", Value::from(name));
                            self.sink.args(self.index, &head);
                            self.state = State::Value(kind);
                        }
                        None if !eof && !rest.contains('>') && rest.len() < MAX_TAG => break,
                        None => {
                            // A broken tag: close the call with the parameters it has.
                            self.end_call(first);
                            self.state = State::Text;
                        }
                    }
                }
                State::Value(kind) => {
                    let (n, closed) = match scan(rest, &[PARAM_CLOSE], eof) {
                        Scan::Found { at, .. } => (at, true),
                        Scan::Plain(n) => (n, false),
                    };
                    let piece = &rest[..n];
                    match kind {
                        Kind::Str => self.sink.args(self.index, &escape(piece)),
                        Kind::Json => self.sink.args(self.index, piece),
                        Kind::Unknown(held) => held.push_str(piece),
                    }
                    pos += n;
                    if closed {
                        match kind {
                            Kind::Str => self.sink.args(self.index, "\""),
                            Kind::Json => {}
                            Kind::Unknown(held) => {
                                let json = match serde_json::from_str::<Value>(held) {
                                    Ok(_) => held.clone(),
                                    Err(_) => Value::from(held.as_str()).to_string(),
                                };
                                self.sink.args(self.index, &json);
                            }
                        }
                        pos += PARAM_CLOSE.len();
                        self.state = State::Params { first: false };
                    } else if eof {
                        // Cut inside a value: the arguments stay incomplete.
                        self.sink.call_end(self.index);
                        self.index += 1;
                        self.state = State::Text;
                    } else {
                        break;
                    }
                }
            }
        }
        self.buf.drain(..pos);
    }
}

buffered_parser!(DsmlParser);

/// One call the way DeepSeek's encoder writes it: strings raw with
/// `string="true"`, everything else as Python-style JSON (`", "` and `": "`
/// separators) with `string="false"`; arguments that are not a JSON object
/// become a single `arguments` string parameter, as the encoder does.
pub(crate) fn render_call(name: &str, arguments_json: &str) -> String {
    let params: Vec<String> = match serde_json::from_str::<Value>(arguments_json) {
        Ok(Value::Object(map)) => map.iter().map(|(k, v)| render_param(k, v)).collect(),
        _ => vec![render_param("arguments", &Value::from(arguments_json))],
    };
    format!(
        "{BLOCK_OPEN}\n{INVOKE_OPEN} name=\"{name}\">\n{}\n{INVOKE_CLOSE}\n{}",
        params.join("\n"),
        BLOCKS[0].1
    )
}

fn render_param(key: &str, value: &Value) -> String {
    let (string, text) = match value {
        Value::String(s) => ("true", s.clone()),
        other => ("false", python_json(other)),
    };
    format!("{PARAM_OPEN} name=\"{key}\" string=\"{string}\">{text}{PARAM_CLOSE}")
}

/// JSON with Python's `json.dumps` default separators, so a replayed call
/// matches what the model saw in training byte for byte.
fn python_json(v: &Value) -> String {
    match v {
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(python_json).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", Value::from(k.as_str()), python_json(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        scalar => scalar.to_string(),
    }
}

#[cfg(test)]
#[path = "dsml_tests.rs"]
mod tests;
