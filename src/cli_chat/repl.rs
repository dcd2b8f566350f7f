//! The interactive session: a line editor with history (rustyline), multi-
//! line input (a line ending in `\`, or a `"""` block), the slash
//! commands, and a reply after each message.

use std::borrow::Cow;

use console::Style;
use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::FileHistory;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::{Config, Editor, Helper};

use super::display::{Printer, Stats};
use super::session::{self, Input, Session};
use super::Chat;
use crate::chat::{ChatMessage, Role};

const HELP: &str = "\
Type a message and press Enter; end a line with \\ to go on to the next,
or write a block between \"\"\" lines. Ctrl-C stops a reply (the
conversation and its KV stay); Ctrl-D or /quit leaves.
  /system [TEXT]  show or set the system prompt
  /clear          start a new conversation (the system prompt stays)
  /file PATH      attach a text file to the next message
  /save NAME      save the conversation and its KV cache
  /load NAME      continue a saved conversation (no prefill)
  /stats          tokens, cache source and speeds
  /help           this
  //text          send text starting with /";

/// Largest file `/file` attaches.
const MAX_FILE_BYTES: u64 = 4 << 20;

/// Keeps reading lines while the input is incomplete.
struct ChatHelper;

impl Helper for ChatHelper {}
impl Completer for ChatHelper {
    type Candidate = String;
}
impl Hinter for ChatHelper {
    type Hint = String;
}
impl Highlighter for ChatHelper {
    fn highlight_prompt<'b, 's: 'b, 'p: 'b>(
        &'s self,
        prompt: &'p str,
        _default: bool,
    ) -> Cow<'b, str> {
        Cow::Borrowed(prompt)
    }
}
impl Validator for ChatHelper {
    fn validate(&self, ctx: &mut ValidationContext<'_>) -> rustyline::Result<ValidationResult> {
        Ok(if session::is_incomplete(ctx.input()) {
            ValidationResult::Incomplete
        } else {
            ValidationResult::Valid(None)
        })
    }
}

pub(crate) fn interactive(chat: &Chat, session: &mut Session) -> anyhow::Result<()> {
    let config = Config::builder().auto_add_history(true).build();
    let mut rl: Editor<ChatHelper, FileHistory> = Editor::with_config(config)?;
    rl.set_helper(Some(ChatHelper));
    let history = chat.data_dir.join("history");
    let _ = rl.load_history(&history);
    let note = Style::new().dim().for_stdout();
    let ctx = chat
        .n_ctx()
        .map(|n| format!(", context {n} tokens"))
        .unwrap_or_default();
    println!(
        "{}",
        note.apply_to(format!(
            "hearth chat: {}{ctx}. /help for commands, Ctrl-D to leave.",
            chat.model_name
        ))
    );
    let mut stats = Stats::default();
    let mut printer = Printer::new(false);
    loop {
        let pending = session.pending_calls();
        let prompt = match pending.first() {
            Some(c) => format!("result of {}> ", c.name),
            None => "> ".to_string(),
        };
        let line = match rl.readline(&prompt) {
            Ok(line) => session::join_lines(&line),
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let input = match session::parse_input(&line) {
            Ok(i) => i,
            Err(e) => {
                println!("{e}");
                continue;
            }
        };
        match input {
            Input::Empty => continue,
            Input::Quit => break,
            Input::Help => println!("{HELP}"),
            Input::Clear => {
                session.clear();
                println!("{}", note.apply_to("a new conversation"));
            }
            Input::Stats => println!("{}", stats.render(session.messages.len(), chat.n_ctx())),
            Input::System(None) => match &session.system {
                Some(s) => println!("system: {s}"),
                None => println!("no system prompt"),
            },
            Input::System(Some(s)) => {
                session.system = Some(s);
                println!("{}", note.apply_to("system prompt set"));
            }
            Input::File(path) => match read_text_file(&path) {
                Ok(text) => {
                    println!(
                        "{}",
                        note.apply_to(format!(
                            "attached {} ({} bytes): it goes with your next message",
                            path.display(),
                            text.len()
                        ))
                    );
                    session.attached.push((path.display().to_string(), text));
                }
                Err(e) => println!("{e}"),
            },
            Input::Save(name) => save_session(chat, session, &name),
            Input::Load(name) => match load_session(chat, &name) {
                Ok(s) => *session = s,
                Err(e) => println!("{e}"),
            },
            Input::Say(text) => {
                match pending.first() {
                    Some(call) => session.messages.push(ChatMessage::tool_result(
                        call.id.clone(),
                        Some(call.name.clone()),
                        text,
                    )),
                    None => session.push_user(&text),
                }
                if session.pending_calls().is_empty() {
                    reply(chat, session, &mut printer, &mut stats);
                }
            }
        }
    }
    let _ = rl.save_history(&history);
    Ok(())
}

fn reply(chat: &Chat, session: &mut Session, printer: &mut Printer, stats: &mut Stats) {
    let turn = chat.turn(session, printer);
    if turn.stopped {
        println!("{}", Style::new().dim().for_stdout().apply_to("[stopped]"));
    }
    if let Some(e) = &turn.error {
        println!(
            "{}",
            Style::new()
                .red()
                .for_stdout()
                .apply_to(format!("error: {e}"))
        );
        // The message that failed is taken back, so it can be sent again.
        if session
            .messages
            .last()
            .is_some_and(|m| m.role == Role::User)
        {
            session.messages.pop();
        }
    }
    stats.record(turn.stats);
}

fn read_text_file(path: &std::path::Path) -> Result<String, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{} is {} bytes; /file attaches at most {MAX_FILE_BYTES}",
            path.display(),
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))
}

fn save_session(chat: &Chat, session: &Session, name: &str) {
    let path = session::session_path(&chat.data_dir, name);
    if let Err(e) = session::save(&path, session, &chat.model_name) {
        println!("{e}");
        return;
    }
    let kv = match chat.persist() {
        Some(n) => format!("; KV: {n} tokens written"),
        None => "; the KV stays in the server's cache".into(),
    };
    println!(
        "{}",
        Style::new().dim().for_stdout().apply_to(format!(
            "saved {name} ({} messages) to {}{kv}",
            session.messages.len(),
            path.display()
        ))
    );
}

/// Read a saved conversation and show where it stands.
pub(crate) fn load_session(chat: &Chat, name: &str) -> Result<Session, String> {
    let path = session::session_path(&chat.data_dir, name);
    let (session, model) = session::load(&path)?;
    let note = Style::new().dim().for_stdout();
    if model != chat.model_name {
        println!(
            "{}",
            note.apply_to(format!(
                "(saved with {model}: its KV does not fit this model, the conversation will be prefilled)"
            ))
        );
    }
    for m in &session.messages {
        let who = match m.role {
            Role::User => "you",
            Role::Assistant => "model",
            Role::Tool => "tool",
            Role::System => "system",
        };
        let first = m.content.lines().next().unwrap_or_default();
        let first: String = first.chars().take(72).collect();
        println!("{}", note.apply_to(format!("  {who}: {first}")));
    }
    println!(
        "{}",
        note.apply_to(format!(
            "loaded {name} ({} messages)",
            session.messages.len()
        ))
    );
    Ok(session)
}
