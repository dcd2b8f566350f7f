//! Llama 3.x JSON tool calls. The model answers with a bare JSON object,
//! optionally after the `<|python_tag|>` token:
//!
//! ```text
//! {"name": "get_weather", "parameters": {"city": "Paris"}}
//! <|python_tag|>{"type": "function", "name": "f", "parameters": {}}; {"name": "g", "parameters": {}}
//! ```
//!
//! There is no opening marker, so only a reply that starts (after
//! whitespace) with such an object is read as calls, and an object counts as
//! a call only once it has shown both a `name` and a `parameters` (or
//! `arguments`) key: a JSON answer like `{"name": "Ada", "age": 36}` stays
//! text. Several calls may follow one another, separated by `;` or newlines.

use super::json::{CallObject, Step};
use super::scan::Sink;

const PYTHON_TAG: &str = "<|python_tag|>";

/// Incremental parser for Llama 3.x JSON calls.
#[derive(Debug, Default)]
pub struct Llama3Parser {
    buf: String,
    sink: Sink,
    state: State,
    index: usize,
}

#[derive(Debug, Default)]
enum State {
    /// Nothing but whitespace (and maybe `<|python_tag|>`) so far.
    #[default]
    Start,
    Call(CallObject),
    /// After a call: separators, then another call or plain text.
    Between,
    /// The reply is plain text from here on.
    Text,
}

/// What comes next at the start of the reply or between calls.
enum Lead {
    /// Whitespace (or `;` between calls) of this many bytes, to skip.
    Skip(usize),
    Tag,
    Object,
    NeedMore,
    Other,
}

fn lead(rest: &str, seps: &str, eof: bool) -> Lead {
    let skip = rest.len()
        - rest
            .trim_start_matches(|c: char| c.is_whitespace() || seps.contains(c))
            .len();
    if skip > 0 {
        Lead::Skip(skip)
    } else if rest.starts_with(PYTHON_TAG) {
        Lead::Tag
    } else if rest.starts_with('{') {
        Lead::Object
    } else if rest.is_empty() || (!eof && PYTHON_TAG.starts_with(rest)) {
        Lead::NeedMore
    } else {
        Lead::Other
    }
}

impl Llama3Parser {
    pub fn new() -> Self {
        Self::default()
    }

    fn run(&mut self, eof: bool) {
        let mut pos = 0;
        // Leading whitespace of the reply: shown if the reply is not a call.
        let mut lead_ws = String::new();
        loop {
            let rest = &self.buf[pos..];
            match &mut self.state {
                State::Start | State::Between => {
                    let start = matches!(self.state, State::Start);
                    match lead(rest, if start { "" } else { ";" }, eof) {
                        Lead::Skip(n) => {
                            if start {
                                lead_ws.push_str(&rest[..n]);
                            }
                            pos += n;
                        }
                        Lead::Tag => {
                            // Whitespace before the tag is layout, and the tag is markup.
                            lead_ws.clear();
                            pos += PYTHON_TAG.len();
                        }
                        Lead::Object => {
                            let raw = std::mem::take(&mut lead_ws);
                            self.state = State::Call(CallObject::new(self.index, true, raw));
                        }
                        Lead::NeedMore if !eof => {
                            // Whitespace stays in `buf` until we know what it leads to.
                            pos -= lead_ws.len();
                            break;
                        }
                        Lead::NeedMore | Lead::Other => {
                            self.sink.text(&std::mem::take(&mut lead_ws));
                            self.state = State::Text;
                        }
                    }
                }
                State::Call(obj) => {
                    let mut next = None;
                    for c in rest.chars() {
                        match obj.feed(c, &mut self.sink) {
                            Step::Taken => pos += c.len_utf8(),
                            Step::Call => {
                                pos += c.len_utf8();
                                next = Some(State::Between);
                                break;
                            }
                            Step::NotCall => {
                                pos += c.len_utf8();
                                self.sink.text(obj.raw());
                                next = Some(State::Text);
                                break;
                            }
                            Step::Rejected => {
                                next = Some(if obj.close(&mut self.sink) {
                                    State::Between
                                } else {
                                    self.sink.text(obj.raw());
                                    State::Text
                                });
                                break;
                            }
                        }
                    }
                    match next {
                        Some(state) => {
                            if matches!(state, State::Between) {
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
                State::Text => {
                    self.sink.text(rest);
                    pos = self.buf.len();
                    break;
                }
            }
        }
        self.buf.drain(..pos);
    }
}

buffered_parser!(Llama3Parser);

#[cfg(test)]
mod tests {
    use super::super::testkit::{check, Item};
    use super::super::ToolParser;
    use super::*;
    use serde_json::json;

    fn parser() -> Box<dyn ToolParser> {
        Box::new(Llama3Parser::new())
    }

    #[test]
    fn bare_object_call() {
        let input = "{\"name\": \"get_weather\", \"parameters\": {\"location\": \"San Francisco, CA\", \"days\": 3}}";
        check(
            &parser,
            input,
            &[Item::call(
                "get_weather",
                json!({"location": "San Francisco, CA", "days": 3}),
            )],
        );
    }

    #[test]
    fn python_tag_and_type_function() {
        let input = "\n<|python_tag|>{\"type\": \"function\", \"name\": \"search\", \"parameters\": {\"query\": \"rust \\\"async\\\" 日本\"}}";
        check(
            &parser,
            input,
            &[Item::call(
                "search",
                json!({"query": "rust \"async\" 日本"}),
            )],
        );
    }

    #[test]
    fn several_calls_separated_by_semicolons_and_newlines() {
        let input = "{\"name\": \"a\", \"parameters\": {\"n\": [1, {\"m\": {}}]}}; {\"name\": \"b\", \"arguments\": {}}\n{\"parameters\": {\"k\": \"v\"}, \"name\": \"c\"}";
        check(
            &parser,
            input,
            &[
                Item::call("a", json!({"n": [1, {"m": {}}]})),
                Item::call("b", json!({})),
                Item::call("c", json!({"k": "v"})),
            ],
        );
    }

    #[test]
    fn text_after_the_calls() {
        let input = "{\"name\": \"a\", \"parameters\": {}}\n\nI called a.";
        check(
            &parser,
            input,
            &[Item::call("a", json!({})), Item::text("I called a.")],
        );
    }

    #[test]
    fn json_answer_is_not_a_call() {
        let input = "{\"name\": \"Ada\", \"age\": 36}";
        check(&parser, input, &[Item::text(input)]);
        let input = " {\"name\": \"Ada\", \"likes\": {\"x\": 1";
        check(&parser, input, &[Item::text(input)]);
    }

    #[test]
    fn prose_is_not_a_call() {
        let input = "  The JSON {\"name\": \"f\", \"parameters\": {}} is a call.";
        check(&parser, input, &[Item::text(input)]);
        check(
            &parser,
            "<|python_ta is a tag",
            &[Item::text("<|python_ta is a tag")],
        );
    }

    #[test]
    fn whitespace_only_reply_is_kept() {
        check(&parser, " \n", &[Item::text(" \n")]);
    }
}
