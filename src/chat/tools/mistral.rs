//! Mistral tool calls, after the `[TOOL_CALLS]` token, in either of the two
//! shapes Mistral's templates have used:
//!
//! ```text
//! [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "f", "arguments": {}}]
//! [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]f[ARGS]{}
//! ```
//!
//! The array form may carry an `"id"` per call; the newer form may put
//! `[CALL_ID]id` between the name and `[ARGS]`. Ids are the server's
//! business, so they are skipped.

use super::json::{CallObject, Feed, JsonScan, Step};
use super::scan::{scan, Scan, Sink};

pub(crate) const TAG: &str = "[TOOL_CALLS]";
const ARGS: &str = "[ARGS]";
const CALL_ID: &str = "[CALL_ID]";
/// Longer than any real function name or call id: past this it is prose.
const MAX_NAME: usize = 256;

/// Incremental parser for Mistral `[TOOL_CALLS]` calls.
#[derive(Debug, Default)]
pub struct MistralParser {
    buf: String,
    sink: Sink,
    state: State,
    index: usize,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Text,
    /// After `[TOOL_CALLS]`; `raw` is the markup consumed, shown if no call follows.
    Tag {
        raw: String,
    },
    /// Inside `[...]`; `raw` is empty once a call has been announced.
    Array {
        raw: String,
    },
    ArrayCall(CallObject),
    /// Reading `name` up to `[ARGS]` or `[CALL_ID]`.
    Name {
        raw: String,
    },
    CallId {
        raw: String,
        name: String,
    },
    ArgsStart {
        raw: String,
        name: String,
    },
    Args(JsonScan),
}

fn is_name(s: &str) -> bool {
    s.len() <= MAX_NAME && !s.contains(|c: char| c.is_whitespace() || "[]{}\"<>".contains(c))
}

impl MistralParser {
    pub fn new() -> Self {
        Self::default()
    }

    fn run(&mut self, eof: bool) {
        let mut pos = 0;
        loop {
            let rest = &self.buf[pos..];
            let ws = rest.len() - rest.trim_start().len();
            match &mut self.state {
                State::Text => match scan(rest, &[TAG], eof) {
                    Scan::Found { at, .. } => {
                        self.sink.text(&rest[..at]);
                        pos += at + TAG.len();
                        self.state = State::Tag { raw: TAG.into() };
                    }
                    Scan::Plain(n) => {
                        self.sink.text(&rest[..n]);
                        pos += n;
                        break;
                    }
                },
                State::Tag { raw } => {
                    raw.push_str(&rest[..ws]);
                    pos += ws;
                    let rest = &rest[ws..];
                    if rest.starts_with('[') {
                        raw.push('[');
                        pos += 1;
                        self.state = State::Array {
                            raw: std::mem::take(raw),
                        };
                    } else if rest.is_empty() && !eof {
                        break;
                    } else {
                        self.state = State::Name {
                            raw: std::mem::take(raw),
                        };
                    }
                }
                State::Array { raw } => {
                    let skip = rest.len()
                        - rest
                            .trim_start_matches(|c: char| c.is_whitespace() || c == ',')
                            .len();
                    if !raw.is_empty() {
                        raw.push_str(&rest[..skip]);
                    }
                    pos += skip;
                    match rest[skip..].chars().next() {
                        Some('{') => {
                            let raw = std::mem::take(raw);
                            self.state = State::ArrayCall(CallObject::new(self.index, false, raw));
                        }
                        Some(']') => {
                            pos += 1;
                            self.state = State::Text;
                        }
                        None if !eof => break,
                        _ => {
                            self.sink.text(raw);
                            self.state = State::Text;
                        }
                    }
                }
                State::ArrayCall(obj) => {
                    let mut next = None;
                    for c in rest.chars() {
                        match obj.feed(c, &mut self.sink) {
                            Step::Taken => pos += c.len_utf8(),
                            Step::Call => {
                                pos += c.len_utf8();
                                next = Some(State::Array { raw: String::new() });
                                break;
                            }
                            Step::NotCall => {
                                pos += c.len_utf8();
                                self.sink.text(obj.raw());
                                next = Some(State::Text);
                                break;
                            }
                            Step::Rejected => {
                                if !obj.close(&mut self.sink) {
                                    self.sink.text(obj.raw());
                                }
                                next = Some(State::Text);
                                break;
                            }
                        }
                    }
                    if next.is_none() && eof {
                        if !obj.finish(&mut self.sink) {
                            self.sink.text(obj.raw());
                        }
                        next = Some(State::Text);
                    }
                    match next {
                        Some(state) => {
                            if obj.started() {
                                self.index += 1;
                            }
                            self.state = state;
                        }
                        None => break,
                    }
                }
                State::Name { raw } => match scan(rest, &[ARGS, CALL_ID], eof) {
                    Scan::Found { at, which } if is_name(&rest[..at]) && at > 0 => {
                        let name = rest[..at].to_string();
                        let marker = if which == 0 { ARGS } else { CALL_ID };
                        raw.push_str(&rest[..at + marker.len()]);
                        pos += at + marker.len();
                        let raw = std::mem::take(raw);
                        self.state = if which == 0 {
                            State::ArgsStart { raw, name }
                        } else {
                            State::CallId { raw, name }
                        };
                    }
                    Scan::Plain(n) if !eof && is_name(&rest[..n]) => break,
                    _ => {
                        // Not `name[ARGS]`: the tag was prose after all.
                        self.sink.text(raw);
                        self.state = State::Text;
                    }
                },
                State::CallId { raw, name } => match scan(rest, &[ARGS], eof) {
                    Scan::Found { at, .. } if is_name(&rest[..at]) => {
                        raw.push_str(&rest[..at + ARGS.len()]);
                        pos += at + ARGS.len();
                        let (raw, name) = (std::mem::take(raw), std::mem::take(name));
                        self.state = State::ArgsStart { raw, name };
                    }
                    Scan::Plain(n) if !eof && is_name(&rest[..n]) => break,
                    _ => {
                        self.sink.text(raw);
                        self.state = State::Text;
                    }
                },
                State::ArgsStart { raw, name } => {
                    raw.push_str(&rest[..ws]);
                    pos += ws;
                    let rest = &rest[ws..];
                    if rest.starts_with('{') {
                        self.sink.call_start(self.index, std::mem::take(name));
                        self.state = State::Args(JsonScan::default());
                    } else if rest.is_empty() && !eof {
                        break;
                    } else {
                        self.sink.text(raw);
                        self.state = State::Text;
                    }
                }
                State::Args(json) => {
                    let mut taken = 0;
                    let mut done = false;
                    for c in rest.chars() {
                        // Only objects get here, and they end on a char they take.
                        let feed = json.feed(c);
                        taken += c.len_utf8();
                        if feed == Feed::Done {
                            done = true;
                            break;
                        }
                    }
                    self.sink.args(self.index, &rest[..taken]);
                    pos += taken;
                    if done || eof {
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

buffered_parser!(MistralParser);

#[cfg(test)]
mod tests {
    use super::super::testkit::{check, Item};
    use super::super::ToolParser;
    use super::*;
    use serde_json::json;

    fn parser() -> Box<dyn ToolParser> {
        Box::new(MistralParser::new())
    }

    #[test]
    fn array_form_with_ids() {
        let input = "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"abc123DEF\"}, {\"name\": \"get_time\", \"arguments\": {\"tz\": [\"CET\", {\"dst\": true}]}, \"id\": \"xyz987ABC\"}]";
        check(
            &parser,
            input,
            &[
                Item::call("get_weather", json!({"city": "Paris"})),
                Item::call("get_time", json!({"tz": ["CET", {"dst": true}]})),
            ],
        );
    }

    #[test]
    fn name_args_form_several_calls_after_text() {
        let input = "Checking both.\n[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Zürich\", \"note\": \"a \\\"b\\\" [ARGS]\"}[TOOL_CALLS]get_time[CALL_ID]c0ffee123[ARGS]{}";
        check(
            &parser,
            input,
            &[
                Item::text("Checking both."),
                Item::call(
                    "get_weather",
                    json!({"city": "Zürich", "note": "a \"b\" [ARGS]"}),
                ),
                Item::call("get_time", json!({})),
            ],
        );
    }

    #[test]
    fn text_after_calls() {
        let input =
            "[TOOL_CALLS][{\"arguments\": {\"a\": {\"b\": []}}, \"name\": \"f\"}]\n\nThat is all.";
        check(
            &parser,
            input,
            &[
                Item::call("f", json!({"a": {"b": []}})),
                Item::text("That is all."),
            ],
        );
    }

    #[test]
    fn look_alikes_stay_text() {
        let input = "The [TOOL_CALLS] token and [TOOL_CALLS]not a name[ARGS] and [TOOL_CALLS][1, 2] and [TOOL_CALL";
        check(&parser, input, &[Item::text(input)]);
        let input = "[TOOL_CALLS]f[ARGS] no object";
        check(&parser, input, &[Item::text(input)]);
    }

    #[test]
    fn unterminated_tag_and_name_return_as_text() {
        check(
            &parser,
            "ok [TOOL_CALLS]get_wea",
            &[Item::text("ok [TOOL_CALLS]get_wea")],
        );
        check(
            &parser,
            "[TOOL_CALLS][{\"na",
            &[Item::text("[TOOL_CALLS][{\"na")],
        );
        // Once the name is complete the call was announced, so it is closed.
        check(
            &parser,
            "[TOOL_CALLS][{\"name\": \"f\"",
            &[Item::call("f", json!({}))],
        );
    }

    #[test]
    fn unterminated_array_with_complete_call_is_closed() {
        let input = "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"x\": \"y\"}}";
        check(&parser, input, &[Item::call("f", json!({"x": "y"}))]);
    }
}
