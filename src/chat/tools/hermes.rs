//! The Hermes tool-call format, written by Qwen 2.5/3, Hermes, SmolLM3 and
//! taught by hearth's fallback prompt:
//!
//! ```text
//! Some text.
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! <tool_call>
//! {"name": "get_time", "arguments": {}}
//! </tool_call>
//! ```
//!
//! The object's keys may come in either order; the closing `</tool_call>` is
//! optional (small models forget it). A `<tool_call>` not followed by a JSON
//! object is just text.

use super::json::{CallObject, Step};
use super::scan::{expect_after_ws, scan, Expect, Scan, Sink};

pub(crate) const OPEN: &str = "<tool_call>";
pub(crate) const CLOSE: &str = "</tool_call>";

/// Incremental parser for `<tool_call>{...}</tool_call>` calls.
#[derive(Debug, Default)]
pub struct HermesParser {
    /// Input not yet consumed: at most a partial marker, between pushes.
    buf: String,
    sink: Sink,
    state: State,
    /// Index of the next call.
    index: usize,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Text,
    /// After `<tool_call>`: reading the JSON object.
    Call(CallObject),
    /// After the object: an optional `</tool_call>`.
    Closing,
}

impl HermesParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consume as much of `buf` as is certain.
    fn run(&mut self, eof: bool) {
        let mut pos = 0;
        loop {
            let rest = &self.buf[pos..];
            match &mut self.state {
                State::Text => match scan(rest, &[OPEN], eof) {
                    Scan::Found { at, .. } => {
                        self.sink.text(&rest[..at]);
                        pos += at + OPEN.len();
                        self.state = State::Call(CallObject::new(self.index, false, OPEN.into()));
                    }
                    Scan::Plain(n) => {
                        self.sink.text(&rest[..n]);
                        pos += n;
                        break;
                    }
                },
                State::Call(obj) => {
                    let mut next = None;
                    for c in rest.chars() {
                        match obj.feed(c, &mut self.sink) {
                            Step::Taken => pos += c.len_utf8(),
                            Step::Call => {
                                pos += c.len_utf8();
                                next = Some(State::Closing);
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
                    match next {
                        Some(state) => {
                            if matches!(state, State::Closing) || obj.started() {
                                self.index += 1;
                            }
                            self.state = state;
                        }
                        None if eof => {
                            if obj.finish(&mut self.sink) {
                                self.index += 1;
                            } else {
                                self.sink.text(obj.raw());
                            }
                            self.state = State::Text;
                        }
                        None => break,
                    }
                }
                State::Closing => match expect_after_ws(rest, CLOSE, eof) {
                    Expect::Matched(n) => {
                        pos += n;
                        self.state = State::Text;
                    }
                    Expect::NeedMore => break,
                    Expect::Other => self.state = State::Text,
                },
            }
        }
        self.buf.drain(..pos);
    }
}

buffered_parser!(HermesParser);

#[cfg(test)]
mod tests {
    use super::super::testkit::{check, Item};
    use super::super::{ToolEvent, ToolParser};
    use super::*;
    use serde_json::json;

    fn parser() -> Box<dyn ToolParser> {
        Box::new(HermesParser::new())
    }

    #[test]
    fn qwen_style_call_after_text() {
        let input = "Let me check the weather.\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>";
        check(
            &parser,
            input,
            &[
                Item::text("Let me check the weather."),
                Item::call("get_weather", json!({"city": "Paris", "unit": "celsius"})),
            ],
        );
    }

    #[test]
    fn several_calls_then_text() {
        let input = "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {\"y\": [1, 2, {\"z\": null}]}}\n</tool_call>\nDone.";
        check(
            &parser,
            input,
            &[
                Item::call("a", json!({"x": 1})),
                Item::call("b", json!({"y": [1, 2, {"z": null}]})),
                Item::text("Done."),
            ],
        );
    }

    #[test]
    fn arguments_before_name_are_buffered() {
        let input = "<tool_call>{\"arguments\": {\"q\": \"}{\"}, \"name\": \"search\"}</tool_call>";
        check(&parser, input, &[Item::call("search", json!({"q": "}{"}))]);
    }

    #[test]
    fn unicode_escapes_and_nesting_in_arguments() {
        let input = "<tool_call>{\"name\": \"write\", \"arguments\": {\"path\": \"naïve ✓.txt\", \"text\": \"say \\\"hi\\\" \\\\ </tool_call> {\\\"a\\\": [1]}\", \"meta\": {\"tags\": [\"日本\", {\"deep\": [[]]}], \"n\": -1.5e3}}}</tool_call>";
        check(
            &parser,
            input,
            &[Item::call(
                "write",
                json!({"path": "naïve ✓.txt", "text": "say \"hi\" \\ </tool_call> {\"a\": [1]}", "meta": {"tags": ["日本", {"deep": [[]]}], "n": -1.5e3}}),
            )],
        );
    }

    #[test]
    fn extra_keys_and_stringified_arguments() {
        let input = "<tool_call>{\"id\": 7, \"name\": \"f\", \"arguments\": \"{\\\"a\\\": true}\"}</tool_call>";
        check(&parser, input, &[Item::call("f", json!({"a": true}))]);
    }

    #[test]
    fn missing_arguments_and_missing_close_tag() {
        let input = "<tool_call>{\"name\": \"now\"}\n\nIt is noon.";
        check(
            &parser,
            input,
            &[Item::call("now", json!({})), Item::text("It is noon.")],
        );
    }

    #[test]
    fn look_alikes_stay_text() {
        let input = "Use <tool and <tool_calls> or <tool_call> tags, e.g. <tool_call> x</tool_call>. a<tool_cal";
        check(&parser, input, &[Item::text(input)]);
    }

    #[test]
    fn object_without_name_is_text() {
        let input = "<tool_call>{\"arguments\": {}}</tool_call> ok";
        check(
            &parser,
            input,
            &[Item::text("<tool_call>{\"arguments\": {}}</tool_call> ok")],
        );
    }

    #[test]
    fn unterminated_call_without_name_returns_raw_text() {
        let input = "Hi <tool_call>\n{\"arguments\": {\"a\": 1}, \"na";
        check(&parser, input, &[Item::text(input)]);
    }

    #[test]
    fn unterminated_call_with_complete_arguments_is_closed() {
        let input = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": [1, 2]}";
        check(&parser, input, &[Item::call("f", json!({"a": [1, 2]}))]);
    }

    #[test]
    fn truncated_arguments_still_end_the_started_call() {
        let mut p = HermesParser::new();
        let mut ev = p.push("<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": \"unfin");
        ev.extend(p.finish());
        assert_eq!(
            ev,
            vec![
                ToolEvent::CallStart {
                    index: 0,
                    name: "f".into()
                },
                ToolEvent::CallArgs {
                    index: 0,
                    fragment: "{\"a\": \"unfin".into()
                },
                ToolEvent::CallEnd { index: 0 },
            ]
        );
    }

    #[test]
    fn arguments_stream_before_the_call_ends() {
        let mut p = HermesParser::new();
        let ev = p.push("<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": \"hel");
        assert_eq!(
            ev,
            vec![
                ToolEvent::CallStart {
                    index: 0,
                    name: "f".into()
                },
                ToolEvent::CallArgs {
                    index: 0,
                    fragment: "{\"a\": \"hel".into()
                },
            ]
        );
        assert_eq!(
            p.push("lo\"}"),
            vec![ToolEvent::CallArgs {
                index: 0,
                fragment: "lo\"}".into()
            }]
        );
        assert_eq!(p.push("}"), vec![ToolEvent::CallEnd { index: 0 }]);
        assert_eq!(p.push("\n</tool_call>"), vec![]);
        assert_eq!(p.finish(), vec![]);
    }

    #[test]
    fn closing_tag_cut_off_by_the_end_is_dropped() {
        let input = "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_c";
        check(&parser, input, &[Item::call("f", json!({}))]);
    }

    #[test]
    fn plain_text_passes_through_with_its_whitespace() {
        check(
            &parser,
            "  Hello,\n world!\n\n",
            &[Item::text("  Hello,\n world!\n\n")],
        );
    }
}
