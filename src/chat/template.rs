//! Conversations to prompt text, through the model's own Jinja chat template.
//!
//! GGUF files carry the HuggingFace chat template (`tokenizer.chat_template`)
//! that the model was trained with. It is rendered here with minijinja,
//! configured the way HuggingFace transformers renders it (trim_blocks,
//! lstrip_blocks, Python string methods, `raise_exception`, `strftime_now`,
//! a `tojson` with Python's spacing), so the prompt is byte for byte the
//! one the model expects. Models without a template (base models) get a
//! documented plain-text fallback.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

use super::ChatMessage;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("chat template syntax error: {0}")]
    Syntax(String),
    #[error("chat template failed: {0}")]
    Render(String),
}

/// The plain-text format for models without a chat template:
///
/// ```text
/// {system text}
///
/// User: {user text}
///
/// Assistant: {assistant text}
///
/// User: ...
///
/// Assistant:
/// ```
///
/// Each turn ends with a blank line; the prompt ends with `Assistant:` when
/// a reply is wanted, and generation stops at `\nUser:`. A past assistant
/// turn is written as `Assistant: ` plus its text without leading
/// whitespace, which is exactly what the model produced after `Assistant:`
/// (its first token usually carries the space), so a resent conversation
/// renders to the text the KV cache already holds.
const FALLBACK: &str = "{% for m in messages %}\
{% if m.role == 'system' %}{{ m.content }}\n\n\
{% elif m.role == 'user' %}User: {{ m.content }}\n\n\
{% else %}Assistant: {{ m.content | trim_start }}\n\n\
{% endif %}{% endfor %}\
{% if add_generation_prompt %}Assistant:{% endif %}";

const FALLBACK_STOPS: &[&str] = &["\nUser:"];

/// A compiled chat template. Shared by every handler (it is `Send + Sync`).
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    fallback: bool,
    stops: Vec<String>,
}

impl ChatTemplate {
    /// Compile a template. `bos_token`/`eos_token` are the model's special
    /// token texts, which templates print themselves.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_filter("trim_start", |s: String| s.trim_start().to_string());
        env.add_template_owned("chat", source.to_string()).map_err(|e| TemplateError::Syntax(describe(&e)))?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            fallback: false,
            stops: Vec::new(),
        })
    }

    /// The plain-text fallback (see [`FALLBACK`]'s format above).
    pub fn fallback(bos_token: &str, eos_token: &str) -> Self {
        let mut t = Self::new(FALLBACK, bos_token, eos_token).expect("the fallback template compiles");
        t.fallback = true;
        t.stops = FALLBACK_STOPS.iter().map(|s| s.to_string()).collect();
        t
    }

    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Stop sequences the format itself needs (the fallback's turn marker).
    pub fn fallback_stops(&self) -> &[String] {
        &self.stops
    }

    /// Render a conversation; `add_generation_prompt` opens the assistant's
    /// turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TemplateError> {
        #[derive(Serialize)]
        struct Ctx<'a> {
            messages: &'a [ChatMessage],
            add_generation_prompt: bool,
            bos_token: &'a str,
            eos_token: &'a str,
        }
        let tmpl = self.env.get_template("chat").map_err(|e| TemplateError::Syntax(describe(&e)))?;
        tmpl.render(Ctx { messages, add_generation_prompt, bos_token: &self.bos_token, eos_token: &self.eos_token })
            .map_err(|e| TemplateError::Render(describe(&e)))
    }
}

/// minijinja's error with its detail, without the template listing.
fn describe(e: &Error) -> String {
    match e.detail() {
        Some(d) => d.to_string(),
        None => e.to_string(),
    }
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(format)`: the current UTC time, for templates that date
/// their system prompt (Llama 3.1). Supports the usual C specifiers.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    strftime(secs, &format)
}

const MONTHS: [&str; 12] =
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

fn strftime(unix: u64, format: &str) -> String {
    let days = (unix / 86_400) as i64;
    let rem = unix % 86_400;
    let (h, mi, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('-') => match chars.next() {
                Some('d') => out.push_str(&d.to_string()),
                Some('m') => out.push_str(&m.to_string()),
                Some(o) => out.push_str(&format!("%-{o}")),
                None => out.push_str("%-"),
            },
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// `tojson` as transformers defines it: `json.dumps` with `", "` and
/// `": "` separators, non-ASCII kept, optional `indent`. minijinja's own
/// escapes HTML characters and writes compact JSON, which would change
/// the tool descriptions a model was trained to read.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Role;

    const SMOLLM2: &str = include_str!("../../tests/fixtures/templates/smollm2.jinja");

    fn msgs(list: &[(Role, &str)]) -> Vec<ChatMessage> {
        list.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
    }

    #[test]
    fn smollm2_renders_chatml_with_its_default_system_prompt() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&msgs(&[(Role::User, "Hi")]), true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&msgs(&[(Role::System, "Be brief."), (Role::User, "Hi"), (Role::Assistant, "Hello!")]), false).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        );
    }

    #[test]
    fn python_methods_namespace_and_whitespace_control_work() {
        // A Llama-3-like template: strip(), namespace, loop.first, trim_blocks.
        let src = "{{ bos_token }}{% set ns = namespace(sys='') %}\
{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.sys = m['content'].strip() %}{% endif %}{% endfor %}\
{% if ns.sys %}<|start_header_id|>system<|end_header_id|>\n\n{{ ns.sys }}<|eot_id|>{% endif %}\n\
{% for m in messages %}\n\
{% if m['role'] != 'system' %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endif %}\n\
{% endfor %}\n\
{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";
        let t = ChatTemplate::new(src, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let out = t.render(&msgs(&[(Role::System, "  Rules.  "), (Role::User, " Q ")]), true).unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nRules.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn raise_exception_is_a_render_error_and_bad_syntax_a_syntax_error() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let err = t.render(&msgs(&[(Role::Assistant, "x")]), true).unwrap_err();
        assert!(matches!(&err, TemplateError::Render(m) if m.contains("must start with user")), "{err}");
        assert_eq!(t.render(&msgs(&[(Role::User, "x")]), true).unwrap(), "ok");
        assert!(matches!(ChatTemplate::new("{% for %}", "", ""), Err(TemplateError::Syntax(_))));
    }

    #[test]
    fn tojson_uses_python_spacing_and_keeps_unicode() {
        let t = ChatTemplate::new("{{ {'a': [1, 'é<x>'], 'b': {}} | tojson }}|{{ [1] | tojson(indent=2) }}", "", "").unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "{\"a\": [1, \"é<x>\"], \"b\": {}}|[\n  1\n]");
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-26 13:25:09 UTC, a Friday.
        assert_eq!(strftime(1_722_000_309, "%d %b %Y %H:%M:%S %A"), "26 Jul 2024 13:25:09 Friday");
        assert_eq!(strftime(0, "%Y-%m-%d %a %%"), "1970-01-01 Thu %");
    }

    #[test]
    fn fallback_format() {
        let t = ChatTemplate::fallback("<bos>", "<eos>");
        assert!(t.is_fallback());
        let out = t
            .render(&msgs(&[(Role::System, "Be kind."), (Role::User, "Hi"), (Role::Assistant, " Hello."), (Role::User, "Bye")]), true)
            .unwrap();
        assert_eq!(out, "Be kind.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Bye\n\nAssistant:");
        assert_eq!(t.fallback_stops(), ["\nUser:"]);
    }
}
