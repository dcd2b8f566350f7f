//! Tool calls in generated text: the incremental parsers that turn a model's
//! output, as it streams, into visible text and structured calls.
//!
//! Every model family writes calls in its own markup (`<tool_call>` JSON,
//! `[TOOL_CALLS]`, DeepSeek's special tokens, DSML tags...). Each format has
//! one parser here, all behind [`ToolParser`]: text goes in in whatever pieces
//! the sampler produced, and out come [`ToolEvent`]s that are already certain,
//! so an API adapter can stream a call's header and then its argument
//! fragments as they are generated. A parser holds back only text that could
//! still turn out to be markup (a trailing `<tool_c`), so markup never leaks
//! into visible text, streaming or not.
//!
//! Whitespace that only separates text from a call (the `\n\n` before a
//! `<tool_call>`, the newline between two calls) is dropped: it is part of the
//! markup's layout, not of the answer.
//!
//! For a reasoning model, the output goes through
//! [`crate::chat::reasoning::ReasoningSplitter`] first and only its content
//! pieces come here. [`ToolFormat::detect`] picks the format,
//! [`ToolFormat::call_opener`] is where a lazy grammar starts, and
//! [`ToolFormat::render_call`] writes a past call back into a prompt.

/// The `ToolParser` of a parser that keeps its input in `buf`, scans it
/// with `run(eof)` and collects events in `sink` (every format here).
macro_rules! buffered_parser {
    ($parser:ty) => {
        impl $crate::chat::tools::ToolParser for $parser {
            fn push(&mut self, text: &str) -> Vec<$crate::chat::tools::ToolEvent> {
                self.buf.push_str(text);
                self.run(false);
                self.sink.take()
            }

            fn finish(&mut self) -> Vec<$crate::chat::tools::ToolEvent> {
                self.run(true);
                self.sink.finish()
            }
        }
    };
}

mod deepseek_v3;
pub(crate) mod dsml;
mod fallback;
mod hermes;
mod json;
mod llama3;
mod mistral;
mod scan;
#[cfg(test)]
pub(crate) mod testkit;

pub use deepseek_v3::DeepSeekV3Parser;
pub use dsml::DsmlParser;
pub use fallback::{fallback_system_prompt, fallback_tool_result};
pub use hermes::HermesParser;
pub use llama3::Llama3Parser;
pub use mistral::MistralParser;

/// One piece of structured output, in generation order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    /// Visible text (never contains tool-call markup).
    Text(String),
    /// A tool call begins: its 0-based index among this reply's calls and the function name.
    CallStart { index: usize, name: String },
    /// A fragment of the call's arguments as JSON text; the fragments of one
    /// call concatenate to its full arguments JSON object.
    CallArgs { index: usize, fragment: String },
    /// The call is complete.
    CallEnd { index: usize },
}

/// An incremental parser for one tool-call format.
pub trait ToolParser: Send {
    /// Feed newly generated text (any split, down to one char at a time);
    /// returns what is now certain.
    fn push(&mut self, text: &str) -> Vec<ToolEvent>;
    /// Generation ended: flush held text. An unterminated call is closed if
    /// its arguments are complete; a call not yet announced comes back as
    /// Text. A call whose `CallStart` was already emitted cannot be taken
    /// back, so it is always closed with `CallEnd`, even when its arguments
    /// were cut short (the caller knows generation stopped on a limit).
    fn finish(&mut self) -> Vec<ToolEvent>;
}

/// A tool as offered to the model: what the fallback system prompt lists.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// The parameters' JSON Schema (an object schema).
    pub parameters: serde_json::Value,
}

/// The tool-call markup a model writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (Qwen 2.5/3, Hermes, SmolLM3).
    Hermes,
    /// A bare `{"name": ..., "parameters": ...}` reply, optionally after `<|python_tag|>` (Llama 3.x).
    Llama3Json,
    /// `[TOOL_CALLS][{...}]` or `[TOOL_CALLS]name[ARGS]{...}`.
    Mistral,
    /// `<｜tool▁calls▁begin｜>...` special tokens (DeepSeek V3, R1, V3.1).
    DeepSeekV3,
    /// `<｜DSML｜tool_calls>` tags (DeepSeek V4).
    DeepSeekV4Dsml,
    /// The template cannot express tools: hearth's own convention, taught by
    /// [`fallback_system_prompt`] (the Hermes markup).
    Fallback,
}

impl ToolFormat {
    /// Choose from the chat template's source and the model's name or
    /// architecture. Markup the template itself writes wins; the name is
    /// consulted only when there is no template, or when the template handles
    /// tools in a way not recognised here. A template that never mentions
    /// tools gets `Fallback`: hearth will teach the model its own convention,
    /// whatever the family would write natively.
    pub fn detect(template_source: Option<&str>, model_name: &str) -> ToolFormat {
        if let Some(src) = template_source {
            // DSML first: a V4 template may also mention older DeepSeek tokens.
            if src.contains("｜DSML｜") {
                return ToolFormat::DeepSeekV4Dsml;
            }
            if src.contains("<｜tool▁calls▁begin｜>") || src.contains("<｜tool▁call▁begin｜>")
            {
                return ToolFormat::DeepSeekV3;
            }
            if src.contains("[TOOL_CALLS]") {
                return ToolFormat::Mistral;
            }
            if src.contains("<tool_call>") {
                return ToolFormat::Hermes;
            }
            if src.contains("<|python_tag|>")
                || (src.contains("ipython") && src.contains("<|start_header_id|>"))
            {
                return ToolFormat::Llama3Json;
            }
            if !src.contains("tool") {
                return ToolFormat::Fallback;
            }
        }
        Self::from_name(model_name)
    }

    /// The family's native format, guessed from a model name or architecture.
    fn from_name(model_name: &str) -> ToolFormat {
        let n = model_name.to_ascii_lowercase().replace(['_', ' '], "-");
        let has = |s: &str| n.contains(s);
        if has("deepseek-v4") || has("deepseek4") || has("deepseekv4") {
            ToolFormat::DeepSeekV4Dsml
        } else if has("deepseek") {
            ToolFormat::DeepSeekV3
        } else if has("mistral") || has("mixtral") || has("devstral") || has("magistral") {
            ToolFormat::Mistral
        } else if has("qwen") || has("hermes") || has("smollm3") {
            ToolFormat::Hermes
        } else if has("llama-3") || has("llama3") {
            ToolFormat::Llama3Json
        } else {
            ToolFormat::Fallback
        }
    }

    /// A fresh parser for one reply in this format.
    pub fn parser(self) -> Box<dyn ToolParser> {
        match self {
            ToolFormat::Hermes | ToolFormat::Fallback => Box::new(HermesParser::new()),
            ToolFormat::Llama3Json => Box::new(Llama3Parser::new()),
            ToolFormat::Mistral => Box::new(MistralParser::new()),
            ToolFormat::DeepSeekV3 => Box::new(DeepSeekV3Parser::new()),
            ToolFormat::DeepSeekV4Dsml => Box::new(DsmlParser::new()),
        }
    }

    /// The literal text that opens a call in this format: where a lazy
    /// grammar starts constraining. Llama 3 has no opening token when it
    /// skips `<|python_tag|>`, so its opener is the start of the JSON object.
    pub fn call_opener(self) -> &'static str {
        match self {
            ToolFormat::Hermes | ToolFormat::Fallback => hermes::OPEN,
            ToolFormat::Llama3Json => "{\"name\":",
            ToolFormat::Mistral => mistral::TAG,
            ToolFormat::DeepSeekV3 => deepseek_v3::CALLS_BEGIN,
            ToolFormat::DeepSeekV4Dsml => dsml::BLOCK_OPEN,
        }
    }

    /// Render one past call the way the model would have written it. The
    /// arguments are embedded as given (history validation happens earlier);
    /// only DSML, which spells arguments as tags, needs them to be a JSON object.
    pub fn render_call(self, name: &str, arguments_json: &str) -> String {
        let name_json = serde_json::Value::from(name).to_string();
        let args = arguments_json.trim();
        match self {
            ToolFormat::Hermes | ToolFormat::Fallback => {
                format!("<tool_call>\n{{\"name\": {name_json}, \"arguments\": {args}}}\n</tool_call>")
            }
            ToolFormat::Llama3Json => format!("{{\"name\": {name_json}, \"parameters\": {args}}}"),
            // The array form: understood by every Mistral generation, while
            // `name[ARGS]` is only read by the newer ones.
            ToolFormat::Mistral => {
                format!("[TOOL_CALLS][{{\"name\": {name_json}, \"arguments\": {args}}}]")
            }
            ToolFormat::DeepSeekV3 => format!(
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
            ),
            ToolFormat::DeepSeekV4Dsml => dsml::render_call(name, args),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::{check, Item};
    use super::*;
    use serde_json::json;

    #[test]
    fn detects_from_template_markup() {
        let cases = [
            ("{{- '<tool_call>\\n' }}", ToolFormat::Hermes),
            ("{{- '<|python_tag|>' }}", ToolFormat::Llama3Json),
            (
                "<|start_header_id|>ipython<|end_header_id|> tools",
                ToolFormat::Llama3Json,
            ),
            ("{{ '[TOOL_CALLS]' }} tools", ToolFormat::Mistral),
            ("{{'<｜tool▁calls▁begin｜>'}}", ToolFormat::DeepSeekV3),
            (
                "<｜DSML｜tool_calls> <｜tool▁calls▁begin｜>",
                ToolFormat::DeepSeekV4Dsml,
            ),
            ("{{ messages }} plain", ToolFormat::Fallback),
        ];
        for (src, want) in cases {
            assert_eq!(ToolFormat::detect(Some(src), "qwen3-8b"), want, "{src}");
        }
    }

    #[test]
    fn template_without_tools_wins_over_name() {
        // hearth teaches its own convention, so the native format is moot.
        assert_eq!(
            ToolFormat::detect(Some("{{ content }}"), "Mistral-7B"),
            ToolFormat::Fallback
        );
    }

    #[test]
    fn detects_from_name_without_template() {
        let cases = [
            ("Qwen2.5-7B-Instruct", ToolFormat::Hermes),
            ("SmolLM3-3B", ToolFormat::Hermes),
            ("Meta-Llama-3.1-8B-Instruct", ToolFormat::Llama3Json),
            ("Mistral-Small-3.2-24B", ToolFormat::Mistral),
            ("DeepSeek-R1-0528", ToolFormat::DeepSeekV3),
            ("deepseek_v4_flash", ToolFormat::DeepSeekV4Dsml),
            ("SmolLM2-135M-Instruct", ToolFormat::Fallback),
        ];
        for (name, want) in cases {
            assert_eq!(ToolFormat::detect(None, name), want, "{name}");
        }
        // A template that speaks of tools in unknown markup defers to the name.
        assert_eq!(
            ToolFormat::detect(Some("tools: {{ tools }}"), "qwen3"),
            ToolFormat::Hermes
        );
    }

    #[test]
    fn openers_are_what_the_parsers_look_for() {
        for f in all_formats() {
            assert!(f.render_call("f", "{}").contains(f.call_opener()), "{f:?}");
        }
    }

    /// Every format reads back what it renders: the basis of exact replay.
    #[test]
    fn render_call_round_trips_through_the_parser() {
        let args = json!({"path": "src/main.rs", "n": 3, "opts": {"deep": [1, "x\"y"]}, "u": "é✓"});
        for f in all_formats() {
            let text = f.render_call("read_file", &args.to_string());
            let want = [Item::call("read_file", args.clone())];
            check(&|| f.parser(), &text, &want);
        }
    }

    /// Random mixes of each format's markup pieces and prose: no panics, the
    /// same events for every split, and well-formed events, whatever the mess.
    #[test]
    fn random_markup_soup_is_split_invariant_and_well_formed() {
        use super::testkit::{assert_well_formed, run, splits};
        let common = [
            "x", " ", "\n", "é✓", "{", "}", "[", "]", "\"", "\\", ":", ",", "1", "<", ">", "`",
        ];
        let markup: [&[&str]; 5] = [
            &[
                "<tool_call>",
                "</tool_call>",
                "\"name\"",
                "\"arguments\"",
                "\"f\"",
                "<tool_c",
            ],
            &[
                "<|python_tag|>",
                "\"name\"",
                "\"parameters\"",
                "\"f\"",
                ";",
                "<|pyth",
            ],
            &[
                "[TOOL_CALLS]",
                "[ARGS]",
                "[CALL_ID]",
                "f",
                "\"name\"",
                "\"arguments\"",
                "[TOOL_",
            ],
            &[
                "<｜tool▁calls▁begin｜>",
                "<｜tool▁call▁begin｜>",
                "<｜tool▁sep｜>",
                "<｜tool▁call▁end｜>",
                "<｜tool▁calls▁end｜>",
                "function",
                "```json\n",
                "```",
                "<｜tool▁",
            ],
            &[
                "<｜DSML｜tool_calls>",
                "</｜DSML｜tool_calls>",
                "<｜DSML｜invoke",
                " name=\"f\">",
                "</｜DSML｜invoke>",
                "<｜DSML｜parameter",
                " string=\"true\">",
                " string=\"false\">",
                "</｜DSML｜parameter>",
                "<｜DSML｜",
            ],
        ];
        let formats = [
            ToolFormat::Hermes,
            ToolFormat::Llama3Json,
            ToolFormat::Mistral,
            ToolFormat::DeepSeekV3,
            ToolFormat::DeepSeekV4Dsml,
        ];
        // SOUP_SEED and SOUP_ROUNDS widen the search when hunting a bug.
        let env =
            |key: &str, default: u64| std::env::var(key).map_or(default, |v| v.parse().unwrap());
        let (mut seed, rounds) = (env("SOUP_SEED", 42), env("SOUP_ROUNDS", 120));
        let mut next = |n: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize % n
        };
        for (format, pieces) in formats.into_iter().zip(markup) {
            for _ in 0..rounds {
                // Whole calls, pieces of calls, markup and prose, in any order.
                let call = format.render_call("f", r#"{"a": "x\"<", "b": [1, {"c": null}]}"#);
                let bounds: Vec<usize> = call
                    .char_indices()
                    .map(|(i, _)| i)
                    .chain([call.len()])
                    .collect();
                let mut input = String::new();
                for _ in 0..1 + next(12) {
                    match next(5) {
                        0 => input.push_str(&call),
                        1 => {
                            let (a, b) = (bounds[next(bounds.len())], bounds[next(bounds.len())]);
                            input.push_str(&call[a.min(b)..a.max(b)]);
                        }
                        2 | 3 => input.push_str(pieces[next(pieces.len())]),
                        _ => input.push_str(common[next(common.len())]),
                    }
                }
                let make = || format.parser();
                let reference = run(&make, &[&input]);
                assert_well_formed(&reference);
                for chunks in splits(&input) {
                    assert_eq!(
                        run(&make, &chunks),
                        reference,
                        "{format:?}: split {chunks:?}"
                    );
                }
            }
        }
    }

    fn all_formats() -> [ToolFormat; 6] {
        [
            ToolFormat::Hermes,
            ToolFormat::Llama3Json,
            ToolFormat::Mistral,
            ToolFormat::DeepSeekV3,
            ToolFormat::DeepSeekV4Dsml,
            ToolFormat::Fallback,
        ]
    }
}
