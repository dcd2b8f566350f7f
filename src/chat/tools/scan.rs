//! Shared machinery of the parsers: finding markers in streamed text without
//! ever releasing a marker's first half, and the [`Sink`] that collects
//! events and applies the whitespace policy around calls.

use super::ToolEvent;

/// Where the earliest of some markers stands in a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Scan {
    /// Marker `which` starts at this byte offset; the text before it is plain.
    Found { at: usize, which: usize },
    /// No marker yet; text up to this byte offset is plain, the rest could
    /// still grow into a marker and must wait for more input.
    Plain(usize),
}

/// Look for any of `markers` in `buf`. At end of stream (`eof`) nothing can
/// grow any more, so a partial marker is plain text.
pub(crate) fn scan(buf: &str, markers: &[&str], eof: bool) -> Scan {
    let found = markers
        .iter()
        .enumerate()
        .filter_map(|(which, m)| buf.find(m).map(|at| (at, which)))
        .min();
    let tail_start = if eof {
        buf.len()
    } else {
        markers
            .iter()
            .map(|m| buf.len() - partial_tail(buf, m))
            .min()
            .unwrap_or(buf.len())
    };
    match found {
        Some((at, which)) if at <= tail_start => Scan::Found { at, which },
        Some((at, _)) => Scan::Plain(tail_start.min(at)),
        None => Scan::Plain(tail_start),
    }
}

/// Length in bytes of the longest suffix of `buf` that is a proper prefix of `marker`.
pub(crate) fn partial_tail(buf: &str, marker: &str) -> usize {
    let longest = marker.len().saturating_sub(1).min(buf.len());
    (1..=longest)
        .rev()
        .find(|&len| {
            let start = buf.len() - len;
            buf.is_char_boundary(start) && marker.starts_with(&buf[start..])
        })
        .unwrap_or(0)
}

/// How `buf` (after leading whitespace) relates to an expected literal.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Expect {
    /// The literal is there; the byte offset just past it.
    Matched(usize),
    /// Too little text to tell (only whitespace, or a prefix of the literal);
    /// at the end of input such a prefix counts as [`Expect::Matched`].
    NeedMore,
    /// Something else is there.
    Other,
}

/// Does `buf`, once leading whitespace is skipped, start with `lit`?
pub(crate) fn expect_after_ws(buf: &str, lit: &str, eof: bool) -> Expect {
    let rest = buf.trim_start();
    let skipped = buf.len() - rest.len();
    if rest.starts_with(lit) {
        Expect::Matched(skipped + lit.len())
    } else if lit.starts_with(rest) {
        // At the end of input, a literal cut short is still markup.
        if eof {
            Expect::Matched(buf.len())
        } else {
            Expect::NeedMore
        }
    } else {
        Expect::Other
    }
}

/// Collects a parser's events, merging adjacent text and adjacent argument
/// fragments, and keeps the whitespace policy: whitespace right before a call
/// or right after one is layout, not content, so it is held until the next
/// non-whitespace text shows it was content after all.
#[derive(Debug, Default)]
pub(crate) struct Sink {
    out: Vec<ToolEvent>,
    /// Trailing whitespace of the text so far, not yet known to be content.
    held_ws: String,
    /// A call just ended: leading whitespace of the next text is dropped.
    after_call: bool,
}

impl Sink {
    pub fn text(&mut self, s: &str) {
        let mut s = s;
        if self.after_call {
            s = s.trim_start();
            if s.is_empty() {
                return;
            }
            self.after_call = false;
        }
        let body = s.trim_end();
        if !body.is_empty() {
            let held = std::mem::take(&mut self.held_ws);
            self.raw_text(&held);
            self.raw_text(body);
        }
        self.held_ws.push_str(&s[body.len()..]);
    }

    fn raw_text(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        match self.out.last_mut() {
            Some(ToolEvent::Text(t)) => t.push_str(s),
            _ => self.out.push(ToolEvent::Text(s.to_string())),
        }
    }

    pub fn call_start(&mut self, index: usize, name: String) {
        self.held_ws.clear();
        self.after_call = false;
        self.out.push(ToolEvent::CallStart { index, name });
    }

    pub fn args(&mut self, index: usize, s: &str) {
        if s.is_empty() {
            return;
        }
        match self.out.last_mut() {
            Some(ToolEvent::CallArgs { index: i, fragment }) if *i == index => fragment.push_str(s),
            _ => self.out.push(ToolEvent::CallArgs {
                index,
                fragment: s.to_string(),
            }),
        }
    }

    pub fn call_end(&mut self, index: usize) {
        self.after_call = true;
        self.out.push(ToolEvent::CallEnd { index });
    }

    /// The events so far, leaving held whitespace held.
    pub fn take(&mut self) -> Vec<ToolEvent> {
        std::mem::take(&mut self.out)
    }

    /// End of generation: held whitespace was content after all.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let held = std::mem::take(&mut self.held_ws);
        self.raw_text(&held);
        self.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_holds_back_partial_markers() {
        assert_eq!(scan("hello <tool", &["<tool_call>"], false), Scan::Plain(6));
        assert_eq!(scan("hello <tool", &["<tool_call>"], true), Scan::Plain(11));
        assert_eq!(
            scan("a<tool_call>b", &["<tool_call>"], false),
            Scan::Found { at: 1, which: 0 }
        );
        assert_eq!(scan("a <b", &["<x>", "<bc>"], false), Scan::Plain(2));
        assert_eq!(scan("a<｜", &["<｜tool▁sep｜>"], false), Scan::Plain(1));
        assert_eq!(scan("é<", &["<x>"], false), Scan::Plain(2));
    }

    #[test]
    fn whitespace_around_calls_is_layout() {
        let mut s = Sink::default();
        s.text("Let me look.\n\n");
        s.call_start(0, "f".into());
        s.call_end(0);
        s.text("\n  ");
        s.text("\nDone. ");
        let ev = s.finish();
        assert_eq!(ev[0], ToolEvent::Text("Let me look.".into()));
        assert_eq!(ev[3], ToolEvent::Text("Done. ".into()));
    }
}
