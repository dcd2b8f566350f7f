//! The conversation `hearth chat` holds: its messages, the system prompt,
//! files waiting to go with the next message, and the transcript files
//! `/save` and `/load` write and read. Pure: no terminal, no engine.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chat::{ChatMessage, Role, ToolCall};

/// What one line typed at the prompt asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Text for the model.
    Say(String),
    Quit,
    Help,
    Clear,
    Stats,
    /// `/system` alone shows the system prompt; with text, replaces it.
    System(Option<String>),
    File(PathBuf),
    Save(String),
    Load(String),
    /// Nothing typed.
    Empty,
}

/// Read one (possibly multi-line) input. Slash commands take the rest of
/// the line; `//text` sends `/text` to the model.
pub fn parse_input(line: &str) -> Result<Input, String> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Ok(Input::Empty);
    }
    if let Some(rest) = trimmed.strip_prefix("//") {
        return Ok(Input::Say(format!("/{rest}")));
    }
    let Some(command) = trimmed.strip_prefix('/') else {
        return Ok(Input::Say(line.trim_end().to_string()));
    };
    let (name, arg) = match command.split_once(char::is_whitespace) {
        Some((n, a)) => (n, a.trim()),
        None => (command, ""),
    };
    let need = |what: &str| -> Result<String, String> {
        if arg.is_empty() {
            Err(format!("/{name} needs {what}"))
        } else {
            Ok(arg.to_string())
        }
    };
    match name {
        "quit" | "exit" | "q" => Ok(Input::Quit),
        "help" | "?" => Ok(Input::Help),
        "clear" => Ok(Input::Clear),
        "stats" => Ok(Input::Stats),
        "system" => Ok(Input::System((!arg.is_empty()).then(|| arg.to_string()))),
        "file" => Ok(Input::File(PathBuf::from(need("a file path")?))),
        "save" => Ok(Input::Save(check_name(&need("a name")?)?)),
        "load" => Ok(Input::Load(check_name(&need("a name")?)?)),
        other => Err(format!("unknown command /{other} (/help lists them)")),
    }
}

/// A saved conversation's name: a plain file name, so it cannot reach
/// outside the sessions directory.
pub fn check_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!(
            "`{name}` is not a usable name: letters, digits, `-`, `_` and `.` (not first), at most 100"
        ))
    }
}

/// Whether the editor should keep reading lines: the last line ends with
/// a backslash, or a `"""` block is still open.
pub fn is_incomplete(text: &str) -> bool {
    text.matches("\"\"\"").count() % 2 == 1 || text.ends_with('\\')
}

/// The text a multi-line input stands for: backslash-continued lines
/// joined with newlines, `"""` fences removed.
pub fn join_lines(text: &str) -> String {
    let mut out = text.replace("\\\n", "\n");
    if out.contains("\"\"\"") {
        out = out.replace("\"\"\"", "");
    }
    out.trim_matches('\n').to_string()
}

/// One conversation in progress.
#[derive(Debug, Clone, Default)]
pub struct Session {
    pub system: Option<String>,
    /// User, assistant and tool messages, oldest first.
    pub messages: Vec<ChatMessage>,
    /// Files attached with `/file`, sent with the next message.
    pub attached: Vec<(String, String)>,
}

impl Session {
    /// The messages a request sends: the system prompt, then the history.
    pub fn request_messages(&self) -> Vec<ChatMessage> {
        let mut out = Vec::with_capacity(self.messages.len() + 1);
        if let Some(s) = &self.system {
            out.push(ChatMessage::new(Role::System, s.clone()));
        }
        out.extend(self.messages.iter().cloned());
        out
    }

    /// Add the user's message, with the attached files before it.
    pub fn push_user(&mut self, text: &str) {
        let mut content = String::new();
        for (name, body) in self.attached.drain(..) {
            content.push_str(&format!("File `{name}`:\n```\n{body}\n```\n\n"));
        }
        content.push_str(text);
        self.messages.push(ChatMessage::new(Role::User, content));
    }

    /// Tool calls of the last reply that have no result yet, in order.
    pub fn pending_calls(&self) -> Vec<ToolCall> {
        let Some(last_call) = self
            .messages
            .iter()
            .rposition(|m| m.role == Role::Assistant && !m.tool_calls.is_empty())
        else {
            return Vec::new();
        };
        let answered: Vec<&str> = self.messages[last_call + 1..]
            .iter()
            .filter_map(|m| m.tool_call_id.as_deref())
            .collect();
        if self.messages[last_call + 1..]
            .iter()
            .any(|m| m.role != Role::Tool)
        {
            return Vec::new();
        }
        self.messages[last_call]
            .tool_calls
            .iter()
            .filter(|c| !answered.contains(&c.id.as_str()))
            .cloned()
            .collect()
    }

    pub fn clear(&mut self) {
        self.messages.clear();
        self.attached.clear();
    }
}

/// A conversation on disk: `sessions/NAME.json` in the chat's directory.
#[derive(Debug, Serialize, Deserialize)]
struct SavedSession {
    format: String,
    version: u32,
    /// The model it was held with: its KV snapshot only fits that model.
    model: String,
    system: Option<String>,
    messages: Vec<SavedMessage>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedMessage {
    role: String,
    content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reasoning: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<SavedCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedCall {
    id: String,
    name: String,
    arguments: String,
}

const FORMAT: &str = "hearth-chat";

/// Where the conversation called `name` is kept.
pub fn session_path(dir: &Path, name: &str) -> PathBuf {
    dir.join("sessions").join(format!("{name}.json"))
}

/// Write the conversation (under a temporary name, then renamed).
pub fn save(path: &Path, session: &Session, model: &str) -> Result<(), String> {
    let saved = SavedSession {
        format: FORMAT.into(),
        version: 1,
        model: model.into(),
        system: session.system.clone(),
        messages: session
            .messages
            .iter()
            .map(|m| SavedMessage {
                role: role_name(m.role).into(),
                content: m.content.clone(),
                reasoning: m.reasoning.clone(),
                tool_calls: m
                    .tool_calls
                    .iter()
                    .map(|c| SavedCall {
                        id: c.id.clone(),
                        name: c.name.clone(),
                        arguments: c.arguments.clone(),
                    })
                    .collect(),
                tool_call_id: m.tool_call_id.clone(),
            })
            .collect(),
    };
    let json = serde_json::to_vec_pretty(&saved).map_err(|e| e.to_string())?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Read a saved conversation and the model it was held with.
pub fn load(path: &Path) -> Result<(Session, String), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let saved: SavedSession = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not a saved conversation: {e}", path.display()))?;
    if saved.format != FORMAT || saved.version != 1 {
        return Err(format!(
            "{} is not a saved conversation of this version",
            path.display()
        ));
    }
    let mut messages = Vec::with_capacity(saved.messages.len());
    for (i, m) in saved.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            other => return Err(format!("message {i} has an unknown role `{other}`")),
        };
        messages.push(ChatMessage {
            role,
            content: m.content,
            reasoning: m.reasoning,
            tool_calls: m
                .tool_calls
                .into_iter()
                .map(|c| ToolCall {
                    id: c.id,
                    name: c.name,
                    arguments: c.arguments,
                })
                .collect(),
            tool_call_id: m.tool_call_id,
            name: None,
        });
    }
    let session = Session {
        system: saved.system,
        messages,
        attached: Vec::new(),
    };
    Ok((session, saved.model))
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_text_are_told_apart() {
        assert_eq!(parse_input("  "), Ok(Input::Empty));
        assert_eq!(parse_input("hello\n"), Ok(Input::Say("hello".into())));
        assert_eq!(parse_input("//etc/x"), Ok(Input::Say("/etc/x".into())));
        assert_eq!(parse_input("/quit"), Ok(Input::Quit));
        assert_eq!(parse_input("/system"), Ok(Input::System(None)));
        assert_eq!(
            parse_input("/system  Be brief. "),
            Ok(Input::System(Some("Be brief.".into())))
        );
        assert_eq!(
            parse_input("/file src/main.rs"),
            Ok(Input::File("src/main.rs".into()))
        );
        assert_eq!(
            parse_input("/save talk-1"),
            Ok(Input::Save("talk-1".into()))
        );
        assert!(parse_input("/save").unwrap_err().contains("needs a name"));
        assert!(parse_input("/load ../x")
            .unwrap_err()
            .contains("not a usable"));
        assert!(parse_input("/frobnicate").unwrap_err().contains("unknown"));
    }

    #[test]
    fn multi_line_input() {
        assert!(is_incomplete("first \\"));
        assert!(is_incomplete("\"\"\"\nsome"));
        assert!(!is_incomplete("\"\"\"\nsome\n\"\"\""));
        assert!(!is_incomplete("done"));
        assert_eq!(join_lines("a\\\nb"), "a\nb");
        assert_eq!(join_lines("\"\"\"\nx\ny\n\"\"\""), "x\ny");
    }

    #[test]
    fn attachments_go_before_the_question_once() {
        let mut s = Session::default();
        s.attached.push(("notes.txt".into(), "abc".into()));
        s.push_user("What is in it?");
        assert_eq!(
            s.messages[0].content,
            "File `notes.txt`:\n```\nabc\n```\n\nWhat is in it?"
        );
        s.push_user("again");
        assert_eq!(s.messages[1].content, "again");
    }

    #[test]
    fn pending_calls_are_those_without_results() {
        let mut s = Session::default();
        s.push_user("weather?");
        let call = |id: &str| ToolCall {
            id: id.into(),
            name: "get".into(),
            arguments: "{}".into(),
        };
        s.messages.push(ChatMessage {
            role: Role::Assistant,
            tool_calls: vec![call("a"), call("b")],
            ..Default::default()
        });
        assert_eq!(s.pending_calls().len(), 2);
        s.messages
            .push(ChatMessage::tool_result("a", None, "sunny"));
        assert_eq!(s.pending_calls(), vec![call("b")]);
        s.push_user("never mind");
        assert!(s.pending_calls().is_empty());
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = std::env::temp_dir().join(format!("hearth-chat-test-{}", std::process::id()));
        let path = session_path(&dir, "t");
        let mut s = Session {
            system: Some("Be brief.".into()),
            ..Default::default()
        };
        s.push_user("hi");
        s.messages.push(ChatMessage {
            role: Role::Assistant,
            content: "hello".into(),
            reasoning: Some("greet".into()),
            ..Default::default()
        });
        save(&path, &s, "m.gguf").unwrap();
        let (back, model) = load(&path).unwrap();
        assert_eq!(model, "m.gguf");
        assert_eq!(back.system, s.system);
        assert_eq!(back.messages, s.messages);
        std::fs::write(&path, b"{}").unwrap();
        assert!(load(&path)
            .unwrap_err()
            .contains("not a saved conversation"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
