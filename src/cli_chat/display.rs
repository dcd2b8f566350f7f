//! The terminal side of a reply: text as it streams, reasoning dimmed and
//! set apart, tool calls labelled, a live progress bar while the prompt is
//! prefilled; and the figures `/stats` prints.

use std::io::Write;
use std::time::Duration;

use console::Style;
use indicatif::{ProgressBar, ProgressStyle};

use super::backend::ReplyEvent;
use crate::chat::output::OutputEvent;
use crate::chat::ToolCall;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Nothing,
    Reasoning,
    Text,
}

/// Writes one reply as it comes.
pub struct Printer {
    /// Reasoning goes to stderr (one-shot use: stdout carries the answer
    /// alone, for scripts), else to stdout, dimmed.
    reasoning_to_stderr: bool,
    section: Section,
    bar: Option<ProgressBar>,
    /// Prompt tokens reused, so the bar's speed counts computed ones only.
    cached: u32,
    dim_out: Style,
    dim_err: Style,
    call: Style,
}

impl Printer {
    pub fn new(one_shot: bool) -> Self {
        Self {
            reasoning_to_stderr: one_shot,
            section: Section::Nothing,
            bar: None,
            cached: 0,
            dim_out: Style::new().dim().for_stdout(),
            dim_err: Style::new().dim().for_stderr(),
            call: Style::new().cyan().for_stdout(),
        }
    }

    pub fn event(&mut self, ev: &ReplyEvent) {
        match ev {
            ReplyEvent::Started { cached, .. } => self.cached = *cached,
            ReplyEvent::Prefill {
                done,
                total,
                elapsed,
            } => self.prefill(*done, *total, *elapsed),
            ReplyEvent::Output(out) => {
                self.clear_bar();
                self.output(out);
            }
            ReplyEvent::Finished { .. } | ReplyEvent::Failed(_) => self.clear_bar(),
        }
    }

    fn prefill(&mut self, done: u32, total: u32, elapsed: Duration) {
        if done >= total {
            self.clear_bar();
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let style =
                ProgressStyle::with_template("prefill [{bar:32}] {pos}/{len} tokens  {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            let bar = ProgressBar::new(total as u64);
            bar.set_style(style);
            bar
        });
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(prefill_message(done, total, self.cached, elapsed));
    }

    fn clear_bar(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    fn output(&mut self, ev: &OutputEvent) {
        let mut out = std::io::stdout().lock();
        match ev {
            OutputEvent::Reasoning(r) => {
                if self.reasoning_to_stderr {
                    eprint!("{}", self.dim_err.apply_to(r));
                } else {
                    let _ = write!(out, "{}", self.dim_out.apply_to(r));
                }
                self.section = Section::Reasoning;
            }
            OutputEvent::Text(t) => {
                if self.section == Section::Reasoning {
                    self.end_reasoning(&mut out);
                }
                let t = if self.section == Section::Nothing {
                    t.trim_start()
                } else {
                    t.as_str()
                };
                let _ = write!(out, "{t}");
                if !t.is_empty() {
                    self.section = Section::Text;
                }
            }
            OutputEvent::CallStart { name, .. } => {
                if self.section == Section::Reasoning {
                    self.end_reasoning(&mut out);
                } else if self.section == Section::Text {
                    let _ = writeln!(out);
                }
                let _ = write!(
                    out,
                    "{} ",
                    self.call.apply_to(format!("[tool call {name}]"))
                );
                self.section = Section::Text;
            }
            OutputEvent::CallArgs { fragment, .. } => {
                let _ = write!(out, "{fragment}");
            }
            OutputEvent::CallEnd { .. } => {
                let _ = writeln!(out);
                self.section = Section::Nothing;
            }
        }
        let _ = out.flush();
    }

    fn end_reasoning(&mut self, out: &mut impl Write) {
        if self.reasoning_to_stderr {
            eprintln!();
        } else {
            let _ = write!(out, "\n\n");
        }
        self.section = Section::Nothing;
    }

    /// After the last event: end the line.
    pub fn finish(&mut self) {
        self.clear_bar();
        if self.section != Section::Nothing {
            println!();
        }
        self.section = Section::Nothing;
    }
}

/// The bar's message: computed tokens per second and the time left.
fn prefill_message(done: u32, total: u32, cached: u32, elapsed: Duration) -> String {
    let computed = done.saturating_sub(cached) as f64;
    let secs = elapsed.as_secs_f64();
    if computed <= 0.0 || secs <= 0.0 {
        return String::new();
    }
    let rate = computed / secs;
    let left = total.saturating_sub(done) as f64 / rate;
    format!("{rate:.0} t/s, {} left", short_secs(left))
}

fn short_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.0} s")
    } else {
        format!("{}m{:02.0}s", (s / 60.0) as u64, s % 60.0)
    }
}

/// One reply's figures.
#[derive(Debug, Clone, Default)]
pub struct ReplyStats {
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    /// Where the reused prefix came from (`live`, `ram`, `disk`, `none`);
    /// empty when a server did not say.
    pub source: String,
    pub generated: u32,
    pub prefill: Duration,
    pub decode: Duration,
    /// From sending the request to the first reply event.
    pub first_token: Option<Duration>,
    /// How it ended: `stop`, `length`, `tool_calls`, `stopped` (Ctrl-C),
    /// `failed`.
    pub outcome: String,
}

/// What `/stats` keeps over the session.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub last: Option<ReplyStats>,
    pub replies: u32,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub generated: u64,
}

impl Stats {
    pub fn record(&mut self, r: ReplyStats) {
        self.replies += 1;
        self.prompt_tokens += r.prompt_tokens as u64;
        self.cached_tokens += r.cached_tokens as u64;
        self.generated += r.generated as u64;
        self.last = Some(r);
    }

    /// The `/stats` text. `n_ctx`: the context size, when known.
    pub fn render(&self, messages: usize, n_ctx: Option<u32>) -> String {
        let mut s = String::new();
        match &self.last {
            None => s.push_str("last reply: none yet\n"),
            Some(r) => {
                let source = if r.source.is_empty() {
                    "source not reported"
                } else {
                    r.source.as_str()
                };
                let computed = r.prompt_tokens.saturating_sub(r.cached_tokens);
                s.push_str(&format!(
                    "last reply: prompt {} tokens, {} cached ({source}), {computed} prefilled{}\n",
                    r.prompt_tokens,
                    r.cached_tokens,
                    rate(computed, r.prefill),
                ));
                s.push_str(&format!(
                    "            {} generated{}, {}",
                    r.generated,
                    rate(r.generated.saturating_sub(1), r.decode),
                    r.outcome
                ));
                if let Some(t) = r.first_token {
                    s.push_str(&format!(", first token after {:.2} s", t.as_secs_f64()));
                }
                s.push('\n');
                if let Some(n) = n_ctx {
                    s.push_str(&format!(
                        "context:    {} of {n} tokens\n",
                        r.prompt_tokens + r.generated
                    ));
                }
            }
        }
        s.push_str(&format!(
            "session:    {} replies, {} messages, {} prompt tokens ({} cached), {} generated",
            self.replies, messages, self.prompt_tokens, self.cached_tokens, self.generated
        ));
        s
    }
}

fn rate(tokens: u32, d: Duration) -> String {
    let secs = d.as_secs_f64();
    if tokens == 0 || secs <= 0.0 {
        return String::new();
    }
    format!(" at {:.1} t/s in {secs:.2} s", tokens as f64 / secs)
}

/// A reply as it ends up in the history.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    pub text: String,
    pub reasoning: String,
    pub calls: Vec<ToolCall>,
}

impl Collected {
    pub fn push(&mut self, ev: &OutputEvent) {
        match ev {
            OutputEvent::Reasoning(r) => self.reasoning.push_str(r),
            OutputEvent::Text(t) => self.text.push_str(t),
            OutputEvent::CallStart { id, name, .. } => self.calls.push(ToolCall {
                id: id.clone(),
                name: name.clone(),
                arguments: String::new(),
            }),
            OutputEvent::CallArgs { fragment, .. } => {
                if let Some(c) = self.calls.last_mut() {
                    c.arguments.push_str(fragment);
                }
            }
            OutputEvent::CallEnd { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_message_counts_computed_tokens_only() {
        let m = prefill_message(1500, 3000, 500, Duration::from_secs(2));
        assert_eq!(m, "500 t/s, 3 s left");
        assert_eq!(prefill_message(500, 3000, 500, Duration::from_secs(1)), "");
        assert_eq!(short_secs(125.0), "2m05s");
    }

    #[test]
    fn stats_render_names_the_cache_source() {
        let mut s = Stats::default();
        s.record(ReplyStats {
            prompt_tokens: 120,
            cached_tokens: 100,
            source: "live".into(),
            generated: 11,
            prefill: Duration::from_millis(100),
            decode: Duration::from_secs(1),
            first_token: Some(Duration::from_millis(150)),
            outcome: "stop".into(),
        });
        let text = s.render(2, Some(2048));
        assert!(text.contains("prompt 120 tokens, 100 cached (live), 20 prefilled at 200.0 t/s"));
        assert!(text.contains("11 generated at 10.0 t/s in 1.00 s, stop"));
        assert!(text.contains("context:    131 of 2048 tokens"));
        assert!(text.contains(
            "session:    1 replies, 2 messages, 120 prompt tokens (100 cached), 11 generated"
        ));
    }

    #[test]
    fn collected_gathers_calls() {
        let mut c = Collected::default();
        c.push(&OutputEvent::Text("a".into()));
        c.push(&OutputEvent::CallStart {
            index: 0,
            id: "c".into(),
            name: "f".into(),
        });
        c.push(&OutputEvent::CallArgs {
            index: 0,
            fragment: "{}".into(),
        });
        assert_eq!(c.text, "a");
        assert_eq!(c.calls[0].arguments, "{}");
    }
}
