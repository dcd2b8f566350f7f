//! Reasoning versus answer: splits a model's streamed output at its thinking
//! markers (`<think>`...`</think>` and the like), so the API layers can send
//! the reasoning as `reasoning_content` or `thinking` blocks and the rest as
//! the answer.
//!
//! Many templates end the generation prompt with the opening marker
//! (`<｜Assistant｜><think>\n`): the model then starts inside its reasoning
//! and only ever writes the closing marker. [`ReasoningSplitter`] is told
//! which case it is in; [`prompt_opens_reasoning`] tells from the rendered
//! prompt. Output cut short inside the reasoning stays reasoning.

/// One piece of the split output, in generation order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReasoningPiece {
    Reasoning(String),
    Content(String),
}

/// Marker pairs that templates are known to use, most common first.
const KNOWN_MARKERS: [(&str, &str); 5] = [
    ("<think>", "</think>"),
    ("<seed:think>", "</seed:think>"),
    ("[THINK]", "[/THINK]"),
    ("◁think▷", "◁/think▷"),
    ("<|START_THINKING|>", "<|END_THINKING|>"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No reasoning yet: content, unless an opening marker comes.
    Before,
    Inside,
    /// Reasoning is over: everything is content.
    After,
}

/// Incremental splitter of reasoning from content.
#[derive(Debug)]
pub struct ReasoningSplitter {
    open: String,
    close: String,
    state: State,
    /// Input not yet certain: at most a partial marker (or one held newline).
    buf: String,
    /// The newline that follows the opening marker is layout: drop it.
    strip_newline: bool,
    /// The newlines that follow the closing marker are layout: drop them.
    strip_leading: bool,
    /// The prompt opened reasoning and the model has written nothing yet: a
    /// repeated opening marker is swallowed rather than shown.
    may_repeat_open: bool,
    /// Trailing whitespace of content before an opening marker (layout if
    /// the marker follows), or the newline before a closing marker.
    held: String,
    out: Vec<ReasoningPiece>,
}

impl Default for ReasoningSplitter {
    fn default() -> Self {
        Self::new("<think>", "</think>", false)
    }
}

impl ReasoningSplitter {
    /// `prompt_opened`: the rendered prompt already ends inside the
    /// reasoning (it wrote the opening marker).
    pub fn new(open: impl Into<String>, close: impl Into<String>, prompt_opened: bool) -> Self {
        ReasoningSplitter {
            open: open.into(),
            close: close.into(),
            state: if prompt_opened {
                State::Inside
            } else {
                State::Before
            },
            buf: String::new(),
            strip_newline: prompt_opened,
            strip_leading: false,
            may_repeat_open: prompt_opened,
            held: String::new(),
            out: Vec::new(),
        }
    }

    /// Whether generation is inside the reasoning now (for thinking budgets).
    pub fn in_reasoning(&self) -> bool {
        self.state == State::Inside
    }

    /// The marker that ends reasoning: what to inject when a thinking budget runs out.
    pub fn close_marker(&self) -> &str {
        &self.close
    }

    pub fn push(&mut self, text: &str) -> Vec<ReasoningPiece> {
        self.buf.push_str(text);
        self.run(false);
        std::mem::take(&mut self.out)
    }

    /// Generation ended: everything held is released as what it was part of.
    pub fn finish(&mut self) -> Vec<ReasoningPiece> {
        self.run(true);
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Inside => self.emit(ReasoningPiece::Reasoning(held)),
            _ => self.emit(ReasoningPiece::Content(held)),
        }
        std::mem::take(&mut self.out)
    }

    fn emit(&mut self, piece: ReasoningPiece) {
        match (self.out.last_mut(), piece) {
            (_, ReasoningPiece::Reasoning(s) | ReasoningPiece::Content(s)) if s.is_empty() => {}
            (Some(ReasoningPiece::Reasoning(a)), ReasoningPiece::Reasoning(b)) => a.push_str(&b),
            (Some(ReasoningPiece::Content(a)), ReasoningPiece::Content(b)) => a.push_str(&b),
            (_, piece) => self.out.push(piece),
        }
    }

    fn run(&mut self, eof: bool) {
        loop {
            match self.state {
                State::Before => {
                    let (plain, found) = find(&self.buf, &self.open, eof);
                    let text: String = self.buf.drain(..plain).collect();
                    if found {
                        self.buf.drain(..self.open.len());
                        // Whitespace right before the marker is layout.
                        if !text.trim().is_empty() {
                            let held = std::mem::take(&mut self.held);
                            self.emit(ReasoningPiece::Content(held + text.trim_end()));
                        }
                        self.held.clear();
                        self.state = State::Inside;
                        self.strip_newline = true;
                    } else {
                        let body = text.trim_end();
                        if !body.is_empty() {
                            let held = std::mem::take(&mut self.held);
                            self.emit(ReasoningPiece::Content(held + body));
                        }
                        self.held.push_str(&text[body.len()..]);
                        return;
                    }
                }
                State::Inside => {
                    if self.may_repeat_open {
                        let trimmed = self.buf.trim_start();
                        if trimmed.starts_with(&self.open) {
                            let skip = self.buf.len() - trimmed.len() + self.open.len();
                            self.buf.drain(..skip);
                        } else if !eof && self.open.starts_with(trimmed) {
                            return;
                        }
                        self.may_repeat_open = false;
                    }
                    if self.strip_newline {
                        if self.buf.is_empty() && !eof {
                            return;
                        }
                        if self.buf.starts_with('\n') {
                            self.buf.remove(0);
                        }
                        self.strip_newline = false;
                    }
                    let (plain, found) = find(&self.buf, &self.close, eof);
                    let mut text = std::mem::take(&mut self.held);
                    text.extend(self.buf.drain(..plain));
                    if found {
                        self.buf.drain(..self.close.len());
                        // The newline before the closing marker is layout too.
                        if text.ends_with('\n') {
                            text.pop();
                        }
                        self.emit(ReasoningPiece::Reasoning(text));
                        self.state = State::After;
                        self.strip_leading = true;
                    } else {
                        if text.ends_with('\n') && !eof {
                            text.pop();
                            self.held.push('\n');
                        }
                        self.emit(ReasoningPiece::Reasoning(text));
                        return;
                    }
                }
                State::After => {
                    if self.strip_leading {
                        let skip = self.buf.len() - self.buf.trim_start_matches(['\n', '\r']).len();
                        self.buf.drain(..skip);
                        if self.buf.is_empty() {
                            return;
                        }
                        self.strip_leading = false;
                    }
                    let text = std::mem::take(&mut self.buf);
                    self.emit(ReasoningPiece::Content(text));
                    return;
                }
            }
        }
    }
}

/// Where `marker` is in `buf`: (bytes certain to be before it, found). When
/// not found, a tail that could be the marker's start is left out, unless
/// the input has ended.
fn find(buf: &str, marker: &str, eof: bool) -> (usize, bool) {
    if let Some(at) = buf.find(marker) {
        return (at, true);
    }
    if eof {
        return (buf.len(), false);
    }
    let longest = marker.len().saturating_sub(1).min(buf.len());
    let tail = (1..=longest)
        .rev()
        .find(|&n| buf.is_char_boundary(buf.len() - n) && marker.starts_with(&buf[buf.len() - n..]))
        .unwrap_or(0);
    (buf.len() - tail, false)
}

/// A template's reasoning markers, and whether the prompt opens the
/// reasoning itself (so the reply starts inside it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReasoningMarkers {
    /// What opens reasoning (`<think>`).
    pub open: String,
    /// What closes it (`</think>`): what the engine writes when a
    /// thinking budget runs out.
    pub close: String,
    /// The prompt ends inside the reasoning: the reply begins as reasoning.
    pub opened_by_prompt: bool,
}

impl ReasoningMarkers {
    pub fn new(open: &str, close: &str, opened_by_prompt: bool) -> Self {
        Self {
            open: open.to_string(),
            close: close.to_string(),
            opened_by_prompt,
        }
    }
}

/// The reasoning markers a chat template uses, if any, and whether its
/// generation prompt opens the reasoning itself. The last part is read off
/// the template's string literals after `add_generation_prompt` (a literal
/// that writes the opening marker without the closing one); when the
/// rendered prompt is at hand, [`prompt_opens_reasoning`] is exact.
pub fn detect_markers(template_source: &str) -> Option<ReasoningMarkers> {
    let (open, close) = KNOWN_MARKERS
        .iter()
        .find(|(open, close)| template_source.contains(open) && template_source.contains(close))?;
    // Templates open reasoning in their generation prompt, which follows
    // the last mention of `add_generation_prompt`.
    let opens = template_source
        .rfind("add_generation_prompt")
        .is_some_and(|at| {
            string_literals(&template_source[at..]).any(|lit| {
                lit.rfind(open)
                    .is_some_and(|o| !lit[o + open.len()..].contains(close))
            })
        });
    Some(ReasoningMarkers::new(open, close, opens))
}

/// Whether a rendered prompt ends inside reasoning: its last opening marker
/// comes after its last closing one.
pub fn prompt_opens_reasoning(rendered_prompt: &str, open: &str, close: &str) -> bool {
    match (rendered_prompt.rfind(open), rendered_prompt.rfind(close)) {
        (Some(o), Some(c)) => o > c,
        (Some(_), None) => true,
        _ => false,
    }
}

/// The quoted string literals of Jinja source (their raw text, escapes kept).
fn string_literals(src: &str) -> impl Iterator<Item = &str> {
    let mut rest = src;
    std::iter::from_fn(move || loop {
        let start = rest.find(['\'', '"'])?;
        let quote = rest[start..].chars().next()?;
        let body = &rest[start + 1..];
        let mut escaped = false;
        let end = body.char_indices().find(|&(_, c)| {
            let closes = c == quote && !escaped;
            escaped = c == '\\' && !escaped;
            closes
        });
        match end {
            Some((end, _)) => {
                rest = &body[end + 1..];
                return Some(&body[..end]);
            }
            None => rest = body,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::tools::testkit::splits;
    use ReasoningPiece::{Content, Reasoning};

    /// Every split of `input` must give `expected` (adjacent pieces merged).
    fn check(
        open: &str,
        close: &str,
        prompt_opened: bool,
        input: &str,
        expected: &[ReasoningPiece],
    ) {
        for chunks in splits(input) {
            let mut s = ReasoningSplitter::new(open, close, prompt_opened);
            let mut got: Vec<ReasoningPiece> = Vec::new();
            let pieces = chunks.iter().flat_map(|c| s.push(c)).collect::<Vec<_>>();
            for piece in pieces.into_iter().chain(s.finish()) {
                match (got.last_mut(), piece) {
                    (_, Reasoning(t) | Content(t)) if t.is_empty() => panic!("empty piece"),
                    (Some(Reasoning(a)), Reasoning(b)) | (Some(Content(a)), Content(b)) => {
                        a.push_str(&b)
                    }
                    (_, piece) => got.push(piece),
                }
            }
            assert_eq!(got, expected, "split {chunks:?}");
        }
    }

    fn r(s: &str) -> ReasoningPiece {
        Reasoning(s.into())
    }
    fn c(s: &str) -> ReasoningPiece {
        Content(s.into())
    }
    /// `<think>` markers; `opened`: the prompt opened the reasoning.
    fn think(opened: bool, input: &str, expected: &[ReasoningPiece]) {
        check("<think>", "</think>", opened, input, expected);
    }

    #[test]
    fn qwen3_style_block() {
        let input = "<think>\nLet me think.\n\nTwo plus two.\n</think>\n\nThe answer is 4.\n";
        think(
            false,
            input,
            &[r("Let me think.\n\nTwo plus two."), c("The answer is 4.\n")],
        );
    }

    #[test]
    fn prompt_opened_the_reasoning() {
        think(
            true,
            "Hmm, 日本.\n</think>\n\nHi",
            &[r("Hmm, 日本."), c("Hi")],
        );
        // Some models write the opening marker again anyway.
        think(true, "<think>\nHmm.</think>Hi", &[r("Hmm."), c("Hi")]);
    }

    #[test]
    fn content_before_the_opening_marker() {
        think(
            false,
            "Sure. <think>x < y</think>y",
            &[c("Sure."), r("x < y"), c("y")],
        );
        think(false, "\n\n<think>a</think>b", &[r("a"), c("b")]);
    }

    #[test]
    fn no_reasoning_and_look_alikes() {
        think(
            false,
            "just text </think> <thin",
            &[c("just text </think> <thin")],
        );
        think(false, "  padded  ", &[c("  padded  ")]);
    }

    #[test]
    fn only_the_first_block_is_reasoning() {
        let input = "<think>a</think>b <think>c</think>";
        think(false, input, &[r("a"), c("b <think>c</think>")]);
    }

    #[test]
    fn truncated_reasoning_stays_reasoning() {
        think(true, "still thinking\n</thi", &[r("still thinking\n</thi")]);
        think(false, "<think>\nstill", &[r("still")]);
    }

    #[test]
    fn other_markers() {
        let input = "[THINK]plan[/THINK]\nanswer";
        check(
            "[THINK]",
            "[/THINK]",
            false,
            input,
            &[r("plan"), c("answer")],
        );
        let input = "<seed:think>\nα\n</seed:think>β";
        check(
            "<seed:think>",
            "</seed:think>",
            false,
            input,
            &[r("α"), c("β")],
        );
    }

    #[test]
    fn in_reasoning_follows_the_markers() {
        let mut s = ReasoningSplitter::default();
        assert!(!s.in_reasoning());
        s.push("<think>\nhm");
        assert!(s.in_reasoning());
        s.push("</think>ok");
        assert!(!s.in_reasoning());
        assert_eq!(s.close_marker(), "</think>");
    }

    #[test]
    fn detects_markers_and_whether_the_prompt_opens_them() {
        let think = |opens| Some(ReasoningMarkers::new("<think>", "</think>", opens));
        // Qwen 3: thinking off writes an empty block; on, the model opens it.
        let qwen3 = "{%- if add_generation_prompt %}\n{{- '<|im_start|>assistant\\n' }}\n{%- if enable_thinking is defined and enable_thinking is false %}\n{{- '<think>\\n\\n</think>\\n\\n' }}\n{%- endif %}{%- endif %}";
        assert_eq!(detect_markers(qwen3), think(false));
        let r1 = "{% set c = content.split('</think>')[-1] %}{% if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{% endif %}";
        assert_eq!(detect_markers(r1), think(true));
        let v31 = "{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% if not thinking %}{{'</think>'}}{% else %}{{'<think>'}}{% endif %}{% endif %}";
        assert_eq!(detect_markers(v31), think(true));
        let magistral = "{{ '[THINK]' }} ... {{ '[/THINK]' }}";
        assert_eq!(
            detect_markers(magistral),
            Some(ReasoningMarkers::new("[THINK]", "[/THINK]", false))
        );
        assert_eq!(detect_markers("{{ messages }} <|im_start|>"), None);
    }

    #[test]
    fn rendered_prompt_tells_exactly() {
        let opens = |p| prompt_opens_reasoning(p, "<think>", "</think>");
        assert!(opens("<|im_start|>assistant\n<think>\n"));
        assert!(!opens("<think>\n\n</think>\n\n"));
        assert!(!opens("<|im_start|>assistant\n"));
    }
}
