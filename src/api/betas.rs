//! What the Messages route does with Anthropic's beta features: the
//! `anthropic-beta` header, `thinking.display`, `context_management` and
//! deferred tools. Claude Code sends all of them on every request; README's
//! "Claude Code's betas and fields" table lists each and what hearth does.

use axum::http::HeaderMap;
use serde_json::Value;

use super::error::ApiError;

/// Under this beta a thinking budget may exceed `max_tokens`: the budget
/// then spans every thinking block of the turn, and the reply still stops
/// at `max_tokens`.
pub const INTERLEAVED_THINKING: &str = "interleaved-thinking-2025-05-14";

/// The betas a request turned on (`anthropic-beta`, comma-separated, any
/// number of headers). Unknown betas are accepted: each only unlocks
/// fields, and every field is checked on its own.
#[derive(Debug, Default, Clone)]
pub struct Betas(Vec<String>);

impl Betas {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let names = headers
            .get_all("anthropic-beta")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        Betas(names)
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|b| b == name)
    }
}

/// `thinking.display`: `summarized` (the default: thinking text is sent)
/// or `omitted` (thinking blocks carry an empty text; the signature holds
/// the reasoning, so the block sent back in history restores it).
pub fn omit_thinking(display: Option<&str>) -> Result<bool, ApiError> {
    match display {
        None | Some("summarized") => Ok(false),
        Some("omitted") => Ok(true),
        Some(other) => Err(ApiError::invalid(format!(
            "thinking.display: Input should be 'summarized' or 'omitted', got '{other}'"
        ))),
    }
}

/// The edit types of `context_management.edits` the real API knows.
const EDIT_TYPES: [&str; 2] = ["clear_tool_uses_20250919", "clear_thinking_20251015"];

/// Check `context_management`. hearth applies no edit: clearing old tool
/// results or thinking would change the prompt's prefix and so throw away
/// the KV cache the next turn reuses (the real API's own docs warn that
/// clearing invalidates its prompt cache). The reply says so with an empty
/// `applied_edits`. Returns whether the field was sent.
pub fn check_context_management(value: Option<&Value>) -> Result<bool, ApiError> {
    let obj = match value {
        None | Some(Value::Null) => return Ok(false),
        Some(Value::Object(o)) => o,
        Some(_) => {
            return Err(ApiError::invalid(
                "context_management: Input should be a valid dictionary",
            ))
        }
    };
    match obj.get("edits") {
        None | Some(Value::Null) => {}
        Some(Value::Array(edits)) => {
            for (i, e) in edits.iter().enumerate() {
                match e.get("type").and_then(Value::as_str) {
                    Some(t) if EDIT_TYPES.contains(&t) => {}
                    Some(t) => {
                        return Err(ApiError::invalid(format!(
                            "context_management.edits.{i}.type: Input should be '{}' or '{}', got '{t}'",
                            EDIT_TYPES[0], EDIT_TYPES[1]
                        )))
                    }
                    None => {
                        return Err(ApiError::invalid(format!(
                            "context_management.edits.{i}.type: Field required"
                        )))
                    }
                }
            }
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "context_management.edits: Input should be a valid list",
            ))
        }
    }
    Ok(true)
}

/// The `context_management` object of a reply: no edit was applied.
pub fn context_management_reply() -> Value {
    serde_json::json!({ "applied_edits": [] })
}

/// The prefix of a signature that carries its thinking text.
const CARRIES_TEXT: &str = "hearth-text-";

/// A thinking block's signature. The real API signs thinking so it can be
/// sent back untampered; hearth has nothing to verify. With the text
/// shown, the signature is a digest of it (stable, and obviously not
/// Anthropic's); with the text omitted, it carries the text itself, as the
/// real API's signature carries the full reasoning.
pub fn signature(thinking: &str, omitted: bool) -> String {
    if omitted {
        return format!("{CARRIES_TEXT}{}", hex::encode(thinking.as_bytes()));
    }
    use sha2::{Digest, Sha256};
    format!(
        "hearth-{}",
        hex::encode(Sha256::digest(thinking.as_bytes()))
    )
}

/// The thinking text a signature carries, for a block sent back with its
/// text omitted. `None` for any other signature.
pub fn signed_text(signature: &str) -> Option<String> {
    let hex_text = signature.strip_prefix(CARRIES_TEXT)?;
    String::from_utf8(hex::decode(hex_text).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn betas_are_split_trimmed_and_case_blind() {
        let mut h = HeaderMap::new();
        h.append(
            "anthropic-beta",
            "claude-code-20250219, Interleaved-Thinking-2025-05-14"
                .parse()
                .unwrap(),
        );
        h.append("anthropic-beta", "effort-2025-11-24".parse().unwrap());
        let b = Betas::from_headers(&h);
        assert!(b.has(INTERLEAVED_THINKING));
        assert!(b.has("effort-2025-11-24"));
        assert!(!b.has("context-management-2025-06-27"));
        assert!(!Betas::from_headers(&HeaderMap::new()).has(INTERLEAVED_THINKING));
    }

    #[test]
    fn display_values() {
        assert!(!omit_thinking(None).unwrap());
        assert!(!omit_thinking(Some("summarized")).unwrap());
        assert!(omit_thinking(Some("omitted")).unwrap());
        let e = omit_thinking(Some("full")).unwrap_err();
        assert!(e.message.contains("thinking.display"), "{}", e.message);
    }

    #[test]
    fn context_management_shapes() {
        assert!(!check_context_management(None).unwrap());
        let claude_code = json!({"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]});
        assert!(check_context_management(Some(&claude_code)).unwrap());
        let tools = json!({"edits": [{"type": "clear_tool_uses_20250919", "trigger": {"type": "input_tokens", "value": 30000}}]});
        assert!(check_context_management(Some(&tools)).unwrap());
        for bad in [
            json!("x"),
            json!({"edits": {}}),
            json!({"edits": [{"type": "summarize"}]}),
            json!({"edits": [{}]}),
        ] {
            let e = check_context_management(Some(&bad)).unwrap_err();
            assert!(e.message.starts_with("context_management"), "{}", e.message);
        }
    }

    #[test]
    fn an_omitted_signature_carries_its_text() {
        let text = "Let me think: ünïcode and \"quotes\"\n";
        let sig = signature(text, true);
        assert_eq!(signed_text(&sig).as_deref(), Some(text));
        let digest = signature(text, false);
        assert!(digest.starts_with("hearth-") && signed_text(&digest).is_none());
        assert_eq!(signed_text("hearth-text-zz"), None);
        assert_eq!(signed_text("EqQBCkgIARABGAIiQL"), None);
    }
}
