//! DeepSeek V3 / R1 tool calls, written with DeepSeek's special tokens:
//!
//! ````text
//! <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
//! ```json
//! {"city": "Paris"}
//! ```<｜tool▁call▁end｜><｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>
//! ````
//!
//! and the V3.1 variant without the type and the code fence:
//! `<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>`.
//! A lone `<｜tool▁call▁begin｜>` without the enclosing `calls` token (which
//! distilled models sometimes drop) is accepted too.

use super::json::{Feed, JsonScan};
use super::scan::{scan, Scan, Sink};

pub(crate) const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const CALLS_END: &str = "<｜tool▁calls▁end｜>";
const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const CALL_END: &str = "<｜tool▁call▁end｜>";
const SEP: &str = "<｜tool▁sep｜>";
const FENCE: &str = "```";
/// Longer than any real function name: past this it is not a header.
const MAX_NAME: usize = 256;
/// Longer than any code fence's info string (`json`).
const MAX_INFO: usize = 16;

/// Incremental parser for DeepSeek V3/R1/V3.1 tool-call tokens.
#[derive(Debug, Default)]
pub struct DeepSeekV3Parser {
    buf: String,
    sink: Sink,
    state: State,
    index: usize,
    /// Inside `<｜tool▁calls▁begin｜>`: after a call, more may follow.
    in_block: bool,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Text,
    /// Between calls of a block; `raw` (empty once a call was announced) is
    /// the markup to show if the block holds no call after all.
    Block {
        raw: String,
    },
    /// After `<｜tool▁call▁begin｜>`, up to `<｜tool▁sep｜>`.
    Header {
        raw: String,
    },
    /// V3: after `function<｜tool▁sep｜>`, the name runs to the end of the line.
    FnName {
        raw: String,
    },
    /// Before the arguments object, maybe behind a ```json fence.
    ArgsStart {
        raw: String,
        name: String,
    },
    Args(JsonScan),
    /// After the arguments: a closing fence and `<｜tool▁call▁end｜>`.
    Tail,
}

fn plausible_name(s: &str) -> bool {
    s.len() <= MAX_NAME && !s.contains(|c: char| c.is_whitespace() || "<>{}`\"".contains(c))
}

impl DeepSeekV3Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Give up on the markup read so far: it is shown as text.
    fn abandon(&mut self, raw: &str) {
        self.sink.text(raw);
        self.state = State::Text;
        self.in_block = false;
    }

    fn run(&mut self, eof: bool) {
        let mut pos = 0;
        loop {
            let rest = &self.buf[pos..];
            let ws = rest.len() - rest.trim_start().len();
            let trimmed = &rest[ws..];
            // Only whitespace, or the start of an expected marker: wait.
            // Only whitespace, or the start of an expected tag.
            let partial = |lits: &[&str]| lits.iter().any(|l| l.starts_with(trimmed));
            match &mut self.state {
                State::Text => match scan(rest, &[CALLS_BEGIN, CALL_BEGIN], eof) {
                    Scan::Found { at, which } => {
                        self.sink.text(&rest[..at]);
                        if which == 0 {
                            pos += at + CALLS_BEGIN.len();
                            self.in_block = true;
                            self.state = State::Block {
                                raw: CALLS_BEGIN.into(),
                            };
                        } else {
                            pos += at + CALL_BEGIN.len();
                            self.state = State::Header {
                                raw: CALL_BEGIN.into(),
                            };
                        }
                    }
                    Scan::Plain(n) => {
                        self.sink.text(&rest[..n]);
                        pos += n;
                        break;
                    }
                },
                State::Block { raw } => {
                    if trimmed.starts_with(CALL_BEGIN) {
                        raw.push_str(&rest[..ws + CALL_BEGIN.len()]);
                        pos += ws + CALL_BEGIN.len();
                        self.state = State::Header {
                            raw: std::mem::take(raw),
                        };
                    } else if trimmed.starts_with(CALLS_END) {
                        pos += ws + CALLS_END.len();
                        self.in_block = false;
                        self.state = State::Text;
                    } else if partial(&[CALL_BEGIN, CALLS_END]) && !eof {
                        break;
                    } else if partial(&[CALL_BEGIN, CALLS_END]) && raw.is_empty() {
                        // Generation stopped inside the block's end token.
                        pos += rest.len();
                        self.in_block = false;
                        self.state = State::Text;
                    } else {
                        let raw = std::mem::take(raw);
                        self.abandon(&raw);
                    }
                }
                State::Header { raw } => match scan(rest, &[SEP], eof) {
                    Scan::Found { at, .. }
                        if plausible_name(rest[..at].trim()) && !rest[..at].trim().is_empty() =>
                    {
                        let header = rest[..at].trim().to_string();
                        raw.push_str(&rest[..at + SEP.len()]);
                        pos += at + SEP.len();
                        let raw = std::mem::take(raw);
                        self.state = if header == "function" {
                            State::FnName { raw }
                        } else {
                            State::ArgsStart { raw, name: header }
                        };
                    }
                    Scan::Plain(n) if !eof && plausible_name(rest[..n].trim()) => break,
                    _ => {
                        let raw = std::mem::take(raw);
                        self.abandon(&raw);
                    }
                },
                State::FnName { raw } => {
                    if trimmed.starts_with('{') {
                        // V3.1 style, for a tool that happens to be called "function".
                        let raw = std::mem::take(raw);
                        self.state = State::ArgsStart {
                            raw,
                            name: "function".into(),
                        };
                    } else if let Some(nl) = rest
                        .find('\n')
                        .filter(|&nl| plausible_name(rest[..nl].trim()))
                    {
                        let name = rest[..nl].trim().to_string();
                        raw.push_str(&rest[..=nl]);
                        pos += nl + 1;
                        let raw = std::mem::take(raw);
                        self.state = State::ArgsStart { raw, name };
                    } else if !eof && !rest.contains('\n') && plausible_name(rest.trim()) {
                        break;
                    } else {
                        let raw = std::mem::take(raw);
                        self.abandon(&raw);
                    }
                }
                State::ArgsStart { raw, name } => {
                    if trimmed.starts_with('{') {
                        pos += ws;
                        self.sink.call_start(self.index, std::mem::take(name));
                        self.state = State::Args(JsonScan::default());
                    } else if let Some(info) = trimmed.strip_prefix(FENCE) {
                        // The fence's info string (`json`) runs to the end of its line.
                        let line = info.find('\n').unwrap_or(info.len());
                        let plausible = line <= MAX_INFO
                            && info[..line]
                                .trim()
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric());
                        if plausible && line < info.len() {
                            let n = ws + FENCE.len() + line + 1;
                            raw.push_str(&rest[..n]);
                            pos += n;
                        } else if plausible && !eof {
                            break;
                        } else {
                            let raw = std::mem::take(raw);
                            self.abandon(&raw);
                        }
                    } else if partial(&[FENCE, "{"]) && !eof {
                        break;
                    } else {
                        let raw = std::mem::take(raw);
                        self.abandon(&raw);
                    }
                }
                State::Args(json) => {
                    let mut taken = 0;
                    let mut done = false;
                    for c in rest.chars() {
                        taken += c.len_utf8();
                        if json.feed(c) == Feed::Done {
                            done = true;
                            break;
                        }
                    }
                    self.sink.args(self.index, &rest[..taken]);
                    pos += taken;
                    if done || eof {
                        self.sink.call_end(self.index);
                        self.index += 1;
                        self.state = State::Tail;
                    } else {
                        break;
                    }
                }
                State::Tail => {
                    if trimmed.starts_with(FENCE) {
                        pos += ws + FENCE.len();
                    } else if trimmed.starts_with(CALL_END) {
                        pos += ws + CALL_END.len();
                        self.state = if self.in_block {
                            State::Block { raw: String::new() }
                        } else {
                            State::Text
                        };
                    } else if partial(&[FENCE, CALL_END]) && !eof {
                        break;
                    } else {
                        if partial(&[FENCE, CALL_END]) {
                            // Generation stopped inside the end token.
                            pos += rest.len();
                        }
                        // A missing end token: read on as text (or as more calls).
                        self.state = if self.in_block {
                            State::Block { raw: String::new() }
                        } else {
                            State::Text
                        };
                    }
                }
            }
        }
        self.buf.drain(..pos);
    }
}

buffered_parser!(DeepSeekV3Parser);

#[cfg(test)]
mod tests {
    use super::super::testkit::{check, Item};
    use super::super::ToolParser;
    use super::*;
    use serde_json::json;

    fn parser() -> Box<dyn ToolParser> {
        Box::new(DeepSeekV3Parser::new())
    }

    #[test]
    fn r1_style_calls_with_code_fences() {
        let input = "I'll check both cities.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"location\": \"Tokyo\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"location\": \"Paris\", \"opts\": {\"units\": [\"C\"]}}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        check(
            &parser,
            input,
            &[
                Item::text("I'll check both cities."),
                Item::call("get_weather", json!({"location": "Tokyo"})),
                Item::call(
                    "get_weather",
                    json!({"location": "Paris", "opts": {"units": ["C"]}}),
                ),
            ],
        );
    }

    #[test]
    fn v31_style_and_text_after() {
        let input = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>search<｜tool▁sep｜>{\"q\": \"\\\"quoted\\\" ünïcode ```\"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{\"x\": 1}<｜tool▁call▁end｜><｜tool▁calls▁end｜>\n\nDone.";
        check(
            &parser,
            input,
            &[
                Item::call("search", json!({"q": "\"quoted\" ünïcode ```"})),
                Item::call("function", json!({"x": 1})),
                Item::text("Done."),
            ],
        );
    }

    #[test]
    fn lone_call_begin_without_block() {
        let input =
            "<｜tool▁call▁begin｜>function<｜tool▁sep｜>ls\n```json\n{}\n```<｜tool▁call▁end｜>";
        check(&parser, input, &[Item::call("ls", json!({}))]);
    }

    #[test]
    fn look_alikes_and_broken_markup_stay_text() {
        let input = "A <｜tool▁calls and <｜tool▁sep｜> token, <｜tool▁calls▁begin｜>oops";
        check(&parser, input, &[Item::text(input)]);
        let input =
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get weather now\nhi";
        check(&parser, input, &[Item::text(input)]);
        let input = "x <｜tool▁call▁begin｜>function<｜tool▁sep｜>f\nno json";
        check(&parser, input, &[Item::text(input)]);
    }

    #[test]
    fn unterminated_header_returns_as_text() {
        let input = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_wea";
        check(&parser, input, &[Item::text(input)]);
    }

    #[test]
    fn end_token_cut_off_by_the_end_is_dropped() {
        let input = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁e";
        check(&parser, input, &[Item::call("f", json!({}))]);
        let input =
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{\"a\": 1}\n<｜tool▁call";
        check(&parser, input, &[Item::call("f", json!({"a": 1}))]);
    }

    #[test]
    fn complete_arguments_without_end_tokens_close_the_call() {
        let input = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\": [1]}";
        check(&parser, input, &[Item::call("f", json!({"a": [1]}))]);
    }
}
