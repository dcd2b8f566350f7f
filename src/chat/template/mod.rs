//! Conversations to prompt text, through the model's own Jinja chat template.
//!
//! A GGUF carries the HuggingFace chat template (`tokenizer.chat_template`)
//! the model was tuned with, and the model only behaves if its prompt is
//! byte for byte what that template gives under HuggingFace transformers.
//! So minijinja is set up the way transformers sets up Jinja2: trim_blocks,
//! lstrip_blocks, Python string/dict/list methods, `raise_exception`,
//! `strftime_now`, `tojson` with `json.dumps` spacing, Python's spelling of
//! `True`/`None` in output, and the `{% generation %}` tag accepted. Models
//! without a template (base models) get a documented plain-text fallback.

use std::fmt;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Output, State};
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
/// User: {user text}
///
/// Assistant:
/// ```
///
/// Every turn ends with a blank line (an empty system text writes nothing);
/// the prompt ends with `Assistant:` when a reply is wanted, and generation
/// stops at `\nUser:` ([`ChatTemplate::fallback_stops`]). No BOS text is
/// written: llama.cpp's tokenizer adds BOS itself where the vocabulary asks.
/// A past assistant turn is written as `Assistant:` plus its text without
/// trailing whitespace, and with a space first unless the text starts with
/// whitespace of its own: the model produced what follows `Assistant:` (its
/// first token usually carries a space; a base model sometimes starts on a
/// new line), and a reply cut at `\nUser:` keeps the newline before it, so
/// the text followed by the blank line and `User:` is what the model wrote,
/// and a resent conversation renders to the text the KV cache already
/// holds.
const FALLBACK: &str = "{% for m in messages %}\
{% if m.role == 'system' %}{% if m.content %}{{ m.content }}\n\n{% endif %}\
{% elif m.role == 'user' %}User: {{ m.content }}\n\n\
{% else %}Assistant:{% if m.content[:1] not in [' ', '\n', '\t'] %} {% endif %}{{ m.content.rstrip() }}\n\n\
{% endif %}{% endfor %}\
{% if add_generation_prompt %}Assistant:{% endif %}";

const FALLBACK_STOPS: &[&str] = &["\nUser:"];

/// A compiled chat template, shared by every handler (`Send + Sync`).
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
    /// token texts (may be empty), which templates print themselves.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_formatter(python_formatter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        // Python's tests: `none` is not iterable (minijinja iterates it as
        // empty, so `tools is iterable and tools | length` fails), and
        // strings and dicts are sequences (they have len and []).
        env.add_test("iterable", |v: Value| !v.is_none() && v.try_iter().is_ok());
        env.add_test("sequence", |v: Value| {
            matches!(
                v.kind(),
                ValueKind::Seq | ValueKind::Map | ValueKind::String
            )
        });
        env.add_template_owned("chat", jinja2_source(source))
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            fallback: false,
            stops: Vec::new(),
        })
    }

    /// The plain-text fallback; its format is documented on [`FALLBACK`].
    pub fn fallback(bos_token: &str, eos_token: &str) -> Self {
        let mut t =
            Self::new(FALLBACK, bos_token, eos_token).expect("the fallback template compiles");
        t.fallback = true;
        t.stops = FALLBACK_STOPS.iter().map(|s| s.to_string()).collect();
        t
    }

    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    /// The template text as given (for the fallback, its Jinja source).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Stop sequences the fallback format needs; empty for real templates,
    /// whose end-of-turn is a special token the engine already stops at.
    pub fn fallback_stops(&self) -> &[String] {
        &self.stops
    }

    /// Render a conversation; `add_generation_prompt` opens the assistant's
    /// turn. The variables are the ones transformers passes when there are
    /// no tools: `tools` and `documents` are defined but none.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        self.render_with(
            messages,
            &RenderOptions {
                add_generation_prompt,
                ..Default::default()
            },
        )
    }

    /// Render with tools and template switches, the variables transformers
    /// passes to `apply_chat_template`: `tools` (OpenAI function objects) and
    /// extra keyword arguments such as `enable_thinking`.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        opts: &RenderOptions,
    ) -> Result<String, TemplateError> {
        #[derive(Serialize)]
        struct Ctx<'a> {
            messages: &'a [ChatMessage],
            add_generation_prompt: bool,
            bos_token: &'a str,
            eos_token: &'a str,
            tools: Option<&'a [serde_json::Value]>,
            documents: Option<()>,
            #[serde(skip_serializing_if = "Option::is_none")]
            enable_thinking: Option<bool>,
            #[serde(skip_serializing_if = "Option::is_none")]
            thinking: Option<bool>,
            #[serde(skip_serializing_if = "Option::is_none")]
            reasoning_effort: Option<&'a str>,
        }
        let ctx = Ctx {
            messages,
            add_generation_prompt: opts.add_generation_prompt,
            bos_token: &self.bos_token,
            eos_token: &self.eos_token,
            tools: opts.tools.as_deref().filter(|t| !t.is_empty()),
            documents: None,
            enable_thinking: opts.enable_thinking,
            // DeepSeek V3.1+ spells the switch `thinking`.
            thinking: opts.enable_thinking,
            reasoning_effort: opts.reasoning_effort.as_deref(),
        };
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        tmpl.render(ctx)
            .map_err(|e| TemplateError::Render(describe(&e)))
    }

    /// Whether the template renders a `tools` list itself.
    pub fn handles_tools(&self) -> bool {
        !self.fallback && self.source.contains("tools")
    }
}

/// What [`ChatTemplate::render_with`] passes besides the messages.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    pub add_generation_prompt: bool,
    /// OpenAI-style tool objects: `{"type": "function", "function": {...}}`.
    pub tools: Option<Vec<serde_json::Value>>,
    /// `enable_thinking` (Qwen 3, SmolLM3...) and `thinking` (DeepSeek).
    pub enable_thinking: Option<bool>,
    /// `reasoning_effort` (gpt-oss style templates).
    pub reasoning_effort: Option<String>,
}

/// Marks an error as the template's own `raise_exception`, whose message is
/// meant for the user as it stands.
#[derive(Debug)]
struct Raised;

impl fmt::Display for Raised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("raised by the template")
    }
}

impl std::error::Error for Raised {}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg).with_source(Raised))
}

/// minijinja's error in one line, without its template listing: the
/// template's own message as is, anything else with its kind and line.
fn describe(e: &Error) -> String {
    if std::error::Error::source(e).is_some_and(|s| s.is::<Raised>()) {
        return e.detail().unwrap_or_default().to_string();
    }
    let mut out = match (e.kind(), e.detail()) {
        (ErrorKind::SyntaxError, Some(d)) => d.to_string(),
        (kind, Some(d)) => format!("{kind}: {d}"),
        (kind, None) => kind.to_string(),
    };
    if let Some(line) = e.line() {
        out.push_str(&format!(" (line {line})"));
    }
    out
}

/// Jinja2 prints Python's `str()` of a value, so a template that prints a
/// flag or a missing field writes `True`/`None`, not minijinja's
/// `true`/`none`. Only scalars are covered; a printed list still uses
/// minijinja's spelling.
fn python_formatter(out: &mut Output, state: &State, value: &Value) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Bool => out.write_str(if value.is_true() { "True" } else { "False" })?,
        ValueKind::None => out.write_str("None")?,
        _ => minijinja::escape_formatter(out, state, value)?,
    }
    Ok(())
}

/// The source as Jinja2 reads it, where minijinja reads it differently:
/// - `\r\n` and `\r` become `\n` (a template saved on Windows renders `\n`);
/// - a backslash-newline in a string literal is a line continuation, as in
///   Python, and disappears (Mistral Small 3.x writes its default system
///   prompt that way; minijinja would keep both characters);
/// - transformers' `{% generation %}...{% endgeneration %}` only marks the
///   assistant's text for training masks and renders its body; minijinja
///   has no such tag, so it becomes an always-true `if`, which keeps the
///   tags' whitespace control (`{%-`, `-%}`).
fn jinja2_source(source: &str) -> String {
    let src = source.replace("\r\n", "\n").replace('\r', "\n");
    let mut out = String::with_capacity(src.len());
    let mut rest = src.as_str();
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        // Comments and raw blocks are copied untouched.
        let verbatim = if tag.starts_with("{#") {
            Some(tag.find("#}").map(|i| i + 2))
        } else if block_word(tag) == Some("raw") {
            Some(
                tag.find("endraw")
                    .and_then(|i| tag[i..].find("%}").map(|j| i + j + 2)),
            )
        } else {
            None
        };
        if let Some(stop) = verbatim {
            let stop = stop.unwrap_or(tag.len());
            out.push_str(&tag[..stop]);
            rest = &tag[stop..];
            continue;
        }
        let (end, code) = if let Some(code) = tag.strip_prefix("{{") {
            out.push_str("{{");
            ("}}", code)
        } else if let Some(word) = block_word(tag) {
            match word {
                "generation" | "endgeneration" => {
                    let at = tag.find(word).unwrap_or(2);
                    out.push_str(&tag[..at]);
                    out.push_str(if word == "generation" {
                        "if true"
                    } else {
                        "endif"
                    });
                    ("%}", &tag[at + word.len()..])
                }
                _ => {
                    out.push_str("{%");
                    ("%}", &tag[2..])
                }
            }
        } else {
            out.push('{');
            rest = &tag[1..];
            continue;
        };
        rest = copy_code(code, end, &mut out);
    }
    out.push_str(rest);
    out
}

/// The statement name of a `{% ... %}` tag.
fn block_word(tag: &str) -> Option<&str> {
    let body = tag
        .strip_prefix("{%")?
        .trim_start_matches(['-', '+'])
        .trim_start();
    Some(
        &body[..body
            .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .unwrap_or(body.len())],
    )
}

/// Copies a tag's code up to and including `end` (outside strings and
/// braces), dropping backslash-newlines in string literals; returns the
/// text after it.
fn copy_code<'a>(code: &'a str, end: &str, out: &mut String) -> &'a str {
    let (mut quote, mut depth) = (None, 0usize);
    let mut chars = code.char_indices();
    while let Some((i, c)) = chars.next() {
        match (quote, c) {
            (None, _) if depth == 0 && code[i..].starts_with(end) => {
                out.push_str(end);
                return &code[i + end.len()..];
            }
            (None, '"' | '\'') => quote = Some(c),
            (None, '{') => depth += 1,
            (None, '}') => depth = depth.saturating_sub(1),
            (Some(_), '\\') => {
                match chars.next() {
                    Some((_, '\n')) => {}
                    Some((_, escaped)) => out.extend(['\\', escaped]),
                    None => out.push('\\'),
                }
                continue;
            }
            (Some(q), _) if c == q => quote = None,
            _ => {}
        }
        out.push(c);
    }
    ""
}

/// `strftime_now(format)`: local time, as Python's `datetime.now()` gives
/// it, for templates that date their system prompt (Llama 3.1 and later).
fn strftime_now(format: String) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(now + local_offset(now), &format)
}

/// Seconds east of UTC at `unix`, from the C library's zone rules (`TZ`,
/// `/etc/localtime`), which is where Python's local time comes from too.
/// std has no local time and the `time` crate refuses it in threaded
/// programs, for fear of a concurrent `setenv`; this crate never sets
/// environment variables.
#[cfg(any(target_os = "linux", target_os = "macos"))]
fn local_offset(unix: i64) -> i64 {
    use std::os::raw::{c_char, c_int, c_long};
    // `struct tm` on glibc, musl and macOS: nine ints, tm_gmtoff, tm_zone.
    #[repr(C)]
    struct Tm {
        _fields: [c_int; 9],
        gmtoff: c_long,
        _zone: *const c_char,
    }
    extern "C" {
        fn localtime_r(time: *const c_long, result: *mut Tm) -> *mut Tm;
    }
    let time = unix as c_long;
    // SAFETY: an all-zero `Tm` is valid (a null zone pointer is never
    // read), and localtime_r only writes into it.
    let mut tm: Tm = unsafe { std::mem::zeroed() };
    if unsafe { localtime_r(&time, &mut tm) }.is_null() {
        return 0;
    }
    #[allow(clippy::useless_conversion)] // c_long is i32 on 32-bit targets
    i64::from(tm.gmtoff)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn local_offset(_unix: i64) -> i64 {
    0
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// C `strftime` for the specifiers chat templates use, on seconds since the
/// epoch already shifted to local time. Unknown specifiers stay as written.
fn strftime(secs: i64, format: &str) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
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
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let (pad, spec) = match chars.next() {
            Some('-') => (false, chars.next()),
            other => (true, other),
        };
        let num = |n: i64| {
            if pad {
                format!("{n:02}")
            } else {
                n.to_string()
            }
        };
        match spec {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&num(y.rem_euclid(100))),
            Some('m') => out.push_str(&num(m)),
            Some('d') => out.push_str(&num(d)),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('H') => out.push_str(&num(h)),
            Some('I') => out.push_str(&num((h + 11) % 12 + 1)),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&num(mi)),
            Some('S') => out.push_str(&num(s)),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(o) => out.extend(['%', o]),
            None => out.push('%'),
        }
    }
    out
}

/// `tojson` as transformers defines it: `json.dumps` with its `indent`,
/// `separators`, `sort_keys` and `ensure_ascii` (default off) arguments, so
/// `", "`/`": "` spacing. minijinja's own filter writes compact JSON and
/// escapes HTML characters, which would change the tool descriptions a
/// model was trained to read.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let bad = |msg: &str| Error::new(ErrorKind::InvalidOperation, format!("tojson: {msg}"));
    let indent = match kwargs
        .get::<Option<Value>>("indent")?
        .filter(|v| !v.is_none())
    {
        None => None,
        Some(v) if v.as_str().is_some() => v.as_str().map(str::to_string),
        Some(v) => Some(
            " ".repeat(
                v.as_usize()
                    .ok_or_else(|| bad("indent must be a count or a string"))?,
            ),
        ),
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")?.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => return Err(bad("separators must be two strings")),
        None => (
            (if indent.is_some() { "," } else { ", " }).to_string(),
            ": ".to_string(),
        ),
    };
    let ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| bad(&e.to_string()))?;
    let mut out = String::new();
    JsonFmt {
        indent,
        item_sep,
        key_sep,
        ascii,
        sort,
    }
    .write(&json, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

struct JsonFmt {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ascii: bool,
    sort: bool,
}

impl JsonFmt {
    fn write(&self, v: &serde_json::Value, depth: usize, out: &mut String) {
        use serde_json::Value as J;
        let (open, close, mut entries): (_, _, Vec<(Option<&String>, &J)>) = match v {
            J::Array(items) if !items.is_empty() => {
                ('[', ']', items.iter().map(|i| (None, i)).collect())
            }
            J::Object(map) if !map.is_empty() => {
                ('{', '}', map.iter().map(|(k, i)| (Some(k), i)).collect())
            }
            J::String(s) => return self.string(s, out),
            other => return out.push_str(&other.to_string()),
        };
        if self.sort {
            entries.sort_by(|a, b| a.0.cmp(&b.0));
        }
        out.push(open);
        for (i, (key, item)) in entries.into_iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            self.newline(depth + 1, out);
            if let Some(key) = key {
                self.string(key, out);
                out.push_str(&self.key_sep);
            }
            self.write(item, depth + 1, out);
        }
        self.newline(depth, out);
        out.push(close);
    }

    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
    }

    /// serde_json escapes exactly the characters `json.dumps` does; with
    /// `ensure_ascii` the rest becomes `\uXXXX` UTF-16 units, as in Python.
    fn string(&self, s: &str, out: &mut String) {
        for c in serde_json::Value::String(s.to_string()).to_string().chars() {
            if c.is_ascii() || !self.ascii {
                out.push(c);
            } else {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
