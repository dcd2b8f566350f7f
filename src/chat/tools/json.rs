//! Incremental JSON for tool calls: [`JsonScan`] finds where one JSON value
//! ends without building it, and [`CallObject`] reads the
//! `{"name": ..., "arguments": {...}}` object that several formats share,
//! streaming the arguments' text as it arrives.

use super::scan::Sink;

/// Follows one JSON value char by char: only strings, escapes and nesting
/// depth, which is all it takes to know where the value ends. It does not
/// validate; whoever finally parses the arguments does.
#[derive(Debug, Clone, Default)]
pub(crate) struct JsonScan {
    state: ScanState,
    depth: u32,
    in_str: bool,
    escaped: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ScanState {
    #[default]
    Start,
    /// Inside an object or array.
    Nested,
    /// Inside a top-level string.
    Str,
    /// Inside a number or `true`/`false`/`null`, which end only at the next char.
    Scalar,
    Done,
}

/// What [`JsonScan::feed`] made of a char.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Feed {
    /// Part of the value, which goes on.
    More,
    /// Part of the value, and the value is now complete.
    Done,
    /// Not part of the value: a scalar ended just before it.
    Ended,
    /// Cannot start a value.
    Invalid,
}

impl JsonScan {
    pub fn feed(&mut self, c: char) -> Feed {
        match self.state {
            ScanState::Start => match c {
                '{' | '[' => {
                    self.state = ScanState::Nested;
                    self.depth = 1;
                    Feed::More
                }
                '"' => {
                    self.state = ScanState::Str;
                    self.in_str = true;
                    Feed::More
                }
                '-' | '0'..='9' | 't' | 'f' | 'n' => {
                    self.state = ScanState::Scalar;
                    Feed::More
                }
                _ => Feed::Invalid,
            },
            ScanState::Nested | ScanState::Str if self.in_str => {
                if self.escaped {
                    self.escaped = false;
                } else if c == '\\' {
                    self.escaped = true;
                } else if c == '"' {
                    self.in_str = false;
                    if self.state == ScanState::Str {
                        self.state = ScanState::Done;
                        return Feed::Done;
                    }
                }
                Feed::More
            }
            ScanState::Nested => {
                match c {
                    '"' => self.in_str = true,
                    '{' | '[' => self.depth += 1,
                    '}' | ']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            self.state = ScanState::Done;
                            return Feed::Done;
                        }
                    }
                    _ => {}
                }
                Feed::More
            }
            ScanState::Scalar => {
                if c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.') {
                    Feed::More
                } else {
                    self.state = ScanState::Done;
                    Feed::Ended
                }
            }
            ScanState::Str | ScanState::Done => Feed::Ended,
        }
    }

    /// A scalar still open at end of input is complete; anything else open is not.
    pub fn complete_at_eof(&self) -> bool {
        matches!(self.state, ScanState::Done | ScanState::Scalar)
    }
}

/// What [`CallObject::feed`] made of a char.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Taken; the object goes on.
    Taken,
    /// Taken, and it closed the object, which was a call: `CallEnd` is out.
    Call,
    /// Taken, and it closed the object, which was not a call: nothing was
    /// emitted and [`CallObject::raw`] is the text to show instead.
    NotCall,
    /// Not taken: the char cannot continue the object.
    Rejected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Open,
    Key,
    InKey,
    Colon,
    Value,
    InValue,
    AfterValue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Name,
    Args,
    Other,
}

/// Reads one `{"name": "...", "arguments": {...}}` object (or `parameters`
/// for Llama), char by char. With the name first, `CallStart` goes out as
/// soon as the name is complete and the arguments stream through as they
/// arrive; with the arguments first they are held until the name shows up.
#[derive(Debug)]
pub(crate) struct CallObject {
    index: usize,
    /// Llama's bare JSON could be an ordinary JSON answer: only an object
    /// with both a name and an arguments key counts as a call.
    need_args_key: bool,
    at: At,
    /// Everything taken so far, shown as text if this is not a call after all.
    raw: String,
    key: String,
    kind: KeyKind,
    /// The current value's text when it is not streamed out directly.
    value: String,
    scan: JsonScan,
    name: Option<String>,
    seen_args_key: bool,
    /// The current arguments value goes straight out as fragments.
    streaming: bool,
    /// Complete arguments held until the call can start.
    pending_args: Option<String>,
    args_out: bool,
    args_done: bool,
    started: bool,
}

impl CallObject {
    /// `raw` is the markup already consumed before the object (shown as text
    /// if the object turns out not to be a call).
    pub fn new(index: usize, need_args_key: bool, raw: String) -> Self {
        CallObject {
            index,
            need_args_key,
            at: At::Open,
            raw,
            key: String::new(),
            kind: KeyKind::Other,
            value: String::new(),
            scan: JsonScan::default(),
            name: None,
            seen_args_key: false,
            streaming: false,
            pending_args: None,
            args_out: false,
            args_done: false,
            started: false,
        }
    }

    pub fn started(&self) -> bool {
        self.started
    }

    pub fn raw(&self) -> &str {
        &self.raw
    }

    pub fn feed(&mut self, c: char, sink: &mut Sink) -> Step {
        let step = self.step(c, sink);
        if step != Step::Rejected {
            self.raw.push(c);
        }
        step
    }

    fn step(&mut self, c: char, sink: &mut Sink) -> Step {
        let ws = c.is_whitespace();
        match self.at {
            At::Open if ws => {}
            At::Open if c == '{' => self.at = At::Key,
            At::Key | At::AfterValue if ws => {}
            At::Key if c == '"' => {
                self.at = At::InKey;
                self.key.clear();
                self.key.push(c);
                self.scan = JsonScan::default();
                self.scan.feed(c);
            }
            At::Key | At::AfterValue if c == '}' => return self.close_object(sink),
            At::AfterValue if c == ',' => self.at = At::Key,
            At::InKey => {
                self.key.push(c);
                if self.scan.feed(c) == Feed::Done {
                    self.kind = match serde_json::from_str::<String>(&self.key).as_deref() {
                        Ok("name") => KeyKind::Name,
                        Ok("arguments" | "parameters") if !self.args_done => KeyKind::Args,
                        _ => KeyKind::Other,
                    };
                    if self.kind == KeyKind::Args {
                        self.seen_args_key = true;
                        self.maybe_start(sink);
                    }
                    self.at = At::Colon;
                }
            }
            At::Colon if ws => {}
            At::Colon if c == ':' => self.at = At::Value,
            At::Value if ws => {}
            At::Value => {
                self.scan = JsonScan::default();
                self.value.clear();
                // Arguments given as a JSON string (`"{\"a\":1}"`) are decoded
                // once complete, so they cannot stream.
                self.streaming = self.kind == KeyKind::Args && self.started && c != '"';
                self.at = At::InValue;
                return self.value_char(c, sink);
            }
            At::InValue => return self.value_char(c, sink),
            _ => return Step::Rejected,
        }
        Step::Taken
    }

    fn value_char(&mut self, c: char, sink: &mut Sink) -> Step {
        match self.scan.feed(c) {
            Feed::Invalid => Step::Rejected,
            Feed::Ended => {
                self.value_done(sink);
                self.at = At::AfterValue;
                self.step(c, sink)
            }
            feed => {
                if self.streaming {
                    sink.args(self.index, c.encode_utf8(&mut [0; 4]));
                    self.args_out = true;
                } else {
                    self.value.push(c);
                }
                if feed == Feed::Done {
                    self.value_done(sink);
                    self.at = At::AfterValue;
                }
                Step::Taken
            }
        }
    }

    fn value_done(&mut self, sink: &mut Sink) {
        let value = std::mem::take(&mut self.value);
        match self.kind {
            KeyKind::Name => {
                if let (None, Ok(name)) = (&self.name, serde_json::from_str::<String>(&value)) {
                    self.name = Some(name);
                    self.maybe_start(sink);
                }
            }
            KeyKind::Args => {
                self.args_done = true;
                if !self.streaming {
                    let args = match serde_json::from_str::<String>(&value) {
                        Ok(decoded) => decoded,
                        Err(_) => value,
                    };
                    self.pending_args = Some(args);
                    self.maybe_start(sink);
                }
                self.streaming = false;
            }
            KeyKind::Other => {}
        }
    }

    fn maybe_start(&mut self, sink: &mut Sink) {
        if !self.started && (self.seen_args_key || !self.need_args_key) {
            if let Some(name) = &self.name {
                sink.call_start(self.index, name.clone());
                self.started = true;
            }
        }
        if self.started {
            if let Some(args) = self.pending_args.take() {
                sink.args(self.index, &args);
                self.args_out = true;
            }
        }
    }

    fn close_object(&mut self, sink: &mut Sink) -> Step {
        if self.close(sink) {
            Step::Call
        } else {
            Step::NotCall
        }
    }

    /// End the call here (object closed, input ended, or junk followed).
    /// Returns false when no call was announced: the caller shows [`Self::raw`].
    pub fn close(&mut self, sink: &mut Sink) -> bool {
        if !self.started {
            return false;
        }
        if !self.args_out {
            sink.args(self.index, "{}");
        }
        sink.call_end(self.index);
        true
    }

    /// Input ended inside the object. A scalar value still open is complete.
    pub fn finish(&mut self, sink: &mut Sink) -> bool {
        if self.at == At::InValue && self.scan.complete_at_eof() {
            self.value_done(sink);
        }
        self.close(sink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(s: &str) -> Option<usize> {
        let mut scan = JsonScan::default();
        for (i, c) in s.char_indices() {
            match scan.feed(c) {
                Feed::Done => return Some(i + c.len_utf8()),
                Feed::Ended => return Some(i),
                Feed::Invalid => return None,
                Feed::More => {}
            }
        }
        None
    }

    #[test]
    fn scan_finds_where_values_end() {
        assert_eq!(
            extent(r#"{"a": "}\"]", "b": [1, {"c": null}]} tail"#),
            Some(36)
        );
        assert_eq!(extent(r#""x\\" tail"#), Some(5));
        assert_eq!(extent("-12.5e3, next"), Some(7));
        assert_eq!(extent("true}"), Some(4));
        assert_eq!(extent("[1, 2"), None);
        assert_eq!(extent("?"), None);
    }
}
